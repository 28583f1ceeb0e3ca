"""Flags every training script shares, and the validators every flag uses, defined once.

Every number a flag takes goes through one of the validators below, so ``inf`` and ``nan`` are
refused at parse time everywhere (``float("inf")`` parses, and an infinite learning rate would
train on for a while before the first non-finite loss).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np

from common.device import DEVICE_CHOICES, PRECISION_CHOICES

FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if abs(value) > FLOAT32_MAX:  # finite in Python, but inf once the optimizer casts it to float32
        raise argparse.ArgumentTypeError(f"must be a finite float32 number (|x| <= {FLOAT32_MAX:.3g}), got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


MAX_LEARNING_RATE = 1e30


def learning_rate(text: str) -> float:
    """A positive learning rate small enough for Adam's float32 arithmetic: its first step is
    ``lr / (1 - beta1)`` = 10 lr, which overflows float32 (a traceback inside the optimizer) from
    about 3.4e37; a diverging run below the cap stops at the NaN guard with one error line."""
    value = positive_float(text)
    if value > MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LEARNING_RATE:g} (larger rates overflow Adam's "
                                         f"float32 step size), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A fraction in [0, 1] (an accuracy threshold, a share of the data)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def int_list(minimum: int, example: str) -> Callable[[str], list[int]]:
    """An argparse type for comma-separated integers ``>= minimum``, e.g. ``int_list(1, "96,64")``."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers like {example}, "
                                             f"got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum} like {example}, "
                                             f"got {text!r}")
        return values

    return parse


# Flags that never change what a run computes: they may differ between a run and its --resume.
RUN_ONLY_FLAGS = frozenset({"device", "resume", "test", "log_dir", "data_dir", "threads"})


def add_run_args(parser: argparse.ArgumentParser, seed_flag: str = "--seed", seed_default: int = 0,
                 resume: bool = True, log_dir_aliases: tuple[str, ...] = ()) -> None:
    """``--device``, ``--precision``, ``--threads``, the seed flag, ``--log_dir``, ``--data_dir``
    and (for scripts that checkpoint) ``--resume``. ``log_dir_aliases``: other spellings of
    ``--log_dir`` a script accepts (hw0's course code calls it ``--logdir``)."""
    group = parser.add_argument_group("run")
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="where to train; auto picks CUDA when present, else MPS, else CPU (default: auto)")
    group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="auto: bf16 autocast only where it is native and measured faster (CUDA with bf16, "
                            "a CPU with AVX512_BF16 or AMX), fp32 elsewhere; one line says which and why "
                            "(default: auto)")
    group.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                       help="the same as --precision bf16")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for torch (default: the cores this process may use)")
    group.add_argument(seed_flag, type=int, default=seed_default, help=f"random seed (default: {seed_default})")
    group.add_argument("--log_dir", *log_dir_aliases, default=None,
                       help="run folder for TensorBoard logs, checkpoints and results.json "
                            "(default: runs/<homework>/<run name built from the flags>)")
    group.add_argument("--data_dir", default=None,
                       help="data directory (default: $CS330_DATA_DIR or data/ at the repo root; "
                            "the read-only mirror $CS330_DATA_MIRROR is searched next)")
    if resume:
        group.add_argument("--resume", action="store_true",
                           help="continue the run in --log_dir (or the default run folder) from its latest "
                                "checkpoint; with no checkpoint there, start it fresh. Every flag must equal the "
                                "run's, except the run length (at least the checkpoint's step), intervals, device "
                                "and threads")
