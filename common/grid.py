"""Run a grid of training runs in this process, one run folder each, and collect their results.

Every homework's ``experiments.py`` declares its configurations and its report; this module runs
them::

    from common.grid import Config, grid_parser, run_experiments

    def configs(preset: str) -> list[Config]:
        epochs = {"cpu": "20", "course": "200"}[preset]
        return [Config(f"lr{lr}", "hw0_recsys.train", ["--lr", lr, "--num_epochs", epochs])
                for lr in ("0.001", "0.01")]

    def report(frame: pd.DataFrame, out: Path) -> str:   # one row per finished run
        return frame[["name", "lr", "test/mrr"]].to_markdown(index=False)

    args = grid_parser(__doc__, presets=("cpu", "course")).parse_args()
    run_experiments(args, "hw0_recsys", configs(args.preset), report)

A configuration runs as ``main([*argv, *run flags, "--log_dir", <root>/<name>])`` with root
``runs/<homework>/experiments/<preset>`` (under ``$CS330_RUNS_DIR`` when set, or ``--out_dir``):
- its results file (``results.json``) exists: skipped, the run is finished;
- its folder exists without it: a killed run, continued with ``--resume`` (for scripts that have it);
- it fails (a ``CS330Error``, a non-zero ``SystemExit``, any other exception, or no results file at
  the end): reported, and the grid goes on; the summary names every failure and the exit status is 1.
Ctrl-C stops the grid. ``--only`` picks configurations, ``--dry_run`` prints them with their status.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import gc
import importlib
import io
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from common.cli import positive_int
from common.device import DEVICE_CHOICES, PRECISION_CHOICES
from common.errors import CS330Error, disk_full_error, is_disk_full
from common.readback import read_json
from common.runlog import runs_root, write_bytes, write_json, write_text

MainFunction = Callable[[list[str]], Any]
# The grid's flags (each with a value) that say where a run computes, not what: a finished configuration
# is reused whatever their values. (common.cli.RUN_ONLY_FLAGS is the larger set a --resume may change.)
MACHINE_FLAGS = ("--device", "--threads", "--data_dir")
RECORD = "grid.json"  # in the grid's root: the flags each finished configuration ran with


@dataclass(frozen=True)
class Config:
    """One run of the grid.

    ``main``: a script's ``main(argv)``, or the name of its module (imported only when the run starts,
    so ``--dry_run`` needs no training code). ``tags``: extra columns of its row in the results frame.
    ``folder``: its run folder under the root (default: ``name``); a ``--test`` evaluation shares the
    folder of the run it evaluates and names its own ``results`` file. ``resume``: pass ``--resume`` to
    a killed run (None: the grid's default; False for an evaluation or a script without the flag).
    """

    name: str
    main: MainFunction | str
    argv: Sequence[str]
    tags: Mapping[str, Any] = field(default_factory=dict)
    folder: str | None = None
    results: str = "results.json"
    resume: bool | None = None

    @property
    def run_folder(self) -> str:
        return self.folder or self.name

    def function(self) -> MainFunction:
        return importlib.import_module(self.main).main if isinstance(self.main, str) else self.main

    def script(self) -> str:
        """``hw2_protonet_maml/maml.py`` for module ``hw2_protonet_maml.maml``, for the printed command."""
        module = self.main if isinstance(self.main, str) else self.main.__module__
        return module.replace(".", "/") + ".py"


def unique(configs: Iterable[Config]) -> list[Config]:
    """The configurations in order, each name once: two parts of a grid may share a run."""
    seen: dict[str, Config] = {}
    for config in configs:
        other = seen.setdefault(config.name, config)
        if other != config:
            raise ValueError(f"two different configurations are both named {config.name!r}")
    return list(seen.values())


def select(configs: Sequence[Config], only: Sequence[str] | None) -> list[Config]:
    """The configurations whose name or run folder matches a name or glob pattern of ``only``
    (naming a run also picks the evaluations sharing its folder)."""
    if not only:
        return list(configs)
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.run_folder, p)
                                            for c in configs)]
    if unmatched:
        raise CS330Error(f"--only {' '.join(unmatched)}: no such configuration; choose from: "
                         f"{', '.join(c.name for c in configs)}")
    return [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.run_folder, p)
                                      for p in only)]


def _without_machine_flags(argv: Sequence[str]) -> list[str]:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in MACHINE_FLAGS:
            skip = True
        else:
            kept.append(token)
    return kept


def _status(config: Config, root: Path, default_resume: bool) -> str:
    if (root / config.run_folder / config.results).exists():
        return "done"
    resume = default_resume if config.resume is None else config.resume
    return "resume" if resume and (root / config.run_folder).exists() else "run"


def _call(config: Config, argv: list[str], results: Path) -> str | None:
    """Run one configuration; the reason it failed, or None."""
    try:
        config.function()(argv)
    except SystemExit as exc:
        if exc.code == 130:  # Ctrl-C inside a script wrapped by common.errors.cli_main: stop the grid
            raise
        if exc.code not in (0, None):
            return f"exit status {exc.code}"
    except CS330Error as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - one broken run must not end a night's grid
        traceback.print_exc()
        return f"{type(err).__name__}: {err}"
    finally:
        gc.collect()  # the run's model and data, before the next run allocates its own
    return None if results.exists() else f"finished without writing {results.name}"


def run_grid(configs: Sequence[Config], root: str | Path, run_flags: Sequence[str] = (), resume: bool = True,
             dry_run: bool = False) -> dict[str, str]:
    """Run every configuration not finished yet (see the module docstring); ``run_flags`` go to every
    run. Returns ``{name: reason}`` for the ones that failed."""
    root = Path(root)
    record_path = root / RECORD
    record = read_record(record_path)
    failed: dict[str, str] = {}
    failed_folders: dict[str, str] = {}
    for config in unique(configs):
        status = _status(config, root, resume)
        run_dir = root / config.run_folder
        argv = [*config.argv, *run_flags, "--log_dir", str(run_dir)] + (["--resume"] if status == "resume" else [])
        flags = _without_machine_flags([*config.argv, *run_flags])
        if dry_run:
            print(f"[{status}] {config.name}: python {config.script()} {' '.join(argv)}")
            continue
        if status == "done":
            if record.get(config.name, flags) != flags:
                failed[config.name] = (f"{run_dir / config.results} was made with other flags ({record[config.name]}); "
                                       "delete it to rerun, or choose another --out_dir")
            continue
        if config.run_folder in failed_folders:  # an evaluation of a run that failed above
            failed[config.name] = f"not run: {failed_folders[config.run_folder]} failed"
            continue
        print(f"\n=== {config.name} ({status}): python {config.script()} {' '.join(argv)}", flush=True)
        reason = _call(config, argv, run_dir / config.results)
        if reason:
            print(f"=== {config.name} failed: {reason}", flush=True)
            failed[config.name] = reason
            failed_folders.setdefault(config.run_folder, config.name)
        else:
            record = remember(record_path, config.name, flags)
    return failed


def read_record(record_path: Path) -> dict[str, list[str]]:
    """The grid's record (empty before its first finished run): configuration name -> flags."""
    if not record_path.exists():
        return {}
    fix = ("delete it: the grid then takes every results file in its folders as made with the "
           "current flags")
    record = read_json(record_path, fix)
    bad = [name for name, flags in record.items()
           if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags)]
    if bad:
        raise CS330Error(f"{record_path}: the entry of {bad[0]} is not a list of flags; {fix}")
    return record


def remember(record_path: Path, name: str, flags: list[str]) -> dict[str, list[str]]:
    """Add a finished configuration to the grid's record and return the record. Read again under a
    lock: ``--only`` workers running one grid side by side each finish runs, and a record read when
    a worker started would drop the others' entries when it is written back."""
    with open(record_path.with_name(RECORD + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        record = read_record(record_path)
        record[name] = flags
        write_json(record_path, record)
    return record


def lookup(frame: pd.DataFrame, name: str, column: str, default: Any = None) -> Any:
    """The ``column`` value of configuration ``name`` in a :func:`collect` frame, or ``default``
    when that run is not finished (or has no such value)."""
    if column not in frame:
        return default
    values = frame.loc[frame["name"] == name, column]
    if values.empty:
        return default
    value = values.iloc[0]
    return default if pd.api.types.is_scalar(value) and pd.isna(value) else value


def ran_with(frame: pd.DataFrame, names: Iterable[str], column: str, planned: Any) -> Any:
    """What the finished runs among ``names`` ran with for the flag ``column`` (their results.json's
    hparams), so a report never states the preset's number for runs made otherwise; ``planned`` while
    none has recorded it, and ``"a or b"`` for a mix."""
    found = (lookup(frame, name, column) for name in names)
    unique = {getattr(value, "item", lambda v=value: v)() for value in found if value is not None}  # numpy -> python
    try:
        values = sorted(unique)
    except TypeError:  # values of several types
        values = sorted(unique, key=str)
    if not values:
        return planned
    return values[0] if len(values) == 1 else " or ".join(map(str, values))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def collect(configs: Sequence[Config], root: str | Path) -> pd.DataFrame:
    """One row per configuration with a results file: ``name``, ``run_dir``, its tags, the flattened
    hparams and metrics of ``results.json`` (or the fields of an evaluation's file). Unfinished
    configurations have no row."""
    rows = []
    for config in unique(configs):
        run_dir = Path(root) / config.run_folder
        path = run_dir / config.results
        if not path.exists():
            continue
        fix = f"delete it to run {config.name} again"
        saved = read_json(path, fix)
        hparams, metrics = (saved.get("hparams", {}), saved["metrics"]) if "metrics" in saved else ({}, saved)
        if not isinstance(hparams, dict) or not isinstance(metrics, dict):
            raise CS330Error(f"{path}: its hparams and metrics are not JSON objects; {fix}")
        rows.append({"name": config.name, "run_dir": run_dir, **config.tags, **_flatten(hparams), **_flatten(metrics)})
    return pd.DataFrame(rows, columns=None if rows else ["name", "run_dir"])


# ---------------------------------------------------------------------------- the experiments.py command line
def grid_parser(description: str | None,
                presets: Sequence[str] = ("smoke", "cpu", "course")) -> argparse.ArgumentParser:
    """``--preset`` (``--quick`` = ``--preset smoke``), ``--only``, ``--dry_run``, ``--out_dir`` and the
    run flags passed to every run (``--device``, ``--precision``, ``--threads``, ``--data_dir``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("grid")
    group.add_argument("--preset", choices=presets, default="cpu",
                       help="run lengths and grid size: cpu = about an hour on 2 CPU cores, course = the course's "
                            "lengths (for a GPU); see PRESETS in the source (default: cpu)")
    if "smoke" in presets:
        group.add_argument("--quick", dest="preset", action="store_const", const="smoke",
                           help="the same as --preset smoke: a few steps of everything, to check the pipeline")
    group.add_argument("--only", nargs="+", metavar="NAME",
                       help="run only these configurations (names or glob patterns; see --dry_run)")
    group.add_argument("--dry_run", action="store_true",
                       help="print each configuration, its status (done / resume / run) and command; run nothing")
    group.add_argument("--out_dir", default=None,
                       help="root of the run folders, tables and plots (default: runs/<homework>/experiments/<preset>)")
    runs = parser.add_argument_group("passed to every run (default: each script's own)")
    runs.add_argument("--device", choices=DEVICE_CHOICES, default=None)
    runs.add_argument("--precision", choices=PRECISION_CHOICES, default=None)
    runs.add_argument("--threads", type=positive_int, default=None)
    runs.add_argument("--data_dir", default=None)
    return parser


def run_flags(args: argparse.Namespace) -> list[str]:
    """The run flags the user set, as argv for every run."""
    return [token for flag in ("device", "precision", "threads", "data_dir") if getattr(args, flag) is not None
            for token in (f"--{flag}", str(getattr(args, flag)))]


def experiments_root(args: argparse.Namespace, homework: str) -> Path:
    return Path(args.out_dir) if args.out_dir else runs_root() / homework / "experiments" / args.preset


def run_experiments(args: argparse.Namespace, homework: str, configs: Sequence[Config],
                    report: Callable[[pd.DataFrame, Path], str], resume: bool = True) -> pd.DataFrame:
    """Run the selected configurations, collect every finished one and write ``results.md`` with
    ``report(frame, root)`` (which also saves its plots into ``root``). Exits 1 if any run failed."""
    configs = unique(configs)
    chosen = select(configs, args.only)
    root = experiments_root(args, homework)
    print(f"{len(chosen)} configurations, preset {args.preset}, in {root}", flush=True)
    failed = run_grid(chosen, root, run_flags(args), resume=resume, dry_run=args.dry_run)
    if args.dry_run:
        return pd.DataFrame()
    frame = collect(configs, root)
    if len(frame):
        try:
            text = report(frame, root)  # it also saves its plots into root
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(root, "the report") from None
            raise
        write_text(root / "results.md", text + "\n")
        print(f"\n{text}\n\ntables in {root / 'results.md'}, plots in {root}")
    missing = [c.name for c in configs if c.name not in set(frame.get("name", []))]
    if missing:
        print(f"not finished (left out of the tables): {', '.join(missing)}")
    if failed:
        print(f"{len(failed)} of {len(chosen)} configurations failed:")
        for name, reason in failed.items():
            print(f"  {name}: {reason}")
        raise SystemExit(1)
    return frame


def save_figure(fig: Any, path: Path) -> None:
    """Lay out a matplotlib figure, write it to ``path`` (its suffix is the format; 120 dpi) atomically,
    and free it."""
    import matplotlib.pyplot as plt  # here, not at the top: the experiment scripts choose the backend

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
