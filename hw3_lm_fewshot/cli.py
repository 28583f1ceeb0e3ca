"""The command line ft.py and icl.py share: their common flags, the run folder and its name's
common parts, the precision policy and the Ctrl-C message. (The checked model load is
``models.load_model``; the results table, also experiments.py's, is in ``results.py``.)"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common.cli import add_run_args, int_list, positive_int
from common.runlog import runs_root
from hw3_lm_fewshot.data import TASKS
from hw3_lm_fewshot.models import MODEL_CHOICES

T = TypeVar("T")

HOMEWORK = "hw3_lm_fewshot"
# --precision auto is fp32 for hw3 everywhere: the README's section 5 has the measurements behind it
FP32_BECAUSE = "bf16 autocast measured slower than fp32 for hw3's models on CPU (hw3 README)"
INTERRUPTED = "interrupted; nothing was saved (results.json is written at the end of a run)"


parse_k_list = int_list(0, "1,8,128")  # --k: support sizes


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags ft.py and icl.py share. Neither keeps checkpoints (each run is short), so there is no ``--resume``."""
    parser.add_argument("--model", default=None,
                        help=f"short name ({', '.join(MODEL_CHOICES)}), hub id or model folder "
                             "(default: minilm for amazon, smollm2 otherwise)")
    parser.add_argument("--dataset", default="amazon", help=f"one of {', '.join(TASKS)} (default: amazon)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="reruns with seeds seed, seed+1, ...: mean and std over them (default: 1)")
    parser.add_argument("--n_eval", type=positive_int, default=50,
                        help="evaluation examples (amazon: split evenly over the 5 classes; course: 625/125); "
                             "the pool is all the rest of the data")
    parser.add_argument("--max_context", type=positive_int, default=None,
                        help="cap on prompt + generated tokens (default: the model's context length)")
    add_run_args(parser, resume=False)


def run_dir_for(args: argparse.Namespace, run_name: str) -> Path:
    """``--log_dir`` if given, else ``runs/hw3_lm_fewshot/<run name>``."""
    return Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / run_name


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
