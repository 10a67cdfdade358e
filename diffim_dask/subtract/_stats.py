"""Robust statistics, coarse background and source masks used by the subtraction steps."""

from __future__ import annotations

import dataclasses

import numpy as np

from ._convolve import fft_convolve_same, grow_flags

__all__ = []

#: 0.7413 IQR = σ for a Gaussian.
IQR_TO_SIGMA = 0.741301109


def robust_sigma(values: np.ndarray) -> float:
    """Gaussian-equivalent standard deviation from the interquartile range."""
    if values.size == 0:
        return float("nan")
    q25, q75 = np.percentile(values, [25.0, 75.0])
    return float(IQR_TO_SIGMA * (q75 - q25))


def clipped_mean_std(values: np.ndarray, nsigma: float = 3.0, iterations: int = 3
                     ) -> tuple[float, float]:
    """Iteratively ``nsigma``-clipped mean and standard deviation (median-centred)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    keep = np.ones(values.size, bool)
    for _ in range(iterations):
        sel = values[keep]
        centre = np.median(sel)
        spread = sel.std()
        if not spread > 0:
            break
        new = np.abs(values - centre) <= nsigma * spread
        if np.array_equal(new, keep) or new.sum() < 2:
            break
        keep = new
    sel = values[keep]
    return float(sel.mean()), float(sel.std())


def _interpolation_matrix(n: int, n_bins: int, bin_size: int) -> np.ndarray:
    """Linear interpolation weights from bin centres to pixel positions: ``(n, n_bins)``."""
    centres = (np.arange(n_bins) + 0.5) * bin_size - 0.5
    centres[-1] = min(centres[-1], 0.5 * ((n_bins - 1) * bin_size + n - 1))
    pos = np.arange(n, dtype=float)
    weights = np.zeros((n, n_bins))
    if n_bins == 1:
        weights[:, 0] = 1.0
        return weights
    idx = np.clip(np.searchsorted(centres, pos) - 1, 0, n_bins - 2)
    frac = np.clip((pos - centres[idx]) / (centres[idx + 1] - centres[idx]), 0.0, 1.0)
    weights[np.arange(n), idx] = 1.0 - frac
    weights[np.arange(n), idx + 1] += frac
    return weights


def coarse_background(image: np.ndarray, good: np.ndarray, bin_size: int,
                      subsample: int = 2) -> np.ndarray:
    """Smooth background: median of good pixels per ``bin_size`` box, linearly interpolated.

    The median of each box is taken over every ``subsample``-th pixel in x and
    y (a quarter of the pixels by default: the sky noise of a 32×32 box median
    is then ~0.08 σ, negligible after interpolation, for a quarter of the cost).
    Boxes with too few good pixels take the median of the other boxes.
    """
    ny, nx = image.shape
    step = subsample if bin_size % subsample == 0 else 1
    box = bin_size // step
    nby, nbx = -(-ny // bin_size), -(-nx // bin_size)
    sampled = np.where(good[::step, ::step], image[::step, ::step], np.nan).astype(np.float32)
    padded = np.full((nby * box, nbx * box), np.nan, dtype=np.float32)
    padded[:sampled.shape[0], :sampled.shape[1]] = sampled
    boxes = padded.reshape(nby, box, nbx, box).transpose(0, 2, 1, 3).reshape(nby * nbx, box * box)
    count = np.sum(np.isfinite(boxes), axis=1)
    boxes.sort(axis=1)  # NaN sorts last
    low = np.take_along_axis(boxes, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    high = np.take_along_axis(boxes, np.maximum(count, 1)[:, None] // 2, axis=1)[:, 0]
    medians = (0.5 * (low.astype(np.float64) + high)).reshape(nby, nbx)
    enough = (count >= max(4, box * box // 10)).reshape(nby, nbx)
    if enough.any():
        medians[~enough] = np.median(medians[enough])
    else:
        medians[:] = 0.0
    wy = _interpolation_matrix(ny, nby, bin_size).astype(np.float32)
    wx = _interpolation_matrix(nx, nbx, bin_size).astype(np.float32)
    return (wy @ medians.astype(np.float32)) @ wx.T


@dataclasses.dataclass(frozen=True, eq=False)
class ImageStatistics:
    """What the subtraction needs to know about one input image.

    Attributes
    ----------
    background : numpy.ndarray
        Coarse background (counts).
    snr : numpy.ndarray
        PSF-matched-filter S/N of a point source at each pixel,
        :math:`\\sum P (I - B) / \\sqrt{\\sum P^2 V}`, with the variance plane as given.
    sources : numpy.ndarray
        Boolean mask of pixels within a PSF radius of a peak above the source threshold.
    good : numpy.ndarray
        Pixels usable for statistics (finite, positive variance, no ignored plane).
    sky_level : float
        Median of the background.
    """

    background: np.ndarray
    snr: np.ndarray
    sources: np.ndarray
    good: np.ndarray
    sky_level: float


def image_statistics(image, variance, mask, psf_stamp, *, ignore_bits: int, bin_size: int,
                     threshold: float, fwhm: float, workers: int = 1) -> ImageStatistics:
    """Background, S/N map and source mask of one image (numpy planes).

    The S/N map is :math:`\\sum P (I - B) / (\\lVert P \\rVert \\sqrt{V})`: the
    numerator is one FFT correlation with the PSF, the denominator uses the
    local variance (exact for a smooth variance plane). The background is
    estimated twice, the second time without the source pixels; the S/N map is
    corrected for the change of the (smooth) background without another FFT.
    """
    good = (mask & np.uint32(ignore_bits)) == 0
    good &= variance > 0  # also False for NaN
    good &= np.isfinite(image)
    # First pass on a sparser sample: it only has to be good enough to find the sources.
    background = coarse_background(image, good, bin_size, subsample=4 if bin_size % 4 == 0 else 2)
    residual = image - background
    residual[~good] = 0
    flipped = psf_stamp[::-1, ::-1]
    (smoothed,) = fft_convolve_same(residual, [flipped], workers=workers)
    del residual
    # inverse = 1 / (‖P‖ sqrt(V)) on good pixels, 0 elsewhere.
    inverse = np.zeros(image.shape, np.float32)
    np.sqrt(variance, out=inverse, where=good)
    np.divide(np.float32(1.0 / np.sqrt((psf_stamp**2).sum())), inverse, out=inverse, where=good)
    snr = smoothed
    snr *= inverse
    grow = max(1, int(round(fwhm)))
    # Source cores are enough to keep them out of the refined box medians.
    refined = coarse_background(image, good & ~(snr > threshold), bin_size)
    # A smooth background passes the unit-sum PSF filter unchanged.
    change = refined - background
    change *= inverse
    snr -= change
    del change, inverse
    sources = _grow(snr > threshold, grow)
    sky = float(np.median(refined[::bin_size // 2 or 1, ::bin_size // 2 or 1]))
    return ImageStatistics(refined, snr.astype(np.float32, copy=False), sources, good, sky)


def _grow(flags: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by (at least) a square of half-width ``radius``.

    For ``radius >= 2`` the growth runs on a 2×2-binned grid (four times
    cheaper); the result may be up to one pixel larger, harmless for masking
    sources out of noise statistics.
    """
    if radius < 2 or not flags.any():
        return grow_flags(flags, radius)
    ny, nx = flags.shape
    padded = np.zeros((ny + ny % 2, nx + nx % 2), bool)
    padded[:ny, :nx] = flags
    binned = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
    grown = grow_flags(binned, (radius + 1) // 2)
    return np.repeat(np.repeat(grown, 2, axis=0), 2, axis=1)[:ny, :nx]


def local_maxima(values: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Array indices ``(iy, ix)`` of 3×3 local maxima above ``threshold`` (edges excluded)."""
    iy, ix = np.nonzero(values[1:-1, 1:-1] >= threshold)
    iy += 1
    ix += 1
    centre = values[iy, ix]
    keep = np.ones(iy.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                keep &= centre >= values[iy + dy, ix + dx]
    return iy[keep], ix[keep]
