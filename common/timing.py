"""Wall-clock timing for the bench scripts, with the device synchronised around the timed calls, and
their FLOP counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device, repeats: int = 1, warmup: int = 0) -> tuple[T, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns the last result and the
    mean seconds per call. CUDA work is asynchronous, so the device is synchronised before reading
    the clock."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    _sync(device)
    return result, (time.perf_counter() - start) / repeats


def counted_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``FlopCounterMode`` counts in one call of ``fn`` (ops it knows: matmuls, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
