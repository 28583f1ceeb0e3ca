"""One run lifecycle for every training script.

A script validates its flags and loads its data and model first, then opens its run folder:

    with RunFolder.open(run_dir, hparams, resume=args.resume, resumable=("num_epochs",)) as run:
        state = run.resume_state(map_location=device)   # None for a fresh run
        ...
        run.check_loss(loss.item(), step)                # NaN/inf stops the run, exit 2
        run.save(step, {"model": ..., "optimizer": ...}) # refuses non-finite weights
        logger = run.logger(start_step, total_steps)     # TensorBoard + progress bar + results.json

What every run gets, in the same words in every homework (see the root README):
- an exclusive lock on the folder (``fcntl.flock``): a second run on the same folder is refused
  with the other process's id; the kernel drops the lock when the holder dies, so a kill leaves
  no stale lock;
- ``--resume`` continues from the latest readable checkpoint (a damaged one is named and the one
  before it used) and refuses, before any work, flags that differ from the stored run except the
  allow-listed ones (run length, intervals, device, threads); with no checkpoint it starts fresh
  with a note; without ``--resume`` a folder holding checkpoints is refused;
- temporary files of a write killed half-way are removed at the next start;
- a folder that cannot be written is a one-line error before any work.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import ensure_finite, list_checkpoints, load_checkpoint, save_checkpoint
from common.cli import RUN_ONLY_FLAGS
from common.errors import CS330Error
from common.runlog import RunLogger, jsonable

LOCK_NAME = ".lock"


def changed_flags(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """``--flag old -> new`` for every flag (outside ``allowed``) whose value differs."""
    allowed = set(allowed)
    current = jsonable(dict(current))
    keys = sorted((set(saved) | set(current)) - allowed)
    return [f"--{key} {saved.get(key)} -> {current.get(key)}" for key in keys if saved.get(key) != current.get(key)]


class RunFolder:
    """A locked run folder: resume rules, checkpoints and the NaN guard. Use :meth:`open`."""

    def __init__(self, path: Path, hparams: Mapping[str, Any], resume: bool, resumable: Iterable[str]) -> None:
        self.path = Path(path)
        self.hparams = dict(hparams)
        self.resume = resume
        self.allowed = RUN_ONLY_FLAGS | set(resumable)
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, hparams: Mapping[str, Any], resume: bool = False,
             resumable: Iterable[str] = (), test_hint: str = "") -> RunFolder:
        """Create (if needed) and lock ``path``, clean up after a killed write, apply the resume rules."""
        run = cls(Path(path), hparams, resume, resumable)
        run._make_writable()
        run._lock()
        try:
            run._remove_temporaries()
            run._check_resume(test_hint)
        except BaseException:
            run.close()
            raise
        return run

    # ------------------------------------------------------------------ opening
    def _make_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise CS330Error(f"cannot write the run folder {self.path} ({err.strerror or err}); "
                             "pass --log_dir with a writable folder") from None

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CS330Error(f"{self.path} is in use by another run (process {holder}); wait for it to finish, "
                             "stop it, or choose another --log_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _remove_temporaries(self) -> None:
        """``*.tmp`` files are written by :func:`common.checkpoint.atomic_save` and
        :func:`common.runlog.write_json` and renamed into place; one left over is a killed write."""
        for stale in list(self.path.glob(".*.tmp")) + list(self.path.glob("checkpoints/.*.tmp")):
            stale.unlink(missing_ok=True)

    def _check_resume(self, test_hint: str) -> None:
        has_checkpoints = bool(list_checkpoints(self.path))
        if not self.resume:
            if has_checkpoints:
                ways = ", ".join(filter(None, ["pass --resume to continue that run", test_hint]))
                raise CS330Error(f"{self.path} already holds checkpoints: {ways}, or choose another --log_dir / "
                                 "delete the folder to start a new run")
            return
        if not has_checkpoints:
            print(f"note: --resume: no checkpoint in {self.path} yet; starting the run fresh", file=sys.stderr)
            return
        self.check_same_flags()

    def check_same_flags(self) -> None:
        """Refuse flags that differ from the stored run's, except the allow-listed ones."""
        saved_path = self.path / "hparams.json"
        if not saved_path.exists():
            return
        changed = changed_flags(json.loads(saved_path.read_text()), self.hparams, self.allowed)
        if changed:
            raise CS330Error(
                f"{self.path} was trained with other flags ({'; '.join(changed)}). Rerun with the run's "
                f"flags (only {', '.join(sorted(self.allowed - {'resume', 'test'}))} may change), "
                "or choose a new --log_dir"
            )

    # ------------------------------------------------------------------ during the run
    def resume_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The checkpoint to continue from, or None for a fresh run."""
        if self.resume and list_checkpoints(self.path):
            return load_checkpoint(self.path, -1, map_location=map_location)
        return None

    def check_loss(self, value: float, step: int) -> None:
        """Stop with a clear error (exit 2, no results.json) when the loss is NaN or inf."""
        ensure_finite(value, step, self.path)

    def save(self, step: int, state: dict[str, Any], keep_last: int | None = None) -> Path:
        return save_checkpoint(self.path, step, state, keep_last=keep_last)

    def logger(self, start_step: int = 0, total_steps: int | None = None, desc: str | None = None,
               **kwargs: Any) -> RunLogger:
        return RunLogger(self.path, self.hparams, start_step=start_step, total_steps=total_steps,
                         desc=desc or self.path.name, **kwargs)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
