"""Capture third-party warnings at the I/O boundary (so they become log lines or errors)."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

__all__ = ["captured_warnings"]

# warnings.catch_warnings swaps process-global state; two threads using it at once (dask's
# threaded scheduler reading several files) could restore each other's filters in the wrong
# order. The lock serialises our own uses.
_LOCK = threading.RLock()


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised in the block instead of emitting it.

    Yields
    ------
    list of warnings.WarningMessage
        Filled as warnings occur; the caller logs them or turns them into errors.
    """
    with _LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
