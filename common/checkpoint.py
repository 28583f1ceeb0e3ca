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
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import CS330Error, DiskFull, disk_full_error, is_disk_full
from common.readback import check_weights, describe, read_torch

_CKPT_RE = re.compile(r"^step(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a kill mid-write
    leaves the previous file intact instead of a truncated one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if is_disk_full(err) or _write_failed_on_full_disk(err, path.parent):
            raise disk_full_error(path.parent, path.name) from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _write_failed_on_full_disk(err: BaseException, folder: Path) -> bool:
    """torch's own writer reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc]
    ... file write failed`` without the errno: a full disk is then the folder having (almost) no room."""
    if not isinstance(err, RuntimeError) or "write failed" not in str(err):
        return False
    try:
        return shutil.disk_usage(folder).free < 2**24
    except OSError:
        return False


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
    try:
        atomic_save({"step": step, **state}, path)
    except (DiskFull, OSError) as err:
        kept = list_checkpoints(run_dir)
        where = (f"the last good checkpoint (step {max(kept)}) is kept (continue with --resume)" if kept
                 else "no checkpoint had been written yet")
        if isinstance(err, DiskFull):
            raise disk_full_error(path.parent, f"the checkpoint of step {step}", where) from None
        raise CS330Error(f"cannot write the checkpoint of step {step} to {path.parent} ({err.strerror or err}); "
                         f"{where}; make the folder writable again, then rerun") from None
    if keep_last is not None:
        for old_step, old_path in list(list_checkpoints(run_dir).items())[:-keep_last]:
            if old_step != step:
                old_path.unlink(missing_ok=True)
    return path


def _read_checkpoint(path: Path, map_location: str | torch.device, model: Mapping[str, torch.Tensor] | None = None,
                     required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint this code wrote: a dict with its step, the entries ``required`` and (when ``model``
    is given) that model's weights, loaded with ``weights_only=True``; anything else raises a
    CS330Error naming the file."""
    fix = "delete it to use an earlier checkpoint"
    state = read_torch(path, fix, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CS330Error(f"{path}: holds {describe(state)} without a step, not a checkpoint; {fix}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CS330Error(f"{path}: holds no {', '.join(missing)} (weights only?), so no run can continue from it; "
                         f"{fix}")
    if model is not None:
        check_weights(state.get("model"), model, path, f"{fix}, or choose another --log_dir for this model")
    return state


def load_checkpoint(run_dir: Path, step: int = -1, map_location: str | torch.device = "cpu",
                    model: torch.nn.Module | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load the checkpoint of ``step`` with ``weights_only=True``. ``step=-1`` loads the latest
    readable one: a damaged or foreign latest file (a kill mid-copy, a full disk, another model's
    weights when ``model`` is given) is named in a warning and the one before it is used."""
    available = list_checkpoints(run_dir)
    if not available:
        raise CS330Error(
            f"no checkpoint in {checkpoint_dir(run_dir)}: train first (without --test), "
            "or point --log_dir at a run folder that has checkpoints/"
        )
    expected = None if model is None else model.state_dict()
    if step != -1:
        if step not in available:
            raise CS330Error(f"no checkpoint for step {step} in {run_dir}; available steps: {sorted(available)}")
        return _read_checkpoint(available[step], map_location, expected, required)
    latest_error = None
    for candidate in sorted(available, reverse=True):
        try:
            return _read_checkpoint(available[candidate], map_location, expected, required)
        except CS330Error as err:
            latest_error = latest_error or err
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    raise CS330Error(f"no usable checkpoint in {checkpoint_dir(run_dir)} (the latest: {latest_error}); delete the "
                     "folder and train again")


def check_model(run_dir: Path, state: dict[str, Any], model: torch.nn.Module) -> None:
    """The weights of a checkpoint loaded without ``model`` must be ``model``'s. ``--test`` loads its
    checkpoint before the run's flags are compared (so a missing one is its own error) and checks
    the weights after, so that differing flags are named as such."""
    check_weights(state.get("model"), model.state_dict(), checkpoint_dir(run_dir) / f"step{state['step']:07d}.pt",
                  "pass the flags of the run that wrote it, or choose another --log_dir")


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
    if cuda and torch.cuda.is_available():  # this device's state; older checkpoints hold one per visible GPU
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
