"""The one place that owns chunking: chunk sizes and halos derived from kernel sizes.

Pixel-local algorithms (convolution, subtraction, score images) are written as
numpy functions of a block plus its global offset; :func:`map_overlap_2d` runs
them on numpy arrays directly or on dask arrays with a halo wide enough for the
largest kernel involved, so the chunked result equals the whole-array one.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np

from .errors import ConfigurationError

__all__ = ["DEFAULT_CHUNK", "halo_for_kernels", "map_overlap_2d", "normalize_chunks"]

#: Default chunk side for detector images (pixels). 1024² float32 = 4 MB per plane.
DEFAULT_CHUNK = 1024


def halo_for_kernels(*kernel_sizes: int, margin: int = 0) -> int:
    """Halo depth (pixels) for a chain of convolutions with the given odd kernel sizes.

    Convolving successively with kernels of sizes ``k_1, k_2, ...`` reaches
    ``Σ k_i // 2`` pixels away; ``margin`` adds slack (e.g. for sub-pixel shifts).
    """
    depth = 0
    for size in kernel_sizes:
        size = int(size)
        if size < 1:
            raise ConfigurationError(f"kernel size must be positive, got {size}")
        depth += size // 2
    return depth + int(margin)


def normalize_chunks(shape: tuple[int, int], chunks: int | tuple[int, int] | None,
                     depth: int = 0) -> tuple[int, int]:
    """Chunk sides for ``shape``: at least ``2 * depth`` so halos come from neighbours only."""
    if chunks is None:
        chunks = DEFAULT_CHUNK
    if isinstance(chunks, int):
        chunks = (chunks, chunks)
    cy, cx = (min(max(int(c), 2 * depth, 1), n) for c, n in zip(chunks, shape))
    return cy, cx


def map_overlap_2d(func: Callable[..., np.ndarray], *arrays, depth: int,
                   dtype=np.float32, **kwargs):
    """Apply ``func(*blocks, offset=(y0, x0), **kwargs)`` with a halo of ``depth``.

    Parameters
    ----------
    func : callable
        Numpy function of 2-D blocks (all the same shape) returning an array of
        that shape. ``offset`` is the global ``(y, x)`` index of the block's
        first pixel *including* its halo, so spatially varying algorithms can
        evaluate their models at true positions. Blocks at the image border
        have no halo on that side (``boundary="none"``), exactly like the
        whole array has nothing beyond its edge.
    *arrays : numpy or dask arrays
        Inputs of identical shape. With numpy inputs ``func`` is called once on
        the whole array (offset ``(0, 0)``). With dask inputs all are brought
        to the chunking of the first dask input (enlarged so every chunk is at
        least ``depth`` wide) and processed block by block.
    depth : int
        Halo width; take it from :func:`halo_for_kernels`.
    dtype : numpy dtype
        Output dtype.

    Returns
    -------
    numpy or dask array
        numpy for numpy inputs, dask otherwise (lazy).
    """
    if not arrays:
        raise ValueError("map_overlap_2d needs at least one array")
    depth = int(depth)
    if not any(isinstance(a, da.Array) for a in arrays):
        return np.asarray(func(*arrays, offset=(0, 0), **kwargs), dtype=dtype)

    first = next(a for a in arrays if isinstance(a, da.Array))
    chunks = first.chunks
    if depth > 0:
        chunks = tuple(_merge_small_chunks(c, depth) for c in chunks)
    darrays = [
        (a if isinstance(a, da.Array) else da.from_array(np.asarray(a), chunks=chunks)).rechunk(chunks)
        for a in arrays
    ]
    core_starts = [np.concatenate(([0], np.cumsum(c)[:-1])) for c in chunks]

    def _block(*blocks, block_info=None):
        loc = block_info[0]["chunk-location"]
        offset = tuple(
            int(core_starts[axis][loc[axis]]) - (depth if loc[axis] > 0 else 0) for axis in range(2)
        )
        return np.asarray(func(*blocks, offset=offset, **kwargs), dtype=dtype)

    meta = np.empty((0, 0), dtype=dtype)
    if depth == 0:
        return da.map_blocks(_block, *darrays, dtype=dtype, meta=meta)
    return da.map_overlap(_block, *darrays, depth=depth, boundary="none", trim=True,
                          dtype=dtype, meta=meta, align_arrays=False)


def _merge_small_chunks(sizes: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Merge chunks narrower than ``minimum`` into their neighbour (halos need ≥ depth)."""
    merged: list[int] = []
    for size in sizes:
        if merged and (size < minimum or merged[-1] < minimum):
            merged[-1] += size
        else:
            merged.append(size)
    return tuple(merged)
