"""The meta-training loop shared by ``protonet.py``, ``maml.py`` and ``anil.py``.

A meta-learner is any ``nn.Module`` that follows :class:`MetaLearner`; :class:`MetaTrainer` samples
meta-batches, steps the optimizer (``train_step``; optionally on a step schedule), logs, validates
(optionally stopping early and keeping the best validation's weights), checkpoints (through
``common.run``), then tests on ``num_test_tasks`` tasks from the test characters with a 95%
interval. Its settings come from the flags in ``flags.py``.

Under ``torchrun --nproc_per_node=N`` the same loop runs data-parallel (``self.parallel``, a
``common.distributed.DataParallel``): every rank draws the full meta-batch from the same seeded
sampler and trains on its equal share of the tasks, gradients are averaged, and evaluation tasks
are split by batch. Rank 0 alone owns the run folder (lock, logs, checkpoints, results). In fp32 the
result equals the single-process run up to floating-point rounding (tests/test_distributed.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from common.checkpoint import capture_rng_state, check_model, restore_rng_state
from common.device import autocast
from common.distributed import DataParallel, FollowerRun, QuietLogger
from common.errors import CS330Error
from common.omniglot import Episodes, EpisodeSampler, OmniglotStore
from common.run import RunFolder
from common.runlog import RunLogger, write_json
from common.stats import mean_ci95
from hw2_protonet_maml.flags import RESUMABLE_FLAGS, TrainSettings

LOG_INTERVAL = 10
VAL_TARGET = 0.98  # the wall time to first reach this validation accuracy is reported
EVAL_SEED = 12345  # validation and test tasks are the same for every run and every model


@dataclass
class BestValidation:
    """Early stopping's record (``--patience``): the best validation so far, the weights that made it,
    and how many validations since have not improved on it."""

    step: int = 0
    query_acc: float = -1.0
    model: dict[str, torch.Tensor] | None = None
    stale: int = 0


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


# ---------------------------------------------------------------------------- the loop
class MetaTrainer:
    """Owns the data, the run folder and the loop for one run of one meta-learner (in this process;
    under ``torchrun``, one rank's part of it, through ``self.parallel``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: TrainSettings,
                 hparams: dict) -> None:
        self.parallel = DataParallel.join(settings.device, batch_size=settings.batch_size)  # one process: nothing
        self.settings = s = replace(settings, device=self.parallel.device)  # cuda -> cuda:LOCAL_RANK
        self.model = model.to(s.device)
        if s.precision == "bf16":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.parallel.track_batch_norm(self.model)  # ProtoNet's running statistics
        self.optimizer = optimizer
        self.scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, s.lr_step_size, s.lr_gamma)
                          if s.lr_step_size else None)
        self.best = BestValidation() if s.patience else None
        self.hparams = hparams
        self.store = self.parallel.main_first(lambda: OmniglotStore.load(s.data_dir))
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

    # ------------------------------------------------------------ one training step
    def train_step(self, run: RunFolder | FollowerRun, episodes: Episodes, step: int) -> dict[str, float]:
        """One meta-batch (all of it: this rank trains on its share): the meta-loss, the whole meta-batch's
        gradient, one update. Returns the loss (and every LOG_INTERVAL steps every metric) as means
        over all the tasks, the same on every rank."""
        episodes = self.parallel.my_share(episodes)  # [B/N, ...] under torchrun, else all of it
        with autocast(self.settings.device, self.settings.precision):  # ProtoNet's bf16; MAML sets its own
            loss, metrics = self.model(episodes)
        logged = metrics if step % LOG_INTERVAL == 0 else {"loss": metrics["loss"]}
        means = self.parallel.mean({k: v.mean() for k, v in logged.items()})
        run.check_loss(means["loss"], step)  # NaN/inf stops every rank here, before the update
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.sync(self.model)  # the whole meta-batch's gradient
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return means

    # ------------------------------------------------------------ evaluation
    def evaluate(self, split: str, num_tasks: int, num_way: int, num_support: int, num_query: int,
                 ) -> dict[str, list[float]]:
        """Per-task metrics on ``num_tasks`` fixed tasks (the same tasks for every model). Under torchrun
        the batches are shared out over the ranks and gathered back in order (``DataParallel.evaluate``),
        so the lists are the single-process ones."""
        batch_size = self.settings.batch_size
        sampler = self.sampler(split, num_way, num_support, num_query, EVAL_SEED)
        batches = (sampler.sample(min(batch_size, num_tasks - done)) for done in range(0, num_tasks, batch_size))
        self.model.eval()
        with torch.no_grad():  # MAML's inner loop still differentiates (torch.func.grad ignores it)
            scores = self.parallel.evaluate(batches, self._score)
        self.model.train()
        merged: dict[str, list[float]] = {}
        for per_task in scores:
            for key, values in per_task.items():
                merged.setdefault(key, []).extend(values)
        return merged

    def _score(self, episodes: Episodes) -> dict[str, list[float]]:
        """Per-task metrics of one evaluation batch. A model that normalizes with batch statistics sees
        one task per forward, so the statistics (and its predictions) are never mixed across tasks."""
        per_task: dict[str, list[float]] = {}
        for chunk in split_tasks(episodes) if self.model.per_task_eval else [episodes]:
            with autocast(self.settings.device, self.settings.precision):
                _, metrics = self.model(chunk)
            metrics.pop("loss")
            for key, value in metrics.items():
                per_task.setdefault(key, []).extend(value.tolist())
        return per_task

    def test(self, logger: RunLogger | QuietLogger | None = None) -> dict[str, float]:
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
        elif self.parallel.is_main:
            print(message)
        return results

    # ------------------------------------------------------------ the run
    def run(self, test_only: bool = False, checkpoint_step: int = -1) -> Path:
        """What the script was asked for: evaluate a checkpoint (``test_only``) or train, then test."""
        s, parallel = self.settings, self.parallel
        if test_only:
            state = parallel.read_checkpoint(s.run_dir, checkpoint_step)
            with self._open_run(resume=True):
                parallel.on_main(lambda: check_model(s.run_dir, state, self.model))
                self._test_checkpoint(state)
        else:
            with self._open_run(resume=s.resume, test_hint="--test to evaluate it") as run:
                self._train(run)
        parallel.close()
        return s.run_dir

    def _open_run(self, resume: bool, test_hint: str = "") -> RunFolder | FollowerRun:
        s = self.settings
        return self.parallel.open_run(lambda: RunFolder.open(
            s.run_dir, self.hparams, resume=resume, resumable=RESUMABLE_FLAGS, test_hint=test_hint,
            length_flag="num_train_iterations"))

    def _train(self, run: RunFolder | FollowerRun) -> None:
        s = self.settings
        train_sampler = self.sampler("train", s.train_num_way, s.num_support, s.num_query, s.seed)
        start_step, elapsed, reached_target = self._resume(run, train_sampler)
        logger = run.logger(start_step=start_step, total_steps=s.num_train_iterations)
        logger.write(f"run folder: {s.run_dir}" + (f" (resuming at step {start_step})" if start_step else "")
                     + self.parallel.processes_note)
        tic = time.perf_counter() - elapsed
        last_step = start_step
        for step in range(start_step + 1, s.num_train_iterations + 1):
            if self.stopped_early:
                break
            last_step = step
            # Every rank draws the whole meta-batch (cheap), so the sampler state is the same everywhere.
            means = self.train_step(run, train_sampler.sample(s.batch_size), step)
            if step % LOG_INTERVAL == 0:
                logger.log({f"train/{k}": v for k, v in means.items()}, step)
                logger.advance(step, loss=means["loss"], acc=means["query_acc"])
            if step % s.val_interval == 0 or step == s.num_train_iterations:
                reached_target = self._validate(logger, step, tic, reached_target)
            if step % s.save_interval == 0 or step == s.num_train_iterations or self.stopped_early:
                run.save(step, self._checkpoint(train_sampler, time.perf_counter() - tic, reached_target))
        logger.advance(last_step)
        early_stopping = self._use_best_weights(last_step)
        results = self.test(logger)
        logger.finish({**results, **early_stopping, "train_seconds": time.perf_counter() - tic,
                       f"seconds_to_val_acc_{VAL_TARGET}": reached_target})
        logger.close()

    def _checkpoint(self, train_sampler: EpisodeSampler, elapsed: float, reached_target: float | None) -> dict:
        """Everything :meth:`_resume` needs to continue the run exactly."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "sampler": train_sampler.state_dict(), "rng": capture_rng_state(),
                 "elapsed": elapsed, "time_to_val_target": reached_target}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.best is not None:
            state["early_stopping"] = asdict(self.best)
        return state

    @property
    def stopped_early(self) -> bool:
        """``--patience`` validations in a row without a new best: the run stops."""
        return self.best is not None and self.best.stale >= self.settings.patience

    def _use_best_weights(self, last_step: int) -> dict:
        """With early stopping, load the best validation's weights (the ones tested) and say which."""
        if self.best is None or self.best.model is None:
            return {}
        self.model.load_state_dict(self.best.model)
        return {"best_val_step": self.best.step, "best_val_acc": self.best.query_acc,
                "stopped_at_step": last_step if self.stopped_early else None}

    def _resume(self, run: RunFolder | FollowerRun, train_sampler: EpisodeSampler) -> tuple[int, float, float | None]:
        """Continue from rank 0's checkpoint, on every rank: (its step, its training seconds, its seconds
        to VAL_TARGET); (0, 0, None) for a fresh run."""
        state = self.parallel.resume_state(run, self.model)
        if state is None:
            return 0, 0.0, None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        train_sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.best is not None:
            self.best = BestValidation(**state["early_stopping"])
        return state["step"], state["elapsed"], state.get("time_to_val_target")

    def _validate(self, logger: RunLogger | QuietLogger, step: int, tic: float, reached_target: float | None,
                  ) -> float | None:
        """Validate and log; returns the seconds to first reach VAL_TARGET (None while not reached)."""
        s = self.settings
        val = self.evaluate("val", s.num_val_tasks, s.train_num_way, s.num_support, s.num_query)
        val_means = {k: mean_ci95(v)[0] for k, v in val.items()}
        logger.log({f"val/{k}": v for k, v in val_means.items()}, step)
        logger.log({"time/wall_seconds": time.perf_counter() - tic}, step)
        if self.best is not None:  # early stopping: keep the best validation's weights
            if val_means["query_acc"] > self.best.query_acc:
                weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.best = BestValidation(step, val_means["query_acc"], weights)
            else:
                self.best.stale += 1
        if reached_target is None and val_means["query_acc"] >= VAL_TARGET:
            return time.perf_counter() - tic
        return reached_target

    def _test_checkpoint(self, state: dict) -> None:
        """``--test``: the checkpoint's weights, or with early stopping the best validation's weights
        it holds (written as ``..._best.json``)."""
        s = self.settings
        best = state.get("early_stopping") or {}
        if best.get("model") is not None:
            self.model.load_state_dict(best["model"])
            step, which = best["step"], "best"
        else:
            self.model.load_state_dict(state["model"])
            step, which = state["step"], f"step{state['step']}"
        results = self.test()
        if self.parallel.is_main:
            name = f"test_way{s.test_num_way}_shot{s.test_num_support}_query{s.test_num_query}_{which}.json"
            write_json(s.run_dir / name, {"checkpoint_step": step, **results})
            print(f"wrote {s.run_dir / name}")

def split_tasks(episodes: Episodes) -> Iterator[Episodes]:
    """Each task of a meta-batch as a meta-batch of one (keeps the batch dimension)."""
    for b in range(episodes.support_images.shape[0]):
        yield Episodes(*(t[b:b + 1] for t in episodes))
