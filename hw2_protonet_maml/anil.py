"""ANIL (Raghu et al. 2020, "Rapid learning or feature reuse?") on Omniglot, in one file: MAML whose
inner loop adapts only the linear head; the convolutional body is meta-learned by the outer loop
alone. The meta-loss written plainly, the fast module (same meta-gradient), flags and ``main()``.
It takes maml.py's flags (less --vmap_tasks and --compile_query).

    python hw2_protonet_maml/anil.py --num_way 5 --num_support 1 --inner_lr 0.4 --num_inner_steps 1
    python hw2_protonet_maml/anil.py --conv_stride 2 --num_inner_steps 5 --inner_lr 0.04
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from common.device import resolve_device, resolve_precision, setup_compute
from common.errors import cli_main
from common.omniglot import Episodes
from common.seeding import seed_everything
from hw2_protonet_maml import flags
from hw2_protonet_maml.flags import (
    TrainSettings,
    add_episode_args,
    add_inner_loop_args,
    check_inner_loop_args,
    inner_loop_run_params,
    parse_hw2_args,
)
from hw2_protonet_maml.networks import ConvNet
from hw2_protonet_maml.training import MetaTrainer, accuracy


# ---------------------------------------------------------------------------- the meta-loss, plainly
def reference_anil_loss(net: ConvNet, episodes: Episodes, inner_lr: float | dict[str, torch.Tensor],
                        num_inner_steps: int = 1, first_order: bool = False) -> torch.Tensor:
    """For each task: features of its support and query images (``net.features``: the body is not
    adapted), a few gradient steps of ``net.head`` on the support features, the query loss of the
    adapted head."""
    support, support_labels, query, query_labels = episodes  # [B, N*K, 1, S, S], [B, N*K], [B, N*Q, ...]
    start = dict(net.head.named_parameters())
    lrs = inner_lr if isinstance(inner_lr, dict) else dict.fromkeys(start, inner_lr)
    total = 0.0
    for b in range(support.shape[0]):
        support_features = net.features(support[b])  # [N*K, C]: batch norm over this task's support set
        query_features = net.features(query[b])  # [N*Q, C]
        head = dict(start)
        for _ in range(num_inner_steps):
            inner_loss = F.cross_entropy(functional_call(net.head, head, (support_features,)), support_labels[b])
            grads = torch.autograd.grad(inner_loss, list(head.values()), create_graph=not first_order)
            head = {k: head[k] - lrs[k] * g for k, g in zip(head, grads)}
        total = total + F.cross_entropy(functional_call(net.head, head, (query_features,)), query_labels[b])
    return total / support.shape[0]


# ---------------------------------------------------------------------------- the fast module
class ANIL(nn.Module):
    """ANIL as a meta-learner (see ``training.MetaLearner``): the loss of :func:`reference_anil_loss`.

    ``net`` is MAML's network (``networks.ConvNet``, or any module with ``features(images)`` and a
    ``head`` module): the body is ``net.features`` (the network minus its head), the head adapts::

        anil = ANIL(ConvNet(num_way=5), inner_lr=0.4, num_inner_steps=1)

    Cheaper than MAML by construction: the body runs once per image whatever the number of inner
    steps, and the inner loop differentiates only through the head (``torch.func.grad``, vmapped over
    tasks: a [N*K, C] x [C, N] product each). The body runs one task at a time: batch-norm statistics
    are per task (as MAML's); one pass over the whole meta-batch with per-task statistics measured
    slower (hw2 README, "Grid sizes").
    """

    per_task_eval = False  # batch-norm statistics are per task already

    def __init__(self, net: ConvNet, *, inner_lr: float = 0.4, num_inner_steps: int = 1,
                 learn_inner_lrs: bool = False, first_order: bool = False,
                 eval_num_inner_steps: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.inner_lrs = nn.ParameterDict({k: nn.Parameter(torch.tensor(inner_lr), requires_grad=learn_inner_lrs)
                                           for k, _ in net.head.named_parameters()})
        self.num_inner_steps = num_inner_steps
        self.eval_num_inner_steps = eval_num_inner_steps or num_inner_steps
        self.first_order = first_order

    def adapt_head(self, head: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor,
                   num_steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One task's inner loop on its support features ``[N*K, C]``; returns the adapted head and
        the support accuracy before each step and after the last, ``[num_steps + 1]``."""
        def support_loss(h):
            logits = functional_call(self.net.head, h, (features,))
            return F.cross_entropy(logits, labels), logits

        accuracies = []
        for _ in range(num_steps):
            grads, logits = grad(support_loss, has_aux=True)(head)
            accuracies.append(accuracy(logits, labels))
            if self.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            head = {k: h - self.inner_lrs[k] * grads[k] for k, h in head.items()}
        accuracies.append(accuracy(functional_call(self.net.head, head, (features,)), labels).detach())
        return head, torch.stack(accuracies)

    def task_loss(self, head: dict[str, torch.Tensor], support_features: torch.Tensor, support_labels: torch.Tensor,
                  query_features: torch.Tensor, query_labels: torch.Tensor, num_steps: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        adapted, support_accs = self.adapt_head(head, support_features, support_labels, num_steps)
        logits = functional_call(self.net.head, adapted, (query_features,)).float()
        return F.cross_entropy(logits, query_labels), support_accs, accuracy(logits, query_labels)

    def forward(self, episodes: Episodes, num_inner_steps: int | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if num_inner_steps is None:
            num_inner_steps = self.num_inner_steps if self.training else self.eval_num_inner_steps
        support, support_labels, query, query_labels = episodes
        head = dict(self.net.head.named_parameters())
        dtype = head["weight"].dtype  # the head adapts in its own precision (fp32), even under autocast
        support_features = torch.stack([self.net.features(task) for task in support]).to(dtype)  # [B, N*K, C]
        query_features = torch.stack([self.net.features(task) for task in query]).to(dtype)  # [B, N*Q, C]
        with torch.autocast(query.device.type, enabled=False):
            task_losses, support_accs, query_accs = vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0, None))(
                head, support_features, support_labels, query_features, query_labels, num_inner_steps)
        loss = task_losses.mean()
        support_accs = support_accs.detach()  # [B, steps + 1]
        return loss, {"loss": loss.detach(), "support_acc_pre": support_accs[:, 0],
                      "support_acc_post": support_accs[:, -1], "query_acc": query_accs.detach()}


# ---------------------------------------------------------------------------- script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_args(parser, num_support=1, num_train_iterations=15000)
    add_inner_loop_args(parser, "anil")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_hw2_args(parser, argv)
    check_inner_loop_args(parser, args)
    return args


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    """The run's folder, named by every hyper-parameter; ``precision``: the resolved ``--precision``
    (resolved here, quietly, when not given)."""
    precision = precision or resolve_precision(args.precision, resolve_device(args.device))[0]
    return flags.run_folder(args, "anil", inner_loop_run_params(args, precision))


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads)
    settings = TrainSettings.from_args(args, device, precision, run_folder(args, precision))
    seed_everything(args.seed)
    net = ConvNet(args.num_way, args.num_filters, args.conv_stride, seed=args.seed)
    model = ANIL(net, inner_lr=args.inner_lr, num_inner_steps=args.num_inner_steps,
                 learn_inner_lrs=args.learn_inner_lrs, first_order=args.first_order,
                 eval_num_inner_steps=args.eval_num_inner_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    trainer = MetaTrainer(model, optimizer, settings, hparams={**vars(args), "precision": precision})
    trainer.run(test_only=args.test, checkpoint_step=args.checkpoint_step)


if __name__ == "__main__":
    main()
