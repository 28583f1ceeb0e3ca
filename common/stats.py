"""Small statistics helpers shared by the evaluation code."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval, ``1.96 * std / sqrt(n)``.

    This is the interval the ProtoNet and MAML papers report (std with ``ddof=0``, as numpy's default).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    return float(arr.mean()), float(1.96 * arr.std() / math.sqrt(arr.size))


def paired_difference_ci95(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same items (tasks) and its 95% interval: far tighter than two
    separate intervals when both models were scored on the same tasks, since the tasks' difficulty
    cancels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same items: {a.shape} vs {b.shape}")
    return mean_ci95(a - b)
