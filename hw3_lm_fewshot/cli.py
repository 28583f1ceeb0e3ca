"""The command line ft.py and icl.py share: their common flags, the run folder and its name's
common parts, the task data they check every k against, the precision policy and the Ctrl-C
message. (The checked model load is
``models.load_model``; the results table, also experiments.py's, is in ``results.py``.)"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from common.cli import add_run_args, int_list, positive_int
from common.device import resolve_device, resolve_precision
from common.errors import CS330Error
from common.runlog import runs_root
from hw3_lm_fewshot.data import TASKS, TaskData, load_task, sample_support
from hw3_lm_fewshot.models import MODEL_CHOICES, ModelSpec, resolve_model

T = TypeVar("T")

HOMEWORK = "hw3_lm_fewshot"
# --precision auto is fp32 for hw3 everywhere: the README's section 5 has the measurements behind it
FP32_BECAUSE = "bf16 autocast measured slower than fp32 for hw3's models on CPU (hw3 README)"
INTERRUPTED = "interrupted; nothing was saved (results.json is written at the end of a run)"


parse_k_list = int_list(0, "1,8,128")  # --k: support sizes


def add_common_args(parser: argparse.ArgumentParser, task: str) -> None:
    """Flags ft.py and icl.py share, the course's ``--task`` (``task`` is the script's) included.
    Neither keeps checkpoints (each run is short), so there is no ``--resume``."""
    parser.add_argument("--task", type=only_task(task), default=task,
                        help=f"the course's flag: this script runs --task {task} only; the course's --task plot "
                             "is experiments.py's tables and plots (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help=f"short name ({', '.join(MODEL_CHOICES)}), hub id or model folder; comma-separated "
                             "for one run per model, as in the course (default: minilm for amazon, smollm2 otherwise)")
    parser.add_argument("--dataset", default="amazon",
                        help=f"one of {', '.join(TASKS)}; comma-separated for one run per dataset, as in the course "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="reruns with seeds seed, seed+1, ...: mean and std over them (default: 1)")
    parser.add_argument("--n_eval", type=positive_int, default=50,
                        help="evaluation examples (amazon: split evenly over the 5 classes; course: 625/125); "
                             "the pool is all the rest of the data")
    parser.add_argument("--max_context", type=positive_int, default=None,
                        help="cap on prompt + generated tokens (default: the model's context length)")
    add_run_args(parser, resume=False)


def only_task(task: str) -> Callable[[str], str]:
    """An argparse type accepting the course's ``--task`` value of this script and nothing else."""
    def parse(text: str) -> str:
        if text != task:
            raise argparse.ArgumentTypeError(
                f"this script runs --task {task} only; the course's --task {text} is "
                + ("python hw3_lm_fewshot/experiments.py (results.md, score_vs_k.png, score_vs_params.png)"
                   if text == "plot" else "not a task here (ft.py: ft, icl.py: icl)"))
        return text

    return parse


def each_run(args: argparse.Namespace, listed: Sequence[str]) -> list[argparse.Namespace]:
    """The course's comma-separated flags (``--model a,b``): one namespace per combination of their
    values, the first flag of ``listed`` outermost, each a run of its own folder. ``--log_dir`` names
    one folder, so it takes one run only."""
    values = []
    for flag in listed:
        given = getattr(args, flag)
        parts = [None] if given is None else [part.strip() for part in given.split(",") if part.strip()]
        if not parts:
            raise CS330Error(f"--{flag} {given!r} names nothing: give a value, or several separated by commas")
        values.append(parts)
    runs = [argparse.Namespace(**{**vars(args), **dict(zip(listed, combination))})
            for combination in itertools.product(*values)]
    if args.log_dir and len(runs) > 1:
        raise CS330Error(f"--log_dir names one run folder, but {' x '.join(f'--{flag}' for flag in listed)} make "
                         f"{len(runs)} runs: leave --log_dir out (each run goes to runs/{HOMEWORK}/<its name>) or "
                         "give one value each")
    return runs


def only_run(runs: list[argparse.Namespace]) -> argparse.Namespace:
    """The one run of a command line (:func:`each_run`); a CS330Error if it asks for several."""
    if len(runs) > 1:
        raise CS330Error(f"the command line asks for {len(runs)} runs; parse it with parse_runs")
    return runs[0]


def run_precision(args: argparse.Namespace) -> str:
    """What ``--precision`` resolves to (``auto``: fp32, whatever the device; see FP32_BECAUSE)."""
    return resolve_precision(args.precision, resolve_device(args.device), FP32_BECAUSE)[0]


def run_dir_for(args: argparse.Namespace, run_name: str) -> Path:
    """``--log_dir`` if given, else ``runs/hw3_lm_fewshot/<run name>``."""
    return Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / run_name


def checked_spec_and_task(args: argparse.Namespace) -> tuple[ModelSpec, TaskData]:
    """The run's model spec and task data, with a support set of every ``--k`` drawn once (a k the
    task cannot fill is one error line, before any model loads)."""
    spec = resolve_model(args.model, args.data_dir)
    task = load_task(args.dataset, seed=args.seed, n_eval=args.n_eval, data_dir=args.data_dir)
    for k in args.k:
        sample_support(task, k, args.seed)
    return spec, task


def result_size_parts(args: argparse.Namespace) -> dict:
    """The run-name parts of the shared flags that change a result besides the model and the data: the
    evaluation set's size, the number of seeds, and a context cap (when one is given)."""
    return {"n": args.n_eval, "rep": args.repeats, **({"ctx": args.max_context} if args.max_context else {})}


def exits_on_interrupt(main: Callable[..., T]) -> Callable[..., T]:
    """Ctrl-C: say that nothing was saved and exit 130. Goes inside :func:`common.errors.cli_main`,
    whose own message promises a checkpoint, which these scripts do not write."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
