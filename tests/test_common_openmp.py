"""common/openmp.py: OpenMP workers sleep instead of spinning when other processes keep the cores busy,
the user's own setting wins, and the choice reaches libgomp (checked with its OMP_DISPLAY_ENV report)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import openmp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_env(monkeypatch):
    """No wait policy in the environment, and torch looking not yet loaded (as at a script's first line)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    return monkeypatch


def test_busy_cores_from_proc_stat_deltas(monkeypatch):
    samples = iter([(100, 1000), (150, 1100)])  # half of all CPU time busy over the sample
    monkeypatch.setattr(openmp, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert openmp.busy_cores(seconds=0) == pytest.approx(2.0)


@pytest.mark.parametrize("busy, policy", [(0.0, None), (0.4, None), (1.5, "PASSIVE"), (None, None)])
def test_passive_only_when_other_processes_keep_cores_busy(fresh_env, busy, policy):
    fresh_env.setattr(openmp, "busy_cores", lambda: busy)
    reason = openmp.choose_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    assert (reason is not None) == (policy is not None)
    if reason:
        assert "1.5 cores busy" in reason


@pytest.mark.parametrize("variable", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_the_users_setting_wins(fresh_env, variable):
    fresh_env.setenv(variable, "ACTIVE" if variable == "OMP_WAIT_POLICY" else "1000")
    fresh_env.setattr(openmp, "busy_cores", lambda: 2.0)
    assert openmp.choose_wait_policy() is None
    assert os.environ.get("OMP_WAIT_POLICY") in (None, "ACTIVE")


def test_too_late_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(openmp, "busy_cores", lambda: 2.0)
    assert "torch" in sys.modules
    assert openmp.choose_wait_policy() is None and "OMP_WAIT_POLICY" not in os.environ


def test_a_busy_machine_makes_libgomp_sleep(tmp_path):
    """Two spinning processes keep 2 cores busy; a script's first import then sets the policy that
    libgomp reports when torch loads it (spin count 0 = sleep at once)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        report = subprocess.run([sys.executable, "-c", "import common.openmp; import torch"], cwd=REPO,
                                env={**env, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True,
                                timeout=120)
    finally:
        for spinner in spinners:
            spinner.kill()
    assert report.returncode == 0, report.stderr
    assert "GOMP_SPINCOUNT = '0'" in report.stdout + report.stderr
