"""common/grid.py with a fake training script: skip finished runs, resume killed ones, report failures
and go on, collect results into a DataFrame; and every experiments.py builds its grid (--dry_run)."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

from common.errors import CS330Error
from common.grid import Config, collect, grid_parser, run_experiments, run_grid
from common.runlog import write_json


class FakeScript:
    """A ``main(argv)`` that records its calls and writes results.json into ``--log_dir``."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float)
        parser.add_argument("--log_dir")
        parser.add_argument("--resume", action="store_true")
        parser.add_argument("--device")
        args = parser.parse_args(argv)
        run_dir = Path(args.log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_dir.name in self.fail:
            raise self.fail[run_dir.name]
        write_json(run_dir / "results.json", {"hparams": {"lr": args.lr, "resumed": args.resume},
                                              "metrics": {"acc": 1 - args.lr, "curve": {"last": 0.5}}})

    def names(self) -> list[str]:
        return [Path(argv[argv.index("--log_dir") + 1]).name for argv in self.calls]


def grid(script: FakeScript, *lrs: float) -> list[Config]:
    return [Config(f"lr{lr}", script, ["--lr", str(lr)], tags={"group": "a"}) for lr in lrs]


def test_skips_finished_runs_and_collects_a_frame(tmp_path):
    script = FakeScript()
    configs = grid(script, 0.1, 0.2)
    assert run_grid(configs, tmp_path) == {}
    assert script.names() == ["lr0.1", "lr0.2"]
    assert all("--resume" not in argv for argv in script.calls)  # fresh folders: no --resume

    assert run_grid(configs + grid(script, 0.3), tmp_path) == {}
    assert script.names() == ["lr0.1", "lr0.2", "lr0.3"]  # the finished two were not run again

    frame = collect(configs + grid(script, 0.3, 0.4), tmp_path)  # lr0.4 never ran: no row
    assert list(frame["name"]) == ["lr0.1", "lr0.2", "lr0.3"]
    assert list(frame["group"]) == ["a"] * 3  # tags
    assert frame["lr"].tolist() == [0.1, 0.2, 0.3]  # hparams
    assert frame["acc"].tolist() == pytest.approx([0.9, 0.8, 0.7])  # metrics
    assert frame["curve.last"].tolist() == [0.5] * 3  # nested metrics flattened
    assert frame["run_dir"].tolist() == [tmp_path / name for name in frame["name"]]


def test_a_killed_run_is_resumed(tmp_path):
    script = FakeScript()
    (tmp_path / "lr0.1" / "checkpoints").mkdir(parents=True)  # killed: a folder without results.json
    no_resume = Config("lr0.2", script, ["--lr", "0.2"], resume=False)
    (tmp_path / "lr0.2").mkdir()
    assert run_grid([*grid(script, 0.1), no_resume], tmp_path) == {}
    assert ["--resume" in argv for argv in script.calls] == [True, False]
    assert collect(grid(script, 0.1), tmp_path)["resumed"].tolist() == [True]

    script.calls.clear()
    (tmp_path / "lr0.3").mkdir()
    run_grid(grid(script, 0.3), tmp_path, resume=False)  # the grid's default: a script without --resume
    assert "--resume" not in script.calls[0]


def test_a_failure_is_reported_and_the_grid_goes_on(tmp_path, capsys):
    script = FakeScript(fail={"lr0.1": CS330Error("bad data"), "lr0.2": SystemExit(2), "lr0.3": RuntimeError("bug")})
    evaluation = Config("lr0.1_test", script, ["--lr", "0.1"], folder="lr0.1", results="test.json", resume=False)
    failed = run_grid([*grid(script, 0.1), evaluation, *grid(script, 0.2, 0.3, 0.4)], tmp_path)
    assert script.names() == ["lr0.1", "lr0.2", "lr0.3", "lr0.4"]  # the evaluation of the failed run was not run
    assert failed == {"lr0.1": "bad data", "lr0.1_test": "not run: lr0.1 failed", "lr0.2": "exit status 2",
                      "lr0.3": "RuntimeError: bug"}
    assert (tmp_path / "lr0.4" / "results.json").exists()

    args = grid_parser(None).parse_args(["--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # the summary names them, exit status 1
        run_experiments(args, "hw", grid(script, 0.1, 0.4), lambda frame, out: f"{len(frame)} rows")
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "1 of 2 configurations failed:\n  lr0.1: bad data" in out
    assert (tmp_path / "results.md").read_text() == "1 rows\n"  # the report covers the finished runs


def test_interrupt_stops_the_grid(tmp_path):
    script = FakeScript(fail={"lr0.1": SystemExit(130)})  # what common.errors.cli_main makes of Ctrl-C
    with pytest.raises(SystemExit):
        run_grid(grid(script, 0.1, 0.2), tmp_path)
    assert script.names() == ["lr0.1"]


def test_a_run_finished_with_other_flags_is_not_reused(tmp_path):
    script = FakeScript()
    run_grid(grid(script, 0.1), tmp_path, run_flags=["--device", "cpu"])
    assert run_grid(grid(script, 0.1), tmp_path, run_flags=["--device", "cuda"]) == {}  # a run-only flag
    changed = Config("lr0.1", script, ["--lr", "0.5"])
    failed = run_grid([changed], tmp_path)
    assert "made with other flags" in failed["lr0.1"]
    assert len(script.calls) == 1


def test_only_dry_run_and_the_default_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path))
    script = FakeScript()
    configs = [*grid(script, 0.1, 0.2),
               Config("lr0.1_test", script, ["--lr", "0.1"], folder="lr0.1", results="t.json", resume=False)]
    args = grid_parser(None).parse_args(["--preset", "course", "--only", "lr0.1", "--dry_run", "--device", "cpu"])
    run_experiments(args, "hw9", configs, lambda frame, out: "")
    out = capsys.readouterr().out
    assert script.calls == []
    root = tmp_path / "hw9" / "experiments" / "course"
    assert f"2 configurations, preset course, in {root}" in out  # the run and its evaluation
    script_path = __name__.replace(".", "/") + ".py"
    assert f"[run] lr0.1: python {script_path} --lr 0.1 --device cpu --log_dir {root / 'lr0.1'}" in out

    args = grid_parser(None).parse_args(["--preset", "course", "--only", "lr0.[2-9]"])
    run_experiments(args, "hw9", configs, lambda frame, out: "")
    assert script.names() == ["lr0.2"]
    assert json.loads((root / "grid.json").read_text()) == {"lr0.2": ["--lr", "0.2"]}
    with pytest.raises(CS330Error, match="--only nope: no such configuration"):
        run_experiments(grid_parser(None).parse_args(["--only", "nope"]), "hw9", configs, lambda frame, out: "")
    assert grid_parser(None).parse_args(["--quick"]).preset == "smoke"


@pytest.mark.parametrize("module", ["hw0_recsys.experiments", "hw1_mann.experiments", "hw2_protonet_maml.experiments",
                                    "hw3_lm_fewshot.experiments"])
def test_every_experiments_script_builds_its_grid(module, tmp_path, capsys):
    main = importlib.import_module(module).main
    for preset in ("smoke", "cpu", "course"):
        main(["--preset", preset, "--dry_run", "--out_dir", str(tmp_path / preset)])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].endswith(f"preset {preset}, in {tmp_path / preset}")
        assert len(lines) > 1 and all(line.startswith("[run] ") for line in lines[1:])


def test_side_by_side_workers_keep_each_others_record(tmp_path):
    # A second --only worker on the same grid finishes "other" while this worker runs lr0.1: the
    # record this worker writes afterwards must keep it.
    script = FakeScript()

    def run_and_meanwhile_another_worker_finishes(argv: list[str]) -> None:
        write_json(tmp_path / "grid.json", {"other": ["--lr", "0.9"]})
        script(argv)

    configs = [Config("lr0.1", run_and_meanwhile_another_worker_finishes, ["--lr", "0.1"])]
    assert run_grid(configs, tmp_path) == {}
    assert json.loads((tmp_path / "grid.json").read_text()) == {"other": ["--lr", "0.9"], "lr0.1": ["--lr", "0.1"]}
