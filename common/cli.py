"""Flags every training script shares, defined once."""

from __future__ import annotations

import argparse

from common.device import DEVICE_CHOICES


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_run_args(parser: argparse.ArgumentParser, seed_flag: str = "--seed", seed_default: int = 0) -> None:
    """``--device``, the seed flag, ``--log_dir``, ``--data_dir`` and ``--resume``."""
    group = parser.add_argument_group("run")
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="where to train; auto picks CUDA when present, else MPS, else CPU (default: auto)")
    group.add_argument(seed_flag, type=int, default=seed_default, help=f"random seed (default: {seed_default})")
    group.add_argument("--log_dir", default=None,
                       help="run folder for TensorBoard logs, checkpoints and results.json "
                            "(default: runs/<homework>/<run name built from the flags>)")
    group.add_argument("--data_dir", default=None,
                       help="data directory (default: $CS330_DATA_DIR or data/ at the repo root; "
                            "the read-only mirror $CS330_DATA_MIRROR is searched next)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --log_dir (or the default run folder) from its latest checkpoint")
