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

from common import distributed
from common.checkpoint import capture_rng_state, check_model, load_checkpoint, restore_rng_state
from common.cli import add_run_args, learning_rate, positive_int
from common.device import autocast, resolve_device, resolve_precision, setup_compute
from common.errors import CS330Error, cli_main
from common.limits import check_fits
from common.omniglot import OmniglotStore
from common.run import RunFolder
from common.runlog import build_run_name, resolve_run_dir
from common.seeding import seed_everything
from common.stats import mean_ci95
from hw1_mann.data import CourseSampler, SantoroSampler, TaskBatch, TaskSampler, check_episode_shape, check_task_shape
from hw1_mann.evaluate import batch_scores, batch_sizes, evaluate
from hw1_mann.models import build_model, sequence_loss

HOMEWORK = "hw1_mann"
# Flags a --resume (or --test) may change besides common.cli.RUN_ONLY_FLAGS: the run length, the
# evaluation interval and the numbers of tasks scored do not change the weights trained so far.
RESUMABLE_FLAGS = ("train_steps", "eval_freq", "eval_tasks", "num_test_tasks")
FP32_BECAUSE = "hw1's LSTM/memory models were not measured faster in bf16"
# The samplers of a run: each its own seeded generator, so validation never shifts the training data
# order. "test" is the small test meta-batch of every --eval_freq step; "final" scores the end model.
SAMPLERS = (("train", "train"), ("val", "val"), ("test", "test"), ("final", "test"))
INSTANCES = (1, 2, 3, 4, 5, 10)  # the columns of Santoro et al.'s table 1, logged under --protocol santoro


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
        parts.update(slots=args.memory_slots, mdim=args.memory_dim, reads=args.num_reads)
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
    world = distributed.init_from_env(device)  # one process: nothing happens
    check_meta_batch_split(args.meta_batch_size, world)
    device = world.device  # under torchrun, cuda -> cuda:LOCAL_RANK

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

    # Rank 0 first (it may download and cache the data; a refusal is one error line), then the others.
    splits = distributed.run_on_main(load_splits, world)
    splits = splits if world.is_main else load_splits()
    seed_everything(args.random_seed)  # before the model is built: its initial weights depend on the seed
    model = build_model(args.model, args.num_classes, args.hidden_dim, memory_slots=args.memory_slots,
                        memory_dim=args.memory_dim, num_reads=args.num_reads).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    samplers = {name: make_sampler(args, splits[split], device, args.random_seed + i)
                for i, (name, split) in enumerate(SAMPLERS)}

    hparams = {**{k: v for k, v in vars(args).items() if k not in {"resume", "test"}}, "precision": precision}
    run_dir = run_folder(args, precision)
    # Checkpoints are read by rank 0 alone and sent to the others through the CPU.
    location = "cpu" if world.enabled else device
    if args.test:
        # A one-line error when there is none.
        state = distributed.run_on_main(lambda: load_checkpoint(run_dir, map_location=location), world, share=True)
        with open_run(world, run_dir, hparams, resume=True):  # same flags as the run
            distributed.run_on_main(lambda: check_model(run_dir, state, model), world)
            result = evaluate_checkpoint(args, model, state, samplers["final"], world, precision)
    else:
        with open_run(world, run_dir, hparams, resume=args.resume, test_hint="--test to evaluate it") as run:
            result = train(run, run_dir, args, model, optimizer, samplers, world, precision, location)
    distributed.destroy(world)
    return result


def check_meta_batch_split(meta_batch_size: int, world: distributed.World) -> None:
    """``common.distributed.check_batch_split`` (an even split of every meta-batch, else one error line
    from rank 0 and the same exit status from all), in the words of hw1's flag."""
    try:
        distributed.check_batch_split(meta_batch_size, world)
    except CS330Error as err:
        raise CS330Error(str(err).replace("--batch_size", "--meta_batch_size")) from None


def open_run(world: distributed.World, run_dir: Path, hparams: dict[str, Any], resume: bool,
             test_hint: str = "") -> RunFolder | distributed.FollowerRun:
    """Rank 0 opens the run folder (lock, resume rules); a refusal stops every rank. The other ranks
    get a ``FollowerRun``, which writes nothing but stops where rank 0 stops."""
    run = distributed.run_on_main(lambda: RunFolder.open(run_dir, hparams, resume=resume, resumable=RESUMABLE_FLAGS,
                                                         test_hint=test_hint, length_flag="train_steps"), world)
    return run if world.is_main else distributed.FollowerRun()


def my_tasks(batch: TaskBatch, world: distributed.World) -> TaskBatch:
    """This rank's contiguous share of a meta-batch (all of it for one process): rank r of N takes
    tasks [r*B/N, (r+1)*B/N), so the shares in rank order are the meta-batch."""
    if not world.enabled:
        return batch
    tasks = distributed.shard(0, batch.images.shape[0], world)
    return type(batch)(*(t[tasks] for t in batch))  # every field [B/N, ...]


@torch.no_grad()
def evaluate_split(model: nn.Module, sampler: TaskSampler, num_tasks: int, batch_size: int,
                   world: distributed.World, by_instance: bool = False) -> dict[str, float | list[float]]:
    """``hw1_mann.evaluate.evaluate``, with the batches split over the ranks (that very function for one process).

    Every rank draws every batch (so the tasks, and the sampler's state, are one process's) and scores
    batches r, r+N, r+2N, ... whole; the per-batch figures are gathered in batch order and combined as
    ``evaluate`` combines them, so every figure is the single-process one, bit for bit.
    """
    if not world.enabled:
        return evaluate(model, sampler, num_tasks, batch_size, by_instance=by_instance)
    was_training = model.training
    model.eval()
    mine = []  # (batch index, per-task accuracies [size], loss * size, accuracy sums by instance [I] | None)
    for index, size in enumerate(batch_sizes(num_tasks, batch_size)):
        batch = sampler.sample(size)
        if index % world.world_size != world.rank:
            continue
        accuracies, loss_sum, by_row = batch_scores(model, batch, by_instance)
        mine.append((index, accuracies.cpu(), loss_sum, by_row.cpu() if by_instance else None))
    model.train(was_training)
    batches = sorted(distributed.gather_lists(mine, world), key=lambda batch: batch[0])
    acc, ci95 = mean_ci95(torch.cat([accuracies for _, accuracies, _, _ in batches]).numpy())
    result: dict[str, float | list[float]] = {"acc": acc, "acc_ci95": ci95,
                                               "loss": sum(loss for _, _, loss, _ in batches) / num_tasks}
    if by_instance:  # summed where evaluate sums them (on the device), in the same order
        by_row = torch.stack([row for _, _, _, row in batches]).to(world.device)  # [num_batches, I]
        result["acc_by_instance"] = (by_row.sum(0) / num_tasks).tolist()
    return result


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, state: dict[str, Any],
                        final_tasks: TaskSampler, world: distributed.World, precision: str) -> dict[str, Any]:
    """Score the checkpoint's model on ``--num_test_tasks`` test tasks: the same tasks the end of
    training scores (the "final" sampler is untouched during training), so a finished run repeats its result."""
    model.load_state_dict(state["model"])
    with autocast(world.device, precision):
        result = evaluate_split(model, final_tasks, args.num_test_tasks, args.meta_batch_size, world, by_instance=True)
    if world.is_main:
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
               run: RunFolder | distributed.FollowerRun, world: distributed.World, step: int, precision: str) -> float:
    """One meta-batch; returns its loss (the whole meta-batch's, on every rank)."""
    # Every rank draws the whole meta-batch (so the sampler state is the same everywhere), keeps its share.
    batch = sampler.sample(args.meta_batch_size)  # CourseBatch or SantoroBatch, [B, ...]
    batch = my_tasks(batch, world)  # [B/N, ...] under torchrun
    with autocast(world.device, precision):
        loss = sequence_loss(model(batch.images, batch.labels), batch.labels)
    # Every step, before the update: a NaN/inf loss stops the run here (exit 2, no results.json),
    # not up to --eval_freq steps later with the weights already poisoned. The mean over the
    # ranks is the whole meta-batch's loss, the same on every rank: all ranks stop together.
    train_loss = distributed.mean_over_ranks({"loss": loss}, world)["loss"]
    run.check_loss(train_loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(model.parameters(), world)  # the whole meta-batch's gradient
    optimizer.step()
    return train_loss


Score = Callable[..., dict[str, Any]]  # (sampler name, number of tasks, by_instance) -> evaluate_split's figures


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


def train(run: RunFolder | distributed.FollowerRun, run_dir: Path, args: argparse.Namespace, model: nn.Module,
          optimizer: torch.optim.Optimizer, samplers: dict[str, TaskSampler], world: distributed.World,
          precision: str, location: str | torch.device) -> dict[str, Any]:
    """Train to ``--train_steps`` (from the latest checkpoint on --resume), then score the final model."""
    # Rank 0 reads the checkpoint; every rank continues from it.
    state = distributed.run_on_main(lambda: run.resume_state(map_location=location, model=model), world, share=True)
    start_step, history = restore(state, model, optimizer, samplers) if state is not None else (0, [])

    def score(name: str, num_tasks: int, by_instance: bool = False) -> dict[str, Any]:
        with autocast(world.device, precision):
            return evaluate_split(model, samplers[name], num_tasks, args.meta_batch_size, world, by_instance)

    # closing(): the logger of ranks other than 0 writes nothing and is no context manager.
    logger = run.logger(start_step=start_step, total_steps=args.train_steps, desc=run_dir.name)
    with contextlib.closing(logger):
        logger.write(f"run folder: {run_dir}" + (f" (resuming at step {start_step})" if start_step else "")
                     + (f" ({world.world_size} processes)" if world.enabled else ""))
        train_seconds, timed_steps = 0.0, 0
        model.train()
        for step in range(start_step + 1, args.train_steps + 1):
            tic = time.perf_counter()
            train_loss = train_step(args, model, optimizer, samplers["train"], run, world, step, precision)
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
                   "steps_per_sec": steps_per_sec, "history": history}
        logger.finish(metrics)
    return metrics


if __name__ == "__main__":
    main()
