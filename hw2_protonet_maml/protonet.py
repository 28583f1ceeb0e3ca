"""Prototypical networks on Omniglot.

    python hw2_protonet_maml/protonet.py --num_way 5 --num_support 1
    python hw2_protonet_maml/protonet.py --num_way 5 --num_support 1 --test   # evaluate the latest checkpoint
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse

import torch

from common.errors import cli_main
from common.seeding import seed_everything
from hw2_protonet_maml.algorithms import ProtoNet
from hw2_protonet_maml.training import MetaTrainer, add_episode_args, check_episode_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_args(parser, num_support=5, num_train_iterations=5000)
    model = parser.add_argument_group("protonet")
    model.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    model.add_argument("--train_num_way", type=int, default=None,
                       help="N at training, e.g. 20 or 60 for the ProtoNet paper's higher-way training "
                            "(default: --num_way)")
    model.add_argument("--eval_bn", choices=("batch", "running"), default="batch",
                       help="batch-norm statistics at evaluation: 'batch' = statistics of each test task's "
                            "images (transductive, as the course code), 'running' = training running averages "
                            "(default: batch)")
    args = parser.parse_args(argv)
    check_episode_args(parser, args)
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    args.train_num_way = args.train_num_way or args.num_way
    if args.train_num_way <= 0:
        parser.error("--train_num_way must be positive")
    return args


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seed_everything(args.seed)  # before the model is built: its initial weights depend on the seed
    # Training (and validation) tasks may use more classes than test tasks (higher-way training);
    # --test_num_way already defaults to the --num_way given on the command line.
    args.num_way = args.train_num_way
    model = ProtoNet(eval_bn=args.eval_bn)
    MetaTrainer(
        args, model, "protonet",
        {"way": args.train_num_way, "shot": args.num_support, "query": args.num_query, "batch": args.batch_size,
         "lr": args.learning_rate, "bn": args.eval_bn, "bf16": int(args.bf16)},
        lambda m: torch.optim.Adam(m.parameters(), lr=args.learning_rate),
    ).run()


if __name__ == "__main__":
    main()
