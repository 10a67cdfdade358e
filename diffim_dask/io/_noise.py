"""Variance model for images that come without one (pure array math, no I/O).

A single-HDU image often arrives with nothing but its pixels and a header. Its
per-pixel variance (counts²) is modelled as

.. math::

    V = \\sigma_{\\rm sky}^2 + \\max(I - S, 0) / g

* :math:`S` and :math:`\\sigma_{\\rm sky}` are the sky level and the sky noise
  *measured* on the image: the median and ``1.4826 × MAD`` of the usable
  pixels after iterative 3σ clipping (sources and cosmic rays are clipped).
  The measured sky variance holds the sky's photon noise, the read noise and
  any noise left by earlier processing, whatever the image's history.
* :math:`\\max(I - S, 0)/g` is the photon noise of the sources above the sky
  with the gain :math:`g` (electrons per count).

Why not ``image / gain + read_noise²``? Many archive images are
*sky-subtracted* (the DECam test frames have a median ≈ 0 while the sky was
≈ 4000 counts): the image alone then says nothing about the sky's photon noise
and a Poisson model built from it underestimates the noise by orders of
magnitude. Measuring the sky variance is correct for both kinds of image.

When the gain is unknown (ZTF stamps) and the sky has *not* been subtracted
(:math:`S > 5 \\sigma_{\\rm sky}`), an effective gain follows from the sky
statistics: photon statistics give :math:`\\sigma^2 = S/g + (r/g)^2` with the
read noise :math:`r` in electrons, so :math:`u = 1/g` solves
:math:`r^2 u^2 + S u - \\sigma^2 = 0`, and :math:`g = S / \\sigma^2` when
:math:`r` is unknown (a slight underestimate of :math:`g`, i.e. a slightly
conservative source term). When neither is possible the source term is left
out and the variance is the sky variance alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "SkyStatistics",
    "sky_statistics",
    "looks_sky_subtracted",
    "effective_gain",
    "model_variance",
    "MAD_TO_SIGMA",
]

#: σ / MAD of a normal distribution.
MAD_TO_SIGMA = 1.482602218505602

#: A sky level below this many sky σ is taken as "sky-subtracted".
SKY_SUBTRACTED_SIGMAS = 5.0

#: Pixels used for the statistics at most (a regular subsample of larger images).
_MAX_SAMPLE = 1_000_000


@dataclasses.dataclass(frozen=True)
class SkyStatistics:
    """Robust sky statistics of an image.

    Attributes
    ----------
    level : float
        Sigma-clipped median (counts).
    sigma : float
        ``1.4826 × MAD`` of the clipped pixels (counts).
    n_pixels : int
        Pixels left after clipping.
    """

    level: float
    sigma: float
    n_pixels: int

    @property
    def variance(self) -> float:
        """``sigma²`` (counts²)."""
        return self.sigma ** 2


def _subsample(values: np.ndarray) -> np.ndarray:
    if values.size <= _MAX_SAMPLE:
        return values
    step = int(math.ceil(values.size / _MAX_SAMPLE))
    return values[::step]


def sky_statistics(image: np.ndarray, usable: np.ndarray, *, clip_sigma: float = 3.0,
                   max_iterations: int = 10) -> SkyStatistics:
    """Sigma-clipped median and MAD-based σ of the usable pixels.

    Parameters
    ----------
    image : numpy.ndarray
        Pixel values.
    usable : numpy.ndarray of bool
        Pixels that may enter the statistics (finite, not saturated, not bad).
    clip_sigma : float
        Clipping threshold in units of the current σ estimate.
    max_iterations : int
        Stop after this many clipping passes (or when nothing changes).

    Returns
    -------
    SkyStatistics
        ``n_pixels`` is 0 (and level, sigma NaN) when no pixel is usable.
    """
    values = _subsample(np.asarray(image, dtype=np.float64)[usable])
    if values.size == 0:
        return SkyStatistics(math.nan, math.nan, 0)
    for _ in range(max_iterations):
        level = float(np.median(values))
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(values - level)))
        if sigma == 0.0:
            break
        kept = values[np.abs(values - level) <= clip_sigma * sigma]
        if kept.size == values.size:
            break
        values = kept
    level = float(np.median(values))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(values - level)))
    return SkyStatistics(level, sigma, int(values.size))


def looks_sky_subtracted(sky: SkyStatistics) -> bool:
    """Whether the sky level is compatible with zero (``S < 5 σ``).

    A real, unsubtracted sky of N electrons per pixel has ``S/σ ≈ sqrt(N)``,
    far above 5 for any sky worth the name.
    """
    return not sky.level > SKY_SUBTRACTED_SIGMAS * sky.sigma


def effective_gain(sky: SkyStatistics, read_noise: float = math.nan) -> float:
    """Gain (electrons per count) implied by the sky's photon statistics.

    Solves ``σ² = S/g + (r/g)²`` for ``g`` (see the module notes); returns NaN
    when the sky is compatible with zero or σ is not positive.

    Parameters
    ----------
    sky : SkyStatistics
        Measured sky level ``S`` and noise ``σ`` (counts).
    read_noise : float
        Read noise ``r`` in electrons, NaN when unknown.
    """
    if looks_sky_subtracted(sky) or not sky.sigma > 0:
        return math.nan
    if not (math.isfinite(read_noise) and read_noise > 0):
        return sky.level / sky.variance
    a, b, c = read_noise ** 2, sky.level, -sky.variance
    inverse_gain = (-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)
    return 1.0 / inverse_gain


def model_variance(image: np.ndarray, sky: SkyStatistics, gain: float) -> np.ndarray:
    """Per-pixel variance ``σ_sky² + max(I - S, 0) / g`` (counts², float64).

    Parameters
    ----------
    image : numpy.ndarray
        Pixel values (non-finite values give NaN; callers mask them).
    sky : SkyStatistics
        Measured sky level and noise.
    gain : float
        Electrons per count; NaN or non-positive leaves the source term out.
    """
    image = np.asarray(image, dtype=np.float64)
    variance = np.full(image.shape, sky.variance, dtype=np.float64)
    if math.isfinite(gain) and gain > 0:
        with np.errstate(invalid="ignore"):
            variance += np.maximum(image - sky.level, 0.0) / gain
    return variance
