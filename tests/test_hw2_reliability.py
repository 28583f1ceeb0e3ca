"""Issue 28 in hw2: a --resume shorter than the checkpoint is refused, a checkpoint of another model
is named (not a traceback), and the grid's report states the test-task count its runs used."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hw2_protonet_maml import experiments
from hw2_protonet_maml import maml as maml_script

TINY = ["--num_way", "3", "--num_support", "1", "--num_query", "2", "--batch_size", "2", "--num_val_tasks", "2",
        "--num_test_tasks", "4", "--num_filters", "4", "--conv_stride", "2", "--val_interval", "1",
        "--device", "cpu", "--threads", "1"]


def run_flags(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data_dir", str(data_dir), "--log_dir", str(log_dir), *extra]


def exit_code_and_stderr(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        maml_script.main(argv)
    return info.value.code, capsys.readouterr().err


def test_resume_shorter_than_the_checkpoint_is_refused(omniglot_data_dir, tmp_path, capsys):
    """--resume --num_train_iterations 1 on a 2-iteration run used to exit 0 with the 2-iteration model
    recorded as a 1-iteration run (and a negative rate on the progress bar)."""
    run = tmp_path / "maml"
    maml_script.main(run_flags(omniglot_data_dir, run, "--num_train_iterations", "2"))
    before = (run / "results.json").read_text()
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, "--num_train_iterations", "1",
                                                       "--resume"))
    assert code == 2 and "already at --num_train_iterations 2, past the --num_train_iterations 1" in err, err
    assert (run / "results.json").read_text() == before


def test_resume_from_a_checkpoint_of_another_model_falls_back_or_says_so(omniglot_data_dir, tmp_path, capsys):
    run = tmp_path / "maml"
    maml_script.main(run_flags(omniglot_data_dir, run, "--num_train_iterations", "1"))
    latest = run / "checkpoints" / "step0000001.pt"
    state = torch.load(latest, weights_only=True)
    state["model"] = {f"other.{name}": value for name, value in state["model"].items()}
    torch.save(state, latest)
    code, err = exit_code_and_stderr(capsys, run_flags(omniglot_data_dir, run, "--num_train_iterations", "2",
                                                       "--resume"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert f"{latest}: the weights of another model (missing " in errors[0], errors[0]


def test_report_states_the_test_task_count_of_its_runs():
    """The paired-column sentence said "600 test tasks" whatever the runs used."""
    rows = [{"name": f"protonet_N5_K1_test{k}shot", "test_accuracy": 0.9, "test_ci95": 0.01,
             "test_task_accuracies": [0.9] * 32, "test_shot": k} for k in experiments.PROTONET_SHOTS]
    rows.append({"name": "protonet_N10_K1_test1shot", "test_accuracy": 0.8, "test_ci95": 0.01,
                 "test_task_accuracies": [0.8] * 32, "test_shot": 1})
    sentence = experiments.paired_note(pd.DataFrame(rows))
    assert "on the same 32 test tasks" in sentence and "600" not in sentence
    mixed = pd.DataFrame(rows + [{"name": "x", "test_task_accuracies": [0.5] * 40}])
    assert "32 or 40 test tasks" in experiments.paired_note(mixed)
    assert experiments.paired_note(pd.DataFrame([{"name": "y"}])) == ""


def test_report_sentence_is_in_the_written_results(tmp_path, monkeypatch):
    for name in ("plot_composition", "plot_accuracy_vs_k", "plot_curves"):
        monkeypatch.setattr(experiments, name, lambda *args: None)
    frame = pd.DataFrame([{"name": "protonet_N5_K1_test1shot", "test_accuracy": 0.9, "test_ci95": 0.01,
                           "test_task_accuracies": [0.9] * 7, "test_shot": 1}])
    text = experiments.report(frame, tmp_path)
    assert "on the same 7 test tasks" in text
    assert json.loads((tmp_path / "results.json").read_text())["protonet"]


def test_paper_preset_runs_the_papers_training_and_tables_its_cells(tmp_path, monkeypatch):
    """--preset paper: 60-way 5-query training episodes one at a time, the paper's schedule, early
    stopping, 1000 test tasks at 20-way (the run's own test) and 5-way (--test on the best weights)."""
    from hw2_protonet_maml import protonet

    configs = {config.name: config for config in experiments.paper_configs()}
    assert len(configs) == 8  # 3 seeds of the 1-shot model, 1 of the 5-shot, each tested at 20 and 5 ways
    args = protonet.parse_args(list(configs["protonet_paper_K1_s2"].argv))
    assert (args.protocol, args.train_num_way, args.num_query, args.batch_size) == ("vinyals", 60, 5, 1)
    assert (args.lr_step_size, args.lr_gamma, args.patience, args.seed) == (2000, 0.5, 10, 2)
    assert (args.test_num_way, args.test_num_support, args.num_test_tasks) == (20, 1, 1000)
    five_way = configs["protonet_paper_K5_s0_test5way"]
    tested = protonet.parse_args(list(five_way.argv))
    assert tested.test and (tested.test_num_way, tested.test_num_support, tested.test_num_query) == (5, 5, 15)
    assert five_way.results == "test_way5_shot5_query15_best.json" and five_way.run_folder == "protonet_paper_K5_s0"
    monkeypatch.setattr(experiments, "plot_curves", lambda *args: None)
    frame = pd.DataFrame([
        {"name": "protonet_paper_K1_s0", "test_accuracy": 0.97, "test_ci95": 0.004, "best_val_step": 9000,
         "stopped_at_step": 14000, "train_seconds": 5000.0, "test_way": 20},
        {"name": "protonet_paper_K1_s1", "test_accuracy": 0.96, "test_ci95": 0.004, "test_way": 20}])
    text = experiments.paper_report(frame, tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| 20-way 1-shot"))
    assert "96.0" in row and "97.00 ± 0.40" in row and "96.50 ± 0.71 (2)" in row and "9000" in row
    assert json.loads((tmp_path / "results.json").read_text())["protonet_paper"][0]["paper %"] == 98.8


@pytest.mark.parametrize("flags", [["--batch_size", "100000000"], ["--batch_size", "100000", "--test_num_query", "15",
                                                                   "--num_way", "100"]])
def test_a_meta_batch_no_memory_can_hold_is_refused_at_parse_time(capsys, flags):
    """Issue 28: a batch of 1e8 tasks ended in an allocator traceback after the run folder existed."""
    with pytest.raises(SystemExit) as info:
        maml_script.parse_args(flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--batch_size {flags[1]} tasks of " in err and "needs at least" in err, err


def test_task_counts_whose_accuracies_cannot_be_held_are_refused_at_parse_time(capsys):
    """--num_test_tasks 1e14 trained to the end, then could not hold the per-task accuracies."""
    with pytest.raises(SystemExit) as info:
        maml_script.parse_args(["--num_test_tasks", "100000000000000"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--num_test_tasks 100000000000000 (an accuracy per task) needs at least" in err
