"""MAML (Finn et al. 2017) on Omniglot, in one file: the meta-loss written plainly, the fast MAML
module over any network (same meta-gradient), its flags and ``main()``. The course's network is
``networks.ConvNet``.

    python hw2_protonet_maml/maml.py --num_way 5 --num_support 1 --inner_lr 0.4 --num_inner_steps 1
    python hw2_protonet_maml/maml.py --learn_inner_lrs                  # learned inner rates, started at 0.4
    python hw2_protonet_maml/maml.py --test --test_num_support 4        # meta-test with more support data
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
from torch.func import functional_call, grad, vmap

from common.device import cpu_capability, resolve_device, resolve_precision, setup_compute
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
def reference_maml_loss(net: nn.Module, params: dict[str, torch.Tensor], episodes: Episodes,
                        inner_lrs: dict[str, torch.Tensor] | float, num_inner_steps: int = 1,
                        first_order: bool = False) -> torch.Tensor:
    """MAML's meta-loss as the paper writes it, for any network ``net`` run with the meta-parameters
    ``params`` (``dict(net.named_parameters())``): for each task, a few gradient steps on its support
    set (keeping the graph, so ``backward()`` differentiates through them: second order), then the
    loss of the adapted weights on its query set; averaged over tasks. :class:`MAML` computes the
    same value faster; the tests check the two meta-gradients agree."""
    lrs = inner_lrs if isinstance(inner_lrs, dict) else dict.fromkeys(params, inner_lrs)
    support, support_labels, query, query_labels = episodes  # [B, N*K, 1, S, S], [B, N*K], [B, N*Q, ...]
    total = 0.0
    for b in range(support.shape[0]):
        adapted = dict(params)
        for _ in range(num_inner_steps):
            inner_loss = F.cross_entropy(functional_call(net, adapted, (support[b],)), support_labels[b])
            grads = torch.autograd.grad(inner_loss, list(adapted.values()), create_graph=not first_order)
            adapted = {k: p - lrs[k] * g for (k, p), g in zip(adapted.items(), grads)}
        total = total + F.cross_entropy(functional_call(net, adapted, (query[b],)), query_labels[b])
    return total / support.shape[0]


# ---------------------------------------------------------------------------- the fast module
class MAML(nn.Module):
    """MAML over any network, as a meta-learner (see ``training.MetaLearner``): the loss of
    :func:`reference_maml_loss`, with the support-set accuracies before and after adaptation as metrics.

    Usage (the network is any ``nn.Module`` mapping images to logits)::

        maml = MAML(ConvNet(num_way=5), inner_lr=0.4, num_inner_steps=1)
        optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
        loss, metrics = maml(episodes)  # a meta-batch: common.omniglot.Episodes, task on dim 0
        optimizer.zero_grad(); loss.backward(); optimizer.step()

    ``learn_inner_lrs``: one learned inner rate per parameter tensor (Meta-SGD-style, per tensor),
    started at ``inner_lr``. ``first_order=True`` detaches the inner gradients (FOMAML).
    ``eval_num_inner_steps``: inner steps in eval mode (default: ``num_inner_steps``).

    Fast without changing the maths (the tests compare meta-gradients with the plain loop):
    - the inner loop is ``torch.func.grad`` over ``functional_call(net, params)``, always in the
      weights' precision, because the second-order term amplifies bf16 rounding there;
    - ``precision="bf16"`` runs the query pass (75 of the 80 images a task sees) with the network's
      convolutions in bf16 on bf16 copies of their weights, on channels-last bf16 images, the layout
      oneDNN's bf16 convolutions need to use AMX; every other parameter (the head) stays in its own
      precision, so the network must bring its features back to it (``ConvNet.features`` does). The
      model sets its own precision: an outer autocast does not reach it;
    - ``compile_query`` runs the query pass (the part needing only a first-order backward) through
      ``torch.compile``, which fuses batch norm + ReLU; it cannot compile the inner loop's double
      backward.
    :class:`TaskVmapMAML` below vmaps the tasks instead of looping over them. Which of these pays
    off on which machine is measured by ``bench.py`` (tables in the README).
    """

    per_task_eval = False  # batch-norm statistics are per task already

    def __init__(self, net: nn.Module, *, inner_lr: float = 0.4, num_inner_steps: int = 1,
                 learn_inner_lrs: bool = False, first_order: bool = False,
                 eval_num_inner_steps: int | None = None, precision: str = "fp32",
                 compile_query: bool = False) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
        self.net = net
        self.param_names = [name for name, _ in net.named_parameters()]
        # One rate per parameter tensor, in the order of param_names; frozen unless learn_inner_lrs.
        self.inner_lrs = nn.ParameterList(
            nn.Parameter(torch.tensor(inner_lr), requires_grad=learn_inner_lrs) for _ in self.param_names)
        self.num_inner_steps = num_inner_steps
        self.eval_num_inner_steps = eval_num_inner_steps or num_inner_steps
        self.first_order = first_order
        self.query_dtype = torch.bfloat16 if precision == "bf16" else None
        convs = [(prefix, m) for prefix, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
        self.conv_param_names = {f"{prefix}.{name}" if prefix else name
                                 for prefix, conv in convs for name, _ in conv.named_parameters(recurse=False)}
        # dynamic=False: a new shape (another K or Q at test) recompiles once.
        self.query_logits = torch.compile(self.plain_query_logits, dynamic=False) if compile_query \
            else self.plain_query_logits

    def meta_params(self) -> dict[str, torch.Tensor]:
        """The network's parameters by name: the starting point of every task's inner loop."""
        return dict(self.net.named_parameters())

    def inner_lr_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.param_names, self.inner_lrs))

    def reference_loss(self, episodes: Episodes, num_inner_steps: int | None = None) -> torch.Tensor:
        """:func:`reference_maml_loss` with this module's network, rates and settings: what
        ``forward``'s loss must equal (the tests and bench.py compare the two)."""
        steps = self.num_inner_steps if num_inner_steps is None else num_inner_steps
        return reference_maml_loss(self.net, self.meta_params(), episodes, self.inner_lr_dict(), steps,
                                   self.first_order)

    def plain_query_logits(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """The network's logits with ``params``, its convolutions in the query pass's precision."""
        if self.query_dtype is not None:
            images = images.to(self.query_dtype, memory_format=torch.channels_last)
            params = {k: p.to(self.query_dtype) if k in self.conv_param_names else p for k, p in params.items()}
        return functional_call(self.net, params, (images,))

    def inner_adapt(self, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    num_steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``num_steps`` gradient steps on one task's support set, in the weights' precision (call it
        outside autocast, as :meth:`task_loss` does).

        Returns the adapted parameters and the support accuracy before each step and after the
        last one, ``[num_steps + 1]``.
        """
        def support_loss(p):
            logits = functional_call(self.net, p, (images,))
            return F.cross_entropy(logits, labels), logits

        lrs = self.inner_lr_dict()
        accuracies = []
        for _ in range(num_steps):
            grads, logits = grad(support_loss, has_aux=True)(params)
            accuracies.append(accuracy(logits, labels))
            if self.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {k: p - lrs[k] * grads[k] for k, p in params.items()}
        with torch.no_grad():  # a metric only, so in the query pass's precision
            accuracies.append(accuracy(self.plain_query_logits(params, images), labels))
        return params, torch.stack(accuracies)

    def task_loss(self, params: dict[str, torch.Tensor], support: torch.Tensor, support_labels: torch.Tensor,
                  query: torch.Tensor, query_labels: torch.Tensor, num_steps: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task: adapt on the support set, score on the query set -> (loss, support accs, query acc)."""
        with torch.autocast(query.device.type, enabled=False):
            adapted, support_accs = self.inner_adapt(params, support, support_labels, num_steps)
            logits = self.query_logits(adapted, query)
            return F.cross_entropy(logits, query_labels), support_accs, accuracy(logits, query_labels)

    def task_losses(self, params: dict[str, torch.Tensor], episodes: Episodes, num_steps: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`task_loss` of every task of the meta-batch, one task after the other -> ``[B]``,
        ``[B, steps + 1]``, ``[B]``."""
        per_task = [self.task_loss(params, *(t[b] for t in episodes), num_steps)
                    for b in range(episodes.support_images.shape[0])]
        return tuple(torch.stack(values) for values in zip(*per_task))

    def forward(self, episodes: Episodes, num_inner_steps: int | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if num_inner_steps is None:
            num_inner_steps = self.num_inner_steps if self.training else self.eval_num_inner_steps
        task_losses, support_accs, query_accs = self.task_losses(self.meta_params(), episodes, num_inner_steps)
        loss = task_losses.mean()
        support_accs = support_accs.detach()  # [B, steps + 1]
        return loss, {"loss": loss.detach(), "support_acc_pre": support_accs[:, 0],
                      "support_acc_post": support_accs[:, -1], "query_acc": query_accs.detach()}


class TaskVmapMAML(MAML):
    """:class:`MAML` with the tasks of a meta-batch vmapped instead of looped over: one batched
    (grouped) convolution for all tasks. Same meta-gradient; slower on a 2-core CPU (bench.py
    ``--vmap``), may pay off on a GPU. Not with ``compile_query``."""

    def __init__(self, net: nn.Module, **kwargs: object) -> None:
        if kwargs.get("compile_query"):
            raise ValueError("compile_query applies to the per-task loop; it cannot be combined with vmap")
        super().__init__(net, **kwargs)

    def task_losses(self, params: dict[str, torch.Tensor], episodes: Episodes, num_steps: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # dim 0 of every episode tensor is the task; the meta-parameters are shared.
        return vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0, None))(params, *episodes, num_steps)


# ---------------------------------------------------------------------------- script
# Where --precision auto means bf16 (the query pass only): the CPU classes where bench.py measured it
# faster, AMX and AVX512+BF16 (README, "Speed at the machine's limit"); the compiled query pass (the
# --compile_query default) only where that measured faster still, AMX.
BF16_WHERE = ("AMX", "BF16")
COMPILE_WHERE = "AMX"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_args(parser, num_support=1, num_train_iterations=15000)
    model = add_inner_loop_args(parser, "maml")
    model.add_argument("--vmap_tasks", action="store_true",
                       help="vmap the per-task computation over the meta-batch instead of looping over tasks "
                            "(slower on a 2-core CPU, see bench.py; may pay off on a GPU)")
    model.add_argument("--compile_query", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the query pass (same maths; a compile of about half a minute first, "
                            "and one more per new task shape; not with --vmap_tasks) (default: on with a bf16 "
                            "query pass on a CPU with AMX, where it was measured faster, off elsewhere)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_hw2_args(parser, argv)
    check_inner_loop_args(parser, args)
    if args.compile_query and args.vmap_tasks:
        parser.error("--compile_query compiles the per-task loop's query pass; drop it or --vmap_tasks")
    return args


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    """The run's folder, named by every hyper-parameter; ``precision``: the resolved ``--precision``
    (resolved here, quietly, when not given)."""
    precision = precision or resolve_precision(args.precision, resolve_device(args.device), bf16_where=BF16_WHERE)[0]
    return flags.run_folder(args, "maml", inner_loop_run_params(args, precision))


def compiles_query(args: argparse.Namespace, device: torch.device, precision: str) -> bool:
    """``--compile_query``, or where it is not given, whether the bf16 query pass runs on a CPU class
    where compiling it measured faster (COMPILE_WHERE)."""
    if args.compile_query is not None:
        return args.compile_query
    return (precision == "bf16" and device.type == "cpu" and not args.vmap_tasks
            and COMPILE_WHERE in cpu_capability().split("+"))


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads, bf16_where=BF16_WHERE)
    compile_query = compiles_query(args, device, precision)
    settings = TrainSettings.from_args(args, device, precision, run_folder(args, precision))
    seed_everything(args.seed)
    net = ConvNet(args.num_way, args.num_filters, args.conv_stride, seed=args.seed)
    model = (TaskVmapMAML if args.vmap_tasks else MAML)(
        net, inner_lr=args.inner_lr, num_inner_steps=args.num_inner_steps, learn_inner_lrs=args.learn_inner_lrs,
        first_order=args.first_order, eval_num_inner_steps=args.eval_num_inner_steps, precision=precision,
        compile_query=compile_query)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    trainer = MetaTrainer(model, optimizer, settings, hparams={**vars(args), "precision": precision})
    trainer.run(test_only=args.test, checkpoint_step=args.checkpoint_step)


if __name__ == "__main__":
    main()
