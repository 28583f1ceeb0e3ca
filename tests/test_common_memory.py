"""common.memory: the peak-memory window of one run inside a longer-lived process."""

from __future__ import annotations

import sys

import pytest
import torch

from common.memory import peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_cpu_peak_is_reset_between_runs():
    assert reset_peak_memory(CPU)
    before = peak_memory_mb(CPU)
    block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    assert float(block[-1]) == 1.0
    during = peak_memory_mb(CPU)
    del block
    assert during >= before + 200  # the block shows in the peak
    assert reset_peak_memory(CPU)
    assert peak_memory_mb(CPU) < during - 200  # a new window forgets it
