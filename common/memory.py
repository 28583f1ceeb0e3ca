"""Peak memory of one run inside a longer-lived process (a grid runs many runs in one process).

CUDA: the allocator's peak, reset per run. CPU: the process's peak resident set (VmHWM), which
Linux resets when ``5`` is written to ``/proc/self/clear_refs``; it includes the interpreter and the
libraries (about 0.5 GB with torch and transformers). Elsewhere: ``None`` (not measured).
"""

from __future__ import annotations

from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where this platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float | None:
    """MiB at the peak since :func:`reset_peak_memory` (CPU: resident set of the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None
