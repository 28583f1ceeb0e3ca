"""Data parallelism over the processes ``torchrun`` starts, in a few collectives.

    torchrun --standalone --nproc_per_node=2 hw2_protonet_maml/maml.py ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process it starts;
:func:`init_from_env` reads them and joins the process group (gloo on CPU, NCCL on CUDA with rank
r on ``cuda:LOCAL_RANK``). Without them (a plain ``python script.py``) it does nothing, and every
helper here is then the identity: the single-process path runs exactly the code it ran before.

Why not ``DistributedDataParallel``: MAML's inner loop is functional (``torch.func.grad`` over a
dict of tensors taken from the module's parameters), and DDP's autograd hooks on module parameters
do not mix with it (learn2learn issue #170). Averaging the gradients with one all-reduce after
``backward()`` (:func:`average_gradients`) is exact and short.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from common.checkpoint import non_finite_tensors
from common.errors import CS330Error

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ``world_size`` processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes (run folder, logs, checkpoints) and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (1 without ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> World:
    """Join the process group ``torchrun`` describes in the environment; a no-op for one process.

    ``device`` is the one the flags resolved; under ``torchrun`` a CUDA device becomes
    ``cuda:LOCAL_RANK`` (one GPU per process) and the backend NCCL, otherwise gloo on the CPU.
    """
    world_size = env_world_size()
    if world_size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CS330Error(f"process {local_rank} of this machine needs its own GPU, but only "
                             f"{torch.cuda.device_count()} are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise CS330Error(f"--device {device.type} cannot be shared by {world_size} processes; use cpu or cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, device)


def destroy(world: World) -> None:
    """Leave the process group at the end of a run that every rank finished.

    The barrier first, so the ranks leave together: a rank that leaves right after its last
    collective while rank 0 still writes the results can abort at exit, and torchrun then reports
    the run as failed (README, "Scaling out").
    """
    if world.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- training
def check_batch_split(batch_size: int, world: World) -> None:
    """Each process trains on an equal share of every meta-batch: refuse a split that is not even
    (rank 0 says why, the others exit with the same status)."""
    if batch_size % world.world_size:
        if not world.is_main:
            leave_after_main(2)
        n = world.world_size
        fits = ", ".join(str(k) for k in range(1, batch_size + 1) if batch_size % k == 0)
        raise CS330Error(f"--batch_size {batch_size} is not divisible by the {n} processes; every process trains on "
                         f"an equal share of each meta-batch, so choose a multiple of {n} (e.g. --batch_size "
                         f"{-(-batch_size // n) * n}) or run {fits} processes")


def leave_after_main(status: int) -> NoReturn:
    """Exit a rank other than 0 with ``status`` when rank 0 stops on the same error, but only after
    rank 0 has gone: torchrun stops every process as soon as one exits, and a rank leaving first
    would cut rank 0 off before it prints the error. Rank 0 never joins this barrier, which fails
    once rank 0's connections close (or torchrun stops this process first)."""
    try:
        dist.barrier()
    except Exception:
        pass
    raise SystemExit(status)


def shard(start: int, stop: int, world: World) -> slice:
    """This rank's equal, contiguous share of ``range(start, stop)`` (the length must divide evenly):
    rank r of N takes ``[start + r*L/N, start + (r+1)*L/N)``, so the shares in rank order are the range."""
    length = stop - start
    if length % world.world_size:
        raise ValueError(f"{length} items cannot be split evenly over {world.world_size} processes")
    size = length // world.world_size
    return slice(start + world.rank * size, start + (world.rank + 1) * size)


def average_gradients(params: Iterable[nn.Parameter], world: World) -> None:
    """Replace every ``.grad`` by its mean over the ranks (call after ``backward()``).

    With equal shards, the mean of the ranks' mean-over-tasks gradients is the gradient of the mean
    over all tasks, i.e. the single-process gradient. Every rank runs the same model code, so every
    rank has gradients for the same parameters; they travel as one flat buffer (one collective).
    """
    if not world.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.world_size
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def mean_over_ranks(values: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """Scalars averaged over the ranks (each rank's value is a mean over an equal share of tasks,
    so this is the mean over all tasks), as Python floats, identical on every rank."""
    if not world.enabled:
        return {k: v.item() for k, v in values.items()}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])  # [num_values]
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values, (stacked / world.world_size).tolist()))


# ---------------------------------------------------------------------------- objects
def gather_lists(items: list[T], world: World) -> list[T]:
    """Every rank's ``items`` concatenated in rank order, on every rank (``all_gather_object``: small
    Python objects such as per-task metric lists; tensors in them should be on the CPU)."""
    if not world.enabled:
        return items
    gathered: list[list[T] | None] = [None] * world.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def run_on_main(fn: Callable[[], T], world: World, share: bool = False) -> T | None:
    """Run ``fn`` on rank 0 alone (opening the run folder, reading a checkpoint); every rank learns
    whether it failed, so none is left waiting in a collective.

    Returns ``fn()`` on rank 0; on the others the same value sent by ``broadcast_object_list`` when
    ``share`` (tensors should be on the CPU), else None. When ``fn`` raises on rank 0, rank 0
    re-raises (``cli_main`` prints the one error line) and the other ranks exit quietly after it with
    the same status: exit 2 for a :class:`CS330Error`, 1 for anything else.
    """
    if not world.enabled:
        return fn()
    result, failure, status = None, None, 0
    if world.is_main:
        try:
            result = fn()
        except Exception as err:
            failure, status = err, 2 if isinstance(err, CS330Error) else 1
    message = [status, result if share and not status else None]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0]:
        leave_after_main(message[0])
    return result if world.is_main else message[1]


# ---------------------------------------------------------------------------- ranks other than 0
class QuietLogger:
    """The logger of ranks other than 0: rank 0 alone logs, shows the progress bar and writes results."""

    def log(self, *args: object, **kwargs: object) -> None:
        pass

    advance = write = finish = close = log

    def __enter__(self) -> QuietLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FollowerRun:
    """What ranks other than 0 hold instead of the :class:`RunFolder`: the same stops, no writes.

    Every rank has the same (all-reduced) loss and the same weights, so each sees a NaN loss or
    non-finite weights at the same step as rank 0; rank 0 prints the error and the others exit with
    the same status, quietly.
    """

    def check_loss(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            leave_after_main(2)

    def save(self, step: int, state: dict, keep_last: int | None = None) -> None:
        if non_finite_tensors(state["model"]):
            leave_after_main(2)

    def resume_state(self, map_location: str | torch.device = "cpu", model: nn.Module | None = None) -> None:
        return None  # rank 0 reads the checkpoint and sends it

    def logger(self, *args: object, **kwargs: object) -> QuietLogger:
        return QuietLogger()

    def __enter__(self) -> FollowerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# ---------------------------------------------------------------------------- batch norm
def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers that keep running statistics (which split tasks update separately)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        if layer.momentum is None:
            raise CS330Error("batch norm with momentum=None (a cumulative average) is not supported by "
                             "several processes; give it a momentum")
    return layers


def bn_snapshot(layers: list[nn.modules.batchnorm._BatchNorm]) -> list[tuple[torch.Tensor, ...]]:
    """Copies of each layer's ``(running_mean, running_var, num_batches_tracked)``."""
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]


def bn_update_since(layers: list[nn.modules.batchnorm._BatchNorm], before: list[tuple[torch.Tensor, ...]],
                    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """What the forwards since ``before`` added to each layer's statistics, on the CPU.

    A forward in training mode updates ``r <- (1 - m) r + m s`` with ``s`` the batch statistic, which
    depends on the data and weights only, never on ``r``. So k forwards map ``r0`` to
    ``(1 - m)^k r0 + c``, and ``(c_mean, c_var, k)`` is what those forwards did, wherever they ran.
    """
    update = []
    for m, (mean0, var0, count0) in zip(layers, before):
        k = int(m.num_batches_tracked - count0)
        decay = (1.0 - m.momentum) ** k
        update.append(((m.running_mean - decay * mean0).cpu(), (m.running_var - decay * var0).cpu(), k))
    return update


def bn_replay(layers: list[nn.modules.batchnorm._BatchNorm], before: list[tuple[torch.Tensor, ...]],
              updates: list[list[tuple[torch.Tensor, torch.Tensor, int]]]) -> None:
    """Set each layer's statistics to ``before`` followed by ``updates`` in order: the statistics one
    process would hold after running every rank's forwards in that order."""
    for i, (m, (mean, var, count)) in enumerate(zip(layers, before)):
        for update in updates:
            c_mean, c_var, k = update[i]
            decay = (1.0 - m.momentum) ** k
            mean, var, count = decay * mean + c_mean.to(mean.device), decay * var + c_var.to(var.device), count + k
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def bn_sync(layers: list[nn.modules.batchnorm._BatchNorm], before: list[tuple[torch.Tensor, ...]],
            world: World) -> None:
    """After each rank ran its contiguous share of the tasks: every rank's statistics become those one
    process would hold after all the tasks in order (rank order is task order)."""
    if layers and world.enabled:
        bn_replay(layers, before, gather_lists([bn_update_since(layers, before)], world))
