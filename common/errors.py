"""User-facing errors: say what was wrong and how to fix it, without a traceback."""

from __future__ import annotations

import errno
import functools
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CS330Error(Exception):
    """An error caused by input, data or environment that the user can fix. Scripts wrapped in
    :func:`cli_main` print its message and exit with status 2 instead of a traceback."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, is a full disk (or an exhausted quota):
    ``torch.save`` may wrap the ``OSError`` of the write that failed in a ``RuntimeError``."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class DiskFull(CS330Error):
    """A write found the disk full (see :func:`disk_full_error`)."""


def disk_full_error(folder: object, what: str, kept: str = "") -> DiskFull:
    """The one line for a write that found the disk full: where, what was not written, what was kept."""
    return DiskFull(f"no space left on {folder}: {what} was not written{'; ' + kept if kept else ''}; "
                    "free some space there or choose a folder on another disk (--log_dir, --data_dir), then rerun")


_ALLOCATION = re.compile(r"[Tt]ried to allocate ([0-9.]+ ?[A-Za-z]*)")


def out_of_memory_line(err: BaseException) -> str | None:
    """The one line for an allocation that failed (torch's CPU allocator, CUDA, Python), else None.
    What the scripts cannot estimate before they start still ends without a traceback."""
    text = str(err)
    if not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text):
        return None
    size = _ALLOCATION.search(text)
    asked = f" (an allocation of {size.group(1)})" if size else ""
    return (f"out of memory{asked}; lower the batch, model or data sizes, or use a device with more memory "
            "(the last checkpoint, if any, is kept)")


def cli_main(main: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a script's ``main``: turn :class:`CS330Error` (and a failed allocation) into
    ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CS330Error as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except (MemoryError, RuntimeError) as err:
            line = out_of_memory_line(err)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
