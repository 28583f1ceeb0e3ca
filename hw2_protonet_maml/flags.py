"""The flags every hw2 script shares, resolved once: names and defaults of the course code, the
course's reading of ``--test``, the checks, the run folder's name and the trainer's settings.

The course tests a trained run by pointing ``--log_dir`` at it and giving the test tasks' sizes
with the training flags' names (its ``q3.sh``: ``--log_dir <run> --num_support 4 --num_query 10
--test``). :func:`parse_hw2_args` reads such a line as the course means it: the flags left out are
the run's (from its ``hparams.json``), and ``--num_way`` / ``--num_support`` / ``--num_query`` given
with other values than the run's become ``--test_num_way`` / ``--test_num_support`` /
``--test_num_query``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import RUN_ONLY_FLAGS, add_run_args, learning_rate, positive_float, positive_int
from common.errors import CS330Error
from common.limits import check_fits
from common.omniglot import NUM_DRAWINGS, PROTOCOLS
from common.readback import read_json
from common.runlog import build_run_name, resolve_run_dir

HOMEWORK = "hw2_protonet_maml"
# Flags a --resume may change: the run length, intervals and what is evaluated at the end.
RESUMABLE_FLAGS = ("num_train_iterations", "val_interval", "save_interval", "num_val_tasks", "num_test_tasks",
                   "test_num_way", "test_num_support", "test_num_query", "checkpoint_step")
TASK_SIZES = ("num_way", "num_support", "num_query")  # each has a test_ twin


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
    test = parser.add_argument_group(
        "evaluation", "--test --log_dir RUN reads the course's way: flags left out are the run's, and "
        "--num_way/--num_support/--num_query other than the run's are the test tasks' sizes")
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


def add_schedule_args(group: argparse._ArgumentGroup) -> None:
    """The learning-rate schedule and early stopping on validation (the ProtoNet paper's training);
    both off by default, as in the course."""
    group.add_argument("--lr_step_size", type=positive_int, default=None,
                       help="multiply the learning rate by --lr_gamma every this many iterations (the ProtoNet "
                            "paper: halved every 2000 episodes) (default: constant)")
    group.add_argument("--lr_gamma", type=positive_float, default=0.5,
                       help="the factor of --lr_step_size (default: 0.5)")
    group.add_argument("--patience", type=positive_int, default=None,
                       help="early stopping: stop once validation accuracy has not improved for this many "
                            "validations in a row (one every --val_interval), and test the weights of the best "
                            "validation (default: off: train --num_train_iterations, test the last weights)")


def schedule_run_params(args: argparse.Namespace) -> dict:
    """The run-name parts of :func:`add_schedule_args` (none when both are off: default names stay)."""
    return ({"lrstep": args.lr_step_size, "gamma": args.lr_gamma} if args.lr_step_size else {}) \
        | ({"pat": args.patience} if args.patience else {})


# ---------------------------------------------------------------------------- parsing
def parse_hw2_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The flags, with ``--test --log_dir RUN`` read as the course means it (module docstring), the
    test tasks' sizes resolved (``--test_num_*`` defaults to the training's) and checked."""
    args = parser.parse_args(argv)
    if args.test and args.log_dir is not None and (Path(args.log_dir) / "hparams.json").is_file():
        args = with_run_settings(args, explicit_flags(parser, argv), Path(args.log_dir) / "hparams.json")
    for name in TASK_SIZES:
        if getattr(args, f"test_{name}") is None:
            setattr(args, f"test_{name}", getattr(args, name))
    check_drawings(parser, args)
    return args


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags ``argv`` gives, told apart from defaults by parsing again with
    every default suppressed (argparse then sets only what the command line names)."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def with_run_settings(args: argparse.Namespace, given: set[str], hparams_path: Path) -> argparse.Namespace:
    """``args`` with every flag the command line left out taken from the run's ``hparams.json``, and
    task sizes given with other values than the run's moved to their ``test_`` twins."""
    saved = read_json(hparams_path, "it holds the flags the run trained with, which --test reads; restore it "
                                    "from a copy of the run, or retrain")
    per_invocation = RUN_ONLY_FLAGS | {"checkpoint_step"}  # what a --test line sets for itself
    values = vars(args) | {name: value for name, value in saved.items()
                           if name in vars(args) and name not in given and name not in per_invocation}
    for name in TASK_SIZES:
        if name in given and f"test_{name}" not in given and name in saved and values[name] != saved[name]:
            values[f"test_{name}"], values[name] = values[name], saved[name]
    return argparse.Namespace(**values)


def check_drawings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse support + query sets that an Omniglot character (20 drawings) cannot fill."""
    for prefix in ("", "test_"):
        k, q = getattr(args, f"{prefix}num_support"), getattr(args, f"{prefix}num_query")
        if k + q > NUM_DRAWINGS:
            parser.error(f"--{prefix}num_support + --{prefix}num_query = {k + q}, but an Omniglot character has "
                         f"only {NUM_DRAWINGS} drawings")
    check_batch_memory(parser, args)


def check_batch_memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a meta-batch whose images alone (float32 28x28) exceed the memory of every device here, and
    task counts whose per-task accuracies (Python floats, then results.json) could not be held."""
    way = max(getattr(args, "train_num_way", None) or args.num_way, args.test_num_way)
    shots = max(args.num_support + args.num_query, args.test_num_support + args.test_num_query)
    try:
        check_fits(4 * 28 * 28 * args.batch_size * way * shots,
                   f"--batch_size {args.batch_size} tasks of {way} classes x {shots} images", "lower --batch_size")
        check_fits(32 * max(args.num_val_tasks, args.num_test_tasks), f"--num_val_tasks {args.num_val_tasks} / "
                   f"--num_test_tasks {args.num_test_tasks} (an accuracy per task)", "lower them")
    except CS330Error as err:
        parser.error(str(err))


def check_inner_loop_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.test_num_way != args.num_way:
        parser.error(f"--test_num_way {args.test_num_way} differs from --num_way {args.num_way}: the network's "
                     "output layer has exactly --num_way classes")


# ---------------------------------------------------------------------------- run folder and settings
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
    """Everything :class:`training.MetaTrainer` reads, as explicit values (built once from the flags)."""

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
    lr_step_size: int | None = None  # off: a constant learning rate
    lr_gamma: float = 0.5
    patience: int | None = None  # off: no early stopping

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device, precision: str, run_dir: Path,
                  train_num_way: int | None = None) -> TrainSettings:
        return cls(
            train_num_way=train_num_way or args.num_way, num_support=args.num_support, num_query=args.num_query,
            batch_size=args.batch_size, protocol=args.protocol, num_train_iterations=args.num_train_iterations,
            val_interval=args.val_interval, num_val_tasks=args.num_val_tasks, save_interval=args.save_interval,
            test_num_way=args.test_num_way, test_num_support=args.test_num_support,
            test_num_query=args.test_num_query, num_test_tasks=args.num_test_tasks,
            seed=args.seed, device=device, precision=precision, data_dir=args.data_dir, run_dir=run_dir,
            resume=args.resume, **{name: getattr(args, name) for name in ("lr_step_size", "lr_gamma", "patience")
                                   if hasattr(args, name)})  # the scripts with add_schedule_args
