"""Source injection: point sources rendered with an exposure's own PSF, with consistent noise.

:func:`inject_sources` adds synthetic point sources to any :class:`~diffim_dask.exposure.Exposure`
(real or simulated) before subtraction and returns the modified exposure with a truth table.

Rendering
    Each source of ``F`` counts at parent-frame position ``(x, y)`` adds
    ``F · P(x, y)`` where ``P`` is the exposure's PSF model evaluated at the
    source with the source's sub-pixel offset (a unit-sum stamp), so the
    injected counts sum to ``F`` exactly (before noise). Pixels flagged
    ``NO_DATA`` are never touched (they carry image 0 and variance 0).

Noise
    The image already holds the sky noise; a source adds its own photon noise.
    With the gain ``g`` (electrons per count), the injected counts of a pixel
    become ``Poisson(g · m) / g`` where ``m`` is the noise-free model, and the
    variance plane grows by ``m / g``. The drawn noise has zero mean, so the
    injected-minus-original image sums to ``F`` within ``sqrt(F / g)``.

Expected S/N
    The S/N of a PSF fit with free amplitude on a background of per-pixel
    variance ``V`` is

    .. math::

        \\mathrm{S/N} = F \\sqrt{\\sum_i P_i^2 / V_i} \\,/\\, s ,

    the simulator's definition (:mod:`diffim_dask.simulate.render`) with the
    local variance plane. ``s`` is the *PSF-scale noise factor*: the ratio of
    the measured scatter of PSF fluxes on empty sky to the scatter the
    variance plane predicts (:func:`measure_psf_noise_scale`). It is 1 for
    white noise and larger for images whose noise is correlated between
    pixels (resampled or stacked frames), whose variance plane therefore
    understates the noise of a PSF-sized measurement. ``expected_snr`` uses
    ``s`` (``snr_noise="measured"``) and ``expected_snr_variance`` does not.

Placement
    Random positions (uniform over usable pixels), or a jittered square grid;
    both keep ``edge_margin`` from the edges, stay clear of masked pixels
    (``avoid_mask_planes`` within ``avoid_radius_fwhm`` PSF FWHMs) and keep
    ``min_separation_fwhm`` between injected sources. ``host`` restricts
    positions to bright extended regions ("on galaxies", see
    :func:`find_extended_regions`), to their complement ("off"), or mixes
    the two.

Mask
    ``INJECTED`` is set on the injected cores: pixels within
    ``core_radius_fwhm`` PSF FWHMs of an injected position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ..config import ConfigBase, config_field
from ..errors import BadInputDataError, ConfigurationError
from ..exposure import Exposure
from ..masks import MASK_PLANES, mask_value

__all__ = [
    "InjectionConfig",
    "InjectionResult",
    "INJECTION_TRUTH_COLUMNS",
    "inject_sources",
    "inject_unit",
    "choose_positions",
    "find_extended_regions",
    "measure_psf_noise_scale",
    "psf_snr_per_count",
    "injection_seed",
    "injection_truth_path",
    "write_injection_truth",
    "read_injection_truth",
]

log = logging.getLogger(__name__)

#: Columns of every injection truth table, in order.
INJECTION_TRUTH_COLUMNS = (
    "injection_id", "visit", "detector", "x", "y", "ra", "dec", "flux_counts", "flux_njy", "mag",
    "expected_snr", "expected_snr_variance", "on_galaxy", "host_surface_brightness",
    "local_variance", "psf_fwhm",
)

_AVOID_DEFAULT = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "STREAK", "INJECTED")
_PLANE_CHOICES = tuple(MASK_PLANES)
_MEASURED, _VARIANCE = "measured", "variance"
#: Folder of a run directory holding injection truth tables.
INJECTED_DIR = "injected"


@dataclasses.dataclass(frozen=True)
class InjectionConfig(ConfigBase):
    """How many point sources to inject, where, how bright, and with what noise.

    A config with ``n_sources = 0`` injects nothing (the workflow's default).
    """

    n_sources: int = config_field(
        0, "Number of point sources to inject per exposure (0 disables injection).", minimum=0)
    placement: str = config_field(
        "random", "Positions: 'random' (uniform over usable pixels) or 'grid' (a square grid "
        "with a random phase, spacing sqrt(usable area / n_sources) or min_separation).",
        choices=("random", "grid"))
    host: str = config_field(
        "any", "Where relative to galaxies: 'any' (no preference; on_galaxy is recorded), 'on' "
        "(inside bright extended regions), 'off' (outside them) or 'mixed' (on_galaxy_fraction "
        "of the sources on galaxies, the rest off).", choices=("any", "on", "off", "mixed"))
    on_galaxy_fraction: float = config_field(
        0.5, "Fraction of the sources placed on galaxies when host='mixed'.", minimum=0.0,
        maximum=1.0)
    snr_range: tuple[float, float] = config_field(
        (3.0, 30.0), "Range of the expected PSF-fit S/N of the injected sources (against the "
        "local noise, see snr_noise).", minimum=0.0, exclusive_minimum=True)
    snr_distribution: str = config_field(
        "log-uniform", "Distribution of the S/N within snr_range.",
        choices=("log-uniform", "uniform"))
    magnitude_range: tuple[float, float] | None = config_field(
        None, "AB magnitude range (uniform) instead of snr_range; needs the exposure's "
        "photo_calib.")
    snr_noise: str = config_field(
        _MEASURED, "Noise of the expected S/N: 'measured' scales the variance-plane prediction by "
        "the PSF-flux scatter measured on empty sky (right for correlated noise), 'variance' "
        "trusts the variance plane.", choices=(_MEASURED, _VARIANCE))
    min_separation_fwhm: float = config_field(
        3.0, "Smallest distance between two injected sources, in PSF FWHMs.", minimum=0.0)
    edge_margin: int = config_field(
        24, "Distance (pixels) kept from the image edges (subtraction and detection lose a "
        "kernel half-width there).", minimum=0)
    avoid_mask_planes: tuple[str, ...] = config_field(
        _AVOID_DEFAULT, "No pixel within avoid_radius_fwhm of an injected position may have one of "
        "these planes.", choices=_PLANE_CHOICES)
    avoid_radius_fwhm: float = config_field(
        1.5, "Radius (PSF FWHMs) around a position that must be free of avoid_mask_planes.",
        minimum=0.0)
    core_radius_fwhm: float = config_field(
        1.0, "INJECTED is set on pixels within this many PSF FWHMs of an injected position.",
        minimum=0.0)
    add_noise: bool = config_field(
        True, "Add the photon noise of the injected counts (needs the gain) and update the "
        "variance plane.")
    gain: float | None = config_field(
        None, "Electrons per count; default: the exposure's VisitInfo gain.", minimum=0.0,
        exclusive_minimum=True)
    stamp_size: int | None = config_field(
        None, "Odd side (pixels) of the rendered PSF stamps; default: the PSF's default size.",
        minimum=3)
    galaxy_threshold: float = config_field(
        3.0, "A pixel belongs to a bright extended region when its S/N, smoothed with a Gaussian "
        "twice the PSF width, exceeds this.", minimum=0.0, exclusive_minimum=True)
    galaxy_size_ratio: float = config_field(
        1.3, "A smoothed-S/N region is extended (a galaxy) when the square root of its "
        "flux-weighted second-moment trace exceeds this multiple of the PSF's.", minimum=1.0)
    galaxy_min_area_fwhm2: float = config_field(
        4.0, "Smallest area of an extended region, in units of FWHM².", minimum=0.0)
    seed: int = config_field(
        0, "Seed of positions, fluxes and noise (the workflow derives one per visit and "
        "detector with injection_seed).", minimum=0)

    def validate(self) -> None:
        lo, hi = self.snr_range
        if len(self.snr_range) != 2 or not lo <= hi:
            raise ConfigurationError(
                f"InjectionConfig.snr_range must be (low, high) with low <= high, got {self.snr_range}")
        if self.magnitude_range is not None:
            if len(self.magnitude_range) != 2 or not self.magnitude_range[0] <= self.magnitude_range[1]:
                raise ConfigurationError(
                    f"InjectionConfig.magnitude_range must be (bright, faint) with bright <= faint, "
                    f"got {self.magnitude_range}")
        if self.stamp_size is not None and self.stamp_size % 2 == 0:
            raise ConfigurationError(f"InjectionConfig.stamp_size must be odd, got {self.stamp_size}")


@dataclasses.dataclass(frozen=True, eq=False)
class InjectionResult:
    """Output of :func:`inject_sources`.

    Attributes
    ----------
    exposure : Exposure
        The input with the sources added (numpy-backed), its variance plane
        updated and ``INJECTED`` set over the injected cores.
    truth : pandas.DataFrame
        One row per injected source, columns :data:`INJECTION_TRUTH_COLUMNS`:
        ``injection_id``; ``visit``, ``detector``; parent-frame ``x``, ``y``;
        ``ra``, ``dec`` (degrees, NaN without a WCS); ``flux_counts``;
        ``flux_njy`` and AB ``mag`` (NaN without a photo_calib);
        ``expected_snr`` (with the PSF-scale noise factor) and
        ``expected_snr_variance`` (variance plane only); ``on_galaxy`` (inside
        a bright extended region); ``host_surface_brightness`` (the smoothed
        background-subtracted image at the position, counts per pixel);
        ``local_variance`` (median variance over the stamp) and ``psf_fwhm``.
    model : numpy.ndarray
        The noise-free injected counts (float64, the exposure's shape).
    metadata : dict
        ``seed``, ``n_requested``, ``n_injected``, ``noise_scale`` (the
        PSF-scale noise factor ``s``), ``gain``, ``psf_fwhm``,
        ``n_usable_pixels``, ``n_galaxy_pixels``, ``config`` (as a dict).
    """

    exposure: Exposure
    truth: pd.DataFrame
    model: np.ndarray
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _nearest(value) -> np.ndarray:
    return np.floor(np.asarray(value, dtype=float) + 0.5).astype(np.int64)


def _disk(radius: float) -> np.ndarray:
    r = max(0, int(math.floor(radius)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= radius * radius + 1e-9


def _usable_pixels(variance, mask) -> np.ndarray:
    return np.isfinite(variance) & (variance > 0) & ((mask & np.uint32(mask_value("NO_DATA"))) == 0)


def _stamp_bounds(ix, iy, half, shape):
    """Slices of the image and of a ``2 half + 1`` stamp centred on pixel ``(iy, ix)``."""
    ny, nx = shape
    ya, yb = max(iy - half, 0), min(iy + half + 1, ny)
    xa, xb = max(ix - half, 0), min(ix + half + 1, nx)
    if ya >= yb or xa >= xb:
        return None
    image_slice = (slice(ya, yb), slice(xa, xb))
    stamp_slice = (slice(ya - (iy - half), yb - (iy - half)), slice(xa - (ix - half), xb - (ix - half)))
    return image_slice, stamp_slice


def _psf_stamp(psf, x: float, y: float, size: int) -> np.ndarray:
    ix, iy = int(_nearest(x)), int(_nearest(y))
    return psf.image(x, y, size, offset=(x - ix, y - iy))


def _stamp_size(psf, config: InjectionConfig) -> int:
    if config.stamp_size is not None:
        return int(config.stamp_size)
    return int(psf.default_size)


def injection_seed(seed: int, visit: int, detector: int) -> int:
    """A seed for one (visit, detector) derived from a run's seed (stable across processes).

    Examples
    --------
    >>> injection_seed(0, 12, 3) == injection_seed(0, 12, 3)
    True
    """
    sequence = np.random.SeedSequence([int(seed), int(visit) & 0xFFFFFFFF, int(visit) >> 32,
                                       int(detector)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))


def _streams(seed: int):
    """Independent generators for positions, fluxes and noise.

    Separate streams make the noise depend on the seed only: re-injecting an
    explicit truth table with the same seed reproduces the same pixels.
    """
    placement, flux, noise = np.random.SeedSequence(int(seed)).spawn(3)
    return (np.random.default_rng(placement), np.random.default_rng(flux),
            np.random.default_rng(noise))


# ----------------------------------------------------------------------------------------------
# Noise and S/N
# ----------------------------------------------------------------------------------------------


def psf_snr_per_count(psf, variance: np.ndarray, x, y, *, origin=(0, 0), size: int | None = None,
                      usable: np.ndarray | None = None) -> np.ndarray:
    """Variance-plane S/N of one count of flux at each position: ``sqrt(Σ P² / V)``.

    Parameters
    ----------
    psf : PsfModel
        Evaluated at each position with its sub-pixel offset.
    variance : numpy.ndarray
        Variance plane (counts²).
    x, y : array_like
        Parent-frame positions.
    origin : (int, int)
        Parent-frame position of ``variance[0, 0]``.
    size : int, optional
        Stamp side (default ``psf.default_size``).
    usable : numpy.ndarray of bool, optional
        Pixels that may be used (default: finite positive variance).

    Returns
    -------
    numpy.ndarray
        ``F · result`` is the S/N of a source of ``F`` counts (0 where no
        pixel is usable).
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    size = int(psf.default_size if size is None else size)
    half = size // 2
    if usable is None:
        usable = np.isfinite(variance) & (variance > 0)
    inverse = np.where(usable, 1.0 / np.where(usable, variance, 1.0), 0.0)
    out = np.zeros(x.size)
    for i in range(x.size):
        stamp = _psf_stamp(psf, x[i], y[i], size)
        bounds = _stamp_bounds(int(_nearest(x[i])) - origin[0], int(_nearest(y[i])) - origin[1], half,
                               variance.shape)
        if bounds is None:
            continue
        image_slice, stamp_slice = bounds
        out[i] = math.sqrt(float(np.sum(stamp[stamp_slice] ** 2 * inverse[image_slice])))
    return out


def _background_and_residual(image, variance, mask, fwhm: float):
    """Mesh background (median super-pixels, from diffim_dask.detect) and the residual image."""
    from ..detect import estimate_background

    ny, nx = image.shape
    bin_size = int(min(max(32, 8 * fwhm), max(8, min(ny, nx) // 2)))
    try:
        background = estimate_background(image, variance, mask, bin_size=bin_size,
                                         ignore_planes=("BAD", "EDGE", "NO_DATA", "SAT"))
        level = background.image
    except BadInputDataError:
        level = np.zeros_like(image)
    return image - level


def _smoothed_significance(residual, variance, usable, sigma: float) -> np.ndarray:
    """S/N of the Gaussian-smoothed image, normalised to unit robust scatter.

    ``ν = (r ⋆ G) / sqrt(V ⋆ G²)`` predicts unit scatter for white noise; the
    result is divided by the robust scatter (1.4826 MAD) of ν over usable
    pixels, so correlated noise (resampled, stacked frames), which the
    variance plane understates on the smoothing scale, does not turn noise
    into detections.
    """
    smooth = ndimage.gaussian_filter(np.where(usable, residual, 0.0), sigma, mode="constant")
    # sqrt(V ⋆ g²) with g² a Gaussian of width σ/√2 scaled by 1/(4πσ²).
    smooth_var = ndimage.gaussian_filter(np.where(usable, variance, 0.0), sigma / math.sqrt(2),
                                         mode="constant") / (4 * math.pi * sigma ** 2)
    nu = np.where(smooth_var > 0, smooth / np.sqrt(np.maximum(smooth_var, 1e-30)), 0.0)
    values = nu[usable]
    if values.size > 100:
        scatter = 1.4826 * float(np.median(np.abs(values - np.median(values))))
        if scatter > 0:
            nu = nu / scatter
    return nu


def _source_mask(residual, variance, usable, sigma: float, threshold: float = 3.0):
    """Pixels in (or near) sources: PSF-smoothed S/N above ``threshold``, grown by 1σ."""
    nu = _smoothed_significance(residual, variance, usable, sigma)
    coverage = ndimage.gaussian_filter(usable.astype(float), sigma, mode="constant")
    detected = (nu > threshold) | (coverage < 0.5)
    return ndimage.binary_dilation(detected, structure=_disk(max(1.0, sigma)))


def measure_psf_noise_scale(exposure: Exposure, *, n_positions: int = 600, seed: int = 0,
                            mask_planes=("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP",
                                         "SUSPECT", "STREAK", "INJECTED", "DETECTED",
                                         "DETECTED_NEGATIVE"),
                            min_weight_fraction: float = 0.7) -> dict[str, float]:
    """Ratio of the measured to the predicted scatter of PSF fluxes on empty sky.

    At ``n_positions`` random positions the PSF flux of the
    background-subtracted image ``r`` is fitted on the source-free pixels
    ``F`` of the stamp, ``f = Σ_F P r / Σ_F P²``, and divided by its
    variance-plane prediction ``σ_f = sqrt(Σ_F P² V) / Σ_F P²``; positions
    where ``Σ_F P² < min_weight_fraction · Σ P²`` are skipped. The noise
    scale is the robust standard deviation ``1.4826 MAD`` of ``f / σ_f``:
    1 for white noise described by the variance plane, larger when the
    noise is correlated between pixels.

    Parameters
    ----------
    exposure : Exposure
        With a PSF.
    n_positions : int
        Positions tried.
    seed : int
        Seed of the positions.
    mask_planes : sequence of str
        Pixels with these planes are not used.
    min_weight_fraction : float
        Smallest fraction of the PSF's ``Σ P²`` on source-free pixels.

    Returns
    -------
    dict
        ``noise_scale`` (1.0 when fewer than 30 positions were usable),
        ``n_positions`` (used), ``pixel_noise_scale`` (robust std of
        ``r / sqrt(V)`` over source-free pixels, the per-pixel analogue).

    Raises
    ------
    BadInputDataError
        If the exposure has no PSF.
    """
    psf = exposure.psf
    if psf is None:
        raise BadInputDataError("measure_psf_noise_scale: the exposure has no PSF model")
    image, variance, mask = (np.asarray(a) for a in exposure.arrays())
    image = image.astype(np.float64)
    variance = variance.astype(np.float64)
    x0, y0 = exposure.origin
    fwhm = float(psf.fwhm(*exposure.center))
    sigma = fwhm / 2.3548
    usable = _usable_pixels(variance, mask) & np.isfinite(image)
    bad = ~usable | ((mask & np.uint32(mask_value(mask_planes))) != 0)
    residual = _background_and_residual(np.where(usable, image, 0.0), np.where(usable, variance, 0.0),
                                        mask, fwhm)
    free = ~bad & ~_source_mask(residual, variance, ~bad, sigma)
    z = residual[free] / np.sqrt(variance[free])
    pixel_scale = float(1.4826 * np.median(np.abs(z - np.median(z)))) if z.size > 100 else math.nan

    size = int(psf.default_size)
    half = size // 2
    ny, nx = image.shape
    result = {"noise_scale": 1.0, "n_positions": 0, "pixel_noise_scale": pixel_scale}
    if ny <= 2 * half + 2 or nx <= 2 * half + 2:
        return result
    rng = np.random.default_rng(seed)
    free_f = free.astype(np.float64)
    stamp = psf.image(*exposure.center, size)
    ratios = []
    for _ in range(n_positions):
        iy = int(rng.integers(half, ny - half))
        ix = int(rng.integers(half, nx - half))
        if not free[iy, ix]:
            continue
        if psf.is_spatially_varying:
            stamp = psf.image(x0 + ix, y0 + iy, size)
        box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        weight = stamp * free_f[box]
        norm2 = float(np.sum(weight * stamp))
        if norm2 < min_weight_fraction * float(np.sum(stamp * stamp)):
            continue
        flux = float(np.sum(weight * residual[box])) / norm2
        flux_sigma = math.sqrt(float(np.sum(weight ** 2 * variance[box]))) / norm2
        ratios.append(flux / flux_sigma)
    ratios = np.asarray(ratios)
    result["n_positions"] = int(ratios.size)
    if ratios.size >= 30:
        result["noise_scale"] = float(1.4826 * np.median(np.abs(ratios - np.median(ratios))))
    return result


# ----------------------------------------------------------------------------------------------
# Galaxies: bright extended regions
# ----------------------------------------------------------------------------------------------


def _adaptive_size(image: np.ndarray, cx: float, cy: float, sigma0: float,
                   max_iter: int = 30) -> float:
    """Circular adaptive (Gaussian-weighted) size of the light around ``(cx, cy)``, pixels.

    With the weight ``exp(-r²/2s²)`` the weighted per-axis moment of a
    Gaussian of width ``σ`` is ``m = σ² s² / (σ² + s²)``; iterating
    ``s² ← 2m`` converges to ``s = σ``. The centre follows the weighted
    centroid. Returns NaN when the weighted flux is not positive.
    """
    ny, nx = image.shape
    s2 = sigma0 ** 2
    for _ in range(max_iter):
        radius = int(math.ceil(4 * math.sqrt(s2)))
        ya, yb = max(int(cy) - radius, 0), min(int(cy) + radius + 1, ny)
        xa, xb = max(int(cx) - radius, 0), min(int(cx) + radius + 1, nx)
        yy, xx = np.mgrid[ya:yb, xa:xb]
        dx, dy = xx - cx, yy - cy
        weighted = image[ya:yb, xa:xb] * np.exp(-(dx * dx + dy * dy) / (2 * s2))
        total = float(weighted.sum())
        if not total > 0:
            return math.nan
        cx_new = cx + float((weighted * dx).sum()) / total
        cy_new = cy + float((weighted * dy).sum()) / total
        m = float((weighted * (dx * dx + dy * dy)).sum()) / (2 * total)
        s2_new = float(np.clip(2 * m, 0.25 * sigma0 ** 2, (8 * sigma0) ** 2))
        converged = abs(s2_new - s2) < 1e-4 * s2 and abs(cx_new - cx) + abs(cy_new - cy) < 1e-3
        cx, cy, s2 = cx_new, cy_new, s2_new
        if converged:
            break
    return math.sqrt(s2)


def find_extended_regions(exposure: Exposure, *, threshold: float = 3.0, size_ratio: float = 1.3,
                          min_area_fwhm2: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of bright extended regions (galaxies) of an exposure.

    1. The background-subtracted image ``r`` is smoothed with a Gaussian
       ``G`` of twice the PSF width; its S/N ``ν = (r ⋆ G) / sqrt(V ⋆ G²)``,
       normalised to unit robust scatter (so correlated noise is not taken for
       signal), is thresholded at ``threshold`` and the connected regions are
       labelled.
    2. A region is a galaxy when its area is at least ``min_area_fwhm2 ·
       FWHM²`` and the adaptive (Gaussian-weighted, circular) size of the
       light around its brightest smoothed pixel exceeds ``size_ratio`` times
       the PSF's adaptive size. Adaptive moments lock onto one object, so a
       blend of stars, whose region is large, still measures a star's size.

    Parameters
    ----------
    exposure : Exposure
        With a PSF.
    threshold : float
        Smoothed S/N threshold.
    size_ratio : float
        Size criterion (see above).
    min_area_fwhm2 : float
        Smallest area, in FWHM².

    Returns
    -------
    (numpy.ndarray of bool, numpy.ndarray of float)
        The galaxy-pixel map and the smoothed residual image (counts per
        pixel: the local host surface brightness).
    """
    psf = exposure.psf
    if psf is None:
        raise BadInputDataError("find_extended_regions: the exposure has no PSF model")
    image, variance, mask = (np.asarray(a) for a in exposure.arrays())
    image = image.astype(np.float64)
    variance = variance.astype(np.float64)
    usable = _usable_pixels(variance, mask) & np.isfinite(image)
    fwhm = float(psf.fwhm(*exposure.center))
    sigma_psf = fwhm / 2.3548
    residual = _background_and_residual(np.where(usable, image, 0.0), np.where(usable, variance, 0.0),
                                        mask, fwhm)
    residual = np.where(usable, residual, 0.0)
    sigma_g = 2.0 * sigma_psf
    weight = ndimage.gaussian_filter(usable.astype(float), sigma_g, mode="constant")
    smooth = ndimage.gaussian_filter(residual, sigma_g, mode="constant")
    surface = np.where(weight > 0, smooth / np.maximum(weight, 1e-12), 0.0)
    nu = _smoothed_significance(residual, variance, usable, sigma_g)
    labels, n_regions = ndimage.label((nu > threshold) & usable)
    galaxy = np.zeros(image.shape, dtype=bool)
    if n_regions == 0:
        return galaxy, surface
    psf_stamp = psf.image(*exposure.center)
    half = psf_stamp.shape[0] // 2
    psf_size = _adaptive_size(psf_stamp, float(half), float(half), sigma_psf)
    index = np.arange(1, n_regions + 1)
    area = ndimage.sum_labels(np.ones(image.shape), labels, index)
    peaks = ndimage.maximum_position(smooth, labels, index)
    keep = np.zeros(n_regions + 1, dtype=bool)
    light = np.where(labels > 0, residual, 0.0)
    for k, (py, px) in zip(index, peaks):
        if area[k - 1] < min_area_fwhm2 * fwhm ** 2:
            continue
        size = _adaptive_size(np.where(labels == k, light, 0.0), float(px), float(py), sigma_psf)
        keep[k] = math.isfinite(size) and size > size_ratio * psf_size
    return keep[labels], surface


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def _allowed_map(variance, mask, config: InjectionConfig, fwhm: float) -> np.ndarray:
    """Pixels where a source may be centred: usable, off the margin, clear of avoided planes."""
    allowed = _usable_pixels(variance, mask)
    if config.avoid_mask_planes:
        avoided = (mask & np.uint32(mask_value(config.avoid_mask_planes))) != 0
        radius = config.avoid_radius_fwhm * fwhm
        if radius >= 0.5:
            avoided = ndimage.binary_dilation(avoided, structure=_disk(radius))
        allowed &= ~avoided
    # NO_DATA around a position would cut the stamp; keep a PSF core's worth of data.
    nodata = ~_usable_pixels(variance, mask)
    if nodata.any():
        allowed &= ~ndimage.binary_dilation(nodata, structure=_disk(max(1.0, fwhm)))
    m = int(config.edge_margin)
    if m:
        allowed[:m, :] = allowed[-m:, :] = False
        allowed[:, :m] = allowed[:, -m:] = False
    return allowed


def _random_positions(rng, candidates: np.ndarray, n: int, min_sep: float, taken: list,
                      max_tries: int) -> list[tuple[float, float]]:
    """Greedy random sequential placement with a minimum separation (array coordinates)."""
    ys, xs = np.nonzero(candidates)
    placed: list[tuple[float, float]] = []
    if ys.size == 0 or n == 0:
        return placed
    existing = list(taken)
    for _ in range(max_tries):
        if len(placed) >= n:
            break
        k = int(rng.integers(ys.size))
        x = xs[k] + rng.uniform(-0.5, 0.5)
        y = ys[k] + rng.uniform(-0.5, 0.5)
        if min_sep > 0 and existing:
            pts = np.asarray(existing)
            if np.min(np.hypot(pts[:, 0] - x, pts[:, 1] - y)) < min_sep:
                continue
        placed.append((x, y))
        existing.append((x, y))
    return placed


def _grid_positions(rng, candidates: np.ndarray, n: int, min_sep: float) -> list[tuple[float, float]]:
    """A square grid over the candidate area with a random phase, thinned to ``n`` points."""
    ny, nx = candidates.shape
    n_usable = int(candidates.sum())
    if n_usable == 0 or n == 0:
        return []
    spacing = max(min_sep, math.sqrt(n_usable / n), 1.0)
    for _ in range(20):
        phase = rng.uniform(0, spacing, size=2)
        gx = np.arange(phase[0], nx - 0.5, spacing)
        gy = np.arange(phase[1], ny - 0.5, spacing)
        xx, yy = np.meshgrid(gx, gy)
        xx, yy = xx.ravel(), yy.ravel()
        inside = candidates[_nearest(yy).clip(0, ny - 1), _nearest(xx).clip(0, nx - 1)]
        xx, yy = xx[inside], yy[inside]
        if xx.size >= n or spacing <= max(min_sep, 1.0):
            break
        spacing = max(min_sep, spacing * 0.9, 1.0)  # masked areas ate points: tighten the grid
    if xx.size > n:
        pick = np.sort(rng.choice(xx.size, size=n, replace=False))
        xx, yy = xx[pick], yy[pick]
    return list(zip(xx.tolist(), yy.tolist()))


def choose_positions(exposure: Exposure, config: InjectionConfig, rng: np.random.Generator, *,
                     galaxy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Parent-frame positions for ``config.n_sources`` sources (see the module docs).

    Parameters
    ----------
    exposure : Exposure
        With a PSF (its FWHM sets the separations).
    config : InjectionConfig
    rng : numpy.random.Generator
    galaxy : numpy.ndarray of bool, optional
        Galaxy-pixel map (:func:`find_extended_regions`); computed when
        ``config.host`` needs it and it is not given.

    Returns
    -------
    (x, y, info)
        Positions and ``{"n_usable_pixels", "n_galaxy_pixels"}``. Fewer than
        ``n_sources`` positions are returned when the usable area cannot hold
        them at the requested separation (a warning is logged).
    """
    psf = exposure.psf
    if psf is None:
        raise BadInputDataError("choose_positions: the exposure has no PSF model")
    _, variance, mask = exposure.arrays()
    fwhm = float(psf.fwhm(*exposure.center))
    allowed = _allowed_map(np.asarray(variance), np.asarray(mask), config, fwhm)
    if config.host != "any" and galaxy is None:
        galaxy, _ = find_extended_regions(exposure, threshold=config.galaxy_threshold,
                                          size_ratio=config.galaxy_size_ratio,
                                          min_area_fwhm2=config.galaxy_min_area_fwhm2)
    min_sep = config.min_separation_fwhm * fwhm
    n = int(config.n_sources)
    max_tries = 200 * max(n, 1)
    if config.host == "any":
        groups = [(allowed, n)]
    elif config.host == "on":
        groups = [(allowed & galaxy, n)]
    elif config.host == "off":
        groups = [(allowed & ~galaxy, n)]
    else:
        n_on = int(round(config.on_galaxy_fraction * n))
        groups = [(allowed & galaxy, n_on), (allowed & ~galaxy, n - n_on)]
    placed: list[tuple[float, float]] = []
    for candidates, count in groups:
        if config.placement == "grid":
            points = _grid_positions(rng, candidates, count, min_sep)
            if min_sep > 0 and placed and points:
                tree = cKDTree(np.asarray(placed))
                distance, _ = tree.query(np.asarray(points))
                points = [p for p, d in zip(points, distance) if d >= min_sep]
        else:
            points = _random_positions(rng, candidates, count, min_sep, placed, max_tries)
        placed.extend(points)
    if len(placed) < n:
        log.warning("injection: placed %d of %d sources (usable area too small for a separation of "
                    "%.1f px; lower min_separation_fwhm or n_sources)", len(placed), n, min_sep)
    pts = np.asarray(placed, dtype=float).reshape(-1, 2)
    x0, y0 = exposure.origin
    info = {"n_usable_pixels": int(allowed.sum()),
            "n_galaxy_pixels": int(galaxy.sum()) if galaxy is not None else -1}
    return pts[:, 0] + x0, pts[:, 1] + y0, info


# ----------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------


def _explicit_table(table: pd.DataFrame, exposure: Exposure) -> pd.DataFrame:
    if not {"x", "y"} <= set(table.columns):
        raise ConfigurationError(
            f"an explicit injection table needs columns x and y (parent-frame pixels); it has "
            f"{list(table.columns)}")
    brightness = [c for c in ("flux_counts", "flux_njy", "mag", "expected_snr", "snr")
                  if c in table.columns]
    if not brightness:
        raise ConfigurationError(
            "an explicit injection table needs one of the columns flux_counts, flux_njy, mag, "
            "expected_snr (or snr) to set the source brightness")
    if brightness[0] in ("flux_njy", "mag") and exposure.photo_calib is None:
        raise ConfigurationError(
            f"the injection table gives {brightness[0]} but the exposure has no photo_calib; give "
            "flux_counts or expected_snr instead")
    return table.reset_index(drop=True)


def _counts_from_table(table, column, exposure, snr_per_count):
    values = table[column].to_numpy(dtype=float)
    if column == "flux_counts":
        return values
    if column == "flux_njy":
        return exposure.photo_calib.njy_to_counts(values)
    if column == "mag":
        return 10.0 ** (-0.4 * (values - exposure.photo_calib.zero_point))
    with np.errstate(divide="ignore"):
        return np.where(snr_per_count > 0, values / snr_per_count, 0.0)


def _draw_counts(rng, config: InjectionConfig, exposure: Exposure, snr_per_count: np.ndarray):
    n = snr_per_count.size
    if config.magnitude_range is not None:
        if exposure.photo_calib is None:
            raise ConfigurationError(
                "InjectionConfig.magnitude_range needs the exposure's photo_calib (zero point); "
                "use snr_range instead")
        mags = rng.uniform(*config.magnitude_range, size=n)
        return 10.0 ** (-0.4 * (mags - exposure.photo_calib.zero_point))
    lo, hi = config.snr_range
    if config.snr_distribution == "log-uniform":
        snr = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    else:
        snr = rng.uniform(lo, hi, size=n)
    with np.errstate(divide="ignore"):
        return np.where(snr_per_count > 0, snr / snr_per_count, 0.0)


def _gain(exposure: Exposure, config: InjectionConfig) -> float:
    gain = config.gain if config.gain is not None else float(exposure.info.gain)
    if not (math.isfinite(gain) and gain > 0):
        raise BadInputDataError(
            f"source injection with noise needs the gain (electrons per count) but exposure "
            f"visit {exposure.info.visit} detector {exposure.info.detector} has gain {gain}; set "
            "InjectionConfig.gain or add_noise=False")
    return gain


def inject_sources(exposure: Exposure, spec: InjectionConfig | pd.DataFrame | None = None,
                   seed: int | None = None, *, config: InjectionConfig | None = None,
                   id_offset: int = 0) -> InjectionResult:
    """Inject point sources rendered with the exposure's PSF, with consistent noise.

    Parameters
    ----------
    exposure : Exposure
        Any exposure with a PSF model (estimate one with
        :func:`diffim_dask.psf.estimate_psf` first). Dask-backed planes are computed.
    spec : InjectionConfig or pandas.DataFrame, optional
        Either the config (positions and fluxes are drawn), or an explicit
        table with parent-frame ``x``, ``y`` and one brightness column
        (``flux_counts``, ``flux_njy``, ``mag`` or ``expected_snr``); an
        explicit table may carry ``injection_id``.
    seed : int, optional
        Seed of positions, fluxes and noise (default ``config.seed``). The
        noise stream is independent of the others, so injecting a returned
        truth table again with the same seed reproduces the pixels exactly.
    config : InjectionConfig, optional
        Noise, masking and S/N options when ``spec`` is a table (default
        ``InjectionConfig()``).
    id_offset : int
        First ``injection_id`` (for several batches into one exposure).

    Returns
    -------
    InjectionResult

    Raises
    ------
    BadInputDataError
        No PSF, or noise requested without a known gain.
    ConfigurationError
        A malformed explicit table, or magnitudes without a photo_calib.

    Examples
    --------
    >>> from diffim_dask.simulate import simulate_pair
    >>> pair = simulate_pair((128, 128), n_transients=0, seed=1)
    >>> result = inject_sources(pair.science, InjectionConfig(n_sources=5, edge_margin=10), seed=2)
    >>> len(result.truth)
    5
    """
    if isinstance(spec, InjectionConfig):
        config, table = spec, None
    elif isinstance(spec, pd.DataFrame):
        config, table = config or InjectionConfig(), spec
    elif spec is None:
        config, table = config or InjectionConfig(), None
    else:
        raise ConfigurationError(
            f"inject_sources: spec must be an InjectionConfig or a DataFrame, got {type(spec).__name__}")
    if not isinstance(exposure, Exposure):
        raise ConfigurationError(f"inject_sources needs an Exposure, got {type(exposure).__name__}")
    psf = exposure.psf
    if psf is None:
        raise BadInputDataError(
            f"exposure visit {exposure.info.visit} detector {exposure.info.detector} has no PSF; "
            "sources are rendered with the image's own PSF (estimate one with "
            "diffim_dask.psf.estimate_psf and attach it with exposure.replace(psf=...))")
    seed = int(config.seed if seed is None else seed)
    place_rng, flux_rng, noise_rng = _streams(seed)
    exposure = exposure.compute()
    image, variance, mask = (np.array(a) for a in exposure.arrays())
    x0, y0 = exposure.origin
    shape = image.shape
    fwhm = float(psf.fwhm(*exposure.center))
    size = _stamp_size(psf, config)
    half = size // 2
    usable = _usable_pixels(variance, mask)

    galaxy, surface = find_extended_regions(exposure, threshold=config.galaxy_threshold,
                                            size_ratio=config.galaxy_size_ratio,
                                            min_area_fwhm2=config.galaxy_min_area_fwhm2)
    if table is None:
        x, y, info = choose_positions(exposure, config, place_rng, galaxy=galaxy)
    else:
        table = _explicit_table(table, exposure)
        x = table["x"].to_numpy(dtype=float)
        y = table["y"].to_numpy(dtype=float)
        info = {"n_usable_pixels": int(usable.sum()), "n_galaxy_pixels": int(galaxy.sum())}
    n = x.size

    snr_var = psf_snr_per_count(psf, variance.astype(np.float64), x, y, origin=(x0, y0), size=size,
                                usable=usable)
    noise = (measure_psf_noise_scale(exposure, seed=seed) if config.snr_noise == _MEASURED
             else {"noise_scale": 1.0, "n_positions": 0, "pixel_noise_scale": math.nan})
    scale = float(noise["noise_scale"])
    snr_per_count = snr_var / scale
    if table is None:
        counts = _draw_counts(flux_rng, config, exposure, snr_per_count)
    else:
        column = [c for c in ("flux_counts", "flux_njy", "mag", "expected_snr", "snr")
                  if c in table.columns][0]
        counts = _counts_from_table(table, column, exposure, snr_per_count)

    # Render the noise-free model (NO_DATA pixels untouched).
    model = np.zeros(shape, dtype=np.float64)
    local_variance = np.full(n, np.nan)
    ix, iy = _nearest(x) - x0, _nearest(y) - y0
    for i in range(n):
        bounds = _stamp_bounds(int(ix[i]), int(iy[i]), half, shape)
        if bounds is None:
            continue
        image_slice, stamp_slice = bounds
        stamp = psf.image(x[i], y[i], size, offset=(x[i] - ix[i] - x0, y[i] - iy[i] - y0))
        model[image_slice] += counts[i] * stamp[stamp_slice] * usable[image_slice]
        var_box = variance[image_slice][usable[image_slice]]
        local_variance[i] = float(np.median(var_box)) if var_box.size else np.nan

    gain = math.nan
    added = model
    if config.add_noise and n:
        gain = _gain(exposure, config)
        positive = np.clip(model, 0.0, None)
        # Photon noise of the injected electrons; negative PSF wings (pixelized models) stay exact.
        added = noise_rng.poisson(positive * gain) / gain + (model - positive)
        variance = variance + (positive / gain).astype(np.float32)
    image = (image.astype(np.float64) + added).astype(np.float32)

    if n and config.core_radius_fwhm > 0:
        core = np.zeros(shape, dtype=bool)
        inside = (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])
        core[iy[inside], ix[inside]] = True
        radius = config.core_radius_fwhm * fwhm
        core = ndimage.binary_dilation(core, structure=_disk(radius)) & usable
        mask = mask | (core.astype(np.uint32) << np.uint32(MASK_PLANES["INJECTED"]))

    injected = exposure.with_planes(image=image, variance=variance.astype(np.float32), mask=mask)
    truth = _truth_table(exposure, table, x, y, counts, snr_var, scale, galaxy, surface,
                         local_variance, fwhm, id_offset)
    metadata = {"seed": seed, "n_requested": int(config.n_sources if table is None else len(table)),
                "n_injected": int(n), "noise_scale": scale,
                "noise_scale_positions": int(noise["n_positions"]),
                "pixel_noise_scale": float(noise["pixel_noise_scale"]), "gain": gain,
                "psf_fwhm": fwhm, "stamp_size": size, **info, "config": config.to_dict()}
    return InjectionResult(injected, truth, model, metadata)


def inject_unit(science: Exposure, config: InjectionConfig, visit: int, detector: int) -> InjectionResult:
    """Inject into one (visit, detector) of a run with a seed derived from ``config.seed``.

    The workflow's hook: ``inject_sources(science, config, seed=injection_seed(config.seed,
    visit, detector))``, so every unit gets its own reproducible sources whatever the
    order or the worker that processes it. The truth's ``visit`` / ``detector`` are the
    unit's.
    """
    science = science.replace(info=science.info.replace(visit=int(visit), detector=int(detector)))
    return inject_sources(science, config, seed=injection_seed(config.seed, visit, detector))


def _truth_table(exposure, table, x, y, counts, snr_var, scale, galaxy, surface, local_variance,
                 fwhm, id_offset) -> pd.DataFrame:
    n = x.size
    x0, y0 = exposure.origin
    shape = exposure.shape
    ix = np.clip(_nearest(x) - x0, 0, shape[1] - 1)
    iy = np.clip(_nearest(y) - y0, 0, shape[0] - 1)
    if exposure.wcs is not None and n:
        ra, dec = exposure.pixel_to_sky(x, y)
    else:
        ra = dec = np.full(n, np.nan)
    calib = exposure.photo_calib
    with np.errstate(divide="ignore", invalid="ignore"):
        flux_njy = calib.counts_to_njy(counts) if calib is not None else np.full(n, np.nan)
        mag = (calib.zero_point - 2.5 * np.log10(counts)) if calib is not None else np.full(n, np.nan)
    if table is not None and "injection_id" in table.columns:
        ids = table["injection_id"].to_numpy(dtype=np.int64)
    else:
        ids = id_offset + np.arange(n, dtype=np.int64)
    frame = pd.DataFrame({
        "injection_id": ids,
        "visit": np.full(n, int(exposure.info.visit), dtype=np.int64),
        "detector": np.full(n, int(exposure.info.detector), dtype=np.int64),
        "x": x, "y": y, "ra": np.asarray(ra, float), "dec": np.asarray(dec, float),
        "flux_counts": counts, "flux_njy": np.asarray(flux_njy, float), "mag": np.asarray(mag, float),
        "expected_snr": counts * snr_var / scale, "expected_snr_variance": counts * snr_var,
        "on_galaxy": galaxy[iy, ix] if n else np.zeros(0, bool),
        "host_surface_brightness": surface[iy, ix] if n else np.zeros(0),
        "local_variance": local_variance,
        "psf_fwhm": np.full(n, fwhm),
    })
    return frame[list(INJECTION_TRUTH_COLUMNS)]


# ----------------------------------------------------------------------------------------------
# Truth tables of a run
# ----------------------------------------------------------------------------------------------


def injection_truth_path(out: str | Path, visit: int, detector: int) -> Path:
    """``OUT/injected/visit=V/detector=D.parquet``."""
    return Path(out) / INJECTED_DIR / f"visit={int(visit)}" / f"detector={int(detector)}.parquet"


def write_injection_truth(result: InjectionResult, out: str | Path, visit: int, detector: int) -> Path:
    """Write an injection's truth table (with its seed and config in the Parquet metadata), atomically.

    The run's report re-injects the same sources into the science image for
    its cutouts (:func:`inject_sources` with the table and the stored seed).
    """

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..io import atomic_output_path

    path = injection_truth_path(out, visit, detector)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(result.truth, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"diffim_dask_injection"] = json.dumps(result.metadata, default=float).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_output_path(path, overwrite=True) as temporary:
        pq.write_table(table, temporary)
    return path


def read_injection_truth(out: str | Path) -> tuple[pd.DataFrame, dict[tuple[int, int], dict]]:
    """All injection truth tables of a run and their metadata keyed by ``(visit, detector)``.

    Returns an empty table (with the standard columns) when the run injected nothing.
    """
    import pyarrow.parquet as pq

    root = Path(out) / INJECTED_DIR
    frames, metadata = [], {}
    for path in sorted(root.glob("visit=*/detector=*.parquet")):
        table = pq.read_table(path)
        frame = table.to_pandas()
        visit = int(path.parent.name.split("=")[1])
        detector = int(path.stem.split("=")[1])
        raw = (table.schema.metadata or {}).get(b"diffim_dask_injection")
        metadata[(visit, detector)] = json.loads(raw) if raw else {}
        frames.append(frame.assign(visit=visit, detector=detector))
    if not frames:
        return pd.DataFrame({c: [] for c in INJECTION_TRUTH_COLUMNS}), metadata
    return pd.concat(frames, ignore_index=True), metadata
