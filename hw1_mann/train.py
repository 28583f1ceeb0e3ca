"""Train a black-box meta-learner (course LSTM MANN or Santoro et al.'s memory network) on Omniglot.

    python hw1_mann/train.py --num_classes 3 --num_shot 1            # course LSTM, 3-way 1-shot
    python hw1_mann/train.py --num_classes 4 --model memory          # external-memory MANN
    python hw1_mann/train.py ... --resume                            # continue a killed run
    python hw1_mann/train.py ... --test                              # re-evaluate a finished run on test
    python hw1_mann/train.py --protocol santoro --model memory       # Santoro et al. 2016's episodes

Every ``--eval_freq`` steps one meta-batch of validation tasks and one of test tasks are scored
(TensorBoard ``val/*`` and ``test/*``) and a checkpoint is written; at the end the final model is
scored on ``--num_test_tasks`` test tasks (mean query accuracy with its 95% interval, and accuracy
by instance number) and everything goes to ``results.json`` in the run folder.

``--protocol santoro`` trains on Santoro et al. (2016)'s episodes instead of the course's K-shot
sequences: N classes with random labels, each shown ``--presentations`` times in one random order,
every image with the label of the step before, and a loss on every step (``hw1_mann.data.SantoroSampler``);
accuracy by instance is then the accuracy on a class's 1st, 2nd, ... presentation within the episode.

The run folder follows ``common.run.RunFolder``: one run at a time per folder, ``--resume`` only
with the run's flags (``--train_steps``, ``--eval_freq``, ``--eval_tasks`` and ``--num_test_tasks`` may change), the
loss checked for NaN/inf at every step, and no checkpoint ever written with non-finite weights.

    torchrun --standalone --nproc_per_node=2 hw1_mann/train.py ...   # data-parallel, same result

Under ``torchrun`` (``common.distributed``) every rank draws the whole meta-batch from the same
seeded sampler and trains on its equal, contiguous share of the tasks; the gradients are averaged
(``query_loss`` is a mean over tasks, so that is the single-process gradient), evaluation batches
are split over the ranks and gathered in order, and rank 0 alone owns the run folder. In fp32 the
weights equal the single-process run's up to rounding and the evaluation figures exactly
(tests/test_distributed_hw1.py measures it).
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import capture_rng_state, check_model, restore_rng_state
from common.cli import add_run_args, learning_rate, positive_int
from common.device import autocast, resolve_device, resolve_precision, setup_compute
from common.distributed import DataParallel, FollowerRun
from common.errors import cli_main
from common.limits import check_fits
from common.omniglot import OmniglotStore
from common.run import RunFolder
from common.runlog import build_run_name, resolve_run_dir
from common.seeding import seed_everything
from hw1_mann.data import CourseSampler, SantoroSampler, TaskSampler, check_episode_shape, check_task_shape
from hw1_mann.evaluate import evaluate
from hw1_mann.models import LRU_WRITES, MEMORY_IMPLS, build_model, check_bf16_runs, sequence_loss

HOMEWORK = "hw1_mann"
# Flags a --resume (or --test) may change besides common.cli.RUN_ONLY_FLAGS: the run length, the
# evaluation interval and the numbers of tasks scored do not change the weights trained so far.
RESUMABLE_FLAGS = ("train_steps", "eval_freq", "eval_tasks", "num_test_tasks", "memory_impl")
# What a run folder from before a flag existed trained with (its hparams.json lacks the flag).
LEGACY_FLAGS = {"key_strength": "none", "lru_write": "per_head"}
FP32_BECAUSE = "hw1's LSTM/memory models were not measured faster in bf16"
# The samplers of a run: each its own seeded generator, so validation never shifts the training data
# order. "test" is the small test meta-batch of every --eval_freq step; "final" scores the end model.
SAMPLERS = (("train", "train"), ("val", "val"), ("test", "test"), ("final", "test"))
# --memory_impl auto compiles the memory model's step from this run length on: the compiles (18 s
# for training's graphs on an AVX2 core, and again for evaluation's, hw1 README) are then a small part of the run.
COMPILE_FROM_STEPS = 2000
INSTANCES = (1, 2, 3, 4, 5, 10)  # the columns of Santoro et al.'s table 1, logged under --protocol santoro


def resolve_memory_impl(args: argparse.Namespace, device: torch.device) -> str:
    """``--memory_impl``, with ``auto`` resolved (see its help; left as given for the LSTM)."""
    if args.memory_impl != "auto" or args.model != "memory":
        return args.memory_impl
    return "compiled" if device.type == "cpu" and args.train_steps >= COMPILE_FROM_STEPS and has_cpp_compiler() \
        else "fast"


def has_cpp_compiler() -> bool:
    """Whether torch.compile finds the C++ compiler it builds CPU kernels with."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # imported here: it loads all of inductor
    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001  (inductor raises several kinds when no compiler is found)
        return False
    return True


def str2bool(text: str) -> bool:
    """``true/false, yes/no, 1/0`` -> bool (argparse's ``type=bool`` would turn "False" into True)."""
    value = text.strip().lower()
    if value in {"true", "t", "yes", "y", "1", "on"}:
        return True
    if value in {"false", "f", "no", "n", "0", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_classes", type=positive_int, default=5, help="N: classes per task (default: 5)")
    parser.add_argument("--num_shot", type=positive_int, default=1,
                        help="K: labelled examples per class before the query (default: 1)")
    parser.add_argument("--meta_batch_size", type=positive_int, default=128, help="tasks per step (default: 128)")
    parser.add_argument("--hidden_dim", type=positive_int, default=128,
                        help="LSTM hidden size (first LSTM, or the memory model's controller) (default: 128)")
    parser.add_argument("--learning_rate", type=learning_rate, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--train_steps", type=positive_int, default=25000, help="training steps (default: 25000)")
    parser.add_argument("--eval_freq", type=positive_int, default=100,
                        help="validate, log and checkpoint every this many steps (default: 100)")
    parser.add_argument("--model", choices=("lstm", "memory"), default="lstm",
                        help="lstm: the course's two stacked LSTMs; memory: Santoro et al. 2016 (default: lstm)")
    parser.add_argument("--memory_slots", type=positive_int, default=128, help="memory model: slots (default: 128)")
    parser.add_argument("--memory_dim", type=positive_int, default=40, help="memory model: slot size (default: 40)")
    parser.add_argument("--num_reads", type=positive_int, default=4, help="memory model: read heads (default: 4)")
    parser.add_argument("--key_strength", choices=("none", "learned"), default="none",
                        help="memory model: read with softmax(cosine) as Santoro et al. (none), or with a learned "
                             "per-head strength softmax(beta * cosine), beta = softplus(linear(h)), as the NTM "
                             "(learned) (default: none)")
    parser.add_argument("--lru_write", choices=LRU_WRITES, default="paper",
                        help="memory model: where a head's least-used write goes: paper = Santoro et al.'s w^lu, "
                             "all num_reads least-used slots for every head; per_head = head j to the j-th "
                             "least-used slot only (this repo's rule before 2026-12-04) (default: paper)")
    parser.add_argument("--memory_impl", choices=("auto", *MEMORY_IMPLS), default="auto",
                        help="memory model: plain = models.MemoryMANN, the paper's equations step by step; fast = "
                             "FastMemoryMANN, the same network in fewer, larger kernels; compiled = fast with each "
                             "step through torch.compile (compiles of some 20 s first); auto = compiled on a "
                             f"CPU with a C++ compiler for runs of {COMPILE_FROM_STEPS}+ steps, else fast. The same "
                             "weights and maths, so a --resume may change it (default: auto)")
    parser.add_argument("--protocol", choices=("course", "santoro"), default="course",
                        help="course: K support rows then a query row, loss on the query; santoro: Santoro et al. "
                             "2016's episodes, labels shown one step late, loss on every step (default: course)")
    parser.add_argument("--presentations", type=positive_int, default=10,
                        help="santoro protocol: presentations of each class per episode, so episodes are "
                             "num_classes * presentations steps long (default: 10, the paper's 5 x 10 = 50)")
    parser.add_argument("--eval_tasks", type=positive_int, default=None,
                        help="tasks scored on val and on test every --eval_freq steps (default: --meta_batch_size)")
    parser.add_argument("--num_test_tasks", type=positive_int, default=1000,
                        help="test tasks scored at the end (default: 1000)")
    parser.add_argument("--test", type=str2bool, nargs="?", const=True, default=False,
                        help="only evaluate the run's latest checkpoint on the test characters "
                             "(--test, --test true or --test false)")
    add_run_args(parser, seed_flag="--random_seed", seed_default=123)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with every default that depends on another flag resolved."""
    args = build_parser().parse_args(argv)
    args.eval_tasks = args.eval_tasks or args.meta_batch_size
    return args


def check_sizes(args: argparse.Namespace) -> None:
    """Refuse sizes whose memory no device here has. A lower bound of what one step holds: the meta-batch
    (B tasks of T steps, an image and a label each), the LSTM states of every step kept for backward, the
    memory model's memory at every step, and the weights with their gradients and Adam's moments."""
    steps = args.num_classes * (args.presentations if args.protocol == "santoro" else args.num_shot + 1)
    rows = args.meta_batch_size * steps
    memory = rows * args.memory_slots * args.memory_dim if args.model == "memory" else 0
    weights = 4 * args.hidden_dim * (784 + args.num_classes + args.hidden_dim)
    check_fits(4 * (rows * (784 + args.num_classes + 8 * args.hidden_dim) + memory) + 16 * weights,
               f"--meta_batch_size {args.meta_batch_size} x {steps} steps with --hidden_dim {args.hidden_dim}"
               + (f", --memory_slots {args.memory_slots} x --memory_dim {args.memory_dim}" if memory else ""),
               "lower the largest of these")
    # An evaluation keeps one accuracy per task (float32) until it reports: found before training, not after it.
    tasks = max(args.eval_tasks, args.num_test_tasks)
    check_fits(4 * tasks, f"--eval_tasks {args.eval_tasks} / --num_test_tasks {args.num_test_tasks} (an accuracy "
               "per task)", "lower them")


def run_name(args: argparse.Namespace, precision: str | None = None) -> str:
    """Every hyper-parameter in the name, the resolved precision included (resolved here when not given)."""
    if precision is None:
        precision = resolve_precision(args.precision, resolve_device(args.device), FP32_BECAUSE)[0]
    santoro = args.protocol == "santoro"
    parts = {"N": args.num_classes, **({"P": args.presentations} if santoro else {"K": args.num_shot}),
             "B": args.meta_batch_size, "H": args.hidden_dim, "lr": args.learning_rate, "steps": args.train_steps,
             "prec": precision, "seed": args.random_seed}
    if args.model == "memory":
        parts.update(slots=args.memory_slots, mdim=args.memory_dim, reads=args.num_reads,
                     **({"ks": args.key_strength} if args.key_strength != "none" else {}), lru=args.lru_write)
    return build_run_name(f"{args.model}_santoro" if santoro else args.model, parts)


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    """``--log_dir``, or ``runs/hw1_mann/<run name>``."""
    return resolve_run_dir(args.log_dir, HOMEWORK, run_name(args, precision))


def make_sampler(args: argparse.Namespace, split_images: torch.Tensor, device: torch.device,
                 seed: int) -> TaskSampler:
    """The task sampler of ``--protocol`` on one split."""
    if args.protocol == "santoro":
        return SantoroSampler(split_images, args.num_classes, args.presentations, device, seed)
    return CourseSampler(split_images, args.num_classes, args.num_shot, device, seed)


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_sizes(args)
    device, precision = setup_compute(args.device, args.precision, args.threads, fp32_because=FP32_BECAUSE)
    # torchrun's process group (one process: nothing), every meta-batch split evenly over it
    parallel = DataParallel.join(device, args.meta_batch_size, batch_flag="--meta_batch_size")
    device = parallel.device  # under torchrun, cuda -> cuda:LOCAL_RANK

    # Everything that can fail before training fails here, before the run folder exists.
    def load_splits() -> dict[str, torch.Tensor]:
        store = OmniglotStore.load(args.data_dir)
        splits = {name: store.split(name) for name in ("train", "val", "test")}
        sizes = {name: len(images) for name, images in splits.items()}
        if args.protocol == "santoro":
            check_episode_shape(args.num_classes, args.presentations, sizes)
        else:
            check_task_shape(args.num_classes, args.num_shot, sizes)
        return splits

    splits = parallel.main_first(load_splits)
    args.memory_impl = memory_impl = resolve_memory_impl(args, device)  # hparams and results.json record it resolved
    seed_everything(args.random_seed)  # before the model is built: its initial weights depend on the seed
    model = build_model(args.model, args.num_classes, args.hidden_dim, memory_slots=args.memory_slots,
                        memory_dim=args.memory_dim, num_reads=args.num_reads,
                        key_strength=args.key_strength == "learned", lru_write=args.lru_write,
                        memory_impl=memory_impl).to(device)
    if precision == "bf16":
        check_bf16_runs(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    samplers = {name: make_sampler(args, splits[split], device, args.random_seed + i)
                for i, (name, split) in enumerate(SAMPLERS)}

    hparams = {**{k: v for k, v in vars(args).items() if k not in {"resume", "test"}}, "precision": precision}
    run_dir = run_folder(args, precision)
    if args.test:
        state = parallel.read_checkpoint(run_dir)  # a one-line error when there is none
        with open_run(parallel, run_dir, hparams, resume=True):  # same flags as the run
            parallel.on_main(lambda: check_model(run_dir, state, model))
            result = evaluate_checkpoint(args, model, state, samplers["final"], parallel, precision)
    else:
        with open_run(parallel, run_dir, hparams, resume=args.resume, test_hint="--test to evaluate it") as run:
            result = train(run, run_dir, args, model, optimizer, samplers, parallel, precision)
    parallel.close()
    return result


def open_run(parallel: DataParallel, run_dir: Path, hparams: dict[str, Any], resume: bool,
             test_hint: str = "") -> RunFolder | FollowerRun:
    """The run folder on rank 0 (lock, resume rules), a ``FollowerRun`` on the others."""
    return parallel.open_run(lambda: RunFolder.open(run_dir, hparams, resume=resume, resumable=RESUMABLE_FLAGS,
                                                    test_hint=test_hint, length_flag="train_steps",
                                                    legacy=LEGACY_FLAGS))


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, state: dict[str, Any],
                        final_tasks: TaskSampler, parallel: DataParallel, precision: str) -> dict[str, Any]:
    """Score the checkpoint's model on ``--num_test_tasks`` test tasks: the same tasks the end of
    training scores (the "final" sampler is untouched during training), so a finished run repeats its result."""
    model.load_state_dict(state["model"])
    with autocast(parallel.device, precision):
        result = evaluate(model, final_tasks, args.num_test_tasks, args.meta_batch_size, True, parallel)
    if parallel.is_main:
        print(f"test ({args.num_test_tasks} tasks, step {state['step']}): accuracy "
              f"{result['acc']:.4f} +- {result['acc_ci95']:.4f}; by instance {result['acc_by_instance']}")
    return {"step": state["step"], **{f"test_{k}": v for k, v in result.items()}}


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            samplers: dict[str, TaskSampler]) -> tuple[int, list[dict[str, Any]]]:
    """Continue from a checkpoint: its step and the curve so far."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name in ("train", "val", "test"):
        samplers[name].load_state_dict(state[f"{name}_tasks"])
    restore_rng_state(state["rng"])
    return state["step"], list(state["history"])


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, samplers: dict[str, TaskSampler],
                     history: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything :func:`restore` needs to continue the run exactly."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "train_tasks": samplers["train"].state_dict(), "val_tasks": samplers["val"].state_dict(),
            "test_tasks": samplers["test"].state_dict(), "rng": capture_rng_state(), "history": history}


def train_step(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler,
               run: RunFolder | FollowerRun, parallel: DataParallel, step: int, precision: str) -> float:
    """One meta-batch; returns its loss (the whole meta-batch's, on every rank)."""
    # Every rank draws the whole meta-batch (so the sampler state is the same everywhere), keeps its share.
    batch = sampler.sample(args.meta_batch_size)  # CourseBatch or SantoroBatch, [B, ...]
    batch = parallel.my_share(batch)  # [B/N, ...] under torchrun
    with autocast(parallel.device, precision):
        loss = sequence_loss(model(batch.images, batch.labels), batch.labels)
    # Every step, before the update: a NaN/inf loss stops the run here (exit 2, no results.json),
    # not up to --eval_freq steps later with the weights already poisoned. The mean over the
    # ranks is the whole meta-batch's loss, the same on every rank: all ranks stop together.
    train_loss = parallel.mean({"loss": loss})["loss"]
    run.check_loss(train_loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parallel.sync(model)  # the whole meta-batch's gradient
    optimizer.step()
    return train_loss


Score = Callable[..., dict[str, Any]]  # (sampler name, number of tasks, by_instance) -> evaluate's figures


def validate(args: argparse.Namespace, score: Score, step: int, train_loss: float,
             steps_per_sec: float) -> tuple[dict[str, Any], dict[str, float]]:
    """The periodic scores of a meta-batch of val and of test tasks: (history record, TensorBoard scalars)."""
    santoro = args.protocol == "santoro"  # Santoro et al.'s curve is by instance, and there it costs no extra forward
    val = score("val", args.eval_tasks, by_instance=santoro)
    test = score("test", args.eval_tasks, by_instance=santoro)
    record = {"step": step, "train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
              "test_loss": test["loss"], "test_acc": test["acc"]}
    scalars = {"train/loss": train_loss, "val/loss": val["loss"], "val/acc": val["acc"],
               "test/loss": test["loss"], "test/acc": test["acc"], "train/steps_per_sec": steps_per_sec}
    if santoro:
        record.update(val_acc_by_instance=val["acc_by_instance"], test_acc_by_instance=test["acc_by_instance"])
        scalars.update({f"test/acc_instance{i}": test["acc_by_instance"][i - 1]
                        for i in INSTANCES if i <= args.presentations})
    return record, scalars


def train(run: RunFolder | FollowerRun, run_dir: Path, args: argparse.Namespace, model: nn.Module,
          optimizer: torch.optim.Optimizer, samplers: dict[str, TaskSampler], parallel: DataParallel,
          precision: str) -> dict[str, Any]:
    """Train to ``--train_steps`` (from the latest checkpoint on --resume), then score the final model."""
    state = parallel.resume_state(run, model)  # rank 0 reads it; every rank continues from it
    start_step, history = restore(state, model, optimizer, samplers) if state is not None else (0, [])

    def score(name: str, num_tasks: int, by_instance: bool = False) -> dict[str, Any]:
        with autocast(parallel.device, precision):
            return evaluate(model, samplers[name], num_tasks, args.meta_batch_size, by_instance, parallel)

    # closing(): the logger of ranks other than 0 writes nothing and is no context manager.
    logger = run.logger(start_step=start_step, total_steps=args.train_steps, desc=run_dir.name)
    with contextlib.closing(logger):
        logger.write(f"run folder: {run_dir}" + (f" (resuming at step {start_step})" if start_step else "")
                     + parallel.processes_note)
        train_seconds, timed_steps = 0.0, 0
        model.train()
        for step in range(start_step + 1, args.train_steps + 1):
            tic = time.perf_counter()
            train_loss = train_step(args, model, optimizer, samplers["train"], run, parallel, step, precision)
            train_seconds += time.perf_counter() - tic
            timed_steps += 1
            if step % args.eval_freq == 0 or step == args.train_steps:
                record, scalars = validate(args, score, step, train_loss, timed_steps / max(train_seconds, 1e-9))
                history.append(record)
                logger.log(scalars, step)
                logger.advance(step, loss=train_loss, val_acc=record["val_acc"])
                # refuses non-finite weights: the last good checkpoint is never pushed out
                run.save(step, checkpoint_state(model, optimizer, samplers, history), keep_last=2)

        final = score("final", args.num_test_tasks, by_instance=True)
        steps_per_sec = timed_steps / max(train_seconds, 1e-9)
        logger.write(f"test ({args.num_test_tasks} tasks): accuracy {final['acc']:.4f} +- {final['acc_ci95']:.4f}"
                     f"; by instance {[round(a, 4) for a in final['acc_by_instance']]}; {steps_per_sec:.1f} steps/s")
        metrics = {"test_acc": final["acc"], "test_acc_ci95": final["acc_ci95"], "test_loss": final["loss"],
                   "test_acc_by_instance": final["acc_by_instance"],
                   "val_acc": history[-1]["val_acc"] if history else None, "steps": args.train_steps,
                   "steps_per_sec": steps_per_sec, "memory_impl": args.memory_impl, "history": history}
        logger.finish(metrics)
    return metrics


if __name__ == "__main__":
    main()
