"""Run logging shared by every training script.

One :class:`RunLogger` per run: a TensorBoard writer under ``runs/<homework>/<run name>``, the
hyper-parameters saved as ``hparams.json`` (and as TensorBoard hparams at the end), a tqdm
progress bar showing the latest metrics, and the final metrics in ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from common.errors import CS330Error, disk_full_error, is_disk_full

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def runs_root() -> Path:
    """Where run folders go: ``$CS330_RUNS_DIR`` or ``runs/`` in the working directory."""
    return Path(os.environ.get("CS330_RUNS_DIR", "runs"))


def resolve_run_dir(log_dir: str | os.PathLike | None, homework: str, run_name: str) -> Path:
    """A run's folder: ``--log_dir`` when given, else ``runs/<homework>/<run name>`` under :func:`runs_root`."""
    return Path(log_dir) if log_dir else runs_root() / homework / run_name


def build_run_name(prefix: str, parts: Mapping[str, Any]) -> str:
    """A run name made of the hyper-parameters, safe on every file system (no colons or slashes):
    ``build_run_name("maml", {"way": 5, "lr": 0.4})`` -> ``maml_way5_lr0.4``."""
    tokens = [prefix] + [f"{key}{value}" for key, value in parts.items()]
    return _UNSAFE.sub("-", "_".join(tokens))


def jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename); a full disk is one error line, the old file kept."""
    write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename); a full disk is one error line, the old file kept."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file + rename); a full disk is one error line, the old file kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path.parent, path.name) from None
        raise CS330Error(f"cannot write {path} ({err.strerror or err}); make {path.parent} writable (or choose "
                         "another folder), then rerun") from None


class RunLogger:
    """TensorBoard + progress bar + results.json for one run.

    ``start_step`` is the step of the checkpoint a resumed run continues from: TensorBoard events
    the killed run wrote after it are purged so curves do not double back.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        hparams: Mapping[str, Any],
        start_step: int = 0,
        total_steps: int | None = None,
        desc: str | None = None,
        enable_tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.hparams = {k: jsonable(v) for k, v in hparams.items()}
        write_json(self.run_dir / "hparams.json", self.hparams)
        self.writer = (
            SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if start_step > 0 else None)
            if enable_tensorboard else None
        )
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc or self.run_dir.name, dynamic_ncols=True,
            disable=total_steps is None,
        )
        self._step = start_step

    @contextlib.contextmanager
    def _writing_events(self) -> Iterator[None]:
        """TensorBoard writes from a thread and raises its OSError at a later call: a full disk is one line."""
        try:
            yield
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.run_dir, "TensorBoard's event file") from None
            raise

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write scalars to TensorBoard (tags like ``train/loss``)."""
        if self.writer is not None:
            with self._writing_events():
                for tag, value in metrics.items():
                    self.writer.add_scalar(tag, float(value), step)

    def advance(self, step: int, **postfix: float) -> None:
        """Move the progress bar to ``step`` and show the given metrics beside it."""
        self.bar.update(step - self._step)
        self._step = step
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self.bar.write(message) if not self.bar.disable else print(message)

    def finish(self, metrics: Mapping[str, Any], filename: str = "results.json") -> Path:
        """Write the final metrics to ``results.json`` (with the hparams) and to TensorBoard hparams."""
        path = self.run_dir / filename
        write_json(path, {"hparams": self.hparams, "metrics": dict(metrics)})
        if self.writer is not None:
            scalars = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            tb_hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
            with self._writing_events():
                self.writer.add_hparams(tb_hparams, scalars, run_name=".")
        return path

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            writer, self.writer = self.writer, None  # closed once, even when closing fails
            with self._writing_events():
                writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scalar_curve(run_dir: str | os.PathLike, tag: str) -> dict[int, float]:
    """A TensorBoard scalar of a run folder as ``{step: value}`` (empty when the tag was never logged, or
    the folder is gone: a report then has no curve, not a traceback)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run_dir).is_dir():
        return {}

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {point.step: point.value for point in events.Scalars(tag)}
