"""Data-parallel hw2 under torchrun (common/distributed.py): 2 processes give the single-process
run's weights and results, an uneven split is refused, and a killed job resumes exactly.

The torchrun tests start real processes (gloo on the CPU, one thread each), as a user would.
"""

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

from common import distributed
from common.distributed import DataParallel, World
from common.errors import CS330Error
from common.omniglot import Episodes, EpisodeSampler

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
# Flags every run here shares: tiny tasks and networks on the CPU, in fp32 (under bf16 autocast the
# bf16 copy of a weight accumulates its gradient over one process's tasks in bf16, so splitting the
# tasks changes the rounding at bf16 precision, about 1e-2).
TINY = ["--num_way", "5", "--num_support", "1", "--num_query", "5", "--batch_size", "4", "--num_val_tasks", "4",
        "--num_test_tasks", "8", "--device", "cpu", "--precision", "fp32", "--seed", "3"]
MAML_NET = ["--num_filters", "8", "--conv_stride", "2"]
# Tensors whose exact gradient is zero, so Adam (which divides by the gradient's own scale) steps them
# by rounding noise of any summation order: a single-process run with --threads 2 instead of 1 moves
# them as far (measured). A bias right before batch norm is subtracted again by it; the running means
# carry those biases; ProtoNet's last batch-norm shift moves every embedding alike on channels that no
# ReLU cuts, which the distances to the prototypes cancel.
ROUNDING_DRIVEN = {
    "maml": tuple(f"net.body.{i}.conv.bias" for i in range(4)),
    "protonet": ("embedding.layers.0.bias", "embedding.layers.4.bias", "embedding.layers.8.bias",
                 "embedding.layers.12.bias", "running_mean", "embedding.layers.13.bias"),
}


def script(name: str) -> str:
    return str(REPO / "hw2_protonet_maml" / f"{name}.py")


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


class Job:
    """A command started in the background (so two runs can share the two cores' idle time)."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def finish(self) -> subprocess.CompletedProcess:
        returncode = self.proc.wait(timeout=TIMEOUT)
        return subprocess.CompletedProcess(self.proc.args, returncode, self.log.read_text())


def run(command: list[str], log: Path) -> subprocess.CompletedProcess:
    return Job(command, log).finish()


def final_state(run_dir: Path) -> dict:
    return torch.load(sorted((run_dir / "checkpoints").glob("step*.pt"))[-1], weights_only=True)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], elementwise: bool = False,
                         ) -> dict[str, float]:
    """Per floating-point tensor: ``||a - b|| / ||a||``, or with ``elementwise`` the largest element's
    ``max |a - b| / max |a|`` (dominated by the few elements whose gradient is near rounding level,
    which Adam steps by their sign: single-process --threads 1 against 2 differs there by 3e-5)."""
    def figure(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double(), y.double()
        if elementwise:
            return float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
        return float((x - y).norm() / x.norm().clamp_min(1e-30))

    return {k: figure(a[k], b[k]) for k in a if a[k].is_floating_point()}


# ---------------------------------------------------------------------------- 2 processes = 1 process
@pytest.mark.slow
@pytest.mark.parametrize("name, flags", [("maml", MAML_NET), ("protonet", [])])
def test_two_processes_train_the_single_process_weights(name, flags, omniglot_data_dir, tmp_path):
    common = [*TINY, *flags, "--num_train_iterations", "3", "--data_dir", str(omniglot_data_dir)]
    one, two = tmp_path / "one", tmp_path / "two"
    single = Job([sys.executable, script(name), *common, "--log_dir", str(one)], tmp_path / "one.log")
    parallel = Job([*torchrun(2), script(name), *common, "--log_dir", str(two)], tmp_path / "two.log")
    single, parallel = single.finish(), parallel.finish()
    assert single.returncode == 0, single.stdout[-3000:]
    assert parallel.returncode == 0, parallel.stdout[-3000:]

    a, b = final_state(one)["model"], final_state(two)["model"]
    diffs, elements = relative_differences(a, b), relative_differences(a, b, elementwise=True)
    live = {k: v for k, v in diffs.items() if not any(part in k for part in ROUNDING_DRIVEN[name])}
    worst = max(live, key=live.get)
    print(f"\n{name}: 2 processes vs 1 after 3 iterations: max relative weight difference {live[worst]:.1e} "
          f"({worst}, {len(live)} of {len(diffs)} tensors); largest element {max(elements[k] for k in live):.1e}; "
          f"rounding-driven tensors {max(diffs[k] for k in diffs if k not in live):.1e}")
    assert live[worst] <= 1e-5, live
    # The evaluation tasks are split by batch and gathered in order: the same per-task values.
    first, second = results(one), results(two)
    assert first["test_accuracy"] == second["test_accuracy"] and first["test_ci95"] == second["test_ci95"]
    # Rank 0 alone wrote the run folder: the files of a single-process run, no more.
    assert "(2 processes)" in parallel.stdout
    def files(folder: Path) -> list[str]:  # TensorBoard files are named after the writing process's id
        return sorted("tfevents" if "tfevents" in p.name else p.name for p in folder.rglob("*"))

    assert files(two) == files(one)
    # --test under torchrun: rank 0 reads the checkpoint and sends it; the same figures as at the end of training.
    tested = run([*torchrun(2), script(name), *common, "--log_dir", str(two), "--test"], tmp_path / "test.log")
    assert tested.returncode == 0, tested.stdout[-3000:]
    written = json.loads(next(two.glob("test_way5_shot1_*.json")).read_text())
    assert written["test_accuracy"] == second["test_accuracy"]


@pytest.mark.slow
def test_batch_not_divisible_by_processes_is_refused_before_any_work(omniglot_data_dir, tmp_path):
    log_dir = tmp_path / "run"
    done = run([*torchrun(4), script("maml"), *TINY, *MAML_NET, "--batch_size", "6", "--data_dir",
                str(omniglot_data_dir), "--log_dir", str(log_dir)], tmp_path / "out.log")
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stdout[-3000:]  # rank 0 says why; the other ranks exit quietly
    assert "--batch_size 6 is not divisible by the 4 processes" in errors[0] and "--batch_size 8" in errors[0]
    assert not log_dir.exists()


@pytest.mark.slow
def test_nan_loss_stops_every_rank_with_one_error(omniglot_data_dir, tmp_path):
    log_dir = tmp_path / "run"
    done = run([*torchrun(2), script("protonet"), *TINY, "--learning_rate", "1e30", "--num_train_iterations", "6",
                "--save_interval", "1", "--data_dir", str(omniglot_data_dir), "--log_dir", str(log_dir)],
               tmp_path / "out.log")
    assert done.returncode != 0
    assert done.stdout.count("error: ") == 1 and "Lower the learning rate" in done.stdout, done.stdout[-3000:]
    assert not (log_dir / "results.json").exists()


# ---------------------------------------------------------------------------- resume
def worker_pids(launcher: int) -> dict[int, int]:
    """Rank -> pid of the workers a torchrun process started (Linux: /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = pid
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_killed_distributed_run_resumes_to_the_uninterrupted_result(omniglot_data_dir, tmp_path):
    flags = [*TINY, *MAML_NET, "--num_train_iterations", "16", "--save_interval", "1", "--val_interval", "8",
             "--data_dir", str(omniglot_data_dir)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = Job([*torchrun(2), script("maml"), *flags, "--log_dir", str(straight)], tmp_path / "straight.log")
    command = [*torchrun(2), script("maml"), *flags, "--log_dir", str(killed)]
    job = Job(command, tmp_path / "killed.log").proc
    deadline, victim = time.time() + TIMEOUT, None
    while time.time() < deadline and job.poll() is None:
        if (killed / "checkpoints" / "step0000004.pt").exists():
            victim = worker_pids(job.pid).get(1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)  # rank 1 dies; torchrun stops rank 0 and the job
                break
        time.sleep(0.01)
    assert job.wait(timeout=TIMEOUT) != 0 and victim is not None, "the job finished before it could be killed"
    assert not (killed / "results.json").exists()
    interrupted_at = max(int(p.stem[4:]) for p in (killed / "checkpoints").glob("step*.pt"))
    assert interrupted_at < 16

    resumed = run([*command, "--resume"], tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming at step" in resumed.stdout
    uninterrupted = uninterrupted.finish()
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    a, b = final_state(straight)["model"], final_state(killed)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results(killed)["test_accuracy"] == results(straight)["test_accuracy"]


# ---------------------------------------------------------------------------- the helpers, in one process
def test_one_process_helpers_are_the_identity():
    parallel = DataParallel(World())
    assert not parallel.world.enabled and parallel.is_main and parallel.processes_note == ""
    grads = torch.nn.Linear(3, 2)
    grads.weight.grad = torch.ones(2, 3)
    parallel.sync(grads)
    assert torch.equal(grads.weight.grad, torch.ones(2, 3))
    assert parallel.gather([1, 2]) == [1, 2]
    assert parallel.on_main(lambda: 7) == 7 and parallel.main_first(lambda: 8) == 8
    assert parallel.mean({"loss": torch.tensor(0.5)}) == {"loss": 0.5}
    batch = Episodes(*(torch.arange(4) for _ in range(4)))
    assert parallel.my_share(batch) is batch and parallel.my_portion(5) == slice(0, 5)
    assert parallel.evaluate(iter([1, 2, 3]), lambda x: 10 * x) == [10, 20, 30]


def test_shards_in_rank_order_are_the_meta_batch():
    shares = [distributed.shard(0, 8, World(rank=r, world_size=4)) for r in range(4)]
    assert [i for s in shares for i in range(8)[s]] == list(range(8))
    with pytest.raises(ValueError):
        distributed.shard(0, 6, World(rank=0, world_size=4))
    # a list shares as a tensor batch does; uneven parts differ by one at most, in order
    lists = [DataParallel(World(rank=r, world_size=4)).my_share(list(range(8))) for r in range(4)]
    assert lists == [[0, 1], [2, 3], [4, 5], [6, 7]]
    parts = [DataParallel(World(rank=r, world_size=4)).my_portion(10) for r in range(4)]
    assert [list(range(10)[p]) for p in parts] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]


def test_uneven_split_message_names_the_fixes():
    with pytest.raises(CS330Error, match=r"--batch_size 6 is not divisible by the 4 processes.*--batch_size 8.*"
                                         r"1, 2, 3, 6 processes"):
        distributed.check_batch_split(6, World(world_size=4))
    distributed.check_batch_split(8, World(world_size=4))


def test_batch_norm_statistics_of_split_tasks_replay_to_the_sequential_ones(omniglot_store):
    """Two 'ranks' each run half of the tasks from the same starting statistics; replaying their
    updates in rank order gives the statistics of one process running every task in order."""
    from hw2_protonet_maml.protonet import ProtoNet

    torch.manual_seed(0)
    model = ProtoNet(hidden_channels=8)
    episodes = EpisodeSampler(omniglot_store.split("train"), 5, 1, 3, seed=0).sample(4)
    layers = distributed.bn_layers(model)
    start = distributed.bn_snapshot(layers)
    with torch.no_grad():
        model(episodes)
    sequential = distributed.bn_snapshot(layers)
    updates = []
    for half in (slice(0, 2), slice(2, 4)):
        distributed.bn_replay(layers, start, [])  # back to the starting statistics, as on every rank
        with torch.no_grad():
            model(Episodes(*(t[half] for t in episodes)))
        updates.append(distributed.bn_update_since(layers, start))
    distributed.bn_replay(layers, start, updates)
    for (mean, var, count), layer in zip(sequential, layers):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-7)
        assert layer.num_batches_tracked == count
