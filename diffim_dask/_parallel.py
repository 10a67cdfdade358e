"""Default thread counts for the pixel code (the one place that decides them)."""

from __future__ import annotations

import os

__all__ = ["default_threads", "on_dask_worker"]


def on_dask_worker() -> bool:
    """Whether this code runs inside a Dask ``distributed`` worker."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def default_threads() -> int:
    """Threads a stage uses when its config says 0 (automatic).

    One inside a Dask worker: the worker already runs one task per thread, and
    nested threading would oversubscribe the cores (and made one worker look like
    two in the throughput benchmark). Elsewhere, the cores this process may use.
    """
    if on_dask_worker():
        return 1
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
