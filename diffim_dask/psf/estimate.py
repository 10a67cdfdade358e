"""PSF estimation from the stars of an exposure.

:func:`estimate_psf` builds a pixelized PSF model from bright, unsaturated,
isolated point sources when no PSF is given:

1. **Background and noise.** A mesh of sigma-clipped medians (masked pixels
   excluded), bilinearly interpolated, is subtracted. The variance plane is
   rescaled so that the background pixels have unit normalised scatter,
   :math:`s = (1.4826\\,\\mathrm{MAD}(r/\\sqrt{V}))^2` (3σ-clipped), which also turns a
   placeholder variance plane of ones into the measured sky variance.
2. **Peaks.** Local maxima of the residual image lightly smoothed with a
   Gaussian of width :math:`\\sigma_s` above ``detection_threshold`` times the
   smoothed noise :math:`\\sqrt{(V * g^2)}` with :math:`g^2` the squared kernel
   (a Gaussian of width :math:`\\sigma_s/\\sqrt2` divided by
   :math:`4\\pi\\sigma_s^2`).
3. **First FWHM guess** from the adaptive second moments of the brightest
   clean peaks; it sets the stamp size and all radii.
4. **Cuts**, each counted: edge, masked pixels in the stamp, saturation
   (``SAT`` plane or a pixel above ``saturation_fraction`` of
   ``exposure.info.saturation``), blends (a neighbouring peak within
   ``isolation_radius_fwhm`` brighter than ``blend_flux_fraction`` of the
   star's peak, or any neighbour in the stamp brighter than the star),
   aperture S/N range, centroid failures and extended sources (size outliers
   from the stellar locus ``T(x, y)`` fitted with sigma clipping,
   :math:`T = 2\\sigma_w^2`).
5. **Sub-pixel centring.** The converged Gaussian-weighted (adaptive-moment)
   centroid is the centre of each star; its stamp is shifted there with a
   Fourier phase ramp (exact for well-sampled stars).
6. **Combination.** Stamps are normalised by their PSF-fit amplitude
   :math:`a_i = \\sum S_i P_i / \\sum P_i^2` (core pixels) and combined per pixel
   by weighted least squares on a spatial design matrix (constant, polynomial
   in ``(u, v)`` or locally weighted quadratic fits at grid nodes), with star
   weights :math:`w_i = (1/\\mathrm{SNR}_i^2 + 1/\\mathrm{SNR}_{cap}^2)^{-1}`,
   starting from the per-pixel median. Pixels deviating by more than
   ``clip_sigma`` from the model (:math:`\\sigma_{ip}^2 = V_{ip}/a_i^2 +
   (\\epsilon P_{ip})^2`) are rejected; whole stars are dropped when their core
   reduced :math:`\\chi^2` is an outlier (median + ``chi2_clip`` × robust σ)
   *and* their noise-corrected residual exceeds ``model_error``. A sky offset
   common to all stars is fitted from the outer residuals, which scale as
   :math:`1/a_i` (the mesh sky includes the wings of bright stars and would
   otherwise eat the PSF wings). This iterates.
7. **Model and FWHM.** :class:`~diffim_dask.psf.ImagePsf` for a constant
   model, :class:`~diffim_dask.psf.PolynomialPsf` or
   :class:`~diffim_dask.psf.GridPsf` when at least ``min_stars_spatial`` stars
   cover the field *and* the spatial model lowers the clipped :math:`\\chi^2`
   by more than ``spatial_significance`` times its extra free values (else the
   combination is redone with a constant model). The reported FWHM is the
   model's intrinsic FWHM (see :mod:`diffim_dask.psf.models`) at the image
   centre; per-star FWHMs scale it by the ratio of adaptive-moment widths, and
   their robust spread is the reported scatter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..config import ConfigBase, config_field
from ..errors import AlgorithmError, BadInputDataError, ConfigurationError
from ..masks import mask_value
from .models import (
    FWHM_PER_SIGMA,
    GridPsf,
    ImagePsf,
    PolynomialPsf,
    PsfModel,
    _fwhm_of_stamp,
    _shift_stamp,
)

__all__ = ["PsfEstimationConfig", "PsfEstimate", "estimate_psf"]

#: Extra pixels cut around each stamp so the Fourier shift's wrap-around stays outside.
_SHIFT_PAD = 4
#: 1.4826 MAD = sigma for a normal distribution.
_MAD_TO_SIGMA = 1.4826


@dataclasses.dataclass(frozen=True)
class PsfEstimationConfig(ConfigBase):
    """Configuration of :func:`estimate_psf`."""

    stamp_size: int | str = config_field(
        "auto",
        "Odd side (pixels) of the PSF stamps, or 'auto': the odd size 2 ceil(stamp_radius_fwhm "
        "* FWHM_guess) + 1, clamped to [min_stamp_size, max_stamp_size].")
    stamp_radius_fwhm: float = config_field(
        3.0, "Half-size of an automatic stamp in units of the first FWHM guess.", minimum=1.0)
    min_stamp_size: int = config_field(
        15, "Smallest automatic stamp size (odd, pixels).", minimum=5)
    max_stamp_size: int = config_field(61, "Largest automatic stamp size (odd, pixels).", minimum=5)
    fwhm_guess: float | None = config_field(
        None, "First FWHM guess in pixels; None measures it from the adaptive second moments "
        "of the brightest clean peaks.", minimum=0.5)
    background_cell: int = config_field(
        128, "Side (pixels) of the cells of the background mesh (sigma-clipped medians).",
        minimum=16)
    smoothing_sigma: float = config_field(
        1.0, "Sigma (pixels) of the Gaussian that lightly smooths the image before peak finding.",
        minimum=0.0)
    detection_threshold: float = config_field(
        5.0, "Peak threshold in units of the noise of the smoothed image.", exclusive_minimum=True,
        minimum=0.0)
    min_snr: float = config_field(
        30.0, "Lowest aperture S/N (aperture radius one FWHM) of a PSF star.", minimum=0.0)
    max_snr: float | None = config_field(
        None, "Highest aperture S/N of a PSF star (None: no limit; saturation is cut separately).",
        minimum=0.0)
    saturation_fraction: float = config_field(
        0.9, "Stars with a stamp pixel above this fraction of exposure.info.saturation (when "
        "finite) are rejected as saturated or non-linear, as are stars with SAT pixels in their "
        "stamp. The margin also covers sky-subtracted images whose true level is higher.",
        minimum=0.0, maximum=1.0, exclusive_minimum=True)
    mask_planes: tuple[str, ...] = config_field(
        ("BAD", "NO_DATA", "CR", "INTRP", "SUSPECT", "EDGE", "STREAK"),
        "Mask planes that disqualify a star when set anywhere in its stamp (SAT is handled by "
        "the saturation cut). BAD and NO_DATA pixels are also ignored in background and peaks.")
    isolation_radius_fwhm: float = config_field(
        3.0, "Radius, in units of the FWHM guess, within which a brighter-than-"
        "blend_flux_fraction neighbour peak rejects a star as blended.", minimum=0.0)
    blend_flux_fraction: float = config_field(
        0.1, "A neighbour peak above this fraction of the star's (smoothed) peak inside the "
        "isolation radius rejects the star.", minimum=0.0)
    stamp_neighbour_ratio: float = config_field(
        1.0, "A neighbour peak anywhere in the stamp brighter than this multiple of the star's "
        "peak rejects the star (fainter ones are removed by per-pixel clipping).", minimum=0.0)
    size_clip: float = config_field(
        4.0, "Stars whose adaptive-moment size T deviates from the stellar locus by more than "
        "this many robust sigmas (and by more than size_tolerance) are rejected as extended or "
        "as artefacts.", exclusive_minimum=True, minimum=0.0)
    size_tolerance: float = config_field(
        0.15, "Fractional deviation of T from the stellar locus always accepted.", minimum=0.0)
    max_stars: int = config_field(
        500, "At most this many stars (the highest-S/N ones passing the cuts) are combined.",
        minimum=1)
    min_stars: int = config_field(
        3, "Fewest stars that make a PSF; fewer raise AlgorithmError.", minimum=1)
    spatial_model: str = config_field(
        "polynomial", "Spatial model of the PSF when enough stars cover the field: 'constant' "
        "(ImagePsf), 'grid' (GridPsf of locally weighted quadratic fits) or 'polynomial' "
        "(PolynomialPsf).", choices=("constant", "grid", "polynomial"))
    polynomial_order: int = config_field(
        2, "Order of the polynomial spatial model in the scaled coordinates (u, v).",
        minimum=0, maximum=4)
    grid_shape: tuple[int, ...] = config_field(
        (3, 3), "Nodes of the grid model along (x, y), spanning the image corner to corner.",
        minimum=1)
    min_stars_spatial: int = config_field(
        50, "Fewest stars for a spatially varying model; with fewer (or stars covering less "
        "than half of either axis) the model is constant.", minimum=1)
    clip_sigma: float = config_field(
        4.0, "Per-pixel rejection threshold (sigma) when combining the star stamps.",
        exclusive_minimum=True, minimum=0.0)
    chi2_clip: float = config_field(
        4.0, "Stars whose core reduced chi2 exceeds the median by this many robust sigmas are "
        "rejected as outliers.", exclusive_minimum=True, minimum=0.0)
    model_error: float = config_field(
        0.02, "Fractional model error added in quadrature to the pixel noise of normalised "
        "stamps (for clipping and chi2).", minimum=0.0)
    snr_weight_cap: float = config_field(
        300.0, "Star weights are SNR^2 softly capped at this S/N, so no few bright stars dominate.",
        exclusive_minimum=True, minimum=0.0)
    fit_background_offset: bool = config_field(
        True, "Fit and remove a sky offset common to all stars (separated from the PSF wings "
        "by its 1/flux scaling in normalised stamps; needs >= 10 stars). Corrects the sky "
        "over-estimate caused by the wings of bright stars, which would otherwise suppress "
        "the PSF wings.")
    spatial_significance: float = config_field(
        2.0, "A spatially varying model is kept only if it lowers the clipped chi2 of the stars "
        "by more than this many times its extra free values (2: Akaike's criterion); "
        "0 always keeps it.", minimum=0.0)
    n_iterations: int = config_field(
        4, "Iterations of amplitude fit, combination and clipping.", minimum=1)

    def validate(self) -> None:
        if isinstance(self.stamp_size, str):
            if self.stamp_size != "auto":
                raise ConfigurationError(
                    f"PsfEstimationConfig.stamp_size must be an odd integer or 'auto', got "
                    f"{self.stamp_size!r}")
        elif self.stamp_size < 5 or self.stamp_size % 2 == 0:
            raise ConfigurationError(
                "PsfEstimationConfig.stamp_size must be an odd integer >= 5, got "
                f"{self.stamp_size}")
        for name in ("min_stamp_size", "max_stamp_size"):
            if getattr(self, name) % 2 == 0:
                raise ConfigurationError(f"PsfEstimationConfig.{name} must be odd, got "
                                         f"{getattr(self, name)}")
        if self.min_stamp_size > self.max_stamp_size:
            raise ConfigurationError("PsfEstimationConfig.min_stamp_size exceeds max_stamp_size")
        if self.max_snr is not None and self.max_snr <= self.min_snr:
            raise ConfigurationError(
                f"PsfEstimationConfig.max_snr ({self.max_snr}) must exceed min_snr "
                f"({self.min_snr})")
        if len(self.grid_shape) != 2:
            raise ConfigurationError(f"PsfEstimationConfig.grid_shape needs two values (nx, ny), "
                                     f"got {self.grid_shape}")
        mask_value(self.mask_planes)  # raises ConfigurationError on unknown planes


@dataclasses.dataclass(frozen=True, eq=False)
class PsfEstimate:
    """Result of :func:`estimate_psf`.

    Attributes
    ----------
    psf : PsfModel
        The estimated model (ImagePsf, PolynomialPsf or GridPsf), parent-frame positions.
    fwhm : float
        Intrinsic FWHM (pixels) of the model at the image centre.
    fwhm_scatter : float
        Robust scatter (1.4826 MAD, pixels) of the per-star FWHMs (includes real
        spatial variation).
    n_candidates : int
        Peaks found above the detection threshold.
    n_used : int
        Stars in the final model.
    x, y : numpy.ndarray
        Parent-frame centroids of the stars used.
    flux : numpy.ndarray
        Their PSF-fit fluxes (counts inside the stamp).
    star_fwhm : numpy.ndarray
        Their individual intrinsic FWHMs (NaN where unmeasurable).
    metadata : dict
        ``passed`` / ``rejected``: stars left after / removed by each cut, in
        order (peaks, edge, masked, saturated, blended, snr, centroid,
        extended, max_stars, chi2); ``fwhm_guess``, ``stamp_size``,
        ``fwhm_pixelized`` (FWHM of the pixel-integrated model at the centre,
        comparable with catalogue FWHMs measured on pixels),
        ``star_fwhm_median``, background and noise statistics,
        ``background_offset`` (sky correction, counts), ``spatial_model`` and
        ``spatial_model_reason`` (with ``spatial_chi2_gain`` / ``_threshold``).
    """

    psf: PsfModel
    fwhm: float
    fwhm_scatter: float
    n_candidates: int
    n_used: int
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    star_fwhm: np.ndarray
    metadata: dict[str, Any]


def estimate_psf(exposure, config: PsfEstimationConfig | None = None) -> PsfEstimate:
    """Estimate the PSF of an exposure from its stars.

    Parameters
    ----------
    exposure : Exposure
        Numpy- or dask-backed exposure (its pixels are computed). The mask,
        variance and ``info.saturation`` are used; an existing ``psf`` is ignored.
    config : PsfEstimationConfig, optional
        Defaults to ``PsfEstimationConfig()``.

    Returns
    -------
    PsfEstimate

    Raises
    ------
    BadInputDataError
        If the image has no usable pixels.
    AlgorithmError
        If fewer than ``config.min_stars`` stars survive; ``metadata`` holds
        the number found and the number passing each cut.
    """
    config = PsfEstimationConfig() if config is None else config
    image, variance, mask = exposure.arrays()
    return _estimate(np.asarray(image, dtype=np.float32), np.asarray(variance, dtype=np.float32),
                     np.asarray(mask), exposure.origin, float(exposure.info.saturation), config)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _estimate(image, variance, mask, origin, saturation, config) -> PsfEstimate:
    prepared = _prepare(image, variance, mask, saturation, config)
    meta = dict(prepared.meta)
    px, py, pval = _find_peaks(prepared.residual, prepared.var_cal, prepared.ignore,
                               config.smoothing_sigma, config.detection_threshold)
    meta["n_peaks"] = int(px.size)
    # rejected[cut]: stars removed by that cut; passed[cut]: stars left after it.
    rejected: dict[str, int] = {}
    passed: dict[str, int] = {"peaks": int(px.size)}

    def fail(reason: str):
        meta["rejected"], meta["passed"] = rejected, passed
        raise AlgorithmError(
            f"PSF estimation found too few usable stars: {reason} (config.min_stars="
            f"{config.min_stars}); stars left after each cut {passed}. Lower min_snr or "
            "detection_threshold, relax the isolation cut, or supply a PSF model.",
            metadata=dict(meta))

    if px.size == 0:
        fail("no peaks above the detection threshold")
    if config.fwhm_guess is not None:
        fwhm_guess = float(config.fwhm_guess)
    else:
        fwhm_guess = _initial_fwhm(prepared.residual, prepared.disqualify | prepared.saturated,
                                   px, py)
        if fwhm_guess is None:
            fail("no clean bright peak to measure a first FWHM")
    meta["fwhm_guess"] = fwhm_guess
    if config.stamp_size == "auto":
        size = 2 * int(math.ceil(config.stamp_radius_fwhm * fwhm_guess)) + 1
        size = int(min(max(size, config.min_stamp_size), config.max_stamp_size))
    else:
        size = int(config.stamp_size)
    meta["stamp_size"] = size

    stars = _select_stars(prepared, px, py, pval, fwhm_guess, size // 2, config, rejected, passed)
    if stars.x.size < config.min_stars:
        fail(f"{stars.x.size} star(s) passed the selection")

    stamps, var_stamps = _cut_stamps(prepared.residual, prepared.var_cal, stars.x, stars.y,
                                     size // 2)
    ny, nx = image.shape
    geometry = _Geometry(nx, ny, int(origin[0]), int(origin[1]))
    star_x, star_y = stars.x + geometry.x0, stars.y + geometry.y0
    result = _combine(stamps, var_stamps, star_x, star_y, stars.snr, fwhm_guess, geometry,
                      config, meta)
    rejected["chi2"] = int(meta["chi2_rejected"])
    if result is None:
        passed["chi2"] = int(stars.x.size - rejected["chi2"])
        fail("too many stars were rejected as outliers from the combined PSF")
    psf, used, amplitude, cleaned = result
    passed["chi2"] = int(used.sum())
    meta["rejected"], meta["passed"] = rejected, passed

    centre = geometry.centre
    fwhm = float(psf.fwhm(*centre))
    model_stamp = psf.image(*centre, size=size)
    meta["fwhm_pixelized"] = float(_fwhm_of_stamp(model_stamp, intrinsic=False))
    star_fwhm = _star_fwhms(cleaned[used], model_stamp, fwhm)
    finite = star_fwhm[np.isfinite(star_fwhm)]
    scatter = (float(_MAD_TO_SIGMA * np.median(np.abs(finite - np.median(finite))))
               if finite.size >= 2 else math.nan)
    meta["star_fwhm_median"] = float(np.median(finite)) if finite.size else math.nan
    return PsfEstimate(
        psf=psf, fwhm=fwhm, fwhm_scatter=scatter, n_candidates=int(px.size),
        n_used=int(used.sum()), x=star_x[used], y=star_y[used], flux=amplitude[used],
        star_fwhm=star_fwhm, metadata=meta)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Background-subtracted pixels, calibrated variance and the pixel flags."""

    residual: np.ndarray  # image - background, 0 where ignored (float32)
    var_cal: np.ndarray  # rescaled variance (float32)
    ignore: np.ndarray  # BAD / NO_DATA / non-finite: no information
    disqualify: np.ndarray  # config.mask_planes or non-finite: a star here is rejected
    saturated: np.ndarray  # SAT plane or above the saturation fraction
    meta: dict[str, Any]


def _prepare(image, variance, mask, saturation, config) -> _Prepared:
    """Flags, background subtraction and variance calibration."""
    finite = np.isfinite(image)
    ignore = ((mask & mask_value(("BAD", "NO_DATA"))) != 0) | ~finite
    disqualify = ((mask & mask_value(config.mask_planes)) != 0) | ~finite
    saturated = (mask & mask_value("SAT")) != 0
    has_saturation = np.isfinite(saturation) and saturation > 0
    if has_saturation:
        saturated |= finite & (image >= config.saturation_fraction * saturation)
    usable = ~(ignore | saturated)
    if np.count_nonzero(usable) < 100:
        raise BadInputDataError(
            f"image has only {np.count_nonzero(usable)} usable pixels (not BAD, NO_DATA, "
            "saturated or non-finite); cannot estimate a PSF")
    background = _background_mesh(image, usable, config.background_cell)
    residual = np.where(ignore, 0.0, image - background).astype(np.float32)
    var_cal, var_scale = _calibrate_variance(residual, variance, usable)
    meta = {
        "background_median": float(np.median(background)),
        "noise_median": float(np.sqrt(np.median(var_cal[usable]))),
        "variance_scale": var_scale,
        "saturation_level": (float(config.saturation_fraction * saturation)
                             if has_saturation else None),
    }
    return _Prepared(residual, var_cal, ignore, disqualify, saturated, meta)


@dataclasses.dataclass(frozen=True)
class _Stars:
    """Selected PSF stars: adaptive centroids (array frame) and aperture S/N."""

    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray


def _select_stars(prepared, px, py, pval, fwhm_guess, half, config, rejected, passed) -> _Stars:
    """Apply the cuts in order, recording how many stars each removes and leaves."""
    residual = prepared.residual
    ny, nx = residual.shape
    cut_half = half + _SHIFT_PAD

    def record(name, keep):
        rejected[name] = rejected.get(name, 0) + int(np.count_nonzero(~keep))
        passed[name] = int(np.count_nonzero(keep))

    keep = (px >= cut_half) & (px < nx - cut_half) & (py >= cut_half) & (py < ny - cut_half)
    record("edge", keep)
    idx = np.nonzero(keep)[0]
    for name, flags in (("masked", prepared.disqualify), ("saturated", prepared.saturated)):
        keep = _box_counts(_box_sum_table(flags), px[idx], py[idx], half) == 0
        record(name, keep)
        idx = idx[keep]

    keep = ~_blended(px, py, pval, idx, config.isolation_radius_fwhm * fwhm_guess,
                     config.blend_flux_fraction, half, config.stamp_neighbour_ratio)
    record("blended", keep)
    idx = idx[keep]

    radius = min(max(1.5, fwhm_guess), cut_half)  # the edge cut leaves room for the aperture
    snr = _aperture_snr(residual, prepared.var_cal, px[idx], py[idx], radius)
    keep = snr >= config.min_snr
    if config.max_snr is not None:
        keep &= snr <= config.max_snr
    record("snr", keep)
    idx, snr = idx[keep], snr[keep]

    moments = [_adaptive_moments(residual, prepared.ignore, px[i], py[i],
                                 fwhm_guess / FWHM_PER_SIGMA) for i in idx]
    keep = np.array([m is not None for m in moments], dtype=bool)
    moments = np.array([m if m is not None else (np.nan,) * 3 for m in moments]).reshape(-1, 3)
    xc, yc, size_t = moments[:, 0], moments[:, 1], 2.0 * moments[:, 2] ** 2
    # The centroid must stay near its peak and leave room for the stamp around it.
    with np.errstate(invalid="ignore"):
        keep &= (np.abs(xc - px[idx]) <= 2.0) & (np.abs(yc - py[idx]) <= 2.0)
        keep &= ((np.round(xc) >= cut_half) & (np.round(xc) < nx - cut_half)
                 & (np.round(yc) >= cut_half) & (np.round(yc) < ny - cut_half))
    record("centroid", keep)
    snr, xc, yc, size_t = snr[keep], xc[keep], yc[keep], size_t[keep]

    keep = _stellar_locus(xc, yc, size_t, (nx, ny), config)
    record("extended", keep)
    snr, xc, yc = snr[keep], xc[keep], yc[keep]

    if xc.size > config.max_stars:
        keep = np.zeros(xc.size, dtype=bool)
        keep[np.argsort(snr)[::-1][:config.max_stars]] = True
        record("max_stars", keep)
        snr, xc, yc = snr[keep], xc[keep], yc[keep]
    return _Stars(xc, yc, snr)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    nx: int
    ny: int
    x0: int
    y0: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + (self.nx - 1) / 2.0, self.y0 + (self.ny - 1) / 2.0

    @property
    def scale(self) -> tuple[float, float]:
        return max(self.nx - 1, 1) / 2.0, max(self.ny - 1, 1) / 2.0


# ----------------------------------------------------------------------------------------------
# Background, noise and peaks
# ----------------------------------------------------------------------------------------------


def _clipped_median(values: np.ndarray, nsigma: float = 3.0, iterations: int = 5) -> float:
    """Median after iterative ``nsigma`` clipping with a MAD-based sigma."""
    values = values[np.isfinite(values)]
    for _ in range(iterations):
        if values.size < 5:
            break
        med = np.median(values)
        sigma = _MAD_TO_SIGMA * np.median(np.abs(values - med))
        if sigma <= 0:
            break
        keep = np.abs(values - med) < nsigma * sigma
        if keep.all():
            break
        values = values[keep]
    return float(np.median(values)) if values.size else math.nan


def _background_mesh(image: np.ndarray, usable: np.ndarray, cell: int) -> np.ndarray:
    """Bilinearly interpolated mesh of sigma-clipped medians (masked pixels excluded).

    Cells with under 30 % usable pixels take the median of the others; with
    at least 3x3 cells a 3x3 median filter removes cells biased by large objects.
    """
    ny, nx = image.shape
    ncy, ncx = max(1, round(ny / cell)), max(1, round(nx / cell))
    ey = np.linspace(0, ny, ncy + 1).astype(int)
    ex = np.linspace(0, nx, ncx + 1).astype(int)
    mesh = np.full((ncy, ncx), np.nan)
    for j in range(ncy):
        for i in range(ncx):
            block = image[ey[j]:ey[j + 1], ex[i]:ex[i + 1]]
            ok = usable[ey[j]:ey[j + 1], ex[i]:ex[i + 1]]
            if np.count_nonzero(ok) >= 0.3 * ok.size:
                mesh[j, i] = _clipped_median(block[ok])
    if not np.isfinite(mesh).any():
        mesh[:] = _clipped_median(image[usable])
    mesh = np.where(np.isfinite(mesh), mesh, np.nanmedian(mesh))
    if ncy >= 3 and ncx >= 3:
        mesh = ndimage.median_filter(mesh, size=3, mode="nearest")
    cy = (ey[:-1] + ey[1:] - 1) / 2.0
    cx = (ex[:-1] + ex[1:] - 1) / 2.0
    # Separable bilinear interpolation, constant beyond the outer cell centres.
    rows = np.array([np.interp(np.arange(nx), cx, mesh[j]) for j in range(ncy)])
    iy = np.arange(ny)
    if ncy == 1:
        return np.broadcast_to(rows[0], (ny, nx)).astype(np.float32)
    pos = np.clip(np.interp(iy, cy, np.arange(ncy)), 0, ncy - 1)
    j0 = np.minimum(pos.astype(int), ncy - 2)
    t = (pos - j0)[:, None]
    return ((1.0 - t) * rows[j0] + t * rows[j0 + 1]).astype(np.float32)


def _clipped_sigma(values: np.ndarray, nsigma: float = 3.0, iterations: int = 10) -> float:
    """1.4826 MAD after iterative ``nsigma`` clipping (sources in the tail are removed)."""
    values = values[np.isfinite(values)]
    sigma = 0.0
    for _ in range(iterations):
        if values.size < 5:
            break
        med = np.median(values)
        sigma = float(_MAD_TO_SIGMA * np.median(np.abs(values - med)))
        keep = np.abs(values - med) < nsigma * sigma
        if sigma <= 0 or keep.all():
            break
        values = values[keep]
    return sigma


def _calibrate_variance(residual, variance, usable) -> tuple[np.ndarray, float]:
    """Variance rescaled so the normalised residual has unit (clipped) robust scatter."""
    valid_var = np.isfinite(variance) & (variance > 0)
    sel = usable & valid_var
    if np.count_nonzero(sel) < 0.5 * np.count_nonzero(usable):
        # Unusable variance plane: a constant from the residual scatter.
        sigma = _clipped_sigma(residual[usable][::max(1, np.count_nonzero(usable) // 2_000_000)])
        return np.full(residual.shape, max(sigma, 1e-12) ** 2, dtype=np.float32), math.nan
    stride = max(1, int(np.count_nonzero(sel) // 2_000_000))
    z = (residual[sel] / np.sqrt(variance[sel]))[::stride]
    scale = _clipped_sigma(z) ** 2
    if not scale > 0:
        scale = 1.0
    fill = float(np.median(variance[sel]))
    var_cal = np.where(valid_var, variance, fill).astype(np.float32) * np.float32(scale)
    return var_cal, scale


def _find_peaks(residual, var_cal, ignore, sigma, threshold):
    """Local maxima of the smoothed residual above ``threshold`` times its noise.

    Returns integer ``x, y`` and the smoothed peak values, brightest first;
    peaks closer than 2 px to a brighter one (plateaus) are merged.
    """
    if sigma > 0:
        smoothed = ndimage.gaussian_filter(residual, sigma, mode="constant")
        # Variance of a g-smoothed image: V * g², and g² is a Gaussian of width sigma/sqrt(2).
        smooth_var = ndimage.gaussian_filter(var_cal, sigma / math.sqrt(2.0), mode="nearest")
        smooth_var /= 4.0 * math.pi * sigma ** 2
    else:
        smoothed, smooth_var = residual, var_cal
    local_max = smoothed == ndimage.maximum_filter(smoothed, size=3, mode="nearest")
    detected = local_max & (smoothed > threshold * np.sqrt(smooth_var)) & ~ignore
    py, px = np.nonzero(detected)
    values = smoothed[py, px].astype(float)
    order = np.argsort(values)[::-1]
    px, py, values = px[order], py[order], values[order]
    if px.size > 1:
        tree = cKDTree(np.column_stack([px, py]))
        alive = np.ones(px.size, dtype=bool)
        for i, j in sorted(tree.query_pairs(2.0)):
            # i < j: i is the brighter one (sorted); drop j if i still stands.
            if alive[i]:
                alive[j] = False
        px, py, values = px[alive], py[alive], values[alive]
    return px, py, values


def _box_sum_table(flags: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row/column in front."""
    table = np.zeros((flags.shape[0] + 1, flags.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(flags, axis=0), axis=1)
    return table


def _box_counts(table, x, y, half):
    """Number of flagged pixels in the boxes ``[y-half, y+half] x [x-half, x+half]``."""
    ny, nx = table.shape[0] - 1, table.shape[1] - 1
    x0, x1 = np.clip(x - half, 0, nx), np.clip(x + half + 1, 0, nx)
    y0, y1 = np.clip(y - half, 0, ny), np.clip(y + half + 1, 0, ny)
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]


def _blended(px, py, pval, idx, radius, fraction, half, ratio):
    """Whether a peak (of ``idx``) has a contaminating neighbour.

    A neighbour within ``radius`` above ``fraction`` of the star's peak, or one
    anywhere in the star's ``(2 half + 1)²`` stamp above ``ratio`` times it.
    """
    if idx.size == 0 or px.size < 2:
        return np.zeros(idx.size, dtype=bool)
    tree = cKDTree(np.column_stack([px, py]))
    reach = max(radius, math.sqrt(2.0) * half)
    out = np.zeros(idx.size, dtype=bool)
    for k, i in enumerate(idx):
        for j in tree.query_ball_point((px[i], py[i]), reach):
            if j == i:
                continue
            dx, dy = abs(px[j] - px[i]), abs(py[j] - py[i])
            close = dx * dx + dy * dy <= radius * radius and pval[j] > fraction * pval[i]
            in_stamp = dx <= half and dy <= half and pval[j] > ratio * pval[i]
            if close or in_stamp:
                out[k] = True
                break
    return out


def _aperture_snr(residual, var_cal, x, y, radius):
    """S/N in circular apertures of ``radius`` around integer positions: ΣI / sqrt(ΣV)."""
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = (xx ** 2 + yy ** 2) <= radius ** 2
    snr = np.empty(x.size)
    for k, (xi, yi) in enumerate(zip(x, y)):
        sl = (slice(yi - r, yi + r + 1), slice(xi - r, xi + r + 1))
        noise = math.sqrt(max(float(var_cal[sl][inside].sum()), 1e-30))
        snr[k] = float(residual[sl][inside].sum()) / noise
    return snr


def _adaptive_moments(residual, ignore, x, y, sigma0, max_iter=60):
    """Adaptive (Gaussian-weighted, circular) centroid and size of one source.

    Iterates :math:`\\bar x = \\sum w I x / \\sum w I` with
    :math:`w = \\exp(-|x - \\bar x|^2 / 2\\sigma_w^2)` and
    :math:`\\sigma_w^2 \\leftarrow M_{xx} + M_{yy}` (weighted second moments),
    whose fixed point for a Gaussian source of width σ is :math:`\\sigma_w = σ`.
    For a symmetric profile the converged centroid is its centre.

    Returns
    -------
    (x, y, sigma_w) or None when the iteration fails.
    """
    ny, nx = residual.shape
    cx, cy, s = float(x), float(y), float(sigma0)
    for _ in range(max_iter):
        h = int(math.ceil(4.0 * s)) + 1
        ix, iy = int(round(cx)), int(round(cy))
        xa, xb = max(ix - h, 0), min(ix + h + 1, nx)
        ya, yb = max(iy - h, 0), min(iy + h + 1, ny)
        data = residual[ya:yb, xa:xb].astype(float)
        good = ~ignore[ya:yb, xa:xb]
        dx = np.arange(xa, xb) - cx
        dy = (np.arange(ya, yb) - cy)[:, None]
        w = np.exp(-(dx ** 2 + dy ** 2) / (2.0 * s * s)) * good
        wi = w * data
        total = wi.sum()
        if not total > 0:
            return None
        mx = (wi * dx).sum() / total
        my = (wi * dy).sum() / total
        mxx = (wi * (dx - mx) ** 2).sum() / total
        myy = (wi * (dy - my) ** 2).sum() / total
        new_s2 = mxx + myy
        if not (0.04 < new_s2 < 400.0) or abs(mx) > 3 * s or abs(my) > 3 * s:
            return None
        new_s = math.sqrt(new_s2)
        cx, cy = cx + mx, cy + my
        done = abs(mx) < 1e-5 and abs(my) < 1e-5 and abs(new_s - s) < 1e-6 * s
        s = new_s
        if done:
            return cx, cy, s
    # Slow convergence still gives a usable estimate if the last step was small.
    return (cx, cy, s) if abs(mx) < 1e-3 and abs(my) < 1e-3 else None


def _initial_fwhm(residual, blocked, px, py) -> float | None:
    """Median adaptive-moment FWHM of up to 100 bright, clean, isolated-ish peaks."""
    ny, nx = residual.shape
    margin = 12
    inside = (px >= margin) & (px < nx - margin) & (py >= margin) & (py < ny - margin)
    table = _box_sum_table(blocked)
    clean = inside.copy()
    clean[inside] = _box_counts(table, px[inside], py[inside], 6) == 0
    order = np.nonzero(clean)[0][:100]  # peaks are sorted brightest first
    sizes = []
    for i in order:
        m = _adaptive_moments(residual, blocked, px[i], py[i], 1.5)
        if m is not None and abs(m[0] - px[i]) < 2 and abs(m[1] - py[i]) < 2:
            # Remove the pixel's 1/12 so the guess approximates the intrinsic width.
            sizes.append(math.sqrt(max(m[2] ** 2 - 1.0 / 12.0, 0.01)))
    if not sizes:
        return None
    sizes = np.array(sizes)
    # The stellar locus is the densest low-size mode: clip galaxies (large) and artefacts.
    return float(FWHM_PER_SIGMA * _clipped_median(sizes, nsigma=2.5))


def _monomials(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Design matrix ``(n, n_terms)`` of the monomials in PolynomialPsf's order."""
    return np.atleast_2d(PolynomialPsf.terms(np.asarray(u, float), np.asarray(v, float), order)).T


def _stellar_locus(x, y, size_t, shape, config) -> np.ndarray:
    """True for sources on the stellar locus of ``T`` (constant or linear/quadratic in x, y)."""
    n = size_t.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    nx, ny = shape
    u = (x - (nx - 1) / 2.0) / max((nx - 1) / 2.0, 1.0)
    v = (y - (ny - 1) / 2.0) / max((ny - 1) / 2.0, 1.0)
    order = 2 if n >= 60 else (1 if n >= 20 else 0)
    design = _monomials(u, v, order)
    keep = np.ones(n, dtype=bool)
    locus = np.full(n, np.median(size_t))
    for _ in range(5):
        if order == 0:
            locus = np.full(n, np.median(size_t[keep]))
        else:
            coeffs, *_ = np.linalg.lstsq(design[keep], size_t[keep], rcond=None)
            locus = design @ coeffs
        resid = size_t - locus
        sigma = _MAD_TO_SIGMA * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        limit = np.maximum(config.size_clip * sigma, config.size_tolerance * locus)
        new_keep = np.abs(resid) <= limit
        if new_keep.sum() < max(1, n // 3) or np.array_equal(new_keep, keep):
            keep = new_keep if new_keep.sum() >= max(1, n // 3) else keep
            break
        keep = new_keep
    return keep


# ----------------------------------------------------------------------------------------------
# Stamps and combination
# ----------------------------------------------------------------------------------------------


def _cut_stamps(residual, var_cal, xc, yc, half):
    """Star stamps shifted so the centroid is on the central pixel, and their variance."""
    size = 2 * half + 1
    cut = half + _SHIFT_PAD
    stamps = np.empty((xc.size, size, size))
    var_stamps = np.empty((xc.size, size, size))
    for k, (x, y) in enumerate(zip(xc, yc)):
        ix, iy = int(round(x)), int(round(y))
        big = residual[iy - cut:iy + cut + 1, ix - cut:ix + cut + 1].astype(float)
        shifted = _shift_stamp(big, -(x - ix), -(y - iy))
        stamps[k] = shifted[_SHIFT_PAD:-_SHIFT_PAD, _SHIFT_PAD:-_SHIFT_PAD]
        var_stamps[k] = var_cal[iy - half:iy + half + 1, ix - half:ix + half + 1]
    return stamps, var_stamps


def _solve_pixels(values, weights, design):
    """Per-pixel weighted least squares: coefficients ``(t, p)`` of ``values ≈ design @ c``.

    ``values`` and ``weights`` are ``(n, p)``, ``design`` is ``(n, t)``; a tiny
    ridge keeps pixels with few unclipped stars solvable.
    """
    normal = np.einsum("np,nt,ns->pts", weights, design, design)
    rhs = np.einsum("np,nt,np->pt", weights, design, values)
    trace = np.trace(normal, axis1=1, axis2=2)[:, None, None]
    ridge = 1e-9 * (trace + 1e-30) * np.eye(design.shape[1])
    return np.linalg.solve(normal + ridge, rhs[..., None])[..., 0].T


def _spatial_choice(star_x, star_y, geometry, config):
    """Which spatial model the stars support, with the reason."""
    n = star_x.size
    if config.spatial_model == "constant":
        return "constant", "configured"
    if n < config.min_stars_spatial:
        return "constant", f"{n} stars < min_stars_spatial={config.min_stars_spatial}"
    u = (star_x - geometry.centre[0]) / geometry.scale[0]
    v = (star_y - geometry.centre[1]) / geometry.scale[1]
    # Coverage: the stars must spread over at least half of each axis (std of a uniform
    # distribution on [-1, 1] is 0.577).
    if np.std(u) < 0.29 or np.std(v) < 0.29:
        return "constant", "stars do not cover the field"
    return config.spatial_model, "enough stars"


class _SpatialFit:
    """Per-pixel spatial model of normalised stamps: constant, polynomial or grid."""

    def __init__(self, kind, star_x, star_y, geometry, config, size):
        self.kind = kind
        self.geometry = geometry
        self.size = size
        self.order = config.polynomial_order if kind == "polynomial" else 0
        cx, cy = geometry.centre
        sx, sy = geometry.scale
        self.star_x, self.star_y = star_x, star_y
        self.u = (star_x - cx) / sx
        self.v = (star_y - cy) / sy
        if kind == "grid":
            gx, gy = config.grid_shape
            x0, y0 = geometry.x0, geometry.y0
            self.x_nodes = np.linspace(x0, x0 + geometry.nx - 1, gx) if gx > 1 else np.array([cx])
            self.y_nodes = np.linspace(y0, y0 + geometry.ny - 1, gy) if gy > 1 else np.array([cy])
            self.node_u = (self.x_nodes - cx) / sx
            self.node_v = (self.y_nodes - cy) / sy
            # Kernel width: one node spacing (in scaled units), at least a third of the field.
            spacing = [2.0 / (g - 1) if g > 1 else 2.0 for g in (gx, gy)]
            self.bandwidth = max(max(spacing), 2.0 / 3.0)

    @property
    def n_extra_parameters(self) -> int:
        """Free values per pixel beyond a constant model's one."""
        if self.kind == "grid":
            return self.x_nodes.size * self.y_nodes.size - 1
        return (self.order + 1) * (self.order + 2) // 2 - 1

    @staticmethod
    def design(u, v, order):
        return _monomials(u, v, order)

    def fit(self, normalised, pixel_weights):
        """Fit the model; returns ``(model stamps at the stars, psf model)``."""
        n = normalised.shape[0]
        flat = normalised.reshape(n, -1)
        w = pixel_weights.reshape(n, -1)
        if self.kind in ("constant", "polynomial"):
            design = self.design(self.u, self.v, self.order)
            coeffs = _solve_pixels(flat, w, design)
            at_stars = (design @ coeffs).reshape(normalised.shape)
            stamps = coeffs.reshape(-1, self.size, self.size)
            if self.kind == "constant":
                psf = ImagePsf(stamps[0] / stamps[0].sum())
            else:
                total = stamps[0].sum()
                psf = PolynomialPsf(stamps / total, self.order, reference=self.geometry.centre,
                                    scale=self.geometry.scale)
            return at_stars, psf
        # Grid: locally weighted quadratic fit at every node (a local mean would be biased
        # towards the interior at edge nodes; a quadratic also follows the curvature of the
        # stamps when the FWHM changes linearly).
        node_stamps = np.empty((self.y_nodes.size, self.x_nodes.size, self.size, self.size))
        for j, nv in enumerate(self.node_v):
            for i, nu in enumerate(self.node_u):
                d2 = (self.u - nu) ** 2 + (self.v - nv) ** 2
                kernel = np.exp(-0.5 * d2 / self.bandwidth ** 2)
                local = self.design(self.u - nu, self.v - nv, 2)
                coeffs = _solve_pixels(flat, w * kernel[:, None], local)
                node = coeffs[0].reshape(self.size, self.size)
                node_stamps[j, i] = node / node.sum()
        psf = GridPsf(self.x_nodes, self.y_nodes, node_stamps)
        at_stars = np.array([psf.image(x, y) for x, y in zip(self.star_x, self.star_y)])
        return at_stars, psf


@dataclasses.dataclass
class _CombineState:
    """Outcome of the iterative combination."""

    kind: str
    reason: str
    psf: PsfModel | None
    used: np.ndarray
    amplitude: np.ndarray
    normalised: np.ndarray
    sigma2: np.ndarray
    pixel_ok: np.ndarray
    model_at_stars: np.ndarray
    weights: np.ndarray
    offset: float


def _combine(stamps, var_stamps, star_x, star_y, snr, fwhm_guess, geometry, config, meta):
    """Clipped combination of the star stamps into a PSF model.

    Iterates (see :func:`_iterate`) with the spatial model the stars support;
    a spatially varying model is then kept only if it lowers the clipped chi2
    by more than ``spatial_significance`` times its extra free values,
    otherwise the combination is redone with a constant model.

    Returns ``(psf, used, amplitude, cleaned stamps)`` or None when fewer than
    ``min_stars`` stars survive.
    """
    n, size, _ = stamps.shape
    half = size // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r2 = xx ** 2 + yy ** 2
    core = r2 <= (2.0 * fwhm_guess) ** 2
    aperture = r2 <= (1.5 * fwhm_guess) ** 2

    # Aperture fluxes capture the same fraction of every star's flux.
    flux0 = stamps[:, aperture].sum(axis=1)
    positive = flux0 > 0
    meta["chi2_rejected"] = 0
    if positive.sum() < config.min_stars:
        return None
    median_stamp = np.median(stamps[positive] / flux0[positive, None, None], axis=0)
    start = np.broadcast_to(median_stamp / median_stamp.sum(), stamps.shape)
    star_weight = 1.0 / (1.0 / np.maximum(snr, 1e-3) ** 2 + 1.0 / config.snr_weight_cap ** 2)
    args = (stamps, var_stamps, star_x, star_y, star_weight, positive, start, core, geometry,
            config)

    state = _iterate(*args, force_constant=False)
    if state.kind != "constant" and state.used.sum() >= config.min_stars:
        gain, threshold = _spatial_chi2_gain(state, star_x, star_y, geometry, config, size)
        meta["spatial_chi2_gain"], meta["spatial_chi2_threshold"] = gain, threshold
        if gain < threshold:
            state = _iterate(*args, force_constant=True)
            state.reason = (f"spatial variation not significant (chi2 drop {gain:.0f} < "
                            f"{threshold:.0f})")

    meta["chi2_rejected"] = int(positive.sum() - state.used.sum())
    meta["background_offset"] = state.offset
    meta["spatial_model"] = state.kind
    meta["spatial_model_reason"] = state.reason
    if state.used.sum() < config.min_stars or state.psf is None:
        return None
    # Clipped pixels (neighbours, cosmic rays) replaced by the model, for per-star measurements.
    cleaned = np.where(state.pixel_ok, state.normalised, state.model_at_stars)
    return state.psf, state.used, state.amplitude, cleaned


def _iterate(stamps, var_stamps, star_x, star_y, star_weight, used, model_at_stars, core,
             geometry, config, *, force_constant) -> _CombineState:
    """Amplitude fit, clipping, sky-offset fit, outlier rejection and model fit, iterated.

    Each iteration (i) fits every star's amplitude against the current model at
    its position, (ii) clips pixels deviating from it by more than
    ``clip_sigma``, (iii) from the second iteration on, removes a common sky
    offset and drops stars whose core chi2 is an outlier, and (iv) refits the
    spatial model with per-star weights.
    """
    stamps = stamps.copy()
    used = used.copy()
    size = stamps.shape[1]
    outer = ~core
    offset_total = 0.0
    kind, reason, psf = "constant", "", None

    def normalise(model):
        # PSF-fit amplitude on core pixels (uniform weights: no bias from Poisson weights).
        m = model * core
        amp = (stamps * m).sum(axis=(1, 2)) / np.maximum((m * m).sum(axis=(1, 2)), 1e-30)
        safe = np.where(amp > 0, amp, 1.0)[:, None, None]
        norm = stamps / safe
        sig2 = var_stamps / safe ** 2 + (config.model_error * model) ** 2
        return amp, safe, norm, sig2, (norm - model) ** 2 / sig2 < config.clip_sigma ** 2

    weights = np.zeros(0)
    for iteration in range(config.n_iterations):
        amplitude, safe_amp, normalised, sigma2, pixel_ok = normalise(model_at_stars)
        used &= amplitude > 0
        if iteration > 0:
            if config.fit_background_offset:
                offset = _background_offset(normalised - model_at_stars, pixel_ok & outer,
                                            amplitude, var_stamps, used)
                if offset != 0.0:
                    stamps -= offset
                    offset_total += offset
                    amplitude, safe_amp, normalised, sigma2, pixel_ok = normalise(model_at_stars)
                    used &= amplitude > 0
            new_used = used & ~_outlier_stars(normalised, model_at_stars, sigma2, pixel_ok,
                                              var_stamps / safe_amp ** 2, core, used, config)
            if new_used.sum() < config.min_stars:
                used = new_used
                break
            converged = np.array_equal(new_used, used) and iteration > 1
            used = new_used
            if converged:
                break

        if force_constant:
            kind, reason = "constant", "forced"
        else:
            kind, reason = _spatial_choice(star_x[used], star_y[used], geometry, config)
        # A pixel where every star was clipped keeps all of them rather than becoming a hole.
        pixel_ok[:, ~pixel_ok[used].any(axis=0)] = True
        weights = star_weight[used, None, None] * pixel_ok[used]
        fitter = _SpatialFit(kind, star_x[used], star_y[used], geometry, config, size)
        model_used, psf = fitter.fit(normalised[used], weights)
        model_at_stars = np.empty_like(stamps)
        model_at_stars[used] = model_used
        model_at_stars[~used] = model_used.mean(axis=0)
    return _CombineState(kind, reason, psf, used, amplitude, normalised, sigma2, pixel_ok,
                         model_at_stars, weights, float(offset_total))


def _outlier_stars(normalised, model, sigma2, pixel_ok, noise_var, core, used, config):
    """Stars whose core chi2 is a robust outlier *and* whose excess residual is real.

    chi2 grows as SNR² for a fixed fractional mismatch, so bright stars are only
    outliers if their noise-corrected core residual also exceeds ``model_error``;
    stars with over a fifth of their core clipped are outliers too.
    """
    core_ok = pixel_ok & core
    n_core = core_ok.sum(axis=(1, 2))
    resid2 = (normalised - model) ** 2 / sigma2
    chi2 = np.where(n_core > 0, (resid2 * core_ok).sum(axis=(1, 2)) / np.maximum(n_core, 1),
                    np.inf)
    clipped_frac = 1.0 - n_core / core.sum()
    ref = chi2[used]
    med = float(np.median(ref))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(ref - med)))
    limit = med + config.chi2_clip * max(spread, 0.1 * med, 0.1)
    excess = _excess_residual(normalised, model, noise_var, core)
    return ((chi2 > limit) & (excess > config.model_error)) | (clipped_frac >= 0.2)


def _spatial_chi2_gain(state, star_x, star_y, geometry, config, size) -> tuple[float, float]:
    """Clipped chi2 drop of the spatial model over a constant one, and the threshold to beat."""
    used = state.used
    constant = _SpatialFit("constant", star_x[used], star_y[used], geometry, config, size)
    model_constant, _ = constant.fit(state.normalised[used], state.weights)
    spatial = state.model_at_stars[used]
    inv_sigma2 = state.pixel_ok[used] / state.sigma2[used]
    data = state.normalised[used]
    gain = float((((data - model_constant) ** 2 - (data - spatial) ** 2) * inv_sigma2).sum())
    fitter = _SpatialFit(state.kind, star_x[used], star_y[used], geometry, config, size)
    threshold = float(config.spatial_significance * fitter.n_extra_parameters * size * size)
    return gain, threshold


def _background_offset(residual, usable, amplitude, var_stamps, used, min_stars=10) -> float:
    """Residual sky offset common to all stars, from how outer residuals scale with 1/flux.

    A sky level wrong by δ counts leaves ``δ / a_i`` in star i's normalised stamp,
    while a wrong model pedestal ``c`` is the same for all stars; a weighted,
    clipped fit of the mean outer residual :math:`m_i = c + δ / a_i` separates the
    two because the offset does not depend on the star's flux. The mesh
    background is typically too high by the light in the wings of bright stars.
    Returns 0 with fewer than ``min_stars`` stars.
    """
    n_pix = usable.sum(axis=(1, 2))
    ok = used & (n_pix > 10) & (amplitude > 0)
    if ok.sum() < min_stars:
        return 0.0
    mean_resid = (residual * usable).sum(axis=(1, 2))[ok] / n_pix[ok]
    inv_amp = 1.0 / amplitude[ok]
    noise2 = (var_stamps * usable).sum(axis=(1, 2))[ok] / n_pix[ok] ** 2 * inv_amp ** 2
    weight = 1.0 / noise2
    keep = np.ones(mean_resid.size, dtype=bool)
    design = np.column_stack([np.ones_like(inv_amp), inv_amp])
    for _ in range(5):
        sw = np.sqrt(weight[keep])
        (pedestal, offset), *_ = np.linalg.lstsq(design[keep] * sw[:, None], mean_resid[keep] * sw,
                                                 rcond=None)
        z = (mean_resid - pedestal - offset * inv_amp) * np.sqrt(weight)
        new_keep = np.abs(z) < 4.0 * max(_MAD_TO_SIGMA * np.median(np.abs(z[keep])), 1e-12)
        if np.array_equal(new_keep, keep) or new_keep.sum() < min_stars:
            break
        keep = new_keep
    return float(offset)


def _excess_residual(normalised, model, noise_var, core) -> np.ndarray:
    """Core RMS residual beyond the noise, relative to each model's peak.

    :math:`\\sqrt{\\max(\\langle (N - M)^2 \\rangle - \\langle \\sigma^2 \\rangle, 0)} / \\max M`
    over the core pixels: a scale-free measure of how much a star differs from
    the model (a few per cent for blends, galaxies or cosmic rays; ~0 for stars).
    """
    diff2 = ((normalised - model) ** 2)[:, core].mean(axis=1)
    noise = noise_var[:, core].mean(axis=1)
    peak = model.reshape(model.shape[0], -1).max(axis=1)
    return np.sqrt(np.maximum(diff2 - noise, 0.0)) / np.maximum(peak, 1e-30)


def _pixel_free_size(stamp: np.ndarray) -> float:
    """Adaptive-moment width of a centred stamp with the pixel's 1/12 removed (NaN on failure)."""
    half = stamp.shape[0] // 2
    moments = _adaptive_moments(stamp, np.zeros(stamp.shape, dtype=bool), half, half, 2.0)
    if moments is None or moments[2] ** 2 <= 1.0 / 12.0:
        return math.nan
    return math.sqrt(moments[2] ** 2 - 1.0 / 12.0)


def _star_fwhms(stamps: np.ndarray, model_stamp: np.ndarray, model_fwhm: float) -> np.ndarray:
    """Per-star FWHM: the model FWHM scaled by the ratio of adaptive-moment widths.

    ``fwhm_i = FWHM_model * s_i / s_model`` with ``s`` the adaptive-moment width
    (pixel removed) of the star's cleaned stamp and of the model at the image
    centre. Weighted moments use every pixel of the core, so unlike a half-maximum
    measurement on a single noisy stamp they are not biased by peak noise.
    """
    reference = _pixel_free_size(model_stamp)
    sizes = np.array([_pixel_free_size(s) for s in stamps])
    return model_fwhm * sizes / reference
