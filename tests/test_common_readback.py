"""Issue 28 in the common run lifecycle: what a run folder holds is checked when it is read back
(hparams.json, results.json, grid.json, checkpoints), a resume never runs past what its flags say,
a finished run's folder is not overwritten, and a full disk is one line that keeps the last good
checkpoint and leaves no new folder behind."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from common import checkpoint as checkpoint_mod
from common import run as run_mod
from common.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from common.errors import CS330Error
from common.grid import Config, collect, run_grid
from common.run import RunFolder
from common.runlog import write_json


def finished_run(path, hparams, steps=(2,), model=None):
    """A run folder as a training script leaves it: hparams.json, checkpoints, results.json."""
    model = model or torch.nn.Linear(2, 1)
    with RunFolder.open(path, hparams) as run:
        logger = run.logger()
        for step in steps:
            run.save(step, {"model": model.state_dict(), "optimizer": {}, "rng": {}})
        logger.finish({"acc": 0.5})
        logger.close()
    return model


# ---------------------------------------------------------------- stored flags (issue item 3)
@pytest.mark.parametrize("damage, what", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: p.write_text("{not json"), r"not valid JSON \(.*\)"),
    (lambda p: p.write_text("[1, 2]"), "holds a JSON array where a JSON object was expected"),
])
def test_resume_without_readable_stored_flags_is_refused(tmp_path, damage, what):
    """Deleted hparams.json + --resume --lr 0.5 used to train at the checkpoint's rate and record 0.5."""
    finished_run(tmp_path / "run", {"lr": 0.001, "steps": 2})
    damage(tmp_path / "run" / "hparams.json")
    with pytest.raises(CS330Error, match=f"hparams.json: {what}; the flags this run trained with are unknown, "
                                         "so it cannot be resumed.*another --log_dir"):
        RunFolder.open(tmp_path / "run", {"lr": 0.5, "steps": 4}, resume=True, resumable=("steps",))


# ---------------------------------------------------------------- run length (issue item 4)
def test_resume_with_a_shorter_run_length_is_refused(tmp_path):
    model = finished_run(tmp_path / "run", {"lr": 0.1, "steps": 6}, steps=(6,))
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "steps": 3}, resume=True, resumable=("steps",),
                        length_flag="steps") as run:
        with pytest.raises(CS330Error, match="already at --steps 6, past the --steps 3 asked for; pass --steps 6"):
            run.resume_state(model=model)
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "steps": 6}, resume=True, resumable=("steps",),
                        length_flag="steps") as run:
        assert run.resume_state(model=model)["step"] == 6  # the same length: continues (to nothing left)


# ---------------------------------------------------------------- a finished run's folder (issue item 7)
def test_fresh_run_into_a_folder_with_results_is_refused(tmp_path):
    """A script without checkpoints (hw3) used to replace results.json and mix both runs' curves."""
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        logger = run.logger()
        logger.log({"train/loss": 1.0}, 1)
        logger.finish({"acc": 0.5})
        logger.close()
    with pytest.raises(CS330Error, match="already holds the results of a finished run .results.json.; choose "
                                         "another --log_dir, or delete the folder"):
        RunFolder.open(tmp_path / "run", {"lr": 0.2})
    with pytest.raises(CS330Error, match="already holds the results of a finished run"):  # no checkpoint to resume
        RunFolder.open(tmp_path / "run", {"lr": 0.2}, resume=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["hparams"] == {"lr": 0.1}


def test_fresh_start_removes_the_curves_of_a_start_that_left_nothing(tmp_path, capsys):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        logger = run.logger()
        logger.log({"train/loss": 1.0}, 1)
        logger.close()  # killed before results: no checkpoint, no results.json
    with RunFolder.open(tmp_path / "run", {"lr": 0.2}) as run:
        assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert "removed the TensorBoard curves of an earlier start" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints read back
def test_checkpoints_of_another_model_a_bare_tensor_or_pickled_code_fall_back_to_a_good_one(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    folder = tmp_path / "checkpoints"
    torch.save({"step": 2, "model": torch.nn.Linear(4, 2).state_dict()}, folder / "step0000002.pt")
    torch.save(torch.zeros(3), folder / "step0000003.pt")
    torch.save({"step": 4, "model": {"w": torch.zeros(1)}, "code": print}, folder / "step0000004.pt")
    state = load_checkpoint(tmp_path, model=model)
    assert state["step"] == 1
    err = capsys.readouterr().err
    assert f"{folder / 'step0000004.pt'}: holds a pickled print, not only tensors" in err
    assert f"{folder / 'step0000003.pt'}: holds a tensor without a step, not a checkpoint" in err
    assert (f"{folder / 'step0000002.pt'}: the weights of another model (shape weight (2, 4) instead of (2, 3)); "
            "delete it to use an earlier checkpoint, or choose another --log_dir") in err
    assert "weights_only=False" not in err and "Traceback" not in err
    with pytest.raises(CS330Error, match=r"step0000002.pt: the weights of another model"):
        load_checkpoint(tmp_path, 2, model=model)


def test_resume_from_a_weights_only_checkpoint_falls_back_to_a_resumable_one(tmp_path, capsys):
    model = finished_run(tmp_path / "run", {"lr": 0.1, "steps": 4}, steps=(1,))
    torch.save({"step": 2, "model": model.state_dict()}, tmp_path / "run" / "checkpoints" / "step0000002.pt")
    with RunFolder.open(tmp_path / "run", {"lr": 0.1, "steps": 4}, resume=True, resumable=("steps",)) as run:
        assert run.resume_state(model=model)["step"] == 1
    assert "step0000002.pt: holds no optimizer, rng (weights only?), so no run can continue from it" in \
        capsys.readouterr().err


def test_no_usable_checkpoint_names_the_latest_reason(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step0000001.pt").write_bytes(b"garbage" * 20)
    with pytest.raises(CS330Error, match=r"no usable checkpoint in .*checkpoints \(the latest: .*step0000001.pt: "
                                         r"damaged"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- grid records read back
def write_results(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload)


@pytest.mark.parametrize("payload, what", [
    ("{\"lr0.1\": [\"--lr\"", r"not valid JSON \(.*\)"),
    ("[]", "holds a JSON array where a JSON object was expected"),
    ("{\"lr0.1\": 3}", "the entry of lr0.1 is not a list of flags"),
])
def test_damaged_grid_record_is_one_line_with_the_fix(tmp_path, payload, what):
    write_results(tmp_path / "grid.json", payload)
    config = Config("lr0.1", lambda argv: None, ["--lr", "0.1"])
    with pytest.raises(CS330Error, match=f"grid.json: {what}; delete it"):
        run_grid([config], tmp_path)


@pytest.mark.parametrize("payload, what", [
    ("\x00\x01", r"not valid JSON \(.*\)"),
    ("\"done\"", "holds a str where a JSON object was expected"),
    ("{\"metrics\": [1]}", "its hparams and metrics are not JSON objects"),
])
def test_damaged_results_file_is_one_line_naming_the_configuration(tmp_path, payload, what):
    write_results(tmp_path / "lr0.1" / "results.json", payload)
    config = Config("lr0.1", lambda argv: None, ["--lr", "0.1"])
    with pytest.raises(CS330Error, match=f"results.json: {what}; delete it to run lr0.1 again"):
        collect([config], tmp_path)


# ---------------------------------------------------------------- a full disk
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}})
    monkeypatch.setattr(checkpoint_mod.torch, "save", enospc)
    with pytest.raises(CS330Error, match=r"^no space left on .*checkpoints: the checkpoint of step 2 was not "
                                         r"written; the last good checkpoint \(step 1\) is kept"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}})
    assert list(list_checkpoints(tmp_path)) == [1]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_torch_writer_failure_on_a_full_disk_is_named(tmp_path, monkeypatch):
    def writer_failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint_mod.torch, "save", writer_failed)
    monkeypatch.setattr(checkpoint_mod.shutil, "disk_usage", lambda path: type("U", (), {"free": 4096})())
    with pytest.raises(CS330Error, match="^no space left on"):
        save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}})


def test_full_disk_at_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod.os, "fsync", enospc)
    with pytest.raises(CS330Error, match="^no space left on .*new/run: .*the run did not start"):
        RunFolder.open(tmp_path / "new" / "run", {"lr": 0.1})
    assert not (tmp_path / "new").exists()


def test_full_disk_writing_hparams_leaves_no_new_folder(tmp_path, monkeypatch):
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        monkeypatch.setattr("pathlib.Path.write_bytes", enospc)
        with pytest.raises(CS330Error, match="^no space left on .*run: hparams.json was not written"):
            run.logger()
    assert not (tmp_path / "run").exists()


def test_a_refused_second_start_keeps_the_first_runs_folder(tmp_path):
    with pytest.raises(CS330Error, match="in use by another run"):
        with RunFolder.open(tmp_path / "run", {}):
            RunFolder.open(tmp_path / "run", {})
    assert (tmp_path / "run").is_dir()  # the first run's folder


def test_json_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    write_json(tmp_path / "results.json", {"acc": 1})
    monkeypatch.setattr("pathlib.Path.write_bytes", enospc)
    with pytest.raises(CS330Error, match="^no space left on .*: results.json was not written"):
        write_json(tmp_path / "results.json", {"acc": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {"acc": 1}


def test_full_disk_while_writing_a_grid_report_is_one_line(tmp_path):
    from common.grid import grid_parser, run_experiments

    def report(frame, out):
        enospc()  # matplotlib's savefig on a full disk

    def script(argv):
        write_json(tmp_path / "lr0.1" / "results.json", {"hparams": {}, "metrics": {"acc": 1.0}})

    args = grid_parser(None).parse_args(["--out_dir", str(tmp_path)])
    with pytest.raises(CS330Error, match=f"^no space left on {tmp_path}: the report was not written"):
        run_experiments(args, "hw", [Config("lr0.1", script, [])], report)


def test_a_checkpoint_folder_that_became_unwritable_is_one_line(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}})

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint_mod.torch, "save", read_only)
    with pytest.raises(CS330Error, match=r"^cannot write the checkpoint of step 2 to .*checkpoints \(Read-only file "
                                         r"system\); the last good checkpoint \(step 1\) is kept"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}})


def test_json_write_refused_by_the_system_is_one_line(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("pathlib.Path.write_bytes", denied)
    with pytest.raises(CS330Error, match=r"^cannot write .*hparams.json \(Permission denied\); make .* writable"):
        write_json(tmp_path / "hparams.json", {"lr": 0.1})


def test_full_disk_under_tensorboard_is_one_line(tmp_path, monkeypatch):
    """TensorBoard's writer thread keeps the OSError of a failed write and raises it at the next call."""
    with RunFolder.open(tmp_path / "run", {"lr": 0.1}) as run:
        logger = run.logger()
        monkeypatch.setattr(logger.writer, "add_scalar", enospc)
        with pytest.raises(CS330Error, match="^no space left on .*run: TensorBoard's event file was not written"):
            logger.log({"train/loss": 1.0}, 1)
        monkeypatch.setattr(logger.writer, "close", enospc)
        with pytest.raises(CS330Error, match="^no space left on"):
            logger.close()
        logger.close()  # closed once
