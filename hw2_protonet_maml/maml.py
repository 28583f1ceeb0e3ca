"""MAML on Omniglot (second order by default), with optional learned per-parameter inner rates.

    python hw2_protonet_maml/maml.py --num_way 5 --num_support 1 --inner_lr 0.4 --num_inner_steps 1
    python hw2_protonet_maml/maml.py --learn_inner_lrs                  # learned inner rates, started at 0.4
    python hw2_protonet_maml/maml.py --test --test_num_support 4        # meta-test with more support data
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse

import torch

from common.cli import positive_int
from common.errors import cli_main
from common.seeding import seed_everything
from hw2_protonet_maml.algorithms import MAML
from hw2_protonet_maml.training import MetaTrainer, add_episode_args, check_episode_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_args(parser, num_support=1, num_train_iterations=15000)
    model = parser.add_argument_group("maml")
    model.add_argument("--num_inner_steps", type=positive_int, default=1, help="inner gradient steps (default: 1)")
    model.add_argument("--inner_lr", type=float, default=0.4, help="inner learning rate (default: 0.4)")
    model.add_argument("--learn_inner_lrs", action="store_true",
                       help="learn one inner rate per parameter tensor with the outer optimizer")
    model.add_argument("--outer_lr", type=float, default=1e-3, help="Adam meta learning rate (default: 1e-3)")
    model.add_argument("--first_order", action="store_true",
                       help="first-order MAML: do not differentiate through the inner gradients")
    model.add_argument("--eval_num_inner_steps", type=positive_int, default=None,
                       help="inner steps at validation/test (default: --num_inner_steps)")
    model.add_argument("--num_filters", type=positive_int, default=64, help="conv channels (default: 64)")
    model.add_argument("--conv_stride", type=int, choices=(1, 2), default=1,
                       help="1 = the course network (full 28x28 resolution in every layer); 2 = the strided "
                            "network of the MAML paper, about 4x cheaper (default: 1)")
    model.add_argument("--vmap_tasks", action="store_true",
                       help="vmap the per-task computation over the meta-batch instead of looping over tasks "
                            "(measured 2x slower on a 2-core CPU; may pay off on a GPU)")
    model.add_argument("--compile_query", action="store_true",
                       help="torch.compile the query pass (same maths, ~1.1x faster per iteration on a 2-core "
                            "CPU after a ~20 s compile; not with --vmap_tasks). With --bf16 only the query pass "
                            "runs in bf16, the inner loop stays fp32")
    args = parser.parse_args(argv)
    check_episode_args(parser, args)
    for flag in ("inner_lr", "outer_lr"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.test_num_way != args.num_way:
        parser.error(f"--test_num_way {args.test_num_way} differs from --num_way {args.num_way}: the MAML "
                     "network's output layer has exactly --num_way classes")
    if args.compile_query and args.vmap_tasks:
        parser.error("--compile_query compiles the per-task loop's query pass; drop it or --vmap_tasks")
    args.eval_num_inner_steps = args.eval_num_inner_steps or args.num_inner_steps
    return args


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seed_everything(args.seed)  # before the model is built: its initial weights depend on the seed
    model = MAML(args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs, args.first_order,
                 args.num_filters, args.conv_stride, seed=args.seed, vmap_tasks=args.vmap_tasks,
                 compile_query=args.compile_query)
    model.eval_num_inner_steps = args.eval_num_inner_steps
    run_params = {"way": args.num_way, "shot": args.num_support, "query": args.num_query,
                  "batch": args.batch_size, "steps": args.num_inner_steps, "ilr": args.inner_lr,
                  "learnilr": int(args.learn_inner_lrs), "olr": args.outer_lr, "fo": int(args.first_order),
                  "filt": args.num_filters, "stride": args.conv_stride, "bf16": int(args.bf16)}
    MetaTrainer(args, model, "maml", run_params, lambda m: torch.optim.Adam(m.parameters(), lr=args.outer_lr)).run()


if __name__ == "__main__":
    main()
