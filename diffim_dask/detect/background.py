"""Super-pixel median background of a difference image.

The image is cut into ``bin_size`` x ``bin_size`` super-pixels; each gets the
median of its usable pixels (pixels in the ignored mask planes, non-finite
pixels and pixels with non-positive variance are skipped). Super-pixels with
too few usable pixels take the value of the nearest valid one, the grid is
median-filtered (``filter_size``), and the full-resolution background is the
Keys cubic-convolution interpolation of the grid (bin centres at
``(j + 1/2) * bin_size - 1/2``; linear extrapolation beyond the outermost
centres, so a background gradient is followed to the image edge).

Keys' kernel (a = -1/2) is local (4 taps), C¹-continuous and linear in the
grid values, so the interpolation is two sparse matrix products,
``B = W_y G W_xᵀ``, which costs a few tens of milliseconds on a 4k x 4k image.
(The anchor interpolates with an Akima spline; both pass through the bin values.)

The medians and the interpolation work on independent bands of super-pixel
rows / image rows, run on ``workers`` threads (numpy's sort and scipy's
sparse products release the GIL); the result does not depend on ``workers``.
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage, sparse

from ..errors import BadInputDataError
from ..masks import mask_value
from .detection import banded_matrix

__all__ = ["BackgroundModel", "estimate_background", "run_concurrently"]


@dataclasses.dataclass(frozen=True, eq=False)
class BackgroundModel:
    """A fitted background.

    Attributes
    ----------
    grid : numpy.ndarray
        Super-pixel values after filling and filtering, shape ``(ceil(ny/b), ceil(nx/b))``.
    bin_size : int
        Super-pixel side ``b`` in pixels.
    shape : (int, int)
        Shape of the full-resolution image.
    n_filled : int
        Number of super-pixels filled from their neighbours.
    """

    grid: np.ndarray
    bin_size: int
    shape: tuple[int, int]
    n_filled: int
    #: Threads used by the interpolations (not part of the model).
    workers: int = dataclasses.field(default=1, repr=False, compare=False)

    @functools.cached_property
    def image(self) -> np.ndarray:
        """Full-resolution background (float32), interpolated on first use."""
        return interpolate_grid(self.grid, self.shape, self.bin_size, workers=self.workers)

    def filtered(self, terms) -> np.ndarray:
        """The background correlated with the separable kernel ``Σ u_i v_iᵀ`` (zero padding).

        Because the interpolation is ``W_y G W_xᵀ``, the filtered background is
        ``Σ (T_u W_y) G (T_v W_x)ᵀ`` with the banded correlation matrices
        ``T``: exact, at the cost of an interpolation rather than a convolution.
        """
        out = None
        for u, v in terms:
            term = interpolate_grid(self.grid, self.shape, self.bin_size, row_filter=u,
                                    column_filter=v, workers=self.workers)
            out = term if out is None else out + term
        return out

    @property
    def mean(self) -> float:
        """Mean of the background image."""
        return float(self.image.mean())

    @property
    def rms(self) -> float:
        """Root-mean-square variation of the background image about its mean."""
        return float(self.image.std())


def run_concurrently(functions, workers: int) -> list:
    """Call each function (no arguments) on up to ``workers`` threads; results in order."""
    functions = list(functions)
    if workers <= 1 or len(functions) <= 1:
        return [f() for f in functions]
    with ThreadPoolExecutor(max_workers=min(workers, len(functions))) as pool:
        futures = [pool.submit(f) for f in functions]
        return [f.result() for f in futures]


def _bands(n: int, step: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ranges covering ``range(n)``, cut at multiples of ``step``."""
    units = -(-n // step)
    per = -(-units // max(workers, 1))
    return [(a * step, min((a + per) * step, n)) for a in range(0, units, per)]


def _binned_medians(image: np.ndarray, usable: np.ndarray, bin_size: int, workers: int = 1):
    """Median and usable count per super-pixel, on bands of super-pixel rows in threads."""
    bands = _bands(image.shape[0], bin_size, workers)
    parts = run_concurrently([functools.partial(_band_medians, image[a:b], usable[a:b], bin_size)
                              for a, b in bands], workers)
    return (np.concatenate([m for m, _ in parts]), np.concatenate([c for _, c in parts]))


def _band_medians(image: np.ndarray, usable: np.ndarray, bin_size: int):
    """Median and usable count per super-pixel (masked pixels sorted to the end as +inf)."""
    ny, nx = image.shape
    gy, gx = -(-ny // bin_size), -(-nx // bin_size)
    values = np.where(usable, image, np.float32(np.inf)).astype(np.float32, copy=False)
    if (gy * bin_size, gx * bin_size) != (ny, nx):
        work = np.full((gy * bin_size, gx * bin_size), np.inf, dtype=np.float32)
        work[:ny, :nx] = values
        values = work
    rows = np.ascontiguousarray(
        values.reshape(gy, bin_size, gx, bin_size).transpose(0, 2, 1, 3)).reshape(gy * gx, -1)
    del values
    # +inf rather than NaN: numpy's vectorised float sort is far faster without NaN.
    rows.sort(axis=1)
    counts = np.count_nonzero(rows < np.inf, axis=1)
    lo = np.clip((counts - 1) // 2, 0, None)
    hi = np.clip(counts // 2, 0, None)
    take = np.take_along_axis
    median = 0.5 * (take(rows, lo[:, None], axis=1)[:, 0].astype(np.float64)
                    + take(rows, hi[:, None], axis=1)[:, 0])
    median[counts == 0] = np.nan
    return median.reshape(gy, gx), counts.reshape(gy, gx)


def _median_filter(grid: np.ndarray, size: int) -> np.ndarray:
    """``size`` x ``size`` running median of a grid padded by ``size // 2`` on every side.

    Returns the ``(ny - 2h, nx - 2h)`` interior, where every window lies in
    the grid (what ``ndimage.median_filter`` gives there, at a fraction of
    its cost on the 512 x 512 grid of a 4k image).
    """
    windows = np.lib.stride_tricks.sliding_window_view(grid, (size, size))
    return np.median(windows.reshape(windows.shape[:2] + (size * size,)), axis=-1)


def _keys_weights(n_out: int, n_grid: int, bin_size: int) -> sparse.csr_matrix:
    """Sparse (n_out, n_grid + 4) Keys interpolation matrix on a grid padded by 2 per side."""
    pos = (np.arange(n_out) - (bin_size - 1) / 2.0) / bin_size + 2.0
    pos = np.clip(pos, 1.0, n_grid + 2.0)
    base = np.floor(pos).astype(int)
    frac = pos - base
    rows, cols, vals = [], [], []
    for offset in (-1, 0, 1, 2):
        t = np.abs(frac - offset)
        # Keys (1981), a = -1/2: reproduces linear (and quadratic) functions exactly.
        w = np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                     np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))
        idx = np.clip(base + offset, 0, n_grid + 3)
        rows.append(np.arange(n_out))
        cols.append(idx)
        vals.append(w)
    matrix = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_out, n_grid + 4))
    matrix.sum_duplicates()
    return matrix


def _pad_linear(grid: np.ndarray, axis: int, n: int = 2) -> np.ndarray:
    """Pad ``n`` cells on each side of ``axis`` by linear extrapolation."""
    g = np.moveaxis(grid, axis, 0)
    if g.shape[0] == 1:
        lo = hi = np.zeros_like(g[0])
    else:
        lo, hi = g[0] - g[1], g[-1] - g[-2]
    before = [(g[0] + k * lo)[None] for k in range(n, 0, -1)]
    after = [(g[-1] + k * hi)[None] for k in range(1, n + 1)]
    return np.moveaxis(np.concatenate(before + [g] + after), 0, axis)


def _fill_invalid(grid: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if valid.all():
        return grid
    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return grid[iy, ix]


def interpolate_grid(grid: np.ndarray, shape: tuple[int, int], bin_size: int, *,
                     row_filter: np.ndarray | None = None,
                     column_filter: np.ndarray | None = None, workers: int = 1) -> np.ndarray:
    """Full-resolution Keys interpolation of a super-pixel grid (float32).

    ``row_filter`` / ``column_filter`` optionally correlate the result along
    y / x with a 1-D kernel (zero padding), folded into the interpolation
    matrices. Bands of output rows are computed on ``workers`` threads.
    """
    ny, nx = shape
    wy = _keys_weights(ny, grid.shape[0], bin_size)
    wx = _keys_weights(nx, grid.shape[1], bin_size)
    if row_filter is not None:
        wy = banded_matrix(ny, row_filter).astype(float) @ wy
    if column_filter is not None:
        wx = banded_matrix(nx, column_filter).astype(float) @ wx
    # Interpolate along x on the small grid first, then along y with one sparse product,
    # which writes the full image in C order (sparse @ dense is fast, dense @ sparse is not).
    padded = _pad_linear(_pad_linear(np.asarray(grid, dtype=float), 0), 1)
    rows = np.ascontiguousarray(np.asarray(wx @ padded.T).T, dtype=np.float32)   # (gy + 4, nx)
    wy = wy.astype(np.float32)
    out = np.empty((ny, nx), dtype=np.float32)

    def band(lo, hi):
        out[lo:hi] = wy[lo:hi] @ rows

    run_concurrently([functools.partial(band, lo, hi) for lo, hi in _bands(ny, 1, workers)],
                     workers)
    return out


def estimate_background(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *,
                        bin_size: int, ignore_planes=("BAD", "EDGE", "NO_DATA"),
                        min_valid_fraction: float = 0.1, filter_size: int = 3,
                        workers: int = 1) -> BackgroundModel:
    """Median background on a super-pixel grid, interpolated to full resolution.

    Parameters
    ----------
    image, variance, mask : numpy.ndarray
        Pixel planes of the image.
    bin_size : int
        Super-pixel side in pixels.
    ignore_planes : sequence of str
        Mask planes whose pixels are not used.
    min_valid_fraction : float
        Super-pixels with fewer usable pixels (as a fraction of ``bin_size²``)
        take the value of the nearest valid super-pixel.
    filter_size : int
        Side of the median filter run over the grid (1: none).
    workers : int
        Threads for the medians and the model's interpolations.

    Returns
    -------
    BackgroundModel

    Raises
    ------
    BadInputDataError
        If no pixel at all is usable. (When no super-pixel reaches
        ``min_valid_fraction`` — small or crowded images — the best-populated
        super-pixels are used.)
    """
    bin_size = int(bin_size)
    usable = np.isfinite(image) & (variance > 0)
    if ignore_planes:
        usable &= (mask & np.uint32(mask_value(ignore_planes))) == 0
    grid, counts = _binned_medians(image, usable, bin_size, workers)
    valid = counts >= max(1, int(np.ceil(min_valid_fraction * bin_size * bin_size)))
    if not valid.any() and counts.max() > 0:
        # Small or crowded images (alert stamps): no bin reaches the fraction, so use the
        # best-populated bins rather than give up.
        valid = counts == counts.max()
    if not valid.any():
        raise BadInputDataError(
            f"background: no {bin_size}x{bin_size} super-pixel has {min_valid_fraction:.0%} usable "
            f"pixels (all pixels are masked by {list(ignore_planes)}, non-finite or have zero "
            "variance)")
    grid = _fill_invalid(grid, valid)
    if filter_size > 1 and min(grid.shape) > 1:
        # Linear extrapolation beyond the edges keeps the filter from bending gradients there.
        pad = filter_size // 2
        padded = _pad_linear(_pad_linear(grid, 0, pad), 1, pad)
        if filter_size % 2:
            grid = _median_filter(padded, filter_size)
        else:
            grid = ndimage.median_filter(padded, size=filter_size, mode="nearest")[
                pad:pad + grid.shape[0], pad:pad + grid.shape[1]]
    return BackgroundModel(grid=grid, bin_size=bin_size, shape=tuple(image.shape),
                           n_filled=int((~valid).sum()), workers=max(int(workers), 1))
