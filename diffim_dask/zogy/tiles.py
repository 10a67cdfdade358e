"""Overlapping tiles: inner boxes that partition the image, outer boxes that are transformed.

Each tile's outer box is its inner box plus a border on every side (zero-
padded beyond the image), sized to one fast FFT length shared by all tiles.
Every tile is processed with its own PSFs and noise levels; only its inner
box is kept, so as long as the border exceeds the reach of the ZOGY kernels
no wrap-around reaches the kept pixels and, on an image with constant PSFs and
noise, the stitched result equals the whole-image one inside every inner box.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable

import numpy as np
import scipy.fft as sfft

from ..errors import ConfigurationError

__all__ = ["Tile", "TileLayout", "plan_tiles", "cut_box", "run_tiles"]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile, in array indices of the full image.

    Attributes
    ----------
    index : (int, int)
        ``(row, column)`` of the tile in the layout.
    inner : (int, int, int, int)
        ``(y0, y1, x0, x1)``: the pixels this tile owns (half-open).
    outer : (int, int, int, int)
        ``(y0, y1, x0, x1)``: the transformed box; may extend beyond the image.
    """

    index: tuple[int, int]
    inner: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Array position ``(x, y)`` of the inner box centre."""
        y0, y1, x0, x1 = self.inner
        return 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)

    @property
    def inner_in_outer(self) -> tuple[slice, slice]:
        """Slices of the inner box within the outer box arrays."""
        y0, y1, x0, x1 = self.inner
        oy, _, ox, _ = self.outer
        return slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)

    @property
    def inner_slices(self) -> tuple[slice, slice]:
        """Slices of the inner box within the full image."""
        y0, y1, x0, x1 = self.inner
        return slice(y0, y1), slice(x0, x1)


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """All tiles of an image.

    Attributes
    ----------
    shape : (int, int)
        Image shape.
    tiles : tuple of Tile
        Row-major.
    grid : (int, int)
        Tiles along ``(y, x)``.
    fft_shape : (int, int)
        Outer-box (transform) shape, common to all tiles.
    border : int
        Smallest border on any side of an inner box.
    y_edges, x_edges : numpy.ndarray
        Inner-box boundaries along each axis (``grid + 1`` values).
    """

    shape: tuple[int, int]
    tiles: tuple[Tile, ...]
    grid: tuple[int, int]
    fft_shape: tuple[int, int]
    border: int
    y_edges: np.ndarray
    x_edges: np.ndarray

    @property
    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Inner-box centres along ``x`` and ``y`` (array positions), increasing."""
        xs = 0.5 * (self.x_edges[:-1] + self.x_edges[1:] - 1)
        ys = 0.5 * (self.y_edges[:-1] + self.y_edges[1:] - 1)
        return xs, ys

    def summary(self) -> dict:
        """Plain-data description (for metadata)."""
        return {"tile_grid": [int(v) for v in self.grid],
                "tile_fft_shape": [int(v) for v in self.fft_shape],
                "tile_border": int(self.border), "n_tiles": len(self.tiles),
                "tile_y_edges": [int(v) for v in self.y_edges],
                "tile_x_edges": [int(v) for v in self.x_edges]}


def _edges(n: int, size: int) -> np.ndarray:
    count = 1 if size <= 0 or size >= n else math.ceil(n / size)
    return np.round(np.linspace(0, n, count + 1)).astype(int)


def plan_tiles(shape: tuple[int, int], tile_size: int, border: int) -> TileLayout:
    """Lay out tiles over ``shape``.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    tile_size : int
        Target inner-box side; the image is split into ``ceil(n / tile_size)``
        near-equal parts per axis (0 or ≥ n: one part).
    border : int
        Minimum border on each side; the outer box is rounded up to a fast FFT
        length and the extra pixels are split between the two sides.

    Returns
    -------
    TileLayout
    """
    ny, nx = (int(v) for v in shape)
    if ny < 1 or nx < 1 or border < 0:
        raise ConfigurationError(f"cannot tile shape {shape} with border {border}")
    y_edges, x_edges = _edges(ny, tile_size), _edges(nx, tile_size)
    inner_y = int(np.diff(y_edges).max())
    inner_x = int(np.diff(x_edges).max())
    fft_shape = (sfft.next_fast_len(inner_y + 2 * border, real=True),
                 sfft.next_fast_len(inner_x + 2 * border, real=True))
    tiles = []
    for j in range(y_edges.size - 1):
        y0, y1 = int(y_edges[j]), int(y_edges[j + 1])
        oy = y0 - (fft_shape[0] - (y1 - y0)) // 2
        for i in range(x_edges.size - 1):
            x0, x1 = int(x_edges[i]), int(x_edges[i + 1])
            ox = x0 - (fft_shape[1] - (x1 - x0)) // 2
            tiles.append(Tile((j, i), (y0, y1, x0, x1),
                              (oy, oy + fft_shape[0], ox, ox + fft_shape[1])))
    smallest = min(min(t.inner[0] - t.outer[0], t.outer[1] - t.inner[1],
                       t.inner[2] - t.outer[2], t.outer[3] - t.inner[3]) for t in tiles)
    return TileLayout((ny, nx), tuple(tiles), (y_edges.size - 1, x_edges.size - 1), fft_shape,
                      int(smallest), y_edges, x_edges)


def cut_box(array: np.ndarray, box: tuple[int, int, int, int], fill=0, dtype=None) -> np.ndarray:
    """A copy of ``array[y0:y1, x0:x1]``, with ``fill`` where the box leaves the array."""
    y0, y1, x0, x1 = box
    ny, nx = array.shape
    dtype = array.dtype if dtype is None else dtype
    if y0 >= 0 and x0 >= 0 and y1 <= ny and x1 <= nx:
        return np.array(array[y0:y1, x0:x1], dtype=dtype, copy=True)
    out = np.full((y1 - y0, x1 - x0), fill, dtype=dtype)
    sy0, sy1 = max(y0, 0), min(y1, ny)
    sx0, sx1 = max(x0, 0), min(x1, nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def run_tiles(function: Callable[[Tile], object], layout: TileLayout, workers: int) -> list:
    """Call ``function(tile)`` for every tile, on ``workers`` threads; results in tile order.

    NumPy and SciPy's FFTs release the GIL, so threads scale on the per-tile
    work. ``function`` must only write to the tile's own inner box of any
    shared output.
    """
    if workers <= 1 or len(layout.tiles) == 1:
        return [function(tile) for tile in layout.tiles]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, layout.tiles))
