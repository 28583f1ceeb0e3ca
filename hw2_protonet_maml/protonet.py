"""Prototypical networks (Snell et al. 2017) on Omniglot, in one file: the embedding network,
``proto_logits``, the ProtoNet module, its flags and ``main()``.

    python hw2_protonet_maml/protonet.py --num_way 5 --num_support 1
    python hw2_protonet_maml/protonet.py --num_way 5 --num_support 1 --test   # evaluate the latest checkpoint
    tensorboard --logdir runs
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import learning_rate, positive_int
from common.device import resolve_device, resolve_precision, setup_compute
from common.errors import cli_main
from common.omniglot import Episodes
from common.seeding import seed_everything
from hw2_protonet_maml import flags
from hw2_protonet_maml.flags import (
    TrainSettings,
    add_episode_args,
    add_schedule_args,
    parse_hw2_args,
    schedule_run_params,
)
from hw2_protonet_maml.training import MetaTrainer, accuracy


def proto_logits(support_emb: torch.Tensor, support_labels: torch.Tensor, query_emb: torch.Tensor,
                 num_way: int) -> torch.Tensor:
    """Negative squared Euclidean distances from each query to each class prototype.

    Shapes: support ``[B, N*K, D]``, labels ``[B, N*K]``, query ``[B, M, D]`` -> logits ``[B, M, N]``.
    The prototype of class n is the mean of its support embeddings (computed with a one-hot
    matrix product, so support sets need not be sorted by class).
    """
    one_hot = F.one_hot(support_labels, num_way).to(support_emb.dtype)  # [B, N*K, N]
    prototypes = one_hot.transpose(1, 2) @ support_emb / one_hot.sum(1).unsqueeze(-1)  # [B, N, D]
    return -torch.cdist(query_emb, prototypes).pow(2)


class ProtoNetEmbedding(nn.Module):
    """Four conv(3x3, 64) -> batch norm -> ReLU -> max-pool(2) blocks: a 28x28 image becomes a 64-d
    vector (28 -> 14 -> 7 -> 3 -> 1).

    The ReLU runs after the pooling: ReLU and max-pooling commute (both are monotone), so the values
    and gradients are the same, and the ReLU touches a quarter of the activations.
    """

    def __init__(self, in_channels: int = 1, hidden_channels: int = 64, num_layers: int = 4) -> None:
        super().__init__()
        blocks = []
        for i in range(num_layers):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden_channels, hidden_channels, 3, padding=1),
                nn.BatchNorm2d(hidden_channels),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
        self.layers = nn.Sequential(*blocks, nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, 1, S, S]`` -> ``[M, D]``."""
        return self.layers(images)


class ProtoNet(nn.Module):
    """The meta-learner (see ``training.MetaLearner``): embed support and query images, classify each
    query by its distance to the class means of the support embeddings.

    ``eval_bn``: ``"batch"`` normalizes with the statistics of the images at hand (transductive,
    as the course code did, because it never switched the network to eval mode); ``"running"``
    uses the running statistics gathered during training (inductive: one query image's
    prediction does not depend on the others).
    """

    per_task_eval = False  # every forward embeds one task at a time

    def __init__(self, hidden_channels: int = 64, eval_bn: str = "batch") -> None:
        super().__init__()
        self.embedding = ProtoNetEmbedding(hidden_channels=hidden_channels)
        self.eval_bn = eval_bn

    def embed_tasks(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support ``[B, N*K, 1, S, S]`` and query ``[B, N*Q, 1, S, S]`` -> embeddings ``[B, N*K, D]``,
        ``[B, N*Q, D]`` in fp32 (distances in fp32 even under bf16 autocast).

        One task per forward, as the course code does: batch-norm statistics are each task's own, so
        tasks never interact (a meta-batch's loss is the mean of its tasks' losses, which is what lets
        data-parallel ranks split the tasks), and one task's activations stay in cache, which
        measured faster than one pass over the whole meta-batch (bench.py).
        """
        num_support = support.shape[1]
        emb = torch.stack([self.embedding(torch.cat([s, q])) for s, q in zip(support, query)]).float()
        return emb[:, :num_support], emb[:, num_support:]

    def forward(self, episodes: Episodes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Query loss and per-task metrics (``[B]`` tensors) of a meta-batch."""
        support, support_labels, query, query_labels = episodes
        num_way = int(support_labels.max()) + 1
        self.embedding.train(self.training or self.eval_bn == "batch")
        support_emb, query_emb = self.embed_tasks(support, query)  # [B, N*K, D], [B, N*Q, D]
        logits = proto_logits(support_emb, support_labels, query_emb, num_way)  # [B, N*Q, N]
        loss = F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())
        with torch.no_grad():
            support_acc = accuracy(proto_logits(support_emb, support_labels, support_emb, num_way), support_labels)
            query_acc = accuracy(logits, query_labels)
        return loss, {"loss": loss.detach(), "support_acc": support_acc, "query_acc": query_acc}


# ---------------------------------------------------------------------------- script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_args(parser, num_support=5, num_train_iterations=5000)
    model = parser.add_argument_group("protonet")
    model.add_argument("--learning_rate", type=learning_rate, default=1e-3, help="Adam learning rate (default: 1e-3)")
    model.add_argument("--train_num_way", type=positive_int, default=None,
                       help="N of training and validation tasks, e.g. 20 or 60 for the ProtoNet paper's "
                            "higher-way training (default: --num_way)")
    model.add_argument("--eval_bn", choices=("batch", "running"), default="batch",
                       help="batch-norm statistics at evaluation: 'batch' = statistics of each test task's "
                            "images (transductive, as the course code), 'running' = training running averages "
                            "(default: batch)")
    add_schedule_args(model)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_hw2_args(build_parser(), argv)


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    """The run's folder, named by every hyper-parameter; ``precision``: the resolved ``--precision``
    (resolved here, quietly, when not given)."""
    precision = precision or resolve_precision(args.precision, resolve_device(args.device))[0]
    return flags.run_folder(args, "protonet", {
        "proto": args.protocol, "way": args.train_num_way or args.num_way, "shot": args.num_support,
        "query": args.num_query, "batch": args.batch_size, "lr": args.learning_rate, "bn": args.eval_bn,
        **schedule_run_params(args), "prec": precision, "seed": args.seed})


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads)
    settings = TrainSettings.from_args(args, device, precision, run_folder(args, precision),
                                       train_num_way=args.train_num_way or args.num_way)
    seed_everything(args.seed)  # before the model is built: its initial weights depend on the seed
    model = ProtoNet(eval_bn=args.eval_bn)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    trainer = MetaTrainer(model, optimizer, settings, hparams={**vars(args), "precision": precision})
    trainer.run(test_only=args.test, checkpoint_step=args.checkpoint_step)


if __name__ == "__main__":
    main()
