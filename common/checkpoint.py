"""Atomic checkpoints and exact resume.

A checkpoint is a plain dict of tensors and python scalars, so it loads with
``torch.load(..., weights_only=True)`` (no arbitrary pickles are ever executed). Together with
the RNG states captured by :func:`capture_rng_state`, a run killed at any point and restarted
with ``--resume`` replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import sys
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


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) checkpoint dict that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}{key}.")]


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write ``state`` as the checkpoint of ``step``; optionally delete all but the newest ``keep_last``.

    A state holding NaN/inf is refused before anything is written: a poisoned checkpoint would make
    the advised ``--resume`` fail the same way, and it would push the last good one out of ``keep_last``.
    """
    bad = non_finite_tensors(state.get("model", state))
    if bad:
        kept = list_checkpoints(run_dir)
        where = f"the last good checkpoint (step {max(kept)}) is kept" if kept else "no checkpoint was written"
        raise CS330Error(
            f"the weights became non-finite by step {step} ({', '.join(b.rstrip('.') for b in bad[:3])}); "
            f"{where}. Lower the learning rate or check the data, then rerun."
        )
    path = checkpoint_dir(run_dir) / f"step{step:07d}.pt"
    atomic_save({"step": step, **state}, path)
    if keep_last is not None:
        for old_step, old_path in list(list_checkpoints(run_dir).items())[:-keep_last]:
            if old_step != step:
                old_path.unlink(missing_ok=True)
    return path


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; a damaged file raises a CS330Error naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        if "Weights only load failed" in str(err):
            raise  # not damage: a checkpoint holding objects we refuse to unpickle
        raise CS330Error(f"checkpoint {path} is damaged ({str(err).splitlines()[0]}); delete it to use "
                         "an earlier one") from None


def load_checkpoint(run_dir: Path, step: int = -1, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint of ``step`` with ``weights_only=True``. ``step=-1`` loads the latest
    readable one: a damaged latest file (a kill mid-copy, a full disk) is named in a warning and
    the one before it is used."""
    available = list_checkpoints(run_dir)
    if not available:
        raise CS330Error(
            f"no checkpoint in {checkpoint_dir(run_dir)}: train first (without --test), "
            "or point --log_dir at a run folder that has checkpoints/"
        )
    if step != -1:
        if step not in available:
            raise CS330Error(f"no checkpoint for step {step} in {run_dir}; available steps: {sorted(available)}")
        return _read_checkpoint(available[step], map_location)
    for candidate in sorted(available, reverse=True):
        try:
            return _read_checkpoint(available[candidate], map_location)
        except CS330Error as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    raise CS330Error(f"every checkpoint in {checkpoint_dir(run_dir)} is damaged; delete the folder and "
                     "train again")


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
        # the device this process uses only: get_rng_state_all() would open a CUDA context on every
        # visible GPU, i.e. rank 0 of a torchrun job would take memory on every other rank's GPU
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
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
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():  # checkpoints before 2026-11-28 hold one state per visible GPU
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[torch.cuda.current_device()])


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
