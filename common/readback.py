"""Reading back what an earlier run wrote: JSON records, checkpoints and saved tensors.

A file read back may be damaged (a kill mid-copy, a full disk, a hand edit) or foreign (another
program's, another model's). Each reader here turns every way it can be wrong into one
:class:`CS330Error` line, ``<file>: <what is wrong>; <the fix>``, never a traceback, and never
advice to load with ``weights_only=False``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import CS330Error

_UNPICKLER = re.compile(r"WeightsUnpickler error: (.*)")
_GLOBAL = re.compile(r"GLOBAL (\S+)")


def describe(value: Any, in_json: bool = False) -> str:
    """``a dict``, ``a tensor``, ``an int`` (``a JSON object``, ``a JSON array`` when ``in_json``): what a
    file held, for a message."""
    names = {dict: "JSON object", list: "JSON array"} if in_json else {}
    name = "tensor" if isinstance(value, torch.Tensor) else names.get(type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def read_json(path: str | Path, fix: str, expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be an ``expect`` (a JSON object by default).
    ``fix``: what the user should do when it is missing, unreadable or of another shape."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CS330Error(f"{path}: missing; {fix}") from None
    except json.JSONDecodeError as err:
        raise CS330Error(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CS330Error(f"{path}: unreadable ({getattr(err, 'strerror', None) or err}); {fix}") from None
    if not isinstance(value, expect):
        raise CS330Error(f"{path}: holds {describe(value, True)} where {describe(expect(), True)} was expected; "
                         f"{fix}")
    return value


def read_torch(path: str | Path, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: a file cut short, overwritten or holding pickled
    objects other than tensors and plain values is one error line naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CS330Error(f"{path}: missing; {fix}") from None
    except Exception as err:  # noqa: BLE001 - torch.load of a damaged file raises nearly any type
        text = str(err)
        detail = _UNPICKLER.search(text)
        foreign = _GLOBAL.search(text) if detail else None
        if foreign:  # the file itself is fine: it holds code we refuse to unpickle
            raise CS330Error(f"{path}: holds a pickled {foreign.group(1)}, not only tensors and plain values, "
                             f"so it is not a file this code wrote and is not loaded; {fix}") from None
        reason = (detail.group(1) if detail else "") or (text.splitlines() or [type(err).__name__])[0]
        raise CS330Error(f"{path}: damaged ({reason.strip() or 'not a torch file'}); {fix}") from None


def check_weights(weights: Any, expected: Mapping[str, torch.Tensor], path: str | Path, fix: str) -> None:
    """``weights`` (a checkpoint's state dict) must have ``expected``'s names and shapes: a checkpoint of
    another model is named with what differs, instead of a ``load_state_dict`` traceback."""
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CS330Error(f"{path}: its weights are {describe(weights)}, not named tensors; {fix}")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{name} {tuple(weights[name].shape)} instead of {tuple(tensor.shape)}"
              for name, tensor in expected.items() if name in weights and weights[name].shape != tensor.shape]
    differences = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                   for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    if differences:
        raise CS330Error(f"{path}: the weights of another model ({'; '.join(differences)}); {fix}")
