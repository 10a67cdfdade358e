"""Smooth image backgrounds: source-masked bin medians, bilinearly interpolated.

Both ZOGY inputs must be background-free: a constant left in ``N`` or ``R``
passes to ``D`` with the weight of the zero-frequency term and, tile by tile,
would make steps at the tile boundaries. The background is fitted on a regular
subsample of about a million pixels (every 2nd pixel of a 2048² image, every
4th of a 4096² one; a 128² bin keeps ≥ 1024 samples): a first median per
bin, a source mask (pixels above 3σ of the variance plane, grown), then the
final median without the sources.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from ..errors import BadInputDataError

__all__ = ["BinnedBackground", "SkySample", "fit_background", "sample_step"]


def _interpolation_index(positions: np.ndarray, centres: np.ndarray):
    """Left neighbour index and fraction (float32) of each position; constant beyond the ends."""
    if centres.size == 1:
        return np.zeros(positions.size, int), np.zeros(positions.size, np.float32)
    pos = np.clip(positions, centres[0], centres[-1])
    idx = np.clip(np.searchsorted(centres, pos) - 1, 0, centres.size - 2)
    frac = (pos - centres[idx]) / (centres[idx + 1] - centres[idx])
    return idx, frac.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class BinnedBackground:
    """A background given at bin centres, bilinear in between and constant beyond.

    Attributes
    ----------
    x_centers, y_centers : numpy.ndarray
        Bin centres in parent-frame pixel coordinates (increasing).
    values : numpy.ndarray
        ``(len(y_centers), len(x_centers))`` background at the centres, in the
        image's units.
    """

    x_centers: np.ndarray
    y_centers: np.ndarray
    values: np.ndarray

    def __call__(self, x, y):
        """Background at parent-frame positions ``(x, y)`` (arrays of one shape)."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        iy, fy = _interpolation_index(y.ravel(), self.y_centers)
        ix, fx = _interpolation_index(x.ravel(), self.x_centers)
        ny, nx = self.values.shape
        iy1, ix1 = np.minimum(iy + 1, ny - 1), np.minimum(ix + 1, nx - 1)
        v = self.values
        fy, fx = fy.astype(float), fx.astype(float)
        out = ((v[iy, ix] * (1 - fx) + v[iy, ix1] * fx) * (1 - fy)
               + (v[iy1, ix] * (1 - fx) + v[iy1, ix1] * fx) * fy)
        return out.reshape(x.shape)

    def image(self, shape, origin=(0, 0), *, offset=(0, 0)) -> np.ndarray:
        """Background on a ``shape`` block whose first pixel is ``origin + offset``.

        ``origin`` is the parent-frame ``(x0, y0)`` of the image, ``offset``
        the ``(y, x)`` array index of the block (the convention of
        :class:`diffim_dask.subtract.SpatialBackground`).
        """
        y0 = origin[1] + offset[0]
        x0 = origin[0] + offset[1]
        return self.grid(np.arange(x0, x0 + shape[1], dtype=float),
                         np.arange(y0, y0 + shape[0], dtype=float))

    def grid(self, xs, ys) -> np.ndarray:
        """float32 background on the grid ``ys × xs`` of parent-frame coordinates."""
        # Separable linear interpolation by gathers (no BLAS: many small calls on busy cores).
        iy, fy = _interpolation_index(np.asarray(ys, float), self.y_centers)
        ix, fx = _interpolation_index(np.asarray(xs, float), self.x_centers)
        values = self.values.astype(np.float32)
        ny, nx = values.shape
        rows = values[iy] * (1.0 - fy)[:, None] + values[np.minimum(iy + 1, ny - 1)] * fy[:, None]
        return (rows[:, ix] * (1.0 - fx)[None, :]
                + rows[:, np.minimum(ix + 1, nx - 1)] * fx[None, :]).astype(np.float32, copy=False)

    def subsampled(self, shape, origin=(0, 0), step: int = 1) -> np.ndarray:
        """The background at every ``step``-th pixel of an image of ``shape`` at ``origin``."""
        return self.grid(np.arange(0, shape[1], step, dtype=float) + origin[0],
                         np.arange(0, shape[0], step, dtype=float) + origin[1])

    def combine(self, other: "BinnedBackground", weight: float) -> "BinnedBackground":
        """``self − weight × other`` (same bins)."""
        if self.values.shape != other.values.shape:
            raise BadInputDataError("backgrounds with different bins cannot be combined")
        return BinnedBackground(self.x_centers, self.y_centers,
                                self.values - float(weight) * other.values)

    def to_dict(self) -> dict:
        """Plain-data form."""
        return {"type": "BinnedBackground", "x_centers": self.x_centers.tolist(),
                "y_centers": self.y_centers.tolist(), "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "BinnedBackground":
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["x_centers"], float), np.asarray(data["y_centers"], float),
                   np.asarray(data["values"], float))


@dataclasses.dataclass(frozen=True, eq=False)
class SkySample:
    """Sky statistics of one image on a regular subsample.

    Attributes
    ----------
    step : int
        Subsampling step (every ``step``-th pixel in x and y).
    sky : numpy.ndarray of bool
        Subsampled pixels that are usable and not on a source.
    sigma : float
        Robust standard deviation of the background-subtracted sky pixels.
    """

    step: int
    sky: np.ndarray
    sigma: float


def _bin_layout(n_sub: int, box: int, step: int, offset: float) -> np.ndarray:
    """Centres (full-image coordinates) of bins of ``box`` subsampled pixels along one axis."""
    lo = np.arange(0, n_sub, box)
    hi = np.minimum(lo + box, n_sub)
    return 0.5 * (lo + hi - 1) * step + offset


def _bin_medians(sample: np.ndarray, usable: np.ndarray, box: int) -> np.ndarray:
    """Median of the usable samples in each ``box × box`` bin (NaN-free; sparse bins filled)."""
    ny, nx = sample.shape
    nby, nbx = -(-ny // box), -(-nx // box)
    padded = np.full((nby * box, nbx * box), np.nan, dtype=np.float32)
    padded[:ny, :nx] = np.where(usable, sample, np.nan)
    boxes = padded.reshape(nby, box, nbx, box).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    full_y = np.minimum(np.arange(1, nby + 1) * box, ny) - np.arange(nby) * box
    full_x = np.minimum(np.arange(1, nbx + 1) * box, nx) - np.arange(nbx) * box
    count = np.isfinite(boxes).sum(axis=2)
    enough = count >= np.maximum(16, (full_y[:, None] * full_x[None, :]) // 10)
    medians = np.zeros((nby, nbx))
    if enough.any():
        # Complete bins in one vectorised median; the others (masked pixels) one by one.
        complete = enough & (count == boxes.shape[2])
        partial = enough & ~complete
        if complete.any():
            medians[complete] = np.median(boxes[complete], axis=1)
        for j, i in zip(*np.nonzero(partial)):
            values = boxes[j, i]
            medians[j, i] = np.median(values[np.isfinite(values)])
        medians[~enough] = np.median(medians[enough])
    return medians


def _robust_sigma(values: np.ndarray) -> float:
    if values.size < 10:
        return float("nan")
    q25, q75 = np.percentile(values, [25.0, 75.0])
    return float(0.741301109 * (q75 - q25))


def sample_step(shape) -> int:
    """Subsampling step giving about a million samples (1 for images up to 1500²)."""
    return max(1, int(round(math.sqrt(shape[0] * shape[1] / 1.0e6))))


def fit_background(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, *,
                   bin_size: int, origin=(0, 0), fit: bool = True, threshold: float = 3.0,
                   grow: int = 4, what: str = "image") -> tuple[BinnedBackground, SkySample]:
    """Fit a smooth background and find the sky pixels of one image.

    Parameters
    ----------
    image, variance : numpy.ndarray
        The planes (counts, counts²).
    usable : numpy.ndarray of bool
        Pixels with valid data (no NO_DATA/BAD/SAT, positive variance).
    bin_size : int
        Bin side in pixels.
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of ``image[0, 0]``.
    fit : bool
        Fit the background (else it is zero; the sky pixels are still found).
    threshold : float
        Source pixels are ``threshold`` σ (of the variance plane) above the
        first background, grown by ``grow`` pixels.
    what : str
        Name used in error messages.

    Returns
    -------
    (BinnedBackground, SkySample)

    Raises
    ------
    BadInputDataError
        If the image has (almost) no usable pixels.
    """
    ny, nx = image.shape
    step = sample_step(image.shape)
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    sample_var = np.asarray(variance[::step, ::step], dtype=np.float32)
    good = np.asarray(usable[::step, ::step]) & (sample_var > 0)
    if good.sum() < 100:
        raise BadInputDataError(f"the {what} has only {int(good.sum())} usable sampled pixels; "
                                f"check its mask and variance planes")
    box = max(1, int(bin_size) // step)
    y_centres = _bin_layout(sample.shape[0], box, step, origin[1])
    x_centres = _bin_layout(sample.shape[1], box, step, origin[0])
    if fit:
        first = BinnedBackground(x_centres, y_centres, _bin_medians(sample, good, box))
        residual = sample - first.subsampled((ny, nx), origin, step)
    else:
        residual = sample
    sources = good & (residual > threshold * np.sqrt(np.where(good, sample_var, 1.0)))
    grow = int(math.ceil(grow / step))
    if grow > 0 and sources.any():
        sources = ndimage.maximum_filter(sources.view(np.uint8), size=2 * grow + 1) > 0
    sky = good & ~sources
    if fit:
        if sky.sum() < 100:
            sky = good
        values = _bin_medians(sample, sky, box)
        background = BinnedBackground(x_centres, y_centres, values)
        residual = sample - background.subsampled((ny, nx), origin, step)
    else:
        background = BinnedBackground(x_centres, y_centres,
                                      np.zeros((y_centres.size, x_centres.size)))
    sigma = _robust_sigma(residual[sky])
    return background, SkySample(step, sky, sigma)
