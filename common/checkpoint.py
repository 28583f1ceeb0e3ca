"""Atomic checkpoints and exact resume.

A checkpoint is a plain dict of tensors and python scalars, so it loads with
``torch.load(..., weights_only=True)`` (no arbitrary pickles are ever executed). Together with
the RNG states captured by :func:`capture_rng_state`, a run killed at any point and restarted
with ``--resume`` replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import CS330Error

_CKPT_RE = re.compile(r"^step(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a kill mid-write
    leaves the previous file intact instead of a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Checkpoints of a run, by step."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _CKPT_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def refuse_existing_checkpoints(run_dir: Path, hint: str = "") -> None:
    """Stop a fresh run (no ``--resume``) from writing over another run's checkpoints.

    ``hint``: another way out the calling script offers, e.g. ``"--test to evaluate it"``.
    """
    if list_checkpoints(run_dir):
        ways = ", ".join(filter(None, ["pass --resume to continue that run", hint]))
        raise CS330Error(f"{run_dir} already holds checkpoints: {ways}, or choose another --log_dir / "
                         "delete the folder to start a new run")


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write ``state`` as the checkpoint of ``step``; optionally delete all but the newest ``keep_last``."""
    path = checkpoint_dir(run_dir) / f"step{step:07d}.pt"
    atomic_save({"step": step, **state}, path)
    if keep_last is not None:
        for old_step, old_path in list(list_checkpoints(run_dir).items())[:-keep_last]:
            if old_step != step:
                old_path.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path, step: int = -1, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint of ``step`` (``-1`` = the latest) with ``weights_only=True``."""
    available = list_checkpoints(run_dir)
    if not available:
        raise CS330Error(
            f"no checkpoint in {checkpoint_dir(run_dir)}: train first (without --test), "
            "or point --log_dir at a run folder that has checkpoints/"
        )
    if step == -1:
        step = max(available)
    if step not in available:
        raise CS330Error(f"no checkpoint for step {step} in {run_dir}; available steps: {sorted(available)}")
    return torch.load(available[step], map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def ensure_finite(value: float, step: int, run_dir: Path) -> None:
    """Stop a run whose loss became NaN/inf, pointing at the last good checkpoint."""
    if math.isfinite(value):
        return
    steps = list_checkpoints(run_dir)
    kept = f"the last good checkpoint (step {max(steps)}) is kept in {checkpoint_dir(run_dir)}" if steps else (
        "no checkpoint had been written yet"
    )
    raise CS330Error(
        f"the training loss became {value} at step {step}; {kept}. "
        "Lower the learning rate or check the data, then rerun (or --resume from the checkpoint)."
    )
