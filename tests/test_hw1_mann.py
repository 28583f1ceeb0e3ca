"""hw1: sequence meta-batches, label masking, the LSTM and memory MANNs, and the run lifecycle of
train.py (resume rules, --test, the NaN guard, precision), on the Omniglot fixture of conftest.py
(the real archives when CS330_DATA_MIRROR holds them, else a small fake set)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import CS330Error
from hw1_mann import train as train_script
from hw1_mann.data import CourseSampler, check_task_shape
from hw1_mann.models import LSTMMANN, FastMemoryMANN, MemoryMANN, query_loss

REPO = Path(__file__).resolve().parents[1]
# A run that takes a fraction of a second: 3-way 1-shot, 4 tasks per step, 2 steps, a checkpoint each step.
TINY = ["--num_classes", "3", "--num_shot", "1", "--meta_batch_size", "4", "--hidden_dim", "8",
        "--train_steps", "2", "--eval_freq", "1", "--num_test_tasks", "8", "--device", "cpu"]


def run_flags(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--log_dir", str(log_dir), *extra]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))


def lstm_runs_bf16() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(1, 1, 4))
    except RuntimeError:
        return False
    return True


LSTM_RUNS_BF16 = lstm_runs_bf16()  # not on AVX2 CPUs (oneDNN has no bf16 LSTM there)


def exit_code_and_stderr(capsys, argv: list[str]) -> tuple[int, str]:
    """Run train.py in-process where it must fail: its exit status and what it printed to stderr."""
    with pytest.raises(SystemExit) as info:
        train_script.main(argv)
    return info.value.code, capsys.readouterr().err


def _fake_batch(batch: int = 3, shots: int = 2, ways: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, shots + 1, ways, 784, generator=gen)
    order = torch.rand(batch, shots + 1, ways, generator=gen).argsort(-1)
    labels = torch.nn.functional.one_hot(order, ways).float()
    return images, labels


# ---------------------------------------------------------------------------------------- data and models
def test_sequence_batch_shapes_and_labels(omniglot_store):
    train_split = omniglot_store.split("train")
    sampler = CourseSampler(train_split, num_classes=3, num_shot=2, seed=5)
    images, labels = sampler.sample(6)
    assert images.shape == (6, 3, 3, 784) and labels.shape == (6, 3, 3, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    eye = torch.eye(3)
    assert torch.equal(labels[:, :2], eye.expand(6, 2, 3, 3))  # support rows: class n at position n
    assert torch.equal(labels[:, 2].sum(1), torch.ones(6, 3))  # query row: every class exactly once
    assert not all(torch.equal(labels[b, 2], eye) for b in range(6))  # ... in a shuffled order
    again = CourseSampler(train_split, num_classes=3, num_shot=2, seed=5).sample(6)
    assert torch.equal(again.images, images) and torch.equal(again.labels, labels)  # seeded


def test_impossible_task_shapes_are_refused(omniglot_store):
    with pytest.raises(CS330Error, match="num_shot 20"):
        check_task_shape(5, 20)
    with pytest.raises(CS330Error, match="at least 2"):
        check_task_shape(1, 1)
    with pytest.raises(CS330Error, match="larger than"):
        CourseSampler(omniglot_store.split("train")[:10], num_classes=11, num_shot=1)


@pytest.mark.parametrize("model_cls", [LSTMMANN, MemoryMANN, FastMemoryMANN])
def test_output_shape_and_query_labels_are_hidden(model_cls):
    torch.manual_seed(0)
    model = model_cls(4, hidden_dim=16)
    images, labels = _fake_batch()
    logits = model(images, labels)
    assert logits.shape == labels.shape
    altered = labels.clone()
    altered[:, -1] = torch.roll(altered[:, -1], 1, dims=-1)  # different query labels, same targets
    altered_logits = model(images, altered)
    assert torch.equal(altered_logits, logits)
    assert query_loss(altered_logits, labels) == query_loss(logits, labels)
    # ... while the support labels do matter.
    support_changed = labels.clone()
    support_changed[:, 0] = torch.roll(support_changed[:, 0], 1, dims=-1)
    assert not torch.equal(model(images, support_changed), logits)


def test_wrong_shapes_get_a_clear_error():
    model = LSTMMANN(4, hidden_dim=8)
    images, labels = _fake_batch(ways=3)
    with pytest.raises(CS330Error, match="4-way"):
        model(images, labels)


# ---------------------------------------------------------------------------------------- flags
def test_boolean_flags_parse_as_booleans():
    assert train_script.parse_args(["--test", "false"]).test is False
    assert train_script.parse_args(["--test", "False"]).test is False
    assert train_script.parse_args(["--test"]).test is True
    assert train_script.parse_args(["--test", "true"]).test is True
    assert train_script.parse_args([]).test is False and train_script.parse_args([]).resume is False
    assert train_script.parse_args(["--resume"]).resume is True
    with pytest.raises(SystemExit):
        train_script.parse_args(["--test", "maybe"])


def test_course_defaults():
    args = train_script.parse_args([])
    assert (args.num_classes, args.num_shot, args.meta_batch_size, args.hidden_dim) == (5, 1, 128, 128)
    assert (args.learning_rate, args.train_steps, args.eval_freq, args.random_seed) == (1e-3, 25000, 100, 123)
    assert args.model == "lstm" and args.precision == "auto"


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "inf"], "must be a finite number"),
    (["--learning_rate", "1e38"], "overflow Adam's float32 step size"),
    (["--learning_rate", "nan"], "must be a finite number"),
    (["--learning_rate", "0"], "must be a positive number"),
    (["--num_shot", "0"], "must be a positive integer"),
    (["--eval_freq", "-5"], "must be a positive integer"),
    (["--threads", "0"], "must be a positive integer"),
    (["--precision", "fp16"], "invalid choice"),
])
def test_bad_flags_are_refused_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_script.parse_args(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_class_counts_are_checked_before_any_work(omniglot_data_dir, omniglot_store, tmp_path, capsys):
    val_size = len(omniglot_store.split("val"))  # the smallest split: 100 characters in the real store
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, tmp_path / "run", *TINY,
                                                       "--num_classes", str(val_size + 1)))
    assert code == 2 and f"larger than the {val_size} characters of the val split" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


# ---------------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_short_training_beats_chance_on_two_way(omniglot_data_dir, tmp_path):
    run = tmp_path / "run"
    metrics = train_script.main(run_flags(omniglot_data_dir, run,
        "--num_classes", "2", "--num_shot", "1", "--meta_batch_size", "32", "--hidden_dim", "64",
        "--train_steps", "400", "--eval_freq", "100", "--learning_rate", "5e-3", "--num_test_tasks", "500",
        "--device", "cpu"))
    assert metrics["test_acc"] - metrics["test_acc_ci95"] > 0.5  # the 95% interval lies above chance
    assert len(metrics["test_acc_by_instance"]) == 2
    assert results(run)["test_acc"] == metrics["test_acc"]


def test_precision_is_resolved_printed_and_recorded(omniglot_data_dir, tmp_path, monkeypatch, capsys):
    # auto means fp32 for hw1 on every device, with the reason on one line, in hparams and in the run name.
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path / "runs"))
    train_script.main(["--data_dir", str(omniglot_data_dir), *TINY])
    out = capsys.readouterr().out
    assert f"precision: fp32 ({train_script.FP32_BECAUSE})" in out
    (run,) = (tmp_path / "runs" / "hw1_mann").iterdir()
    assert "_precfp32_" in run.name and run.name == train_script.run_name(train_script.parse_args(TINY))
    assert json.loads((run / "hparams.json").read_text())["precision"] == "fp32"
    # --bf16 trains under bf16 autocast and says so, where the CPU can run the LSTM in bf16; elsewhere
    # (AVX2: oneDNN has no bf16 LSTM there) it stops before the run folder exists, with the fix.
    assert "_precbf16_" in train_script.run_name(train_script.parse_args([*TINY, "--bf16"]))
    bf16 = tmp_path / "bf16"
    if not LSTM_RUNS_BF16:
        code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, bf16, *TINY, "--bf16"))
        assert code == 2 and "cannot run the LSTM in bf16" in err and "--precision fp32" in err
        assert not bf16.exists()
        return
    train_script.main(run_flags(omniglot_data_dir, bf16, *TINY, "--bf16"))
    assert "precision: bf16 (as requested)" in capsys.readouterr().out
    assert json.loads((bf16 / "hparams.json").read_text())["precision"] == "bf16"


def test_nan_loss_stops_the_run_at_that_step(omniglot_data_dir, tmp_path, monkeypatch, capsys):
    # --eval_freq 100: the loss must be checked at every step, not only when the run evaluates.
    real_loss, calls = train_script.sequence_loss, {"n": 0}

    def loss_nan_at_step_3(logits, labels):
        calls["n"] += 1
        loss = real_loss(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_script, "sequence_loss", loss_nan_at_step_3)
    run = tmp_path / "run"
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--train_steps", "10",
                                                       "--eval_freq", "100"))
    assert code == 2 and "the training loss became nan at step 3" in err
    assert calls["n"] == 3  # stopped at once
    assert not (run / "results.json").exists() and checkpoints(run) == []


def test_huge_learning_rate_stops_without_a_poisoned_checkpoint(omniglot_data_dir, tmp_path, capsys):
    # The memory model: its logits are unbounded, so lr 1e30 drives the weights to inf within steps
    # (the LSTM's logits are a tanh output, and its loss stays finite however large the weights).
    run = tmp_path / "run"
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--model", "memory",
                                                       "--memory_slots", "8", "--train_steps", "10",
                                                       "--learning_rate", "1e30"))
    assert code == 2 and "Lower the learning rate" in err
    assert not (run / "results.json").exists()
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), path.name


# ---------------------------------------------------------------------------------------- resume and --test
def test_existing_run_without_resume_is_refused(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    before = checkpoints(run)
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY))
    assert code == 2 and "--resume" in err and "--test to evaluate it" in err
    assert checkpoints(run) == before


def test_resume_without_checkpoint_starts_fresh_with_a_note(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY, "--resume"))
    err = capsys.readouterr().err
    assert "note: --resume: no checkpoint" in err and "starting the run fresh" in err
    assert results(run)["steps"] == 2 and checkpoints(run)[-1] == "step0000002.pt"


def test_resume_with_changed_flags_is_refused_before_any_work(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    before = checkpoints(run)
    for changed in (["--learning_rate", "0.5"], ["--hidden_dim", "16"], ["--bf16"]):
        code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--resume", *changed))
        flag = "--precision" if changed == ["--bf16"] else changed[0]
        refusal = "cannot run the LSTM in bf16" if changed == ["--bf16"] and not LSTM_RUNS_BF16 else "other flags"
        assert code == 2 and refusal in err and flag in err, err
    assert checkpoints(run) == before
    # The run length, the interval and the number of test tasks may change: the run is extended.
    train_script.main(run_flags(omniglot_data_dir, run, *TINY, "--resume", "--train_steps", "4",
                                "--eval_freq", "2", "--num_test_tasks", "4"))
    assert checkpoints(run)[-1] == "step0000004.pt" and results(run)["steps"] == 4


def test_test_mode_checks_the_flags_and_scores_the_latest_checkpoint(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    trained = train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    retest = train_script.main(run_flags(omniglot_data_dir, run, *TINY, "--test"))
    assert retest["step"] == 2 and retest["test_acc"] == trained["test_acc"]  # the same test tasks
    # --train_steps may differ (as on --resume); flags that change the model may not.
    assert train_script.main(run_flags(omniglot_data_dir, run, *TINY, "--test", "--train_steps", "50"))["step"] == 2
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--test", "--hidden_dim", "16"))
    assert code == 2 and "other flags" in err and "--hidden_dim 8 -> 16" in err


def test_test_mode_without_checkpoint_says_so(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "empty"
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--test"))
    assert code == 2 and "no checkpoint" in err and "train first" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


@pytest.mark.parametrize("flags", [["--meta_batch_size", "100000000"], ["--hidden_dim", "10000000000"],
                                   ["--model", "memory", "--memory_slots", "10000000", "--memory_dim", "100000"],
                                   ["--num_test_tasks", "100000000000000"]])
def test_sizes_no_memory_can_hold_are_refused_before_any_work(omniglot_data_dir, tmp_path, capsys, flags):
    """Issue 28: a meta-batch of 1e8 tasks (or a 1e10-unit LSTM) ended in an allocator traceback."""
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, tmp_path / "run", *TINY, *flags))
    assert code == 2 and "needs at least" in err and f"{flags[-2]} {flags[-1]}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_resume_shorter_than_the_checkpoint_is_refused(omniglot_data_dir, tmp_path, capsys):
    """Issue 28: --resume --train_steps 1 on a 2-step run used to exit 0 and label the 2-step model as 1 step."""
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    before = results(run)
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--resume", "--train_steps", "1"))
    assert code == 2 and "already at --train_steps 2, past the --train_steps 1 asked for" in err, err
    assert results(run) == before


def test_resume_without_stored_flags_is_refused(omniglot_data_dir, tmp_path, capsys):
    """Issue 28: with hparams.json deleted, --resume --learning_rate 0.5 trained at the checkpoint's rate
    and recorded 0.5."""
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    (run / "hparams.json").unlink()
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--resume", "--train_steps", "4",
                                                       "--learning_rate", "0.5"))
    assert code == 2 and "hparams.json: missing; the flags this run trained with are unknown" in err, err
    assert checkpoints(run)[-1] == "step0000002.pt" and not (run / "hparams.json").exists()


def test_full_disk_at_start_or_at_a_checkpoint_is_one_line(omniglot_data_dir, tmp_path, capsys, monkeypatch):
    """Issue 28: a full disk was an OSError (or torch's inline_container RuntimeError) traceback."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    run = tmp_path / "new" / "run"
    monkeypatch.setattr("common.run.os.fsync", full)  # the start's probe write
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY))
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: no space left on {run}: "), err
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    monkeypatch.setattr("common.checkpoint.torch.save", full)
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--resume", "--train_steps", "3"))
    assert code == 2 and (f"error: no space left on {run / 'checkpoints'}: the checkpoint of step 3 was not written; "
                          "the last good checkpoint (step 2) is kept") in err, err
    assert checkpoints(run) == ["step0000001.pt", "step0000002.pt"] and results(run)["steps"] == 2


def test_test_mode_on_a_checkpoint_of_another_model_is_one_line(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_script.main(run_flags(omniglot_data_dir, run, *TINY))
    latest = run / "checkpoints" / "step0000002.pt"
    state = torch.load(latest, weights_only=True)
    state["model"] = {name: torch.zeros(3, *value.shape) for name, value in state["model"].items()}
    torch.save(state, latest)  # the same flags, foreign weights: copied in by hand
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, *TINY, "--test"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: {latest}: the weights of another model (shape "), errors[0]


def start_train(log: Path, *flags: str) -> subprocess.Popen:
    # A real process, as a user's run would be: the kill is a real SIGKILL at an arbitrary instruction.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO / "hw1_mann" / "train.py"), *flags],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lstm", "memory"])
def test_resume_after_sigkill_matches_uninterrupted_run(omniglot_data_dir, tmp_path, model):
    flags = ["--num_classes", "3", "--num_shot", "2", "--meta_batch_size", "8", "--hidden_dim", "16",
             "--train_steps", "80", "--eval_freq", "5", "--num_test_tasks", "32", "--device", "cpu",
             "--model", model, "--memory_slots", "16"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_train(tmp_path / "straight.log", *run_flags(omniglot_data_dir, straight, *flags))
    proc = start_train(tmp_path / "killed.log", *run_flags(omniglot_data_dir, killed, *flags))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "step0000010.pt").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "results.json").exists()
    resumed = start_train(tmp_path / "resumed.log", *run_flags(omniglot_data_dir, killed, *flags, "--resume"))
    for process, log in ((uninterrupted, "straight.log"), (resumed, "resumed.log")):
        assert process.wait() == 0, (tmp_path / log).read_text()[-2000:]
    assert "resuming at step" in (tmp_path / "resumed.log").read_text()
    expected, got = results(straight), results(killed)
    for key in ("history", "test_acc", "test_acc_ci95", "test_loss", "test_acc_by_instance", "val_acc"):
        assert got[key] == expected[key], key
