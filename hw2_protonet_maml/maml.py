"""MAML (Finn et al. 2017) on Omniglot, in one file: the meta-loss written plainly, the functional
network, the fast MAML module (same meta-gradient), its flags and ``main()``.

    python hw2_protonet_maml/maml.py --num_way 5 --num_support 1 --inner_lr 0.4 --num_inner_steps 1
    python hw2_protonet_maml/maml.py --learn_inner_lrs                  # learned inner rates, started at 0.4
    python hw2_protonet_maml/maml.py --test --test_num_support 4        # meta-test with more support data
    tensorboard --logdir runs
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from common.device import resolve_device, resolve_precision, setup_compute
from common.errors import cli_main
from common.omniglot import Episodes
from common.seeding import seed_everything
from hw2_protonet_maml import training
from hw2_protonet_maml.training import (
    MetaTrainer,
    TrainSettings,
    accuracy,
    add_episode_args,
    add_inner_loop_args,
    check_drawings,
    check_inner_loop_args,
    inner_loop_run_params,
)


# ---------------------------------------------------------------------------- the meta-loss, plainly
def reference_maml_loss(maml: MAML, episodes: Episodes, num_inner_steps: int | None = None) -> torch.Tensor:
    """MAML's meta-loss as the paper writes it: for each task, a few gradient steps on its support
    set (keeping the graph, so ``backward()`` differentiates through them: second order), then the
    loss of the adapted weights on its query set; averaged over tasks. :class:`MAML` computes the
    same value faster; the tests check the two meta-gradients agree."""
    steps = maml.num_inner_steps if num_inner_steps is None else num_inner_steps
    names = list(maml.meta_params)
    support, support_labels, query, query_labels = episodes  # [B, N*K, 1, S, S], [B, N*K], [B, N*Q, ...]
    total = 0.0
    for b in range(support.shape[0]):
        params = dict(maml.meta_params)
        for _ in range(steps):
            inner_loss = F.cross_entropy(maml_forward(params, support[b], maml.conv_stride), support_labels[b])
            grads = torch.autograd.grad(inner_loss, [params[k] for k in names], create_graph=not maml.first_order)
            params = {k: params[k] - maml.inner_lrs[k] * g for k, g in zip(names, grads)}
        total = total + F.cross_entropy(maml_forward(params, query[b], maml.conv_stride), query_labels[b])
    return total / support.shape[0]


# ---------------------------------------------------------------------------- the functional network
NUM_CONV_LAYERS = 4


def init_maml_params(num_way: int, in_channels: int = 1, hidden_channels: int = 64,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The course network's meta-parameters: four 3x3 convs and a linear head; Xavier-uniform
    weights, zero biases. A plain dict of tensors, so the inner loop can make adapted copies
    without touching any module state."""
    params: dict[str, torch.Tensor] = {}
    for i in range(NUM_CONV_LAYERS):
        c_in = in_channels if i == 0 else hidden_channels
        params[f"conv{i}"] = _xavier((hidden_channels, c_in, 3, 3), generator)
        params[f"b{i}"] = torch.zeros(hidden_channels)
    params["w_head"] = _xavier((num_way, hidden_channels), generator)
    params["b_head"] = torch.zeros(num_way)
    return params


def _xavier(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def maml_forward(params: dict[str, torch.Tensor], images: torch.Tensor, stride: int = 1,
                 compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[M, 1, S, S]`` -> logits ``[M, N]``: 4 x [conv 3x3, batch norm, ReLU], spatial mean, linear head.

    Batch norm always uses the statistics of the images passed in (no running statistics), as in
    the course and the MAML paper: the support and query sets are normalized separately.
    ``stride=2`` is the paper's strided network, about 4x cheaper than the course's ``stride=1``.

    ``compute_dtype=torch.bfloat16`` is for speed and leaves the function the same up to rounding:
    the body runs in bf16 on bf16 copies of the weights (so gradients still flow back to the float32
    weights), channels-last, the layout oneDNN's bf16 convolutions need to use AMX (in fp32 it
    measured no faster); the spatial mean accumulates in float32 and the head runs in the weights'
    own precision.
    """
    x = images
    if compute_dtype is not None:
        x = x.to(compute_dtype, memory_format=torch.channels_last)
    for i in range(NUM_CONV_LAYERS):
        weight, bias = params[f"conv{i}"], params[f"b{i}"]
        if compute_dtype is not None:
            weight, bias = weight.to(compute_dtype), bias.to(compute_dtype)
        x = F.conv2d(x, weight, bias, stride=stride, padding=1)
        x = F.batch_norm(x, None, None, training=True)
        x = F.relu(x)
    x = x.mean(dim=(2, 3), dtype=params["w_head"].dtype)  # [M, C]
    return F.linear(x, params["w_head"], params["b_head"])


# ---------------------------------------------------------------------------- the fast module
class MAML(nn.Module):
    """MAML as a meta-learner (see ``training.MetaLearner``): the loss of :func:`reference_maml_loss`,
    with the support-set accuracies before and after adaptation as metrics.

    Fast without changing the maths (the tests compare meta-gradients with the plain loop):
    - the inner loop is ``torch.func.grad`` on the functional network, always in float32 (the
      weights' precision), because the second-order term amplifies bf16 rounding there;
    - tasks run in a loop by default; ``vmap_tasks`` vmaps the per-task computation over the meta-batch
      (one grouped convolution for all tasks);
    - ``precision="bf16"`` runs the query pass (75 of the 80 images a task sees) in bf16 on bf16
      copies of the float32 weights, channels-last; the inner loop's gradients and updates stay
      float32. The model
      sets its own precision: an outer autocast does not reach it;
    - ``compile_query`` runs the query pass (the part needing only a first-order backward) through
      ``torch.compile``, which fuses batch norm + ReLU; it cannot compile the inner loop's double
      backward.
    Which of these pays off on which machine is measured by ``bench.py`` (tables in the README).
    ``first_order=True`` detaches the inner gradients (FOMAML). ``learn_inner_lrs``: one learned
    inner rate per parameter tensor (Meta-SGD-style, per tensor).
    """

    per_task_eval = False  # batch-norm statistics are per task already

    def __init__(self, num_way: int, num_inner_steps: int = 1, inner_lr: float = 0.4,
                 learn_inner_lrs: bool = False, first_order: bool = False, hidden_channels: int = 64,
                 conv_stride: int = 1, seed: int = 0, vmap_tasks: bool = False,
                 compile_query: bool = False, eval_num_inner_steps: int | None = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        if compile_query and vmap_tasks:
            raise ValueError("compile_query applies to the per-task loop; it cannot be combined with vmap_tasks")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
        init = init_maml_params(num_way, hidden_channels=hidden_channels,
                                generator=torch.Generator().manual_seed(seed))
        self.meta_params = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})
        # One rate per parameter tensor; frozen at inner_lr unless learn_inner_lrs.
        self.inner_lrs = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(inner_lr), requires_grad=learn_inner_lrs) for k in init})
        self.num_way = num_way
        self.num_inner_steps = num_inner_steps
        self.eval_num_inner_steps = eval_num_inner_steps or num_inner_steps
        self.first_order = first_order
        self.conv_stride = conv_stride
        self.vmap_tasks = vmap_tasks
        self.query_dtype = torch.bfloat16 if precision == "bf16" else None
        # dynamic=False: a new shape (another K or Q at test) recompiles once.
        self.query_forward = torch.compile(maml_forward, dynamic=False) if compile_query else maml_forward

    def inner_adapt(self, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    num_steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``num_steps`` gradient steps on one task's support set, in the weights' precision (call it
        outside autocast, as :meth:`task_loss` does).

        Returns the adapted parameters and the support accuracy before each step and after the
        last one, ``[num_steps + 1]``.
        """
        def support_loss(p):
            logits = maml_forward(p, images, self.conv_stride)
            return F.cross_entropy(logits, labels), logits

        accuracies = []
        for _ in range(num_steps):
            grads, logits = grad(support_loss, has_aux=True)(params)
            accuracies.append(accuracy(logits, labels))
            if self.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {k: p - self.inner_lrs[k] * grads[k] for k, p in params.items()}
        with torch.no_grad():  # a metric only, so in the query pass's precision
            logits = maml_forward(params, images, self.conv_stride, self.query_dtype)
            accuracies.append(accuracy(logits, labels))
        return params, torch.stack(accuracies)

    def task_loss(self, params: dict[str, torch.Tensor], support: torch.Tensor, support_labels: torch.Tensor,
                  query: torch.Tensor, query_labels: torch.Tensor, num_steps: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task: adapt on the support set, score on the query set -> (loss, support accs, query acc)."""
        with torch.autocast(query.device.type, enabled=False):
            adapted, support_accs = self.inner_adapt(params, support, support_labels, num_steps)
            logits = self.query_forward(adapted, query, self.conv_stride, self.query_dtype)
            return F.cross_entropy(logits, query_labels), support_accs, accuracy(logits, query_labels)

    def forward(self, episodes: Episodes, num_inner_steps: int | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if num_inner_steps is None:
            num_inner_steps = self.num_inner_steps if self.training else self.eval_num_inner_steps
        params = dict(self.meta_params)
        if self.vmap_tasks:  # dim 0 of every episode tensor is the task; the meta-parameters are shared
            task_losses, support_accs, query_accs = vmap(
                self.task_loss, in_dims=(None, 0, 0, 0, 0, None))(params, *episodes, num_inner_steps)
        else:
            per_task = [self.task_loss(params, *(t[b] for t in episodes), num_inner_steps)
                        for b in range(episodes.support_images.shape[0])]
            task_losses, support_accs, query_accs = (torch.stack(values) for values in zip(*per_task))
        loss = task_losses.mean()
        support_accs = support_accs.detach()  # [B, steps + 1]
        return loss, {"loss": loss.detach(), "support_acc_pre": support_accs[:, 0],
                      "support_acc_post": support_accs[:, -1], "query_acc": query_accs.detach()}


# ---------------------------------------------------------------------------- script
# Where --precision auto means bf16 (the query pass only): measured faster only on CPUs with AMX (README).
BF16_WHERE = ("AMX",)


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
                            "query pass on the CPU, where it was measured faster, off elsewhere)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_drawings(parser, args)
    check_inner_loop_args(parser, args)
    if args.compile_query and args.vmap_tasks:
        parser.error("--compile_query compiles the per-task loop's query pass; drop it or --vmap_tasks")
    return args


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    """The run's folder, named by every hyper-parameter; ``precision``: the resolved ``--precision``
    (resolved here, quietly, when not given)."""
    precision = precision or resolve_precision(args.precision, resolve_device(args.device), bf16_where=BF16_WHERE)[0]
    return training.run_folder(args, "maml", inner_loop_run_params(args, precision))


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads, bf16_where=BF16_WHERE)
    compile_query = args.compile_query
    if compile_query is None:
        compile_query = precision == "bf16" and device.type == "cpu" and not args.vmap_tasks
    settings = TrainSettings.from_args(args, device, precision, run_folder(args, precision))
    seed_everything(args.seed)
    model = MAML(args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs, args.first_order,
                 args.num_filters, args.conv_stride, seed=args.seed, vmap_tasks=args.vmap_tasks,
                 compile_query=compile_query, eval_num_inner_steps=args.eval_num_inner_steps,
                 precision=precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    trainer = MetaTrainer(model, optimizer, settings, hparams={**vars(args), "precision": precision})
    trainer.run(test_only=args.test, checkpoint_step=args.checkpoint_step)


if __name__ == "__main__":
    main()
