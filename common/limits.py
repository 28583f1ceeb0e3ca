"""The machine's limits: refuse, before any work, a size whose memory cannot exist here.

Flags such as an embedding dimension or a batch of tasks have no upper bound of their own; the
bound is the memory of this machine. Each script estimates what its largest sizes need (a lower
bound: the tensors it must hold at once, not every intermediate) and calls :func:`check_fits`,
so ``--embedding_dim 1e11`` is one line naming the flag instead of an allocator traceback, and a
size just under the limit is never refused by a wrong guess.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import CS330Error

_MEMINFO = Path("/proc/meminfo")
_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def _cpu_memory() -> int | None:
    """Bytes of RAM this process could still get: MemAvailable, or less under a cgroup limit."""
    available = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    for limit_file in _CGROUP_FILES:
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" means no limit
            available = min(available, int(text)) if available is not None else int(text)
        break
    return available


def largest_memory() -> int | None:
    """The most memory one device here offers (free RAM, or the largest GPU's total), in bytes; None
    where it cannot be told. Flags are checked before the device is chosen, so a size is refused
    only when no device of this machine could hold it."""
    sizes = [_cpu_memory()]
    if torch.cuda.is_available():
        sizes += [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    known = [size for size in sizes if size]
    return max(known) if known else None


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_fits(nbytes: float, what: str, fix: str) -> None:
    """Refuse ``what`` (e.g. ``"--meta_batch_size 100000000 (a meta-batch of 3-way 1-shot tasks)"``)
    when its estimated ``nbytes`` exceed the memory of every device here; ``fix`` says which flag to lower."""
    limit = largest_memory()
    if limit is not None and nbytes > limit:
        raise CS330Error(f"{what} needs at least {human_bytes(nbytes)}, more than the {human_bytes(limit)} of memory "
                         f"this machine has free; {fix}")
