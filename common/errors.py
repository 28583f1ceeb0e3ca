"""User-facing errors: say what was wrong and how to fix it, without a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CS330Error(Exception):
    """An error caused by input, data or environment that the user can fix. Scripts wrapped in
    :func:`cli_main` print its message and exit with status 2 instead of a traceback."""


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
