"""Data-parallel hw1 under torchrun (common/distributed.py in hw1_mann/train.py): 2 processes give the
single-process run's weights (up to rounding) and exactly its evaluation figures, --test and --resume
work under torchrun, and a meta-batch that does not split evenly is refused before any work.

The torchrun tests start real processes (gloo on the CPU, one thread each), as a user would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import Job, torchrun

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "hw1_mann" / "train.py")
# Tiny tasks and models on the CPU in fp32; 8 final test tasks are 2 evaluation batches, one per rank.
TINY = ["--num_classes", "2", "--num_shot", "1", "--meta_batch_size", "4", "--hidden_dim", "8", "--eval_freq", "3",
        "--num_test_tasks", "8", "--device", "cpu", "--precision", "fp32", "--memory_slots", "8"]
# Accuracies are exact: the weights differ by rounding only, which moves no argmax, and each evaluation
# batch is scored whole by one rank. Losses follow the weights' rounding (about 1e-7).
ACCURACIES = ("test_acc", "test_acc_ci95", "test_acc_by_instance", "val_acc")
LOSSES = ("test_loss", "train_loss", "val_loss")


def succeed(*jobs: Job) -> list[subprocess.CompletedProcess]:
    done = [job.finish() for job in jobs]
    for result in done:
        assert result.returncode == 0, result.stdout[-3000:]
    return done


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(sorted((run_dir / "checkpoints").glob("step*.pt"))[-1], weights_only=True)["model"]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``||a - b|| / ||a||`` over the floating-point tensors, and that tensor's name."""
    diffs = {k: float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30))
             for k in a if a[k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def assert_same_run(single: Path, parallel: Path, label: str) -> None:
    """Weights and losses equal up to rounding (the ranks sum their gradients in another order); every
    accuracy, final and in the history, exactly equal."""
    figure, tensor = largest_relative_difference(final_weights(single), final_weights(parallel))
    print(f"\nhw1 {label}: 2 processes vs 1: max relative weight difference {figure:.1e} ({tensor})")
    assert figure <= 1e-5, (figure, tensor)
    first, second = results(single), results(parallel)
    for one, two in [(first, second), *zip(first["history"], second["history"], strict=True)]:
        for key in one:
            if key in LOSSES:
                assert one[key] == pytest.approx(two[key], rel=1e-5), key
            elif key in (*ACCURACIES, "step", "steps"):
                assert one[key] == two[key], key


# ---------------------------------------------------------------------------- 2 processes = 1 process
@pytest.mark.slow
@pytest.mark.parametrize("model, protocol", [("lstm", "course"), ("memory", "course"), ("memory", "santoro")])
def test_two_processes_train_the_single_process_weights(model, protocol, omniglot_data_dir, tmp_path):
    flags = [*TINY, "--model", model, "--train_steps", "3", "--data_dir", str(omniglot_data_dir),
             "--protocol", protocol, "--presentations", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _, parallel = succeed(Job([sys.executable, SCRIPT, *flags, "--log_dir", str(one)], tmp_path / "one.log"),
                          Job([*torchrun(2), SCRIPT, *flags, "--log_dir", str(two)], tmp_path / "two.log"))
    assert_same_run(one, two, f"{model}, {protocol} protocol")
    assert "(2 processes)" in parallel.stdout and parallel.stdout.count("precision: ") == 1
    # Rank 0 alone wrote the run folder: the files of a single-process run, no more.
    def files(folder: Path) -> list[str]:  # TensorBoard files are named after the writing process's id
        return sorted("tfevents" if "tfevents" in p.name else p.name for p in folder.rglob("*"))

    assert files(two) == files(one)
    # --test under torchrun on the single-process run's folder: rank 0 reads the checkpoint and sends it;
    # the same weights give exactly the figures the single process reported at the end of training.
    (tested,) = succeed(Job([*torchrun(2), SCRIPT, *flags, "--log_dir", str(one), "--test"], tmp_path / "test.log"))
    expected = results(one)
    line = (f"test (8 tasks, step 3): accuracy {expected['test_acc']:.4f} +- {expected['test_acc_ci95']:.4f}; "
            f"by instance {expected['test_acc_by_instance']}")
    assert tested.stdout.count(line) == 1, tested.stdout[-3000:]  # printed by rank 0 alone


@pytest.mark.slow
def test_resume_under_torchrun_continues_to_the_single_process_result(omniglot_data_dir, tmp_path):
    flags = [*TINY, "--data_dir", str(omniglot_data_dir)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    single = Job([sys.executable, SCRIPT, *flags, "--train_steps", "6", "--log_dir", str(straight)],
                 tmp_path / "straight.log")
    command = [*torchrun(2), SCRIPT, *flags, "--log_dir", str(resumed)]
    succeed(Job([*command, "--train_steps", "3"], tmp_path / "first.log"))
    _, second = succeed(single, Job([*command, "--train_steps", "6", "--resume"], tmp_path / "second.log"))
    assert "resuming at step 3" in second.stdout
    assert_same_run(straight, resumed, "resumed at step 3 of 6")


# ---------------------------------------------------------------------------- refusals
@pytest.mark.slow
def test_meta_batch_not_divisible_by_processes_is_refused_before_any_work(omniglot_data_dir, tmp_path):
    log_dir = tmp_path / "run"
    done = Job([*torchrun(2), SCRIPT, *TINY, "--meta_batch_size", "3", "--train_steps", "3", "--data_dir",
                str(omniglot_data_dir), "--log_dir", str(log_dir)], tmp_path / "out.log").finish()
    assert done.returncode != 0  # torchrun's own status is 1 whenever a worker fails
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stdout[-3000:]  # rank 0 says why; the other rank exits quietly
    assert "--meta_batch_size 3 is not divisible by the 2 processes" in errors[0]
    assert "--meta_batch_size 4" in errors[0] and "--batch_size" not in errors[0].replace("--meta_batch_size", "")
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2\b", done.stdout), done.stdout[-3000:]  # the script's status
    assert not log_dir.exists()
