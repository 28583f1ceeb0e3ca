"""Issue 28, item 7: hw3's scripts keep no checkpoints, and a second run into a folder holding
another run's results used to replace results.json without a word and mix both runs' curves.
The run lifecycle (common/run.py) refuses it for every script; here with the real mains."""

from __future__ import annotations

import json

import pytest

from hw3_lm_fewshot import ft, icl
from tests.test_hw3_unit import fake_icl_result, offline  # noqa: F401  (offline: the fixture)


def test_a_second_run_into_a_finished_run_folder_is_refused(offline, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(icl, "run_icl", fake_icl_result([]))
    monkeypatch.setattr(ft, "run_ft", lambda *a, **k: pytest.fail("trained into a finished run's folder"))
    run_dir = offline["runs"] / "mine"
    argv = ["--model", str(offline["model"]), "--data_dir", str(offline["data"]), "--dataset", "babi",
            "--n_eval", "2", "--k", "1", "--device", "cpu", "--threads", "1", "--log_dir", str(run_dir)]
    icl.main(argv)
    before = (run_dir / "results.json").read_text()
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    capsys.readouterr()
    for main, other in ((icl.main, ["--seed", "1"]), (ft.main, [])):
        with pytest.raises(SystemExit) as info:
            main([*argv, *other])
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert f"error: {run_dir} already holds the results of a finished run (results.json)" in err
    assert (run_dir / "results.json").read_text() == before and json.loads(before)["hparams"]["seed"] == 0
    assert sorted(run_dir.glob("events.out.tfevents.*")) == events
