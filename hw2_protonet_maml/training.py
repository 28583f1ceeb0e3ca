"""The meta-training loop shared by ``protonet.py``, ``maml.py`` and ``anil.py``.

A meta-learner is any ``nn.Module`` that follows :class:`MetaLearner`; :class:`MetaTrainer` samples
meta-batches, steps the optimizer, logs, validates, checkpoints (through ``common.run``), then tests
on ``num_test_tasks`` tasks from the test characters with a 95% interval.

Under ``torchrun --nproc_per_node=N`` the same loop runs data-parallel (``common.distributed``):
every rank draws the full meta-batch from the same seeded sampler and trains on its equal share of
the tasks, gradients are averaged, and evaluation tasks are split by batch. Rank 0 alone owns the
run folder (lock, logs, checkpoints, results). In fp32 the result equals the single-process run up
to floating-point rounding (tests/test_distributed.py measures it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from common import distributed
from common.checkpoint import capture_rng_state, check_model, load_checkpoint, restore_rng_state
from common.cli import add_run_args, learning_rate, positive_int
from common.device import autocast
from common.errors import CS330Error
from common.limits import check_fits
from common.omniglot import NUM_DRAWINGS, PROTOCOLS, Episodes, EpisodeSampler, OmniglotStore
from common.run import RunFolder
from common.runlog import RunLogger, build_run_name, resolve_run_dir, write_json
from common.stats import mean_ci95

HOMEWORK = "hw2_protonet_maml"
LOG_INTERVAL = 10
VAL_TARGET = 0.98  # the wall time to first reach this validation accuracy is reported
EVAL_SEED = 12345  # validation and test tasks are the same for every run and every model
# Flags a --resume may change: the run length, intervals and what is evaluated at the end.
RESUMABLE_FLAGS = ("num_train_iterations", "val_interval", "save_interval", "num_val_tasks", "num_test_tasks",
                   "test_num_way", "test_num_support", "test_num_query", "checkpoint_step")


class MetaLearner(Protocol):
    """What :class:`MetaTrainer` needs of a meta-learner (an ``nn.Module``).

    ``forward(episodes)`` takes a meta-batch of B tasks and returns ``(loss, metrics)``: ``loss`` is
    the scalar meta-loss to minimise; ``metrics`` maps names to per-task ``[B]`` tensors and must hold
    ``"loss"`` (the detached loss, logged) and ``"query_acc"`` (accuracy on each task's queries,
    validated and tested); any other key (``"support_acc_pre"``...) is logged and averaged too.
    ``per_task_eval``: True when the model's predictions for one task depend on the other tasks of
    the batch (batch norm over the whole batch): evaluation then runs one task per forward.

    A new meta-learner is one file::

        class Baseline(nn.Module):
            per_task_eval = False

            def __init__(self, num_way: int) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_way))

            def forward(self, episodes: Episodes):
                logits = self.net(episodes.query_images.flatten(0, 1)).view(*episodes.query_labels.shape, -1)
                loss = F.cross_entropy(logits.flatten(0, 1), episodes.query_labels.flatten())
                return loss, {"loss": loss.detach(), "query_acc": accuracy(logits, episodes.query_labels)}

        MetaTrainer(Baseline(5), torch.optim.Adam(...), settings, hparams).run()
    """

    per_task_eval: bool

    def __call__(self, episodes: Episodes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy per task: logits ``[..., M, N]``, labels ``[..., M]`` -> ``[...]``."""
    return (logits.argmax(-1) == labels).float().mean(-1)


# ---------------------------------------------------------------------------- flags
def add_episode_args(parser: argparse.ArgumentParser, num_support: int, num_train_iterations: int) -> None:
    """The flags every hw2 script shares (names and defaults of the course code, plus what a tool needs)."""
    task = parser.add_argument_group("tasks")
    task.add_argument("--num_way", type=positive_int, default=5, help="classes per task (default: 5)")
    task.add_argument("--num_support", type=positive_int, default=num_support,
                      help=f"support examples per class at training (default: {num_support})")
    task.add_argument("--num_query", type=positive_int, default=15, help="query examples per class (default: 15)")
    task.add_argument("--batch_size", type=positive_int, default=16, help="tasks per meta-batch (default: 16)")
    task.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cs330",
                      help="class split: cs330 (1100/100/423 characters) or vinyals (1028/172/423 characters, "
                           "each rotation a new class, as in the MAML and ProtoNet papers) (default: cs330)")
    task.add_argument("--num_train_iterations", type=positive_int, default=num_train_iterations,
                      help=f"meta-training iterations (default: {num_train_iterations})")
    task.add_argument("--val_interval", type=positive_int, default=100,
                      help="validate every this many iterations (default: 100)")
    task.add_argument("--num_val_tasks", type=positive_int, default=128, help="validation tasks (default: 128)")
    task.add_argument("--save_interval", type=positive_int, default=100,
                      help="checkpoint every this many iterations (default: 100)")
    test = parser.add_argument_group("evaluation")
    test.add_argument("--test", action="store_true", help="evaluate a checkpoint on the test characters, no training")
    test.add_argument("--checkpoint_step", type=int, default=-1, help="checkpoint to test (-1 = latest)")
    test.add_argument("--num_test_tasks", type=positive_int, default=600, help="test tasks (default: 600)")
    test.add_argument("--test_num_way", type=positive_int, default=None, help="N at meta-test (default: --num_way)")
    test.add_argument("--test_num_support", type=positive_int, default=None,
                      help="K at meta-test, e.g. more support data than at training (default: --num_support)")
    test.add_argument("--test_num_query", type=positive_int, default=None,
                      help="queries per class at meta-test (default: --num_query)")
    add_run_args(parser)


def add_inner_loop_args(parser: argparse.ArgumentParser, name: str) -> argparse._ArgumentGroup:
    """Flags of the gradient-based meta-learners (``maml.py``, ``anil.py``); returns their group."""
    group = parser.add_argument_group(name)
    group.add_argument("--num_inner_steps", type=positive_int, default=1, help="inner gradient steps (default: 1)")
    group.add_argument("--inner_lr", type=learning_rate, default=0.4, help="inner learning rate (default: 0.4)")
    group.add_argument("--learn_inner_lrs", action="store_true",
                       help="learn one inner rate per parameter tensor with the outer optimizer")
    group.add_argument("--outer_lr", type=learning_rate, default=1e-3, help="Adam meta learning rate (default: 1e-3)")
    group.add_argument("--first_order", action="store_true",
                       help="first-order: do not differentiate through the inner gradients")
    group.add_argument("--eval_num_inner_steps", type=positive_int, default=None,
                       help="inner steps at validation/test (default: --num_inner_steps)")
    group.add_argument("--num_filters", type=positive_int, default=64, help="conv channels (default: 64)")
    group.add_argument("--conv_stride", type=int, choices=(1, 2), default=1,
                       help="1 = the course network (full 28x28 resolution in every layer); 2 = the strided "
                            "network of the MAML paper, about 4x cheaper (default: 1)")
    return group


def check_inner_loop_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.test_num_way is not None and args.test_num_way != args.num_way:
        parser.error(f"--test_num_way {args.test_num_way} differs from --num_way {args.num_way}: the network's "
                     "output layer has exactly --num_way classes")


def inner_loop_run_params(args: argparse.Namespace, precision: str) -> dict:
    """The hyper-parameters that name a MAML/ANIL run folder (the evaluation's inner steps only where
    they differ from training's, so that default folder names stay as they were)."""
    eval_steps = args.eval_num_inner_steps
    return {"proto": args.protocol, "way": args.num_way, "shot": args.num_support, "query": args.num_query,
            "batch": args.batch_size, "steps": args.num_inner_steps,
            **({"evalsteps": eval_steps} if eval_steps not in (None, args.num_inner_steps) else {}),
            "ilr": args.inner_lr, "learnilr": int(args.learn_inner_lrs), "olr": args.outer_lr,
            "fo": int(args.first_order), "filt": args.num_filters, "stride": args.conv_stride, "prec": precision,
            "seed": args.seed}


def run_folder(args: argparse.Namespace, prefix: str, params: dict) -> Path:
    """``--log_dir``, or ``runs/hw2_protonet_maml/<prefix>_<params>`` (the run name built from ``params``)."""
    return resolve_run_dir(args.log_dir, HOMEWORK, build_run_name(prefix, params))


@dataclass(frozen=True)
class TrainSettings:
    """Everything :class:`MetaTrainer` reads, as explicit values (built once from the flags)."""

    train_num_way: int  # N of training and validation tasks
    num_support: int
    num_query: int
    batch_size: int
    protocol: str
    num_train_iterations: int
    val_interval: int
    num_val_tasks: int
    save_interval: int
    test_num_way: int
    test_num_support: int
    test_num_query: int
    num_test_tasks: int
    seed: int
    device: torch.device
    precision: str
    data_dir: str | None
    run_dir: Path
    resume: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device, precision: str, run_dir: Path,
                  train_num_way: int | None = None) -> TrainSettings:
        return cls(
            train_num_way=train_num_way or args.num_way, num_support=args.num_support, num_query=args.num_query,
            batch_size=args.batch_size, protocol=args.protocol, num_train_iterations=args.num_train_iterations,
            val_interval=args.val_interval, num_val_tasks=args.num_val_tasks, save_interval=args.save_interval,
            test_num_way=args.test_num_way or args.num_way, test_num_support=args.test_num_support or args.num_support,
            test_num_query=args.test_num_query or args.num_query, num_test_tasks=args.num_test_tasks,
            seed=args.seed, device=device, precision=precision, data_dir=args.data_dir, run_dir=run_dir,
            resume=args.resume)


def check_drawings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse support + query sets that an Omniglot character (20 drawings) cannot fill."""
    for prefix, k, q in (("", args.num_support, args.num_query),
                         ("test_", args.test_num_support or args.num_support, args.test_num_query or args.num_query)):
        if k + q > NUM_DRAWINGS:
            parser.error(f"--{prefix}num_support + --{prefix}num_query = {k + q}, but an Omniglot character has "
                         f"only {NUM_DRAWINGS} drawings")
    check_batch_memory(parser, args)


def check_batch_memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a meta-batch whose images alone (float32 28x28) exceed the memory of every device here, and
    task counts whose per-task accuracies (Python floats, then results.json) could not be held."""
    way = max(getattr(args, "train_num_way", None) or args.num_way, getattr(args, "test_num_way", None) or 0)
    shots = max(args.num_support + args.num_query, (args.test_num_support or 0) + (args.test_num_query or 0))
    try:
        check_fits(4 * 28 * 28 * args.batch_size * way * shots,
                   f"--batch_size {args.batch_size} tasks of {way} classes x {shots} images", "lower --batch_size")
        check_fits(32 * max(args.num_val_tasks, args.num_test_tasks), f"--num_val_tasks {args.num_val_tasks} / "
                   f"--num_test_tasks {args.num_test_tasks} (an accuracy per task)", "lower them")
    except CS330Error as err:
        parser.error(str(err))


# ---------------------------------------------------------------------------- the loop
class MetaTrainer:
    """Owns the data, the run folder and the loop for one run of one meta-learner (in this process;
    under ``torchrun``, one rank's part of it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: TrainSettings,
                 hparams: dict) -> None:
        self.world = distributed.init_from_env(settings.device)  # one process: nothing happens
        distributed.check_batch_split(settings.batch_size, self.world)
        self.settings = s = replace(settings, device=self.world.device)  # cuda -> cuda:LOCAL_RANK
        self.model = model.to(s.device)
        if s.precision == "bf16":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optimizer
        self.hparams = hparams
        # Rank 0 first (it may download and cache the data), then the others read its cache.
        store = distributed.run_on_main(lambda: OmniglotStore.load(s.data_dir), self.world)
        self.store = store if self.world.is_main else OmniglotStore.load(s.data_dir)
        # Running statistics that the ranks' shares of the tasks update separately (ProtoNet's).
        self._bn = distributed.bn_layers(self.model) if self.world.enabled else []
        self._splits: dict[str, torch.Tensor] = {}
        self._check_class_counts()

    def _check_class_counts(self) -> None:
        """Every way flag against the classes of the split it samples, before any work."""
        s = self.settings
        needs = (("train", s.train_num_way, "--num_way (or --train_num_way)"),
                 ("val", s.train_num_way, "--num_way (or --train_num_way), used for validation"),
                 ("test", s.test_num_way, "--test_num_way"))
        for split, way, flag in needs:
            classes = len(self.split(split))
            if way > classes:
                raise CS330Error(f"{flag} = {way}, but the {s.protocol} {split} split has only {classes} classes; "
                                 f"choose at most {classes}")

    def split(self, name: str) -> torch.Tensor:
        if name not in self._splits:  # built once: validation asks for a sampler every --val_interval
            self._splits[name] = self.store.split(name, self.settings.protocol).to(self.settings.device)
        return self._splits[name]

    def sampler(self, split: str, num_way: int, num_support: int, num_query: int, seed: int) -> EpisodeSampler:
        return EpisodeSampler(self.split(split), num_way, num_support, num_query, self.settings.device, seed)

    def evaluate(self, split: str, num_tasks: int, num_way: int, num_support: int, num_query: int,
                 ) -> dict[str, list[float]]:
        """Per-task metrics on ``num_tasks`` fixed tasks (the same tasks for every model).

        Several processes: every rank draws every batch (so the tasks are one process's) and
        evaluates batches r, r+N, r+2N, ...; the batches are gathered back in order, so the lists
        (and their means) are the single-process ones.
        """
        s, world = self.settings, self.world
        sampler = self.sampler(split, num_way, num_support, num_query, EVAL_SEED)
        bn_start = distributed.bn_snapshot(self._bn)
        self.model.eval()
        batches = []  # (batch index, {metric: per-task values}, batch-norm update) of this rank's batches
        with torch.no_grad():
            for index, done in enumerate(range(0, num_tasks, s.batch_size)):
                episodes = sampler.sample(min(s.batch_size, num_tasks - done))
                if index % world.world_size != world.rank:
                    continue
                bn_before = distributed.bn_snapshot(self._bn)
                per_task: dict[str, list[float]] = {}
                # A model that normalizes with batch statistics sees one task per forward, so
                # the statistics (and its predictions) are per task, never mixed across tasks.
                chunks = split_tasks(episodes) if self.model.per_task_eval else [episodes]
                for chunk in chunks:
                    with autocast(s.device, s.precision):
                        _, metrics = self.model(chunk)
                    metrics.pop("loss")
                    for key, value in metrics.items():
                        per_task.setdefault(key, []).extend(value.tolist())
                batches.append((index, per_task, distributed.bn_update_since(self._bn, bn_before)))
        self.model.train()
        batches = sorted(distributed.gather_lists(batches, world), key=lambda batch: batch[0])
        if self._bn:  # running statistics as one process would have updated them, batch after batch
            distributed.bn_replay(self._bn, bn_start, [update for _, _, update in batches])
        merged: dict[str, list[float]] = {}
        for _, per_task, _ in batches:
            for key, values in per_task.items():
                merged.setdefault(key, []).extend(values)
        return merged

    def run(self, test_only: bool = False, checkpoint_step: int = -1) -> Path:
        """What the script was asked for: evaluate a checkpoint (``test_only``) or train, then test."""
        s, world = self.settings, self.world
        if test_only:
            # Rank 0 reads the checkpoint and sends it (the run folder may be on its machine only).
            state = distributed.run_on_main(lambda: load_checkpoint(s.run_dir, checkpoint_step, self._location),
                                            world, share=True)
            with self._open_run(resume=True):
                distributed.run_on_main(lambda: check_model(s.run_dir, state, self.model), world)
                self._test_checkpoint(state)
        else:
            with self._open_run(resume=s.resume, test_hint="--test to evaluate it") as run:
                self._train(run)
        distributed.destroy(world)
        return s.run_dir

    @property
    def _location(self) -> str | torch.device:
        """Where checkpoints are loaded: the device, or the CPU when rank 0 sends them to the others."""
        return "cpu" if self.world.enabled else self.settings.device

    def _open_run(self, resume: bool, test_hint: str = "") -> RunFolder | distributed.FollowerRun:
        """Rank 0 opens the run folder (lock, resume rules); a refusal stops every rank. The other
        ranks get a :class:`FollowerRun`, which writes nothing."""
        s = self.settings
        run = distributed.run_on_main(lambda: RunFolder.open(s.run_dir, self.hparams, resume=resume,
                                                             resumable=RESUMABLE_FLAGS, test_hint=test_hint,
                                                             length_flag="num_train_iterations"), self.world)
        return run if self.world.is_main else distributed.FollowerRun()

    def _train(self, run: RunFolder | distributed.FollowerRun) -> None:
        s, world = self.settings, self.world
        start_step, elapsed, reached_target = 0, 0.0, None
        train_sampler = self.sampler("train", s.train_num_way, s.num_support, s.num_query, s.seed)
        state = distributed.run_on_main(lambda: run.resume_state(map_location=self._location, model=self.model),
                                        world, share=True)
        if state is not None:  # every rank continues from rank 0's checkpoint
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            train_sampler.load_state_dict(state["sampler"])
            restore_rng_state(state["rng"])
            start_step, elapsed, reached_target = state["step"], state["elapsed"], state.get("time_to_val_target")
        logger = run.logger(start_step=start_step, total_steps=s.num_train_iterations)
        logger.write(f"run folder: {s.run_dir}" + (f" (resuming at step {start_step})" if start_step else "")
                     + (f" ({world.world_size} processes)" if world.enabled else ""))
        tic = time.perf_counter() - elapsed
        for step in range(start_step + 1, s.num_train_iterations + 1):
            # Every rank draws the whole meta-batch (cheap), so the sampler state is the same everywhere.
            episodes = self._my_tasks(train_sampler.sample(s.batch_size))
            bn_before = distributed.bn_snapshot(self._bn)
            with autocast(s.device, s.precision):
                loss, metrics = self.model(episodes)
            # Means over all tasks (every rank has the same values, so all ranks stop together on NaN).
            logged = metrics if step % LOG_INTERVAL == 0 else {"loss": metrics["loss"]}
            means = distributed.mean_over_ranks({k: v.mean() for k, v in logged.items()}, world)
            run.check_loss(means["loss"], step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.model.parameters(), world)  # the whole meta-batch's gradient
            # After backward: batch norm's backward may read the running statistics it saved.
            distributed.bn_sync(self._bn, bn_before, world)  # as if one process ran all the tasks in order
            self.optimizer.step()
            if step % LOG_INTERVAL == 0:
                logger.log({f"train/{k}": v for k, v in means.items()}, step)
                logger.advance(step, loss=means["loss"], acc=means["query_acc"])
            if step % s.val_interval == 0 or step == s.num_train_iterations:
                val = self.evaluate("val", s.num_val_tasks, s.train_num_way, s.num_support, s.num_query)
                val_means = {k: mean_ci95(v)[0] for k, v in val.items()}
                logger.log({f"val/{k}": v for k, v in val_means.items()}, step)
                logger.log({"time/wall_seconds": time.perf_counter() - tic}, step)
                if reached_target is None and val_means["query_acc"] >= VAL_TARGET:
                    reached_target = time.perf_counter() - tic
            if step % s.save_interval == 0 or step == s.num_train_iterations:
                run.save(step, {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "sampler": train_sampler.state_dict(), "rng": capture_rng_state(),
                    "elapsed": time.perf_counter() - tic, "time_to_val_target": reached_target,
                })
        logger.advance(s.num_train_iterations)
        results = self.test(logger)
        logger.finish({**results, "train_seconds": time.perf_counter() - tic,
                       f"seconds_to_val_acc_{VAL_TARGET}": reached_target})
        logger.close()

    def _my_tasks(self, episodes: Episodes) -> Episodes:
        """This rank's equal, contiguous share of a meta-batch (all of it for one process): rank r
        of N takes tasks [r*B/N, (r+1)*B/N), so the shares in rank order are the meta-batch."""
        if not self.world.enabled:
            return episodes
        tasks = distributed.shard(0, self.settings.batch_size, self.world)
        return Episodes(*(t[tasks] for t in episodes))

    def test(self, logger: RunLogger | distributed.QuietLogger | None = None) -> dict[str, float]:
        """Mean query accuracy over the test tasks with its 95% interval."""
        s = self.settings
        per_task = self.evaluate("test", s.num_test_tasks, s.test_num_way, s.test_num_support, s.test_num_query)
        mean, ci = mean_ci95(per_task["query_acc"])
        results = {"test_accuracy": mean, "test_ci95": ci, "test_num_tasks": s.num_test_tasks,
                   "test_num_way": s.test_num_way, "test_num_support": s.test_num_support,
                   "test_num_query": s.test_num_query,
                   # per task, in the fixed task order every model sees: for paired comparisons
                   "test_task_accuracies": [round(a, 6) for a in per_task["query_acc"]]}
        for key in ("support_acc_pre", "support_acc_post"):
            if key in per_task:
                results[f"test_{key}"] = mean_ci95(per_task[key])[0]
        message = (f"test accuracy ({s.test_num_way}-way {s.test_num_support}-shot, "
                   f"{s.num_test_tasks} tasks): {100 * mean:.2f}% +- {100 * ci:.2f}% (95% interval)")
        if logger is not None:
            logger.write(message)
        elif self.world.is_main:
            print(message)
        return results

    def _test_checkpoint(self, state: dict) -> None:
        s = self.settings
        self.model.load_state_dict(state["model"])
        results = self.test()
        if self.world.is_main:
            name = (f"test_way{s.test_num_way}_shot{s.test_num_support}"
                    f"_query{s.test_num_query}_step{state['step']}.json")
            write_json(s.run_dir / name, {"checkpoint_step": state["step"], **results})
            print(f"wrote {s.run_dir / name}")


def split_tasks(episodes: Episodes) -> Iterator[Episodes]:
    """Each task of a meta-batch as a meta-batch of one (keeps the batch dimension)."""
    for b in range(episodes.support_images.shape[0]):
        yield Episodes(*(t[b:b + 1] for t in episodes))
