"""Variance-plane scaling: make each variance plane match the noise measured in source-free sky.

Following ``ScaleVarianceTask`` (``lsst-ip_diffim.md`` §3.5): after removing a
coarse background, the pixel-based factor is

.. math:: f = \\left(0.7413\\,\\mathrm{IQR}\\!\\left[(I - B)/\\sqrt{V}\\right]\\right)^2

over good, source-free pixels. If :math:`f` is outside :math:`[1/L, L]`
(``limit`` :math:`L = 10`) the image-based factor
:math:`f = \\sigma_\\mathrm{robust}(I - B)^2 / \\mathrm{median}(V)` is tried; if
that is outside too, the data are refused (:class:`~diffim_dask.errors.BadInputDataError`).
Unlike the anchor, which relies on upstream ``DETECTED`` masks, sources are
found here directly (PSF-smoothed S/N above a threshold, grown by a PSF FWHM),
so the measurement is source-free even on exposures with no detection masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BadInputDataError
from ..masks import mask_value
from ._stats import coarse_background, robust_sigma

__all__ = ["VarianceScale", "measure_variance_scale"]


#: Fewest source-free pixels for a variance-scale measurement.
_MIN_PIXELS = 100


@dataclasses.dataclass(frozen=True)
class VarianceScale:
    """Result of :func:`measure_variance_scale`.

    Attributes
    ----------
    factor : float
        Multiply the variance plane by this.
    method : str
        ``"pixel"``, ``"image"`` (fallback), or ``"image-all-pixels"`` when fewer
        than 100 source-free pixels exist (robust scatter of all unmasked pixels).
    n_pixels : int
        Pixels used.
    """

    factor: float
    method: str
    n_pixels: int


def measure_variance_scale(image, variance, mask, *, source_mask=None, background=None,
                           limit: float = 10.0, bin_size: int = 32,
                           ignore_planes=("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA",
                                          "INTRP", "CR", "EDGE"),
                           what: str = "image") -> VarianceScale:
    """Measure the factor that makes ``variance`` match the image noise.

    Parameters
    ----------
    image, variance, mask : numpy.ndarray
        The planes.
    source_mask : numpy.ndarray of bool, optional
        Pixels belonging to sources (excluded).
    background : numpy.ndarray, optional
        Background to remove; estimated with ``bin_size`` boxes when absent.
    limit : float
        Largest acceptable factor (its inverse is the smallest).
    bin_size : int
        Background box size.
    ignore_planes : sequence of str
        Mask planes excluded from the measurement.
    what : str
        Name of the image in error messages (e.g. ``"template"``).

    Raises
    ------
    BadInputDataError
        Too few pixels with a positive variance, or no factor within
        ``[1/limit, limit]``.
    """
    image = np.asarray(image)
    # A regular subsample of at most ~4 million pixels measures the IQR to ~1e-3.
    step = max(1, int(np.sqrt(image.size / 4_000_000)))
    image_sub = image[::step, ::step]
    var_sub = np.asarray(variance)[::step, ::step]
    good = (np.asarray(mask)[::step, ::step] & np.uint32(mask_value(ignore_planes))) == 0
    good &= np.isfinite(image_sub) & np.isfinite(var_sub) & (var_sub > 0)
    if source_mask is not None:
        good &= ~source_mask[::step, ::step]
    n_good = int(good.sum())
    if n_good < _MIN_PIXELS:
        # Too little source-free sky (e.g. an alert stamp filled by its source, or a variance
        # plane so low that everything looks significant): fall back to the robust scatter of
        # all unmasked pixels, which sources bias only when they fill most of the image.
        usable = (np.asarray(mask)[::step, ::step] & np.uint32(mask_value(ignore_planes))) == 0
        usable &= np.isfinite(image_sub) & np.isfinite(var_sub) & (var_sub > 0)
        n_usable = int(usable.sum())
        if n_usable < _MIN_PIXELS:
            raise BadInputDataError(
                f"variance scaling of the {what}: only {n_usable} usable pixels with a positive "
                f"variance (need >= {_MIN_PIXELS}); check its mask and variance planes")
        values = image_sub[usable]
        factor = robust_sigma(values - np.median(values)) ** 2 / float(np.median(var_sub[usable]))
        if not (1.0 / limit <= factor <= limit):
            raise BadInputDataError(
                f"variance plane of the {what} disagrees with its measured noise: image-based "
                f"variance scale factor {factor:.3g} (only {n_good} source-free pixels) is outside "
                f"[{1 / limit:.3g}, {limit:.3g}] (VarianceScalingConfig.limit)")
        return VarianceScale(float(factor), "image-all-pixels", n_usable)
    if background is None:
        full_good = (np.asarray(mask) & np.uint32(mask_value(ignore_planes))) == 0
        full_good &= np.asarray(variance) > 0
        if source_mask is not None:
            full_good &= ~source_mask
        background = coarse_background(image, full_good, bin_size)
    residual = (image_sub - background[::step, ::step])[good]
    var_sub = var_sub[good]
    factor = robust_sigma(residual / np.sqrt(var_sub)) ** 2
    method = "pixel"
    if not (1.0 / limit <= factor <= limit):
        pixel_factor = factor
        factor = robust_sigma(residual) ** 2 / float(np.median(var_sub))
        method = "image"
        if not (1.0 / limit <= factor <= limit):
            raise BadInputDataError(
                f"variance plane of the {what} disagrees with its measured noise: variance "
                f"scale factor {pixel_factor:.3g} (pixel-based) / {factor:.3g} (image-based) is "
                f"outside [{1 / limit:.3g}, {limit:.3g}] (VarianceScalingConfig.limit); the "
                f"variance plane or the image is bad")
    return VarianceScale(float(factor), method, n_good)
