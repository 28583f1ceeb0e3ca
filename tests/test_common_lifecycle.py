"""The run lifecycle every training script goes through (common/run.py), the flag validators and the
precision/thread choice (common/device.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from common import device as device_mod
from common.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from common.cli import add_run_args, finite_float, positive_float, positive_int
from common.errors import CS330Error
from common.run import RunFolder


def test_validators_refuse_inf_nan_and_junk():
    for validator, text in ((finite_float, "inf"), (positive_float, "nan"), (positive_float, "-inf"),
                            (positive_float, "0"), (positive_float, "1e39"), (positive_int, "1.5"),
                            (finite_float, "abc")):
        with pytest.raises(argparse.ArgumentTypeError):
            validator(text)
    assert positive_float("1e-3") == 1e-3 and positive_int("3") == 3


def test_bf16_flag_is_an_alias_of_precision_bf16():
    parser = argparse.ArgumentParser()
    add_run_args(parser)
    assert parser.parse_args([]).precision == "auto"
    assert parser.parse_args(["--bf16"]).precision == "bf16"
    assert parser.parse_args(["--precision", "fp32"]).precision == "fp32"


def test_fresh_run_writes_and_refuses_a_second_fresh_start(tmp_path):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        run.save(1, {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CS330Error, match="already holds checkpoints: pass --resume"):
        RunFolder.open(tmp_path / "run", {"lr": 0.1})


def test_resume_without_checkpoint_starts_fresh_with_a_note(tmp_path, capsys):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}, resume=True) as run:
        assert run.resume_state() is None
    assert "starting the run fresh" in capsys.readouterr().err


def test_resume_refuses_changed_flags_but_allows_the_run_length(tmp_path):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "steps": 10, "device": "cpu"}) as run:
        run.logger().close()  # writes hparams.json
        run.save(10, {"model": {"w": torch.ones(1)}, "optimizer": {}, "rng": {}})
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "steps": 20, "device": "cuda"}, resume=True,
                        resumable=("steps",)) as run:
        assert run.resume_state()["step"] == 10
    with pytest.raises(CS330Error, match=r"--lr 0.1 -> 0.5.*only .*steps"):
        RunFolder.open(tmp_path / "run", {"lr": 0.5, "steps": 20}, resume=True, resumable=("steps",))


def test_a_flag_newer_than_the_run_reads_as_its_legacy_value(tmp_path):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        run.logger().close()  # hparams.json without "rule": the run is older than that flag
        run.save(1, {"model": {"w": torch.ones(1)}, "optimizer": {}, "rng": {}})
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "rule": "old"}, resume=True, legacy={"rule": "old"}) as run:
        assert run.resume_state()["step"] == 1
    with pytest.raises(CS330Error, match="--rule old -> new"):
        RunFolder.open(tmp_path / "run", {"lr": 0.1, "rule": "new"}, resume=True, legacy={"rule": "old"})
    with pytest.raises(CS330Error, match="--rule None -> old"):  # no legacy value: an unknown one, refused
        RunFolder.open(tmp_path / "run", {"lr": 0.1, "rule": "old"}, resume=True)


def test_non_finite_weights_are_never_written(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}})
    with pytest.raises(CS330Error, match=r"non-finite by step 2 \(w\); the last good checkpoint \(step 1\)"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.tensor([1.0, float("inf"), 0.0])}})
    assert list(list_checkpoints(tmp_path)) == [1]


def test_damaged_latest_checkpoint_falls_back_with_its_name(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((1000,), float(step))}})
    latest = list_checkpoints(tmp_path)[2]
    latest.write_bytes(latest.read_bytes()[:500])  # truncated, as by a full disk
    assert load_checkpoint(tmp_path)["step"] == 1
    assert f"{latest}: damaged" in capsys.readouterr().err
    with pytest.raises(CS330Error, match=f"{latest}: damaged"):
        load_checkpoint(tmp_path, 2)


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    stale = [tmp_path / "run" / ".results.json.tmp", tmp_path / "run" / "checkpoints" / ".step0000003.pt.x1.tmp"]
    for path in stale:
        path.write_text("half")
    RunFolder.open(tmp_path / "run", {}).close()
    assert not any(path.exists() for path in stale)


def test_unwritable_run_folder_is_one_clear_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    with pytest.raises(CS330Error, match="cannot write the run folder .*Permission denied.*--log_dir"):
        RunFolder.open(tmp_path / "run", {})
    monkeypatch.undo()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CS330Error, match="cannot write the run folder .*file/run"):
        RunFolder.open(tmp_path / "file" / "run", {})


def test_a_second_process_on_the_same_folder_is_refused_and_a_killed_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from common.run import RunFolder
        run = RunFolder.open({str(tmp_path / "run")!r}, {{}})
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CS330Error, match=f"in use by another run \\(process {holder.pid}\\)"):
            RunFolder.open(tmp_path / "run", {})
    finally:
        holder.kill()
        holder.wait()
    RunFolder.open(tmp_path / "run", {}).close()  # the kernel dropped the dead process's lock


def test_auto_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "cpu_capability", lambda: "AVX2")
    assert device_mod.resolve_precision("auto", cpu)[0] == "fp32"
    monkeypatch.setattr(device_mod, "cpu_capability", lambda: "AVX512+BF16")
    assert device_mod.resolve_precision("auto", cpu)[0] == "bf16"
    assert device_mod.resolve_precision("auto", cpu, fp32_because="not measured")[0] == "fp32"
    assert device_mod.resolve_precision("fp32", cpu)[0] == "fp32"


def test_threads_default_to_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert device_mod.configure_threads(None) == device_mod.usable_cores() == torch.get_num_threads()
        assert device_mod.configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_beyond_the_usable_cores_are_capped_with_a_note(monkeypatch, capsys):
    """Issue 28: --threads far above the cores made a run many times slower."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(device_mod, "usable_cores", lambda: 1)
        assert device_mod.configure_threads(64) == 1 == torch.get_num_threads()
        assert capsys.readouterr().err == ("note: --threads 64 is more than the 1 cores this process may use; using 1 "
                                           "(more threads than cores only wait for each other)\n")
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        assert device_mod.configure_threads(None) == 1
        assert "note: OMP_NUM_THREADS 8 is more than the 1 cores" in capsys.readouterr().err
        assert device_mod.configure_threads(1) == 1 and capsys.readouterr().err == ""
        monkeypatch.setattr(device_mod, "usable_cores", lambda: 4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the 4 cores
        assert device_mod.configure_threads(4) == 2
        err = capsys.readouterr().err
        assert "note: --threads 4 is more than the 2 cores each of this machine's 2 processes may use" in err
    finally:
        torch.set_num_threads(before)


def test_hparams_of_a_finished_run_are_what_it_trained_with(tmp_path):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        logger = run.logger()
        logger.finish({"acc": 1.0})
        logger.close()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["hparams"] == {"lr": 0.1}
