"""Train a black-box meta-learner (course LSTM MANN or Santoro et al.'s memory network) on Omniglot.

    python hw1_mann/train.py --num_classes 3 --num_shot 1            # course LSTM, 3-way 1-shot
    python hw1_mann/train.py --num_classes 4 --model memory          # external-memory MANN
    python hw1_mann/train.py ... --resume                            # continue a killed run
    python hw1_mann/train.py ... --test                              # re-evaluate a finished run on test

Every ``--eval_freq`` steps one meta-batch of validation tasks and one of test tasks are scored
(TensorBoard ``val/*`` and ``test/*``) and a checkpoint is written; at the end the final model is
scored on ``--num_test_tasks`` test tasks (mean query accuracy with its 95% interval, and accuracy
by instance number) and everything goes to ``results.json`` in the run folder.

The run folder follows ``common.run.RunFolder``: one run at a time per folder, ``--resume`` only
with the run's flags (``--train_steps``, ``--eval_freq`` and ``--num_test_tasks`` may change), the
loss checked for NaN/inf at every step, and no checkpoint ever written with non-finite weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from common.cli import add_run_args, positive_float, positive_int
from common.device import autocast, resolve_device, resolve_precision, setup_compute
from common.errors import cli_main
from common.omniglot import OmniglotStore
from common.run import RunFolder
from common.runlog import build_run_name, runs_root
from common.seeding import seed_everything
from hw1_mann.data import SequenceSampler, check_task_shape
from hw1_mann.evaluate import evaluate
from hw1_mann.models import build_model, query_loss

HOMEWORK = "hw1_mann"
# Flags a --resume (or --test) may change besides common.cli.RUN_ONLY_FLAGS: the run length, the
# evaluation interval and the number of final test tasks do not change the weights trained so far.
RESUMABLE_FLAGS = ("train_steps", "eval_freq", "num_test_tasks")
FP32_BECAUSE = "hw1's LSTM/memory models were not measured faster in bf16"
# The samplers of a run: each its own seeded generator, so validation never shifts the training data
# order. "test" is the small test meta-batch of every --eval_freq step; "final" scores the end model.
SAMPLERS = (("train", "train"), ("val", "val"), ("test", "test"), ("final", "test"))


def str2bool(text: str) -> bool:
    """``true/false, yes/no, 1/0`` -> bool (argparse's ``type=bool`` would turn "False" into True)."""
    value = text.strip().lower()
    if value in {"true", "t", "yes", "y", "1", "on"}:
        return True
    if value in {"false", "f", "no", "n", "0", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_classes", type=positive_int, default=5, help="N: classes per task (default: 5)")
    parser.add_argument("--num_shot", type=positive_int, default=1,
                        help="K: labelled examples per class before the query (default: 1)")
    parser.add_argument("--meta_batch_size", type=positive_int, default=128, help="tasks per step (default: 128)")
    parser.add_argument("--hidden_dim", type=positive_int, default=128,
                        help="LSTM hidden size (first LSTM, or the memory model's controller) (default: 128)")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--train_steps", type=positive_int, default=25000, help="training steps (default: 25000)")
    parser.add_argument("--eval_freq", type=positive_int, default=100,
                        help="validate, log and checkpoint every this many steps (default: 100)")
    parser.add_argument("--model", choices=("lstm", "memory"), default="lstm",
                        help="lstm: the course's two stacked LSTMs; memory: Santoro et al. 2016 (default: lstm)")
    parser.add_argument("--memory_slots", type=positive_int, default=128, help="memory model: slots (default: 128)")
    parser.add_argument("--memory_dim", type=positive_int, default=40, help="memory model: slot size (default: 40)")
    parser.add_argument("--num_reads", type=positive_int, default=4, help="memory model: read heads (default: 4)")
    parser.add_argument("--num_test_tasks", type=positive_int, default=1000,
                        help="test tasks scored at the end (default: 1000)")
    parser.add_argument("--test", type=str2bool, nargs="?", const=True, default=False,
                        help="only evaluate the run's latest checkpoint on the test characters "
                             "(--test, --test true or --test false)")
    add_run_args(parser, seed_flag="--random_seed", seed_default=123)
    return parser.parse_args(argv)


def run_name(args: argparse.Namespace, precision: str | None = None) -> str:
    """Every hyper-parameter in the name, the resolved precision included (resolved here when not given)."""
    if precision is None:
        precision = resolve_precision(args.precision, resolve_device(args.device), FP32_BECAUSE)[0]
    parts = {"N": args.num_classes, "K": args.num_shot, "B": args.meta_batch_size, "H": args.hidden_dim,
             "lr": args.learning_rate, "steps": args.train_steps, "prec": precision, "seed": args.random_seed}
    if args.model == "memory":
        parts.update(slots=args.memory_slots, mdim=args.memory_dim, reads=args.num_reads)
    return build_run_name(args.model, parts)


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads, fp32_because=FP32_BECAUSE)

    # Everything that can fail before training fails here, before the run folder exists.
    store = OmniglotStore.load(args.data_dir)
    splits = {name: store.split(name) for name in ("train", "val", "test")}
    check_task_shape(args.num_classes, args.num_shot, {name: len(images) for name, images in splits.items()})
    seed_everything(args.random_seed)  # before the model is built: its initial weights depend on the seed
    model = build_model(args.model, args.num_classes, args.hidden_dim, memory_slots=args.memory_slots,
                        memory_dim=args.memory_dim, num_reads=args.num_reads).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    samplers = {name: SequenceSampler(splits[split], args.num_classes, args.num_shot, device, args.random_seed + i)
                for i, (name, split) in enumerate(SAMPLERS)}

    hparams = {**{k: v for k, v in vars(args).items() if k not in {"resume", "test"}}, "precision": precision}
    run_dir = Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / run_name(args, precision)
    if args.test:
        state = load_checkpoint(run_dir, map_location=device)  # a one-line error when there is none
        with RunFolder.open(run_dir, hparams, resume=True, resumable=RESUMABLE_FLAGS):  # same flags as the run
            return evaluate_checkpoint(args, model, state, samplers["final"], device, precision)
    with RunFolder.open(run_dir, hparams, resume=args.resume, resumable=RESUMABLE_FLAGS,
                        test_hint="--test to evaluate it") as run:
        return train(run, args, model, optimizer, samplers, device, precision)


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, state: dict[str, Any],
                        final_tasks: SequenceSampler, device: torch.device, precision: str) -> dict[str, Any]:
    """Score the checkpoint's model on ``--num_test_tasks`` test tasks: the same tasks the end of
    training scores (the "final" sampler is untouched during training), so a finished run repeats its result."""
    model.load_state_dict(state["model"])
    with autocast(device, precision):
        result = evaluate(model, final_tasks, args.num_test_tasks, args.meta_batch_size, by_instance=True)
    print(f"test ({args.num_test_tasks} tasks, step {state['step']}): query accuracy "
          f"{result['acc']:.4f} +- {result['acc_ci95']:.4f}; by instance {result['acc_by_instance']}")
    return {"step": state["step"], **{f"test_{k}": v for k, v in result.items()}}


def train(run: RunFolder, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
          samplers: dict[str, SequenceSampler], device: torch.device, precision: str) -> dict[str, Any]:
    """Train to ``--train_steps`` (from the latest checkpoint on --resume), then score the final model."""
    start_step, history = 0, []
    state = run.resume_state(map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for name in ("train", "val", "test"):
            samplers[name].load_state_dict(state[f"{name}_tasks"])
        restore_rng_state(state["rng"])
        start_step, history = state["step"], list(state["history"])

    def score(name: str, num_tasks: int, by_instance: bool = False) -> dict[str, Any]:
        with autocast(device, precision):
            return evaluate(model, samplers[name], num_tasks, args.meta_batch_size, by_instance=by_instance)

    with run.logger(start_step=start_step, total_steps=args.train_steps, desc=run.path.name) as logger:
        logger.write(f"run folder: {run.path}" + (f" (resuming at step {start_step})" if start_step else ""))
        train_seconds, timed_steps = 0.0, 0
        model.train()
        for step in range(start_step + 1, args.train_steps + 1):
            tic = time.perf_counter()
            batch = samplers["train"].sample(args.meta_batch_size)  # images [B, K+1, N, 784], labels [B, K+1, N, N]
            with autocast(device, precision):
                loss = query_loss(model(*batch), batch.labels)
            # Every step, before the update: a NaN/inf loss stops the run here (exit 2, no results.json),
            # not up to --eval_freq steps later with the weights already poisoned.
            train_loss = loss.item()
            run.check_loss(train_loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_seconds += time.perf_counter() - tic
            timed_steps += 1

            if step % args.eval_freq == 0 or step == args.train_steps:
                val = score("val", args.meta_batch_size)
                test = score("test", args.meta_batch_size)
                record = {"step": step, "train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
                          "test_loss": test["loss"], "test_acc": test["acc"]}
                history.append(record)
                logger.log({"train/loss": train_loss, "val/loss": val["loss"], "val/acc": val["acc"],
                            "test/loss": test["loss"], "test/acc": test["acc"],
                            "train/steps_per_sec": timed_steps / max(train_seconds, 1e-9)}, step)
                logger.advance(step, loss=train_loss, val_acc=val["acc"])
                run.save(step, {  # refuses non-finite weights: the last good checkpoint is never pushed out
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "train_tasks": samplers["train"].state_dict(), "val_tasks": samplers["val"].state_dict(),
                    "test_tasks": samplers["test"].state_dict(), "rng": capture_rng_state(), "history": history,
                }, keep_last=2)

        final = score("final", args.num_test_tasks, by_instance=True)
        steps_per_sec = timed_steps / max(train_seconds, 1e-9)
        logger.write(f"test ({args.num_test_tasks} tasks): query accuracy {final['acc']:.4f} +- {final['acc_ci95']:.4f}"
                     f"; by instance {[round(a, 4) for a in final['acc_by_instance']]}; {steps_per_sec:.1f} steps/s")
        metrics = {"test_acc": final["acc"], "test_acc_ci95": final["acc_ci95"], "test_loss": final["loss"],
                   "test_acc_by_instance": final["acc_by_instance"],
                   "val_acc": history[-1]["val_acc"] if history else None, "steps": args.train_steps,
                   "steps_per_sec": steps_per_sec, "history": history}
        logger.finish(metrics)
    return metrics


if __name__ == "__main__":
    main()
