"""Resolve ``--device``, ``--precision`` and ``--threads`` in one place."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from common import openmp
from common.errors import CS330Error

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|mps`` (or ``cuda:1``) to a ``torch.device``; ``auto`` prefers CUDA, then MPS."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CS330Error(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CS330Error("--device mps: MPS is not available on this machine; use --device cpu or auto.")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise CS330Error(f"--device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}.")
    return torch.device(name)


def cpu_capability() -> str:
    """What the CPU offers PyTorch's kernels: the dispatch level (``AVX2``, ``AVX512``, ...) plus
    ``+BF16`` / ``+AMX`` when the processor has native bf16 instructions. Printed with every bench figure."""
    level = torch.backends.cpu.get_cpu_capability()
    if not level.startswith("AVX512"):  # AVX2 kernels (e.g. ATEN_CPU_CAPABILITY=avx2) emulate bf16
        return level
    flags = _cpu_flags()
    extras = [name for name, flag in (("BF16", "avx512_bf16"), ("AMX", "amx_bf16")) if flag in flags]
    return "+".join([level, *extras])


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():  # not Linux: no flags known, so no native bf16 is assumed
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(requested: str, device: torch.device, fp32_because: str | None = None,
                      bf16_where: tuple[str, ...] = ("cuda", "BF16", "AMX")) -> tuple[str, str]:
    """``(precision, reason)`` for ``--precision auto|fp32|bf16``.

    ``auto`` picks bf16 only where it is native (CUDA with bf16 support, a CPU with AVX512_BF16 or
    AMX: elsewhere bf16 is emulated and several times slower, see the hw2 README) and where the
    calling script's model was measured faster in it: ``bf16_where`` lists ``"cuda"`` and the CPU
    features of :func:`cpu_capability` (``"BF16"``, ``"AMX"``) where it was.
    ``fp32_because``: a script whose model was not measured faster (or as accurate) in bf16 anywhere
    passes the reason, and ``auto`` means fp32 everywhere.
    """
    if requested not in PRECISION_CHOICES:
        raise CS330Error(f"--precision {requested!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if requested != "auto":
        return requested, "as requested"
    if fp32_because:
        return "fp32", fp32_because
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if not torch.cuda.is_bf16_supported():
            return "fp32", f"{name} has no native bf16"
        if "cuda" in bf16_where:
            return "bf16", f"{name} supports bf16 natively"
        return "fp32", "bf16 was not measured faster on CUDA for this model"
    if device.type == "cpu":
        capability = cpu_capability()
        native = [feature for feature in ("BF16", "AMX") if feature in capability.split("+")]
        if not native:
            return "fp32", f"CPU capability {capability}: no native bf16, where bf16 is emulated and slower"
        if any(feature in bf16_where for feature in native):
            return "bf16", f"CPU capability {capability}: native bf16"
        return "fp32", (f"CPU capability {capability}: bf16 was measured faster for this model only with "
                        f"{' or '.join(bf16_where)}")
    return "fp32", f"no bf16 autocast measured on {device.type}"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast when ``precision == "bf16"``, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``$OMP_NUM_THREADS``, else the usable cores.
    More threads than cores makes OpenMP workers spin against each other, many times slower, so a
    larger request is capped at the usable cores with a note."""
    source = "--threads"
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        source = "OMP_NUM_THREADS"
        threads = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
    # Under torchrun the processes of one machine share its cores (LOCAL_WORLD_SIZE of them).
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = max(1, usable_cores() // processes)
    if threads > cores:
        if os.environ.get("RANK", "0") == "0":
            whose = f"each of this machine's {processes} processes" if processes > 1 else "this process"
            print(f"note: {source} {threads} is more than the {cores} cores {whose} may use; using {cores} "
                  "(more threads than cores only wait for each other)", file=sys.stderr, flush=True)
        threads = cores
    torch.set_num_threads(threads)
    return threads


def setup_compute(device: str, precision: str, threads: int | None, fp32_because: str | None = None,
                  bf16_where: tuple[str, ...] = ("cuda", "BF16", "AMX")) -> tuple[torch.device, str]:
    """The three run flags every script has: set the threads, resolve the device and the precision,
    and print the one line that says which precision and why. Returns ``(device, precision)``."""
    configure_threads(threads)
    resolved = resolve_device(device)
    chosen, why = resolve_precision(precision, resolved, fp32_because, bf16_where)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job, not one per process
        print(f"precision: {chosen} ({why})", flush=True)
        if openmp.CHOICE:
            print(f"threads: {torch.get_num_threads()}; {openmp.CHOICE}", flush=True)
    return resolved, chosen
