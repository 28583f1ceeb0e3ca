"""Data parallelism over the processes ``torchrun`` starts, in a few collectives.

    torchrun --standalone --nproc_per_node=2 hw2_protonet_maml/maml.py ...

A training script holds one :class:`DataParallel` (at the end of this file): its share of each
batch, the gradient sync, the strided evaluation, rank 0's run folder. ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in each process it starts; :func:`init_from_env` reads them and
joins the process group (gloo on CPU, NCCL on CUDA with rank r on ``cuda:LOCAL_RANK``). Without
them (a plain ``python script.py``) it does nothing, and every method of ``DataParallel`` is then
the identity or the plain call.

Why not ``DistributedDataParallel``: MAML's inner loop is functional (``torch.func.grad`` over a
dict of tensors taken from the module's parameters), and DDP's autograd hooks on module parameters
do not mix with it (learn2learn issue #170). Averaging the gradients with one all-reduce after
``backward()`` (:meth:`DataParallel.sync`) is exact and short.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from common.checkpoint import load_checkpoint, non_finite_tensors
from common.errors import CS330Error

T = TypeVar("T")
R = TypeVar("R")


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
def check_batch_split(batch_size: int, world: World, flag: str = "--batch_size") -> None:
    """Each process trains on an equal share of every (meta-)batch: refuse a split that is not even
    (rank 0 says why, naming ``flag``; the others exit with the same status)."""
    if batch_size % world.world_size:
        if not world.is_main:
            leave_after_main(2)
        n = world.world_size
        fits = ", ".join(str(k) for k in range(1, batch_size + 1) if batch_size % k == 0)
        raise CS330Error(f"{flag} {batch_size} is not divisible by the {n} processes; every process trains on "
                         f"an equal share of each batch, so choose a multiple of {n} (e.g. {flag} "
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


# ---------------------------------------------------------------------------- the one object a script holds
class DataParallel:
    """A training script's data parallelism in one object (hw1, hw2 and hw3 hold one)::

        parallel = DataParallel.join(device, batch_size=args.batch_size)  # torchrun's group, if any
        run = parallel.open_run(lambda: RunFolder.open(run_dir, hparams))  # rank 0's; a FollowerRun elsewhere
        for step in steps:
            batch = parallel.my_share(sampler.sample(batch_size))        # this rank's tasks, [B/N, ...]
            loss = model_loss(model, batch)
            means = parallel.mean({"loss": loss})                         # whole-batch means, on every rank
            loss.backward(); parallel.sync(model)                         # the whole batch's gradient
            optimizer.step()
        scores = parallel.evaluate(batches, score)                        # batches r, r+N, ..., gathered in order
        parallel.close()

    In one process (a plain ``python script.py``, or ``DataParallel(World())``) every method is the
    identity or the plain call, so the single-process path runs exactly the code it would run without
    this class.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self._bn: list[nn.modules.batchnorm._BatchNorm] = []
        self._bn_before: list[tuple[torch.Tensor, ...]] = []

    @classmethod
    def join(cls, device: torch.device, batch_size: int | None = None, batch_flag: str = "--batch_size",
             ) -> DataParallel:
        """Join the process group torchrun describes (nothing for one process) and check that every
        ``batch_size`` batch splits evenly over the processes."""
        world = init_from_env(device)
        if batch_size is not None:
            check_batch_split(batch_size, world, batch_flag)
        return cls(world)

    @property
    def device(self) -> torch.device:
        """This rank's device (under torchrun, ``cuda`` becomes ``cuda:LOCAL_RANK``)."""
        return self.world.device

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def processes_note(self) -> str:
        """``" (N processes)"`` under torchrun, else empty: for a script's first log line."""
        return f" ({self.world.world_size} processes)" if self.world.enabled else ""

    # ------------------------------------------------------------ what rank 0 does
    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        """Run ``fn`` on rank 0 alone (opening the run folder, reading a checkpoint); every rank learns
        whether it failed, so none is left waiting in a collective.

        Returns ``fn()`` on rank 0; on the others the same value sent by ``broadcast_object_list`` when
        ``share`` (tensors should be on the CPU), else None. When ``fn`` raises on rank 0, rank 0
        re-raises (``cli_main`` prints the one error line) and the other ranks exit quietly after it
        with the same status: exit 2 for a :class:`CS330Error`, 1 for anything else.
        """
        if not self.world.enabled:
            return fn()
        result, failure, status = None, None, 0
        if self.world.is_main:
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
        return result if self.world.is_main else message[1]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn`` on rank 0 first (it may download and cache; a refusal is one error line), then on
        the other ranks (which read rank 0's cache)."""
        result = self.on_main(fn)
        return result if self.world.is_main else fn()

    def open_run(self, open_folder: Callable[[], T]) -> T | FollowerRun:
        """Rank 0 opens the run folder (lock, resume rules); a refusal stops every rank. The other ranks
        get a :class:`FollowerRun`, which writes nothing but stops where rank 0 stops."""
        run = self.on_main(open_folder)
        return run if self.world.is_main else FollowerRun()

    @property
    def checkpoint_location(self) -> str | torch.device:
        """Where checkpoints are loaded: the device, or the CPU when rank 0 sends them to the others."""
        return "cpu" if self.world.enabled else self.world.device

    def read_checkpoint(self, run_dir: Path, step: int = -1) -> dict[str, Any]:
        """Rank 0 reads the checkpoint (the run folder may be on its machine only) and sends it."""
        return self.on_main(lambda: load_checkpoint(run_dir, step, self.checkpoint_location), share=True)

    def resume_state(self, run: Any, model: nn.Module) -> dict[str, Any] | None:
        """The checkpoint ``run`` continues from (None for a fresh run), read by rank 0, on every rank."""
        return self.on_main(lambda: run.resume_state(map_location=self.checkpoint_location, model=model),
                            share=True)

    # ------------------------------------------------------------ training
    def track_batch_norm(self, model: nn.Module) -> None:
        """Keep ``model``'s batch-norm running statistics as one process running every task in order
        would (see :meth:`sync`); models without running statistics need not call this."""
        self._bn = bn_layers(model) if self.world.enabled else []

    def my_share(self, batch: T) -> T:
        """This rank's equal, contiguous share of a batch (all of it for one process): rank r of N takes
        items [r*B/N, (r+1)*B/N), so the shares in rank order are the batch. ``batch``: a list, or a
        tuple of tensors (``Episodes``, ``TaskBatch``) with the item on dim 0."""
        self._bn_before = bn_snapshot(self._bn)
        if not self.world.enabled:
            return batch
        if isinstance(batch, list):
            return batch[shard(0, len(batch), self.world)]
        items = shard(0, batch[0].shape[0], self.world)
        return type(batch)(*(t[items] for t in batch))

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalars averaged over the ranks (each rank's value is a mean over an equal share, so this is
        the mean over the whole batch), as Python floats, identical on every rank."""
        if not self.world.enabled:
            return {k: v.item() for k, v in values.items()}
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])  # [num_values]
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return dict(zip(values, (stacked / self.world.world_size).tolist()))

    def sync(self, model: nn.Module | Iterable[nn.Parameter]) -> None:
        """After ``backward()``: every ``.grad`` becomes its mean over the ranks, and tracked batch-norm
        statistics those of one process that ran every rank's share in order (:func:`bn_replay`; after
        backward, because batch norm's backward may read the statistics it saved).

        With equal shares, the mean of the ranks' mean-over-tasks gradients is the gradient of the mean
        over all tasks, i.e. the single-process gradient. Every rank runs the same model code, so every
        rank has gradients for the same parameters; they travel as one flat buffer (one collective).
        """
        if not self.world.enabled:
            return
        params = model.parameters() if isinstance(model, nn.Module) else model
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world.world_size
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))
        if self._bn:
            bn_replay(self._bn, self._bn_before, self.gather([bn_update_since(self._bn, self._bn_before)]))

    # ------------------------------------------------------------ evaluation
    def evaluate(self, batches: Iterable[T], score: Callable[[T], R]) -> list[R]:
        """``score(batch)`` of every batch, in batch order, on every rank: rank r scores batches r, r+N,
        r+2N, ... whole, yet draws every batch (so a sampler ends where one process's ends), and the
        results are gathered back in order (through ``all_gather_object``: put tensors on the CPU).
        Tracked batch-norm statistics end as one process would leave them."""
        start = bn_snapshot(self._bn)
        mine = []  # (batch index, score, batch-norm update) of this rank's batches
        for index, batch in enumerate(batches):
            if index % self.world.world_size != self.world.rank:
                continue
            before = bn_snapshot(self._bn)
            mine.append((index, score(batch), bn_update_since(self._bn, before)))
        gathered = sorted(self.gather(mine), key=lambda item: item[0])
        if self._bn:
            bn_replay(self._bn, start, [update for _, _, update in gathered])
        return [result for _, result, _ in gathered]

    def my_portion(self, num_items: int) -> slice:
        """This rank's contiguous part of ``num_items`` items whose number need not divide evenly
        (parts differ by at most one item; in rank order they are the items): for :meth:`gather`."""
        bounds = [round(i * num_items / self.world.world_size) for i in range(self.world.world_size + 1)]
        return slice(bounds[self.world.rank], bounds[self.world.rank + 1])

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items`` concatenated in rank order, on every rank (``all_gather_object``:
        small Python objects such as per-task metric lists; tensors in them should be on the CPU)."""
        if not self.world.enabled:
            return items
        gathered: list[list[T] | None] = [None] * self.world.world_size
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]

    def close(self) -> None:
        """Leave the process group, all ranks together (:func:`destroy`)."""
        destroy(self.world)
