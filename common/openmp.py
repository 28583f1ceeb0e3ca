"""OpenMP's wait policy, chosen by measuring the machine's load; imported first by every entry script.

torch's CPU kernels run on OpenMP (libgomp) workers. Between parallel regions an idle worker spins
for a while (300,000 iterations by default) before it sleeps, so that the next region starts without
a wake-up. On a quiet machine that is the fastest choice. When another job keeps the cores busy, the
spinning workers of two processes burn each other's time slices and a run slows down several times
over; ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) keeps it near its quiet speed but costs a little on
a quiet machine (the measurements: hw2 README, "Precision and chunking by machine").

So: sample the load for a tenth of a second before torch loads libgomp (which reads its settings
once, when loaded) and choose ``PASSIVE`` only when other processes keep at least half a core busy.
A run that starts on a quiet machine keeps spinning if a job starts later; set ``OMP_WAIT_POLICY``
yourself to decide (a value already in the environment always wins).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BUSY_CORES = 0.5  # busy time of other processes, in cores, above which workers sleep instead of spinning
SAMPLE_SECONDS = 0.1


def cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies over all CPUs from /proc/stat; None where there is no /proc (macOS, Windows)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes keep busy, measured while this process sleeps."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def choose_wait_policy() -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy; returns the reason, else None."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None  # the user's choice
    if "torch" in sys.modules:
        return None  # libgomp is loaded and has read its settings: too late to choose
    busy = busy_cores()
    if busy is None or busy < BUSY_CORES:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return f"other processes keep {busy:.1f} cores busy: idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE)"


CHOICE = choose_wait_policy()  # setup_compute prints it
