"""The meta-training loop, evaluation and flags shared by ``protonet.py`` and ``maml.py``.

Any ``nn.Module`` whose ``forward(episodes)`` returns ``(loss, metrics)`` can be trained here:
sample a meta-batch, step the optimizer, log, validate, checkpoint; then test on
``--num_test_tasks`` tasks from the test characters with a 95% interval.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import (
    capture_rng_state,
    ensure_finite,
    list_checkpoints,
    load_checkpoint,
    refuse_existing_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from common.cli import add_run_args, positive_int
from common.device import resolve_device
from common.omniglot import PROTOCOLS, EpisodeSampler, OmniglotStore
from common.runlog import RunLogger, build_run_name, runs_root, write_json
from common.stats import mean_ci95

HOMEWORK = "hw2_protonet_maml"
LOG_INTERVAL = 10
VAL_TARGET = 0.98  # the wall time to first reach this validation accuracy is reported
EVAL_SEED = 12345  # validation and test tasks are the same for every run and every model


def add_episode_args(parser: argparse.ArgumentParser, num_support: int, num_train_iterations: int) -> None:
    """The flags both scripts share (names and defaults of the course code, plus what a tool needs)."""
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
    speed = parser.add_argument_group("speed")
    speed.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast + channels-last convolutions: about 2x faster on CPUs with "
                            "AVX-512 BF16 / AMX and on recent GPUs (see bench.py); MAML keeps its inner loop "
                            "in fp32")
    add_run_args(parser)


def check_episode_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill meta-test defaults and refuse impossible tasks before any work."""
    args.test_num_way = args.test_num_way or args.num_way
    args.test_num_support = args.test_num_support or args.num_support
    args.test_num_query = args.test_num_query or args.num_query
    for prefix, k, q in (("", args.num_support, args.num_query),
                         ("test_", args.test_num_support, args.test_num_query)):
        if k + q > 20:
            parser.error(f"--{prefix}num_support + --{prefix}num_query = {k + q}, but an Omniglot character has "
                         "only 20 drawings")


class MetaTrainer:
    """Owns the data, run folder, optimizer and loop for one run."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, run_prefix: str, run_params: dict,
                 optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.model = model.to(self.device)
        if args.bf16:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optimizer_factory(self.model)
        self.run_name = build_run_name(run_prefix, {"proto": args.protocol, **run_params, "seed": args.seed})
        self.run_dir = Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / self.run_name
        self.store = OmniglotStore.load(args.data_dir)
        self._splits: dict[str, torch.Tensor] = {}

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def sampler(self, split: str, num_way: int, num_support: int, num_query: int, seed: int) -> EpisodeSampler:
        if split not in self._splits:  # built once: validation asks for a sampler every --val_interval
            self._splits[split] = self.store.split(split, self.args.protocol).to(self.device)
        return EpisodeSampler(self._splits[split], num_way, num_support, num_query, self.device, seed)

    def evaluate(self, split: str, num_tasks: int, num_way: int, num_support: int, num_query: int,
                 ) -> dict[str, list[float]]:
        """Per-task metrics on ``num_tasks`` fixed tasks (the same tasks for every model)."""
        sampler = self.sampler(split, num_way, num_support, num_query, EVAL_SEED)
        self.model.eval()
        per_task: dict[str, list[float]] = {}
        with torch.no_grad():
            done = 0
            while done < num_tasks:
                batch = min(self.args.batch_size, num_tasks - done)
                episodes = sampler.sample(batch)
                # A model that normalizes with batch statistics sees one task per forward, so
                # the statistics (and its predictions) are per task, never mixed across tasks.
                chunks = _split_tasks(episodes) if self.model.per_task_eval else [episodes]
                for chunk in chunks:
                    with self.autocast():
                        _, metrics = self.model(chunk)
                    metrics.pop("loss")
                    for key, value in metrics.items():
                        per_task.setdefault(key, []).extend(value.tolist())
                done += batch
        self.model.train()
        return per_task

    def train(self) -> Path:
        args = self.args
        run_dir = self.run_dir
        start_step, elapsed, reached_target = 0, 0.0, None
        train_sampler = self.sampler("train", args.num_way, args.num_support, args.num_query, args.seed)
        if args.resume and list_checkpoints(run_dir):
            state = load_checkpoint(run_dir, -1, map_location=self.device)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            train_sampler.load_state_dict(state["sampler"])
            restore_rng_state(state["rng"])
            start_step, elapsed, reached_target = state["step"], state["elapsed"], state.get("time_to_val_target")
        elif not args.resume:
            refuse_existing_checkpoints(run_dir, "--test to evaluate it")
        logger = RunLogger(run_dir, vars(args), start_step=start_step, total_steps=args.num_train_iterations,
                           desc=self.run_name)
        logger.write(f"run folder: {run_dir}" + (f" (resuming at step {start_step})" if start_step else ""))
        tic = time.perf_counter() - elapsed
        for step in range(start_step + 1, args.num_train_iterations + 1):
            with self.autocast():
                loss, metrics = self.model(train_sampler.sample(args.batch_size))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ensure_finite(loss.item(), step, run_dir)
            self.optimizer.step()
            if step % LOG_INTERVAL == 0:
                means = {k: v.mean().item() for k, v in metrics.items()}
                logger.log({f"train/{k}": v for k, v in means.items()}, step)
                logger.advance(step, loss=means["loss"], acc=means["query_acc"])
            if step % args.val_interval == 0 or step == args.num_train_iterations:
                val = self.evaluate("val", args.num_val_tasks, args.num_way, args.num_support, args.num_query)
                val_means = {k: mean_ci95(v)[0] for k, v in val.items()}
                logger.log({f"val/{k}": v for k, v in val_means.items()}, step)
                logger.log({"time/wall_seconds": time.perf_counter() - tic}, step)
                if reached_target is None and val_means["query_acc"] >= VAL_TARGET:
                    reached_target = time.perf_counter() - tic
            if step % args.save_interval == 0 or step == args.num_train_iterations:
                save_checkpoint(run_dir, step, {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "sampler": train_sampler.state_dict(), "rng": capture_rng_state(),
                    "elapsed": time.perf_counter() - tic, "time_to_val_target": reached_target,
                })
        logger.advance(args.num_train_iterations)
        results = self.test(logger)
        logger.finish({**results, "train_seconds": time.perf_counter() - tic,
                       f"seconds_to_val_acc_{VAL_TARGET}": reached_target})
        logger.close()
        return run_dir

    def test(self, logger: RunLogger | None = None) -> dict[str, float]:
        """Mean query accuracy over the test tasks with its 95% interval."""
        args = self.args
        per_task = self.evaluate("test", args.num_test_tasks, args.test_num_way, args.test_num_support,
                                 args.test_num_query)
        mean, ci = mean_ci95(per_task["query_acc"])
        results = {"test_accuracy": mean, "test_ci95": ci, "test_num_tasks": args.num_test_tasks,
                   "test_num_way": args.test_num_way, "test_num_support": args.test_num_support,
                   "test_num_query": args.test_num_query}
        for key in ("support_acc_pre", "support_acc_post"):
            if key in per_task:
                results[f"test_{key}"] = mean_ci95(per_task[key])[0]
        message = (f"test accuracy ({args.test_num_way}-way {args.test_num_support}-shot, "
                   f"{args.num_test_tasks} tasks): {100 * mean:.2f}% +- {100 * ci:.2f}% (95% interval)")
        (logger.write if logger else print)(message)
        return results

    def run(self) -> None:
        """What the script was asked for: evaluate a checkpoint (``--test``) or train."""
        if self.args.test:
            self.run_test_only()
        else:
            self.train()

    def run_test_only(self) -> None:
        run_dir = self.run_dir
        state = load_checkpoint(run_dir, self.args.checkpoint_step, map_location=self.device)
        self.model.load_state_dict(state["model"])
        results = self.test()
        name = (f"test_way{self.args.test_num_way}_shot{self.args.test_num_support}"
                f"_query{self.args.test_num_query}_step{state['step']}.json")
        write_json(run_dir / name, {"checkpoint_step": state["step"], **results})
        print(f"wrote {run_dir / name}")


def _split_tasks(episodes):
    """Yield each task of a meta-batch as a meta-batch of one (keeps the batch dimension)."""
    for b in range(episodes.support_images.shape[0]):
        yield type(episodes)(*(t[b:b + 1] for t in episodes))
