"""Train a black-box meta-learner (course LSTM MANN or Santoro et al.'s memory network) on Omniglot.

    python hw1_mann/train.py --num_classes 3 --num_shot 1            # course LSTM, 3-way 1-shot
    python hw1_mann/train.py --num_classes 4 --model memory          # external-memory MANN
    python hw1_mann/train.py ... --resume                            # continue a killed run
    python hw1_mann/train.py ... --test                              # re-evaluate a finished run on test

Every ``--eval_freq`` steps one meta-batch of validation tasks and one of test tasks are scored
(TensorBoard ``val/*`` and ``test/*``) and a checkpoint is written; at the end the final model is
scored on ``--num_test_tasks`` test tasks (mean query accuracy with its 95% interval, and accuracy
by instance number) and everything goes to ``results.json`` in the run folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import (
    capture_rng_state,
    ensure_finite,
    load_checkpoint,
    refuse_existing_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from common.cli import add_run_args, positive_float, positive_int
from common.device import resolve_device
from common.errors import CS330Error, cli_main
from common.omniglot import OmniglotStore
from common.runlog import RunLogger, build_run_name, runs_root
from common.seeding import seed_everything
from hw1_mann.data import SequenceSampler, check_task_shape
from hw1_mann.evaluate import evaluate
from hw1_mann.models import build_model, query_loss

HOMEWORK = "hw1_mann"
# Flags that may differ when resuming or re-testing a run (they do not change what is trained).
_RUN_ONLY_FLAGS = {"device", "resume", "test", "log_dir", "data_dir", "num_test_tasks"}


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


def run_name(args: argparse.Namespace) -> str:
    parts = {"N": args.num_classes, "K": args.num_shot, "B": args.meta_batch_size, "H": args.hidden_dim,
             "lr": args.learning_rate, "steps": args.train_steps, "seed": args.random_seed}
    if args.model == "memory":
        parts.update(slots=args.memory_slots, mdim=args.memory_dim, reads=args.num_reads)
    return build_run_name(args.model, parts)


def _check_same_run(run_dir: Path, hparams: dict[str, Any]) -> None:
    """A resumed or re-tested run must use the flags it was trained with."""
    path = run_dir / "hparams.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    changed = [f"--{key} {saved.get(key)} -> {value}" for key, value in hparams.items()
               if key not in _RUN_ONLY_FLAGS and saved.get(key) != value]
    if changed:
        raise CS330Error(f"{run_dir} was trained with other flags ({'; '.join(changed)}); "
                         "use the original flags or a new --log_dir")


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    store = OmniglotStore.load(args.data_dir)
    splits = {name: store.split(name) for name in ("train", "val", "test")}
    check_task_shape(args.num_classes, args.num_shot, {name: len(images) for name, images in splits.items()})
    hparams = {k: v for k, v in vars(args).items() if k not in {"resume", "test"}}

    seed_everything(args.random_seed)
    model = build_model(args.model, args.num_classes, args.hidden_dim, memory_slots=args.memory_slots,
                        memory_dim=args.memory_dim, num_reads=args.num_reads).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    # Separate generators per split, so validation never shifts the training data order.
    seed = args.random_seed
    train_tasks = SequenceSampler(splits["train"], args.num_classes, args.num_shot, device, seed)
    val_tasks = SequenceSampler(splits["val"], args.num_classes, args.num_shot, device, seed + 1)
    test_tasks = SequenceSampler(splits["test"], args.num_classes, args.num_shot, device, seed + 2)
    final_tasks = SequenceSampler(splits["test"], args.num_classes, args.num_shot, device, seed + 3)

    name = run_name(args)
    start_step, history = 0, []
    run_dir = Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / name
    if args.resume or args.test:
        _check_same_run(run_dir, hparams)
        state = load_checkpoint(run_dir, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for sampler, key in ((train_tasks, "train_tasks"), (val_tasks, "val_tasks"), (test_tasks, "test_tasks")):
            sampler.load_state_dict(state[key])
        restore_rng_state(state["rng"])
        start_step, history = state["step"], list(state["history"])
        if args.test:
            result = evaluate(model, final_tasks, args.num_test_tasks, args.meta_batch_size, by_instance=True)
            print(f"test ({args.num_test_tasks} tasks, step {start_step}): query accuracy "
                  f"{result['acc']:.4f} +- {result['acc_ci95']:.4f}; by instance {result['acc_by_instance']}")
            return {"step": start_step, **{f"test_{k}": v for k, v in result.items()}}
    else:
        refuse_existing_checkpoints(run_dir, "--test to evaluate it")

    logger = RunLogger.for_homework(HOMEWORK, name, hparams, log_dir=str(run_dir), start_step=start_step,
                                    total_steps=args.train_steps, desc=name)
    if start_step:
        logger.write(f"resumed {run_dir} at step {start_step}")
    train_seconds, timed_steps = 0.0, 0
    model.train()
    for step in range(start_step + 1, args.train_steps + 1):
        tic = time.perf_counter()
        batch = train_tasks.sample(args.meta_batch_size)  # images [B, K+1, N, 784], labels [B, K+1, N, N]
        loss = query_loss(model(*batch), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - tic
        timed_steps += 1

        if step % args.eval_freq == 0 or step == args.train_steps:
            train_loss = loss.item()
            ensure_finite(train_loss, step, run_dir)
            val = evaluate(model, val_tasks, args.meta_batch_size, args.meta_batch_size)
            test = evaluate(model, test_tasks, args.meta_batch_size, args.meta_batch_size)
            record = {"step": step, "train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
                      "test_loss": test["loss"], "test_acc": test["acc"]}
            history.append(record)
            logger.log({"train/loss": train_loss, "val/loss": val["loss"], "val/acc": val["acc"],
                        "test/loss": test["loss"], "test/acc": test["acc"],
                        "train/steps_per_sec": timed_steps / max(train_seconds, 1e-9)}, step)
            logger.advance(step, loss=train_loss, val_acc=val["acc"])
            save_checkpoint(run_dir, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "train_tasks": train_tasks.state_dict(), "val_tasks": val_tasks.state_dict(),
                "test_tasks": test_tasks.state_dict(), "rng": capture_rng_state(), "history": history,
            }, keep_last=2)

    final = evaluate(model, final_tasks, args.num_test_tasks, args.meta_batch_size, by_instance=True)
    steps_per_sec = timed_steps / max(train_seconds, 1e-9)
    logger.write(f"test ({args.num_test_tasks} tasks): query accuracy {final['acc']:.4f} +- {final['acc_ci95']:.4f}"
                 f"; by instance {[round(a, 4) for a in final['acc_by_instance']]}; {steps_per_sec:.1f} steps/s")
    metrics = {"test_acc": final["acc"], "test_acc_ci95": final["acc_ci95"], "test_loss": final["loss"],
               "test_acc_by_instance": final["acc_by_instance"], "val_acc": history[-1]["val_acc"] if history else None,
               "steps": args.train_steps, "steps_per_sec": steps_per_sec, "history": history}
    logger.finish(metrics)
    logger.close()
    return metrics


if __name__ == "__main__":
    main()
