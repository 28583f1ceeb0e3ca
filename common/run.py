"""One run lifecycle for every training script.

A script validates its flags and loads its data and model first, then opens its run folder:

    with RunFolder.open(run_dir, hparams, resume=args.resume, resumable=("num_epochs",),
                        length_flag="num_epochs") as run:
        state = run.resume_state(map_location=device, model=model)  # None for a fresh run
        ...
        run.check_loss(loss.item(), step)                 # NaN/inf stops the run, exit 2
        run.save(step, {"model": ..., "optimizer": ...})  # refuses non-finite weights
        logger = run.logger(start_step, total_steps)      # TensorBoard + progress bar + results.json

What every run gets, in the same words in every homework (see the root README):
- an exclusive lock on the folder (``fcntl.flock``): a second run on the same folder is refused
  with the other process's id; the kernel drops the lock when the holder dies, so a kill leaves
  no stale lock;
- ``--resume`` continues from the latest readable checkpoint (a damaged one, or one of another
  model, is named and the one before it used) and refuses, before any work, flags that differ from
  the stored run except the allow-listed ones (run length, intervals, device, threads), a folder whose
  stored flags are missing or unreadable, and a run length (``length_flag``) shorter than the
  checkpoint's step; with no checkpoint it starts fresh with a note; without ``--resume`` a folder
  holding checkpoints, or the results of a finished run, is refused;
- temporary files of a write killed half-way are removed at the next start, and so are the
  TensorBoard curves of an earlier start that left neither a checkpoint nor results;
- a folder that cannot be written (or whose disk is full) is a one-line error before any work, and a
  start that fails leaves no folder it created behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import ensure_finite, list_checkpoints, load_checkpoint, save_checkpoint
from common.cli import RUN_ONLY_FLAGS
from common.errors import CS330Error, disk_full_error, is_disk_full
from common.readback import read_json
from common.runlog import RunLogger, jsonable

LOCK_NAME = ".lock"
RESULTS_NAME = "results.json"
RESUME_KEYS = ("optimizer", "rng")  # what every script's checkpoint holds besides the model, and restores
PROBE_BYTES = 2**16  # written and synced at the start: a full disk is found before any work


def changed_flags(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str],
                  legacy: Mapping[str, Any] | None = None) -> list[str]:
    """``--flag old -> new`` for every flag (outside ``allowed``) whose value differs. ``legacy``: the
    value a flag newer than a stored run had before it existed (what that run trained with), used where
    ``saved`` lacks the flag, so that adding a flag does not lock every earlier run out of --resume/--test."""
    allowed = set(allowed)
    saved = {**(legacy or {}), **saved}
    current = jsonable(dict(current))
    keys = sorted((set(saved) | set(current)) - allowed)
    return [f"--{key} {saved.get(key)} -> {current.get(key)}" for key in keys if saved.get(key) != current.get(key)]


class RunFolder:
    """A locked run folder: resume rules, checkpoints and the NaN guard. Use :meth:`open`."""

    def __init__(self, path: Path, hparams: Mapping[str, Any], resume: bool, resumable: Iterable[str],
                 length_flag: str | None = None, legacy: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.hparams = dict(hparams)
        self.resume = resume
        self.allowed = RUN_ONLY_FLAGS | set(resumable)
        self.length_flag = length_flag
        self.legacy = dict(legacy or {})
        self._lock_fd: int | None = None
        self._created: Path | None = None  # the topmost folder this run created, removed if the start fails

    @classmethod
    def open(cls, path: str | os.PathLike, hparams: Mapping[str, Any], resume: bool = False,
             resumable: Iterable[str] = (), test_hint: str = "", length_flag: str | None = None,
             legacy: Mapping[str, Any] | None = None) -> RunFolder:
        """Create (if needed) and lock ``path``, clean up after a killed write, apply the resume rules.
        ``length_flag``: the flag holding the run length, which a resumed checkpoint must not exceed;
        ``legacy``: see :func:`changed_flags`."""
        run = cls(Path(path), hparams, resume, resumable, length_flag, legacy)
        try:
            run._make_writable()
            run._lock()
            run._remove_temporaries()
            run._check_resume(test_hint)
        except BaseException:
            run.discard_if_new()
            run.close()
            raise
        return run

    # ------------------------------------------------------------------ opening
    def _make_writable(self) -> None:
        """Create the folder and write a probe to it: an unwritable folder or a full disk stops here."""
        self._created = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        probe = self.path / f".write-test-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.path, "the run folder's first file", "the run did not start") from None
            raise CS330Error(f"cannot write the run folder {self.path} ({err.strerror or err}); "
                             "pass --log_dir with a writable folder") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    def discard_if_new(self) -> None:
        """After a failed start: remove the folders this run created (nothing of an earlier run is in
        them). Unlocked, only empty ones: another run may have taken the new folder in the meantime."""
        if self._created is None:
            return
        if self._lock_fd is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        else:
            for folder in [self.path, *self.path.parents][:len(self.path.relative_to(self._created).parts) + 1]:
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._created = None

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
        if not self.resume and has_checkpoints:
            ways = ", ".join(filter(None, ["pass --resume to continue that run", test_hint]))
            raise CS330Error(f"{self.path} already holds checkpoints: {ways}, or choose another --log_dir / "
                             "delete the folder to start a new run")
        if has_checkpoints:
            self.check_same_flags()
            return
        # A run starts fresh here: it must not overwrite the results of a run that kept no checkpoints
        # (hw3's scripts, or a run whose checkpoints were deleted), whatever that run's flags were.
        if (self.path / RESULTS_NAME).exists():
            raise CS330Error(f"{self.path} already holds the results of a finished run ({RESULTS_NAME}); "
                             "choose another --log_dir, or delete the folder to run again")
        if self.resume:
            print(f"note: --resume: no checkpoint in {self.path} yet; starting the run fresh", file=sys.stderr)
        self._remove_curves_of_a_lost_start()

    def _remove_curves_of_a_lost_start(self) -> None:
        """A fresh start in a folder where an earlier start left curves but neither a checkpoint nor
        results (it was killed or stopped): its curves would be mixed with this run's in TensorBoard."""
        stale = list(self.path.glob("events.out.tfevents.*"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            print(f"note: removed the TensorBoard curves of an earlier start in {self.path} that left no "
                  "checkpoint or results", file=sys.stderr)

    def check_same_flags(self) -> None:
        """Refuse flags that differ from the stored run's, except the allow-listed ones. Without the
        stored flags nothing says what the checkpoints were trained with: refused too."""
        saved = read_json(self.path / "hparams.json",
                          f"the flags this run trained with are unknown, so it cannot be resumed or tested; "
                          f"start a fresh run in another --log_dir, or delete {self.path} and rerun without --resume")
        changed = changed_flags(saved, self.hparams, self.allowed, self.legacy)
        if changed:
            raise CS330Error(
                f"{self.path} was trained with other flags ({'; '.join(changed)}). Rerun with the run's "
                f"flags (only {', '.join(sorted(self.allowed - {'resume', 'test'}))} may change), "
                "or choose a new --log_dir"
            )

    # ------------------------------------------------------------------ during the run
    def resume_state(self, map_location: str | torch.device = "cpu",
                     model: torch.nn.Module | None = None) -> dict[str, Any] | None:
        """The checkpoint to continue from (of ``model``'s architecture when given), or None for a fresh
        run. A checkpoint past the run length would label a longer-trained model with the shorter length."""
        if not (self.resume and list_checkpoints(self.path)):
            return None
        state = load_checkpoint(self.path, -1, map_location=map_location, model=model, required=RESUME_KEYS)
        length = self.hparams.get(self.length_flag) if self.length_flag else None
        if isinstance(length, int) and state["step"] > length:
            raise CS330Error(f"{self.path} is already at --{self.length_flag} {state['step']}, past the "
                             f"--{self.length_flag} {length} asked for; "
                             f"pass --{self.length_flag} {state['step']} or more to continue it, or choose "
                             "another --log_dir for a shorter run")
        return state

    def check_loss(self, value: float, step: int) -> None:
        """Stop with a clear error (exit 2, no results.json) when the loss is NaN or inf."""
        ensure_finite(value, step, self.path)

    def save(self, step: int, state: dict[str, Any], keep_last: int | None = None) -> Path:
        return save_checkpoint(self.path, step, state, keep_last=keep_last)

    def logger(self, start_step: int = 0, total_steps: int | None = None, desc: str | None = None,
               **kwargs: Any) -> RunLogger:
        """The run's logger; it writes ``hparams.json`` first, so a full disk still stops the start."""
        try:
            return RunLogger(self.path, self.hparams, start_step=start_step, total_steps=total_steps,
                             desc=desc or self.path.name, **kwargs)
        except CS330Error:
            if not list_checkpoints(self.path):
                self.discard_if_new()
            raise

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
