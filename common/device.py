"""Resolve the ``--device`` flag in one place."""

from __future__ import annotations

import torch

from common.errors import CS330Error

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


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
