r"""Pixel-to-pixel noise correlation of an image (resampled frames and coadds).

Shared by the two subtraction methods: ZOGY's correlated-noise generalisation
and the Alard–Lupton decorrelation filter both model each input's noise power
from the autocorrelation measured here.

ZOGY as published assumes white noise in both inputs. Warped and coadded
images are not white: resampling kernels correlate neighbouring pixels
(lag-1 correlations of 0.3–0.5 are common), so a matched filter's noise is
well above what the per-pixel variance predicts. The generalisation is exact
for stationary noise: replace each image's ``σ²`` by its noise power spectrum
``σ² R(k)``, where ``R`` is the Fourier transform of the normalised noise
autocorrelation ``ρ`` (``ρ(0) = 1``, mean of ``R`` = 1). :func:`measure_noise_correlation`
estimates ``ρ`` on the sky pixels of an image, within a small radius; lags
whose correlation is not significant (below three standard errors) are set to
zero, so a white image gives exactly ``ρ = δ``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

__all__ = ["NoiseCorrelation", "measure_noise_correlation"]


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseCorrelation:
    """Normalised noise autocorrelation of one image.

    Attributes
    ----------
    acf : numpy.ndarray
        ``(2 r + 1, 2 r + 1)`` correlation at lags ``(dy, dx)`` about the
        centre (``acf[r, r] = 1``), symmetric.
    n_pixels : int
        Sky pixels used.
    standard_error : float
        Standard error of one lag's estimate.
    """

    acf: np.ndarray
    n_pixels: int
    standard_error: float

    @property
    def is_white(self) -> bool:
        """No significant correlation at any non-zero lag."""
        centre = self.acf.shape[0] // 2
        others = self.acf.copy()
        others[centre, centre] = 0.0
        return not np.any(others)

    @property
    def lag1(self) -> tuple[float, float]:
        """Correlation at one pixel along x and along y."""
        c = self.acf.shape[0] // 2
        if c == 0:
            return 0.0, 0.0
        return float(self.acf[c, c + 1]), float(self.acf[c + 1, c])

    @property
    def far_correlation(self) -> float:
        """Mean correlation on the outermost ring of lags (Chebyshev distance = radius).

        Resampling and coadding correlate noise over a kernel's width (one or
        two pixels), so a noise ACF has died out at the largest measured lags.
        A plateau there means the "sky" pixels hold structure (unresolved stars
        in a crowded field, nebulosity, background residuals) rather than noise.
        """
        radius = self.acf.shape[0] // 2
        if radius == 0:
            return 0.0
        ring = np.ones(self.acf.shape, bool)
        ring[1:-1, 1:-1] = False
        return float(self.acf[ring].mean())

    def status(self, white_below: float, max_lag1: float = float("inf"),
               max_far_fraction: float = float("inf")) -> str:
        """How a noise model should treat this measurement.

        ``'white'`` when the largest |lag-1| correlation is at most
        ``white_below``; ``'structured'`` when it exceeds ``max_lag1`` or the
        outer ring (:attr:`far_correlation`) holds more than
        ``max_far_fraction`` × lag-1 — sky structure rather than resampling
        noise, which dies out within a pixel or two; else ``'correlated'``.
        """
        lag1 = max(abs(v) for v in self.lag1)
        if lag1 <= white_below:
            return "white"
        if lag1 > max_lag1 or self.far_correlation > max_far_fraction * lag1:
            return "structured"
        return "correlated"

    @property
    def matched_filter_factor(self) -> float:
        """Sum of the ACF: variance ratio of a wide (flat) filter's output, correlated vs white."""
        return float(self.acf.sum())


def white(radius: int = 0) -> NoiseCorrelation:
    """The white-noise correlation ``δ``."""
    acf = np.zeros((2 * radius + 1, 2 * radius + 1))
    acf[radius, radius] = 1.0
    return NoiseCorrelation(acf, 0, 0.0)


def measure_noise_correlation(image: np.ndarray, usable: np.ndarray, background=None, *,
                              origin=(0, 0), radius: int = 3, max_side: int = 512,
                              threshold: float = 3.0,
                              clip: float = 2.5, grow: int = 3,
                              significance: float = 3.0) -> NoiseCorrelation:
    """Estimate the normalised noise autocorrelation on sky pixels.

    Parameters
    ----------
    image : numpy.ndarray
        The image (counts).
    usable : numpy.ndarray of bool
        Pixels with valid data.
    background : numpy.ndarray or BinnedBackground, optional
        Background to subtract: an array of the image shape, or a model with
        an ``image(shape, origin, offset=)`` method (evaluated on the block used).
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of ``image[0, 0]`` (for a background model).
    radius : int
        Largest lag (pixels) along each axis.
    max_side : int
        The central block of at most ``max_side²`` pixels is used.
    threshold, clip, grow
        Pixels more than ``clip`` robust σ above the background are sources;
        they are grown by ``grow`` pixels and excluded with their pairs.
    significance : float
        Lags below ``significance`` standard errors are set to zero.

    Returns
    -------
    NoiseCorrelation
    """
    ny, nx = image.shape
    y0, x0 = max(0, (ny - max_side) // 2), max(0, (nx - max_side) // 2)
    y1, x1 = min(ny, y0 + max_side), min(nx, x0 + max_side)
    block = np.asarray(image[y0:y1, x0:x1], dtype=np.float64)
    good = np.asarray(usable[y0:y1, x0:x1], dtype=bool).copy()
    if background is not None:
        if callable(getattr(background, "image", None)):
            block = block - background.image(block.shape, origin, offset=(y0, x0))
        else:
            block = block - np.asarray(background)[y0:y1, x0:x1]
    values = block[good]
    if values.size < 100:
        return white(radius)
    q25, q50, q75 = np.percentile(values, [25.0, 50.0, 75.0])
    sigma = 0.741301109 * (q75 - q25)
    if not sigma > 0:
        return white(radius)
    block -= q50
    sources = good & (block > clip * sigma)
    if grow > 0 and sources.any():
        sources = ndimage.maximum_filter(sources.view(np.uint8), size=2 * grow + 1) > 0
    # Also drop extreme negative outliers (defects) from the pairs.
    sky = good & ~sources & (block > -threshold * 2 * sigma)
    data = np.where(sky, block, 0.0)
    weight = sky.astype(np.float64)
    by, bx = data.shape
    acf = np.zeros((2 * radius + 1, 2 * radius + 1))
    pairs = np.zeros_like(acf)
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx < 0:
                continue
            xa0, xa1 = max(0, -dx), min(bx, bx - dx)
            a = data[0:by - dy, xa0:xa1]
            b = data[dy:by, xa0 + dx:xa1 + dx]
            wa = weight[0:by - dy, xa0:xa1]
            wb = weight[dy:by, xa0 + dx:xa1 + dx]
            count = float((wa * wb).sum())
            value = float((a * b).sum()) / count if count > 0 else 0.0
            for sy, sx in ((dy, dx), (-dy, -dx)):
                acf[radius + sy, radius + sx] = value
                pairs[radius + sy, radius + sx] = count
    if not acf[radius, radius] > 0:
        return white(radius)
    acf /= acf[radius, radius]
    n_pixels = int(pairs[radius, radius])
    standard_error = 1.0 / np.sqrt(max(n_pixels, 1))
    insignificant = np.abs(acf) < significance * standard_error
    insignificant[radius, radius] = False
    acf[insignificant] = 0.0
    return NoiseCorrelation(acf, n_pixels, float(standard_error))
