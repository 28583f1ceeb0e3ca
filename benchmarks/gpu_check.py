"""One prepared check for a machine with a GPU (``make gpu-check``): every step, its status, its
seconds and its headline figure in one summary table. Built to finish within 8 minutes on one H100.
Without CUDA the CUDA steps are skipped with the reason and the CPU steps still run.

    python benchmarks/gpu_check.py              # everything that this machine can run
    python benchmarks/gpu_check.py --only bench # one step
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    needs_cuda: bool
    min_gpus: int = 1
    timeout: int = 150
    figure: str = ""  # what to read from results.json (a metrics key) or "tail" (the last output line)


def steps(run_root: Path) -> list[Step]:
    py = sys.executable
    hw2 = REPO / "hw2_protonet_maml"
    short = ["--num_train_iterations", "300", "--val_interval", "100", "--num_test_tasks", "600", "--device", "cuda"]
    equal = ["--num_train_iterations", "20", "--batch_size", "8", "--num_test_tasks", "64", "--device", "cuda",
             "--save_interval", "20", "--val_interval", "20"]
    return [
        Step("cuda tests", [py, "-m", "pytest", "-q", "-m", "cuda", str(REPO / "tests")], True, figure="tail"),
        Step("distributed tests (CPU, gloo)", [py, "-m", "pytest", "-q", str(REPO / "tests" / "test_distributed.py")],
             False, figure="tail"),
        Step("hw2 bench", [py, str(hw2 / "bench.py"), "--device", "cuda", "--repeats", "5"], True, timeout=180,
             figure="tail"),
        Step("protonet 300 it.", [py, str(hw2 / "protonet.py"), "--num_support", "1", *short,
                                  "--log_dir", str(run_root / "protonet")], True, figure="test_accuracy"),
        Step("maml 300 it.", [py, str(hw2 / "maml.py"), *short, "--log_dir", str(run_root / "maml")], True,
             timeout=240, figure="test_accuracy"),
        Step("hw3 KV-cache bench", [py, str(REPO / "hw3_lm_fewshot" / "bench.py"), "--device", "cuda"], True,
             figure="tail"),
        Step("torchrun 2 GPUs", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(hw2 / "maml.py"), *equal, "--log_dir", str(run_root / "maml_2gpu")],
             True, min_gpus=2, figure="test_accuracy"),
        Step("1 GPU, same flags", [py, str(hw2 / "maml.py"), *equal, "--log_dir", str(run_root / "maml_1gpu")],
             True, min_gpus=2, figure="test_accuracy"),
    ]


def run_step(step: Step, run_root: Path) -> tuple[str, float, str]:
    gpus = torch.cuda.device_count()
    if step.needs_cuda and gpus < step.min_gpus:
        return f"skipped: needs {step.min_gpus} CUDA device(s), found {gpus}", 0.0, ""
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.command, capture_output=True, text=True, timeout=step.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"timed out after {step.timeout} s", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).strip().splitlines()
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    if step.figure == "tail" or proc.returncode != 0:
        return status, seconds, output[-1] if output else ""
    log_dir = Path(step.command[step.command.index("--log_dir") + 1])
    metrics = json.loads((log_dir / "results.json").read_text())["metrics"]
    return status, seconds, f"{step.figure} {metrics[step.figure]:.4f} +- {metrics.get('test_ci95', 0):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="steps whose name contains one of these words")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"gpu-check on {device} ({torch.cuda.device_count()} GPU(s)), torch {torch.__version__}", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for step in steps(Path(tmp)):
            if args.only and not any(word in step.name for word in args.only):
                continue
            status, seconds, figure = run_step(step, Path(tmp))
            rows.append((step.name, status, seconds, figure))
            print(f"  {step.name}: {status} ({seconds:.0f} s) {figure}", flush=True)
    print("\n| step | status | seconds | figure |\n|---|---|---:|---|")
    for name, status, seconds, figure in rows:
        print(f"| {name} | {status} | {seconds:.0f} | {figure} |")
    if any(status.startswith(("failed", "timed out")) for _, status, _, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
