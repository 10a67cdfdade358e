"""Limit OpenBLAS threads around many small linear-algebra calls.

The kernel fit makes hundreds of small GEMMs and factorisations (28×28
systems, 28×1849 designs). Multi-threaded OpenBLAS spins up its threads for
each call; on a busy machine (or under a multi-threaded Dask scheduler) this is
up to ten times slower than one thread. :func:`single_blas_thread` sets the
OpenBLAS thread count of the libraries already loaded in the process to 1 for
the duration of a block and restores it afterwards (the mechanism
``threadpoolctl`` uses; that package is not a dependency). Without a loaded
OpenBLAS it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

__all__ = ["single_blas_thread"]

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")
_LOCK = threading.Lock()
_DEPTH = 0
_SAVED: list[tuple] = []


def _openblas_libraries():
    """(setter, getter) pairs of every OpenBLAS library mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    except OSError:
        return []
    pairs = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        getter = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        if setter is not None and getter is not None:
            getter.restype = ctypes.c_int
            pairs.append((setter, getter))
    return pairs


@contextlib.contextmanager
def single_blas_thread():
    """Run the block with OpenBLAS limited to one thread (re-entrant, thread-safe)."""
    global _DEPTH, _SAVED
    with _LOCK:
        if _DEPTH == 0:
            _SAVED = [(setter, int(getter())) for setter, getter in _openblas_libraries()]
            for setter, _ in _SAVED:
                setter(1)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for setter, count in _SAVED:
                    setter(count)
                _SAVED = []
