"""User-facing errors: say what was wrong and how to fix it, without a traceback."""

from __future__ import annotations

import errno
import functools
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
                      "free some space or choose a --log_dir on another disk, then rerun")


def cli_main(main: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a script's ``main``: turn :class:`CS330Error` into ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CS330Error as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
