"""Detection and measurement of DIA sources on a difference image.

:func:`detect_and_measure` runs, in order (anchor ``DetectAndMeasureTask``, §8.2):

1. clear DETECTED, DETECTED_NEGATIVE and STREAK; flag non-finite pixels NO_DATA;
   pixels the subtraction flagged EDGE (its invalid border band, where its
   filters ring) are zeroed like NO_DATA and get zero significance; then set
   EDGE where the matched filter runs off the image (a flag only);
2. background: a bin-8 background, a 5σ detection (both signs) with it
   subtracted, then a bin-40 background ignoring those detections, subtracted
   from the difference. With a score image both passes run on the score
   itself (its noise is the score's unit variance, whatever the correlations
   of the difference's noise), and the score's own bin-40 background is
   subtracted from it;
3. detection: matched-filter significance ``ν = (D ⋆ K) / sqrt(V ⋆ K²)``
   (or ``score / sqrt(V_score)`` with no smoothing for a score image),
   thresholds at ±``threshold``, footprints grown, positive and negative
   footprints merged, peaks separated (:mod:`.footprints`); DETECTED and
   DETECTED_NEGATIVE set;
4. streak masking (STREAK plane);
5. rejection of detections whose peak is on NO_DATA / BAD / SAT / EDGE;
6. sky sources on empty sky;
7. measurement of every source on the difference (:mod:`.measure`):
   centroid, PSF flux, aperture flux, adaptive moments, extendedness; dipole
   fits of merged two-sign footprints (:mod:`.dipole`; those not confirmed
   as dipoles become single-sign sources at their more significant lobe,
   re-centroided and measured there); trail fits of
   significantly elongated sources (:mod:`.trail`; the rules are those of
   :class:`~diffim_dask.detect.config.TrailConfig`); forced PSF photometry on
   the science image and the matched template (only the stamps' pixels of
   those images are read and cleaned); pixel flags;
8. removal of sources with bad flags (:mod:`.filters`), ids, sky
   coordinates, calibration to nJy, the catalog and the metadata.

All the work is on numpy arrays (dask inputs are computed once); per-source
work is batched over all sources except the few nonlinear fits (dipoles,
trails; Levenberg–Marquardt with analytic Jacobians, a few milliseconds each)
and the joint fits of overlapping deblended siblings. The whole-image steps
of the background run on ``config.workers`` threads (default: the available
cores, one inside a Dask worker); the result does not depend on it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from .._parallel import default_threads
from ..errors import AlgorithmError, BadInputDataError
from ..exposure import Exposure
from ..masks import MASK_PLANES, mask_value, plane_set
from ..psf.models import FWHM_PER_SIGMA, PsfModel
from ..schema import CENTER_ALL_PLANES, PIXEL_FLAG_PLANES, catalog_from_columns, make_dia_source_id
from .background import estimate_background, run_concurrently
from .config import DetectAndMeasureConfig
from .detection import SmoothingKernel, correlate_separable, make_smoothing_kernel, significance
from .dipole import classify_dipole, fit_dipole
from .filters import drop_flagged, reject_peaks
from .footprints import build_sources, disk_offsets, grow_pixels, subpixel_peak, threshold_pixels
from .measure import (
    PsfStamps,
    adaptive_moments,
    aperture_flux,
    center_flags,
    fit_blend,
    fit_linear_flux,
    footprint_flags,
    gather,
    refine_centroids,
)
from .result import DetectionResult
from .sky_sources import place_sky_sources
from .streaks import find_streaks
from .trail import fit_trail

__all__ = ["detect_and_measure"]

#: Source kinds: +1 positive, -1 negative, 0 both signs (dipole candidate), 2 sky source.
_KIND_SKY = 2
#: Largest cluster of overlapping deblended siblings fitted jointly.
_MAX_JOINT = 8
_DETECTION_PLANES = ("DETECTED", "DETECTED_NEGATIVE")


def detect_and_measure(difference: Exposure, *, science: Exposure | None = None,
                       matched_template: Exposure | None = None, score: Exposure | None = None,
                       config: DetectAndMeasureConfig | None = None,
                       id_offset: int = 0) -> DetectionResult:
    """Detect and measure DIA sources on a difference image.

    Parameters
    ----------
    difference : Exposure
        Difference image (science minus PSF-matched template) with variance,
        mask and PSF; dask-backed planes are computed once.
    science : Exposure, optional
        The science image: forced photometry (``scienceFlux``), the dipole
        fit's positive-lobe constraint and the sky coordinates (its WCS;
        the difference's WCS otherwise).
    matched_template : Exposure, optional
        The PSF-matched template: forced photometry (``templateFlux``) and the
        dipole fit's negative-lobe constraint.
    score : Exposure, optional
        A score image (Alard–Lupton preconvolution or ZOGY S_corr): detection
        runs on it without further smoothing, measurement on the difference.
    config : DetectAndMeasureConfig, optional
        Defaults follow the anchor.
    id_offset : int
        First value of the per-(visit, detector) counter of ``diaSourceId``
        (use disjoint offsets when one detector is processed in pieces).

    Returns
    -------
    DetectionResult
        ``metadata`` holds: ``n_positive_footprints``, ``n_negative_footprints``
        (before merging), ``n_merged_footprints``, ``n_detections``,
        ``n_rejected_bad_mask_planes``, ``n_removed_flagged`` and
        ``dropped_<flag>`` per filter flag, ``n_dia_sources`` (non-sky),
        ``n_positive``, ``n_negative``, ``n_dipoles`` (isDipole),
        ``n_dipole_fits``, ``n_trail_fits``, ``n_deblended``, ``n_sky_sources``,
        ``sky_psf_flux_std``, ``sky_psf_flux_err_mean``, ``sky_noise_ratio``
        (their ratio, ≈ 1 when the variance plane is right), ``sky_snr_std``
        (scatter of psfFlux / psfFluxErr, also ≈ 1 when the noise varies),
        ``n_streaks``, ``n_pixels_detected_positive`` / ``_negative``,
        ``<PLANE>_mask_fraction``, background statistics (``score_background_rms``:
        of the score's own background, 0 without a score), ``flux_unit`` and
        ``timing`` (seconds per step).

    Raises
    ------
    BadInputDataError
        Missing PSF, mismatched inputs, or no usable pixel.
    AlgorithmError
        When ``config.raise_on_no_sources`` and no DIA source survives.
    """
    config = config or DetectAndMeasureConfig()
    _check_inputs(difference, {"science": science, "matched_template": matched_template,
                               "score": score})
    if id_offset < 0:
        raise BadInputDataError(f"id_offset must be >= 0, got {id_offset}")
    timer = _Timer()
    # Dask-backed inputs are computed once, here.
    difference = difference.compute()
    science = science.compute() if science is not None else None
    matched_template = matched_template.compute() if matched_template is not None else None
    score = score.compute() if score is not None else None

    workers = config.workers or default_threads()
    planes, kernel = _prepare(difference, config)
    score_planes = _score_planes(score, planes) if score is not None else None
    timer.lap("prepare")
    background, raw, noise = _subtract_background(planes, kernel, config, score_planes, workers)
    timer.lap("background")
    filtered, nu = _detection_image(planes, kernel, background, raw, noise, score_planes,
                                    config)
    del raw, noise
    found = _detect(planes, nu, config)
    timer.lap("detection")
    streaks = _mask_streaks(planes, config)
    timer.lap("streaks")
    keep = reject_peaks(planes.mask, found.peak_y, found.peak_x,
                        config.filters.reject_peak_planes)
    src = _Sources.from_detections(found, keep, filtered, nu)
    _add_sky_sources(src, planes, nu, config, difference.info)
    del filtered
    timer.lap("sky_sources")

    # Centroid iterations render the PSF and two shifted copies per source, photometry once.
    stamps = PsfStamps(planes.psf, planes.half, planes.shape, planes.origin,
                       moments_half=planes.half_moments,
                       expected_renders=len(src) * (3 * config.measurement.centroid_iterations + 1))
    columns: dict[str, Any] = {}
    joint = _fit_centroids(planes, src, stamps, config, columns)
    timer.lap("centroids")
    n_dipole_fits = _fit_dipoles(planes, src, config, science, matched_template, columns)
    _resolve_unconfirmed_dipoles(planes, src, stamps, config, columns)
    timer.lap("dipoles")
    _photometry(planes, src, stamps, joint, config, columns)
    timer.lap("photometry")
    _moments(planes, src, stamps, config, columns)
    timer.lap("moments")
    n_trail_fits = _fit_trails(planes, src, config, columns)
    timer.lap("trails")
    _forced_photometry(planes, src, config, science, matched_template, columns)
    timer.lap("forced")
    _pixel_flags(planes, src, columns)
    timer.lap("flags")

    catalog, dropped, n_removed, keep_rows = _catalog(planes, src, difference, science,
                                                      matched_template, config, id_offset,
                                                      columns)
    footprints = _label_image(planes.shape, src, keep_rows)
    timer.lap("catalog")
    metadata = _metadata(catalog, found, src, planes, kernel, background, streaks, config,
                         score is not None, "nJy" if difference.photo_calib else "count",
                         dropped, n_removed, int((~keep).sum()), n_dipole_fits, n_trail_fits)
    timer.lap("metadata")
    metadata["score_background_rms"] = (
        score_planes.background.rms if score_planes is not None
        and score_planes.background is not None else 0.0)
    metadata["timing"] = dict(timer.times)
    metadata["timing"]["total"] = round(sum(timer.times.values()), 4)

    if config.raise_on_no_sources and metadata["n_dia_sources"] == 0:
        raise AlgorithmError(
            "no DIA source survived detection and filtering (raise_on_no_sources is set)",
            {k: v for k, v in metadata.items() if k != "timing"})

    out_difference = difference.with_planes(image=planes.image, variance=planes.variance,
                                            mask=planes.mask)
    score_exposure = None
    if score is not None:
        detection_bits = np.uint32(mask_value(_DETECTION_PLANES))
        s_mask = (score_planes.mask & ~detection_bits) | (planes.mask & detection_bits)
        score_exposure = score.with_planes(image=score_planes.image, mask=s_mask)
    return DetectionResult(catalog=catalog, difference=out_difference, background=background,
                           score=score_exposure, footprints=footprints, streaks=streaks,
                           metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Working state.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Planes:
    """The difference image being processed (local frame) and derived constants."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    nodata: np.ndarray
    excluded: np.ndarray            # zeroed before filtering (NO_DATA, input EDGE, exclude_planes)
    psf: PsfModel
    origin: tuple[int, int]
    fwhm: float
    grow_radius: int
    half: int                       # PSF-fit stamp half-width
    has_exclusions: bool = False    # any excluded pixel that is not NO_DATA
    band: np.ndarray | None = None  # the subtraction's invalid border band (input EDGE)
    unusable: np.ndarray | None = None   # zero weight in fits (set before measurement)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def psf_sigma(self) -> float:
        return self.fwhm / FWHM_PER_SIGMA

    @property
    def half_moments(self) -> int:
        # Moments need room for resolved and trailed sources: twice the fit stamp.
        return 2 * self.half

    def stamp_data(self, ix, iy):
        """Data and inverse-variance weight stamps (float64) around integer pixels."""
        data, inside = gather(self.image, iy, ix, self.half)
        var, _ = gather(self.variance, iy, ix, self.half)
        bad, _ = gather(self.unusable, iy, ix, self.half, fill=True)
        return data.astype(float), _weights(var, bad, inside)


@dataclasses.dataclass
class _Sources:
    """Per-source working arrays: detections first, then sky sources."""

    kind: np.ndarray
    footprint: np.ndarray
    group_size: np.ndarray
    peak_y: np.ndarray
    peak_x: np.ndarray
    nu: np.ndarray
    x: np.ndarray
    y: np.ndarray
    lobes: np.ndarray               # (n, 4): x+, y+, x-, y- of dipole candidates (NaN otherwise)
    pixel_y: np.ndarray
    pixel_x: np.ndarray
    pixel_source: np.ndarray
    n_detections: int
    # Pixel lists sorted by source, built on first use by pixels_of().
    _order: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)
    _sorted: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    @classmethod
    def from_detections(cls, found, keep, filtered, nu) -> "_Sources":
        """Kept detections, pixel lists re-indexed, initial sub-pixel positions."""
        new_index = np.cumsum(keep) - 1
        pixel_keep = keep[found.pixel_source]
        footprint = found.footprint[keep]
        group_size = np.zeros(footprint.size, dtype=np.int64)
        if footprint.size:
            # Siblings may have been rejected: recount.
            _, inverse, counts = np.unique(footprint, return_inverse=True, return_counts=True)
            group_size = counts[inverse]
        kind = found.kind[keep]
        peak_y, peak_x = found.peak_y[keep], found.peak_x[keep]
        peak_nu = found.nu[keep]
        # Initial positions: sub-pixel extremum of the matched-filtered image; dipole
        # candidates start at the midpoint of their two lobes.
        sign = np.where(kind == 0, np.sign(peak_nu), kind)
        y, x = subpixel_peak(filtered, peak_y, peak_x, sign)
        lobes = np.full((kind.size, 4), np.nan)
        dipoles = np.flatnonzero(kind == 0)
        if dipoles.size:
            pos_y, pos_x = subpixel_peak(filtered, found.pos_y[keep][dipoles],
                                         found.pos_x[keep][dipoles], np.ones(dipoles.size))
            neg_y, neg_x = subpixel_peak(filtered, found.neg_y[keep][dipoles],
                                         found.neg_x[keep][dipoles], -np.ones(dipoles.size))
            lobes[dipoles] = np.column_stack([pos_x, pos_y, neg_x, neg_y])
            x[dipoles], y[dipoles] = 0.5 * (pos_x + neg_x), 0.5 * (pos_y + neg_y)
        return cls(kind=kind, footprint=footprint, group_size=group_size, peak_y=peak_y,
                   peak_x=peak_x, nu=peak_nu.astype(float), x=x, y=y, lobes=lobes,
                   pixel_y=found.pixel_y[pixel_keep], pixel_x=found.pixel_x[pixel_keep],
                   pixel_source=new_index[found.pixel_source[pixel_keep]],
                   n_detections=int(kind.size))

    def __len__(self) -> int:
        return int(self.kind.size)

    @property
    def is_sky(self) -> np.ndarray:
        return self.kind == _KIND_SKY

    @property
    def point_like(self) -> np.ndarray:
        return (self.kind == 1) | (self.kind == -1)

    def append(self, **arrays) -> None:
        """Append sources (all per-source fields given) and their footprint pixels."""
        offset = len(self)
        for name in ("kind", "footprint", "group_size", "peak_y", "peak_x", "nu", "x", "y",
                     "lobes"):
            setattr(self, name, np.concatenate([getattr(self, name), arrays[name]]))
        self.pixel_y = np.concatenate([self.pixel_y, arrays["pixel_y"]])
        self.pixel_x = np.concatenate([self.pixel_x, arrays["pixel_x"]])
        self.pixel_source = np.concatenate([self.pixel_source, arrays["pixel_source"] + offset])
        self._order = None

    def pixels_of(self, row: int) -> np.ndarray:
        """Indices (into the pixel lists) of the footprint pixels of source ``row``."""
        if self._order is None:
            self._order = np.argsort(self.pixel_source, kind="stable")
            self._sorted = self.pixel_source[self._order]
        lo, hi = np.searchsorted(self._sorted, [row, row + 1])
        return self._order[lo:hi]

    def footprint_box(self, row: int, margin: int, shape) -> tuple[int, int, int, int] | None:
        """``(y0, y1, x0, x1)`` of the footprint grown by ``margin``, clipped to the image."""
        pix = self.pixels_of(row)
        if pix.size == 0:
            return None
        py, px = self.pixel_y[pix], self.pixel_x[pix]
        return (max(int(py.min()) - margin, 0), min(int(py.max()) + margin + 1, shape[0]),
                max(int(px.min()) - margin, 0), min(int(px.max()) + margin + 1, shape[1]))


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._last, 4)
        self._last = now


# ---------------------------------------------------------------------------------------------
# Steps 1-6: preparation, background, detection, streaks, sky sources.
# ---------------------------------------------------------------------------------------------


def _check_inputs(difference: Exposure, others: dict[str, Exposure | None]) -> None:
    if not isinstance(difference, Exposure):
        raise BadInputDataError(f"difference must be an Exposure, got {type(difference).__name__}")
    if difference.psf is None:
        raise BadInputDataError(
            "the difference exposure has no PSF; detection needs it for the matched filter and "
            "PSF photometry (attach the science PSF, e.g. difference.replace(psf=science.psf))")
    for name, exposure in others.items():
        if exposure is None:
            continue
        if not isinstance(exposure, Exposure):
            raise BadInputDataError(f"{name} must be an Exposure, got {type(exposure).__name__}")
        if exposure.shape != difference.shape or exposure.origin != difference.origin:
            raise BadInputDataError(
                f"{name} covers {exposure.shape} at origin {exposure.origin} but the difference "
                f"covers {difference.shape} at {difference.origin}; pass images on the same pixel "
                "grid")


def _arrays(exposure: Exposure):
    """Writable float32 / uint32 copies of an exposure's planes."""
    image, variance, mask = exposure.compute().arrays()
    return (np.array(image, dtype=np.float32), np.array(variance, dtype=np.float32),
            np.array(mask, dtype=np.uint32))


def _sanitize(image, variance, mask):
    """Flag non-finite / negative-variance pixels NO_DATA and zero NO_DATA pixels in place."""
    bad = ~np.isfinite(image) | ~np.isfinite(variance) | (variance < 0)
    if bad.any():
        mask[bad] |= np.uint32(mask_value("NO_DATA"))
    nodata = plane_set(mask, "NO_DATA")
    np.copyto(image, 0.0, where=nodata)
    np.copyto(variance, 0.0, where=nodata)
    return nodata


def _direct_pixels(image, variance, mask, bad_planes, inside=True):
    """Data and inverse-variance weight (float64) of raw science or template pixels.

    Only the pixels a fit reads (stamps or boxes) are cleaned, rather than the
    whole image: a pixel is unusable when non-finite, of non-positive variance,
    off the image (``inside`` False) or in ``bad_planes`` / NO_DATA; its weight
    and its data are then 0 (what sanitising the whole image gave).
    """
    image = np.asarray(image, dtype=float)
    variance = np.asarray(variance, dtype=float)
    bad_bits = np.uint32(mask_value(tuple(bad_planes) + ("NO_DATA",)))
    usable = (inside & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
              & ((mask & bad_bits) == 0))
    weight = np.where(usable, 1.0 / np.where(usable, variance, 1.0), 0.0)
    return np.where(usable, image, 0.0), weight


def _set_border(mask: np.ndarray, width: int, plane: str) -> None:
    if width <= 0:
        return
    bit = np.uint32(mask_value(plane))
    mask[:width, :] |= bit
    mask[-width:, :] |= bit
    mask[:, :width] |= bit
    mask[:, -width:] |= bit


def _zeroed(array, planes: _Planes):
    """``array`` with excluded pixels zeroed (NO_DATA pixels are zero already)."""
    return np.where(planes.excluded, np.float32(0), array) if planes.has_exclusions else array


def _ratio(numerator, denominator):
    """``numerator / denominator`` where the denominator is positive, else 0 (float32)."""
    out = np.zeros(numerator.shape, dtype=np.float32)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _prepare(difference: Exposure, config: DetectAndMeasureConfig):
    det_cfg = config.detection
    image, variance, mask = _arrays(difference)
    mask &= ~np.uint32(mask_value(_DETECTION_PLANES + ("STREAK",)))
    nodata = _sanitize(image, variance, mask)
    if nodata.all():
        raise BadInputDataError(
            "the difference image has no usable pixel (all NO_DATA or non-finite)")
    psf = difference.psf
    x_centre, y_centre = difference.center
    fwhm = float(psf.fwhm(x_centre, y_centre))
    kernel = make_smoothing_kernel(psf, x_centre, y_centre, kind=det_cfg.smoothing,
                                   width_sigma=det_cfg.kernel_width_sigma,
                                   max_rank=det_cfg.smoothing_max_rank,
                                   tolerance=det_cfg.smoothing_tolerance)
    # EDGE set by the subtraction marks its invalid border band (convolution, decorrelation or
    # score filters running off the image): those pixels ring, so they are zeroed before the
    # matched filter (which would otherwise spread the ringing inwards) and never thresholded.
    # The detection's own EDGE border, set next, is only a flag: its pixels are valid.
    band = plane_set(mask, "EDGE")
    excluded = nodata | band | plane_set(mask, det_cfg.exclude_planes)
    if det_cfg.mask_edge:
        _set_border(mask, kernel.half_width, "EDGE")
    planes = _Planes(
        image=image, variance=variance, mask=mask, nodata=nodata, excluded=excluded, psf=psf,
        origin=difference.origin, fwhm=fwhm,
        grow_radius=int(det_cfg.grow_sigma * fwhm / FWHM_PER_SIGMA + 0.5),
        half=max(3, int(math.ceil(config.measurement.psf_fit_radius_fwhm * fwhm))),
        has_exclusions=bool((excluded & ~nodata).any()),
        band=band if band.any() else None)
    return planes, kernel


@dataclasses.dataclass
class _ScorePlanes:
    """The score image being processed: planes, invalid pixels, its own background."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    invalid: np.ndarray
    background: object = None


def _score_planes(score: Exposure, planes: _Planes) -> _ScorePlanes:
    """Sanitised score planes; pixels without a valid score get zero image and variance.

    A score pixel is invalid where it is NO_DATA or EDGE (the subtraction's filters ran off
    the image) or where the difference pixel is excluded. The score's EDGE band is also
    flagged on the difference, so sources centred there are dropped.
    """
    s_image, s_variance, s_mask = _arrays(score)
    s_nodata = _sanitize(s_image, s_variance, s_mask)
    invalid = s_nodata | planes.excluded | plane_set(s_mask, "EDGE")
    s_image[invalid] = 0.0
    s_variance[invalid] = 0.0
    planes.mask |= s_mask & np.uint32(mask_value("EDGE"))
    return _ScorePlanes(image=s_image, variance=s_variance, mask=s_mask, invalid=invalid)


def _polarities(config: DetectAndMeasureConfig) -> tuple[int, ...]:
    return {"both": (1, -1), "positive": (1,), "negative": (-1,)}[config.detection.polarity]


def _subtract_background(planes: _Planes, kernel: SmoothingKernel,
                         config: DetectAndMeasureConfig, score: _ScorePlanes | None,
                         workers: int):
    """Two-pass background; returns it, ``D ⋆ K`` of the input and ``sqrt(V ⋆ K²)``.

    The two correlations and the first-pass background are independent: with
    two or more ``workers`` they run at once (the libraries release the GIL).
    With a score image the passes run on the score instead (see
    :func:`_subtract_score_background`) and no correlation is needed.
    """
    bg_cfg = config.background
    if score is not None:
        if not bg_cfg.enabled:
            return None, None, None
        return _subtract_score_background(planes, score, config, workers), None, None

    def noise_image():
        noise = correlate_separable(_zeroed(planes.variance, planes), kernel.squared_terms)
        np.clip(noise, 0.0, None, out=noise)
        return np.sqrt(noise, out=noise)

    def raw_image():
        return correlate_separable(_zeroed(planes.image, planes), kernel.terms)

    def first_pass():
        # (D - B) ⋆ K = D ⋆ K - B ⋆ K, with B ⋆ K folded into the interpolation (cheap).
        # Where pixels are zeroed this misses B ⋆ K over them; this pass only masks sources.
        first = _background(planes.image, planes.variance, planes.mask, bg_cfg,
                            bg_cfg.initial_bin_size)
        return first.filtered(kernel.terms)

    jobs = ([first_pass] if bg_cfg.enabled else []) + [noise_image, raw_image]
    results = run_concurrently(jobs, workers)
    noise, raw = results[-2:]
    if not bg_cfg.enabled:
        return None, raw, noise
    temp_mask = _mask_first_pass(planes, _ratio(raw - results[0], noise), config)
    background = _background(planes.image, planes.variance, temp_mask, bg_cfg,
                             bg_cfg.final_bin_size, _DETECTION_PLANES, workers)
    planes.image -= background.image
    np.copyto(planes.image, 0.0, where=planes.nodata)
    return background, raw, noise


def _background(image, variance, mask, bg_cfg, bin_size, extra_planes=(), workers=1):
    return estimate_background(image, variance, mask, bin_size=bin_size,
                               ignore_planes=tuple(bg_cfg.ignore_planes) + tuple(extra_planes),
                               min_valid_fraction=bg_cfg.min_valid_fraction,
                               filter_size=bg_cfg.filter_size, workers=workers)


def _mask_first_pass(planes: _Planes, nu_first, config) -> np.ndarray:
    """A copy of the mask with the grown first-pass detections in DETECTED(_NEGATIVE)."""
    det_cfg = config.detection
    temp_mask = planes.mask.copy()
    flat_mask = temp_mask.ravel()
    for sign, plane in zip((1, -1), _DETECTION_PLANES):
        if sign in _polarities(config):
            above = threshold_pixels(nu_first, det_cfg.threshold, sign, det_cfg.min_pixels)
            flat_mask[grow_pixels(above, planes.shape, planes.grow_radius)] |= np.uint32(
                mask_value(plane))
    return temp_mask


def _subtract_score_background(planes: _Planes, score: _ScorePlanes, config,
                               workers: int):
    """Two-pass background of a score image, fitted on the score itself.

    A score is the difference correlated with a matched (and decorrelating)
    filter φ and divided by its noise: a smooth difference background ``B``
    appears in it as ``(B ⋆ φ) / σ_score``. That is what a median background of
    the score measures directly, with the score's own noise (unit variance,
    correlated over the PSF): no noise model is involved. Converting ``B``
    through the difference's per-pixel variance instead (``(B ⋆ K) / sqrt(V ⋆
    K²)``) is wrong for a preconvolved difference or S_corr, whose noise is
    already correlated: ``V ⋆ K²`` then underestimates the filtered noise
    several-fold and the background's own noise is amplified into the score.

    The first pass (score minus a bin-``initial_bin_size`` score background,
    thresholded in units of the score's noise) masks sources for the final
    passes; the final bin-``final_bin_size`` backgrounds of the difference (for
    measurement) and of the score (for detection) ignore those pixels.
    Returns the difference's background; the score's is kept in ``score``.
    """
    bg_cfg = config.background
    s_mask = planes.mask | score.mask
    first = _background(score.image, score.variance, s_mask, bg_cfg, bg_cfg.initial_bin_size,
                        workers=workers)
    s_sigma = np.sqrt(score.variance)
    temp_mask = _mask_first_pass(planes, _ratio(score.image - first.image, s_sigma), config)
    del first, s_sigma
    s_mask |= temp_mask
    background, score.background = run_concurrently([
        functools.partial(_background, planes.image, planes.variance, temp_mask, bg_cfg,
                          bg_cfg.final_bin_size, _DETECTION_PLANES),
        functools.partial(_background, score.image, score.variance, s_mask, bg_cfg,
                          bg_cfg.final_bin_size, _DETECTION_PLANES)], workers)
    planes.image -= background.image
    np.copyto(planes.image, 0.0, where=planes.nodata)
    score.image -= score.background.image
    score.image[score.invalid] = 0.0
    return background


def _detection_image(planes: _Planes, kernel, background, raw, noise,
                     score: _ScorePlanes | None, config):
    """The filtered image (for sub-pixel peaks) and the significance ν.

    ν is zero on the subtraction's invalid EDGE band, so nothing is detected there.
    """
    if score is not None:
        _, _, nu = significance(score.image, score.variance, None)
        return score.image, nu
    if background is None:
        filtered = raw
    elif not planes.excluded.any():
        # No zeroed pixel: (D - B) ⋆ K = D ⋆ K - B ⋆ K exactly, and B ⋆ K is cheap.
        filtered = raw - background.filtered(kernel.terms)
    else:
        filtered = correlate_separable(_zeroed(planes.image, planes), kernel.terms)
    nu = _ratio(filtered, noise)
    if planes.band is not None:
        nu[planes.band] = 0.0
    return filtered, nu


def _detect(planes: _Planes, nu: np.ndarray, config: DetectAndMeasureConfig):
    det_cfg = config.detection
    thresholded = {sign: threshold_pixels(nu, det_cfg.threshold, sign, det_cfg.min_pixels)
                   for sign in _polarities(config)}
    found = build_sources(
        nu, thresholded.get(1), thresholded.get(-1), grow_radius=planes.grow_radius,
        min_separation=det_cfg.min_peak_separation_fwhm * planes.fwhm,
        min_contrast=det_cfg.min_peak_contrast,
        min_contrast_fraction=det_cfg.min_peak_contrast_fraction,
        max_peaks=det_cfg.max_peaks_per_footprint,
        dipole_link_distance=det_cfg.dipole_link_fwhm * planes.fwhm,
        dipole_max_gap=det_cfg.dipole_max_gap_fwhm * planes.fwhm)
    flat_mask = planes.mask.ravel()
    flat_mask[found.detected_positive] |= np.uint32(mask_value("DETECTED"))
    flat_mask[found.detected_negative] |= np.uint32(mask_value("DETECTED_NEGATIVE"))
    return found


def _mask_streaks(planes: _Planes, config: DetectAndMeasureConfig) -> list:
    st = config.streaks
    if not st.enabled:
        return []
    streak_mask, streaks = find_streaks(
        planes.image, planes.variance,
        ~planes.excluded if planes.has_exclusions else None, psf_fwhm=planes.fwhm,
        bin_factor=st.bin_factor, threshold=st.threshold, min_length=st.min_length,
        min_aspect=st.min_aspect, line_tolerance=st.line_tolerance, width_sigma=st.width_sigma,
        mask_full_line=st.mask_full_line, max_streaks=st.max_streaks)
    if streaks:
        planes.mask[streak_mask] |= np.uint32(mask_value("STREAK"))
    return streaks


def _add_sky_sources(src: _Sources, planes: _Planes, nu, config, info) -> None:
    sky_cfg = config.sky_sources
    rng = np.random.default_rng([sky_cfg.seed, max(int(info.visit), 0),
                                 max(int(info.detector), 0)])
    sky_y, sky_x = place_sky_sources(planes.mask, n_sources=sky_cfg.n_sources,
                                     radius=sky_cfg.radius, avoid_planes=sky_cfg.avoid_planes,
                                     rng=rng)
    n_sky = sky_y.size
    dy, dx = disk_offsets(sky_cfg.radius)
    src.append(kind=np.full(n_sky, _KIND_SKY), footprint=np.zeros(n_sky, np.int64),
               group_size=np.ones(n_sky, np.int64), peak_y=sky_y, peak_x=sky_x,
               nu=nu[sky_y, sky_x].astype(float), x=sky_x.astype(float), y=sky_y.astype(float),
               lobes=np.full((n_sky, 4), np.nan),
               pixel_y=(sky_y[:, None] + dy[None, :]).ravel(),
               pixel_x=(sky_x[:, None] + dx[None, :]).ravel(),
               pixel_source=np.repeat(np.arange(n_sky), dy.size))


# ---------------------------------------------------------------------------------------------
# Step 7: measurement. Each helper fills catalog columns (counts, before calibration).
# ---------------------------------------------------------------------------------------------


def _weights(variance_stamps, unusable_stamps, inside):
    usable = inside & (variance_stamps > 0) & ~unusable_stamps
    return np.where(usable, 1.0 / np.where(usable, variance_stamps, 1.0), 0.0)


def _box_data(image, variance, unusable, box):
    """``(image, weight)`` cut to ``box``; weight = 1/variance, 0 where unusable."""
    y0, y1, x0, x1 = box
    var = variance[y0:y1, x0:x1].astype(float)
    ok = (var > 0) & ~unusable[y0:y1, x0:x1]
    return image[y0:y1, x0:x1].astype(float), np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)


def _blend_clusters(x, y, footprint_id, candidates, distance):
    """Cluster id (-1: none) of siblings of one footprint closer than ``distance``."""
    cluster = np.full(x.size, -1, dtype=np.int64)
    rows = np.flatnonzero(candidates)
    if rows.size < 2:
        return cluster
    tree = cKDTree(np.column_stack([x[rows], y[rows]]))
    pairs = tree.query_pairs(distance, output_type="ndarray")
    pairs = pairs[footprint_id[rows[pairs[:, 0]]] == footprint_id[rows[pairs[:, 1]]]]
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                              shape=(rows.size, rows.size))
    _, labels = csgraph.connected_components(graph, directed=False)
    cluster[rows] = labels
    return cluster


def _fit_centroids(planes: _Planes, src: _Sources, stamps: PsfStamps, config, columns):
    """Centroids of point sources; returns the mask of jointly fitted (blended) sources.

    Deblended siblings whose stamps overlap are fitted jointly (clusters of at
    most ``_MAX_JOINT``), which also gives their PSF fluxes; all other point
    sources are refined alone, in one batch. Dipole candidates keep the
    midpoint of their lobes (the dipole fit refines it; unconfirmed dipoles move to
    their dominant lobe, :func:`_resolve_unconfirmed_dipoles`) and sky sources their
    placement.
    """
    meas_cfg = config.measurement
    planes.unusable = plane_set(planes.mask, tuple(meas_cfg.fit_bad_planes) + ("NO_DATA",))
    n = len(src)
    for name, fill, dtype in (("xErr", np.nan, float), ("yErr", np.nan, float),
                              ("centroid_flag", False, bool), ("psfFlux", np.nan, float),
                              ("psfFluxErr", np.nan, float), ("psfChi2", np.nan, float),
                              ("psfNdata", 0, np.int64)):
        columns[name] = np.full(n, fill, dtype=dtype)
    point_like = src.point_like
    cluster = _blend_clusters(src.x, src.y, src.footprint, point_like & (src.group_size > 1),
                              2 * planes.half + 1)
    cluster_size = np.bincount(cluster + 1)[cluster + 1]
    joint = point_like & (cluster >= 0) & (cluster_size > 1) & (cluster_size <= _MAX_JOINT)
    single = np.flatnonzero(point_like & ~joint)
    if single.size:
        (src.x[single], src.y[single], columns["xErr"][single], columns["yErr"][single],
         columns["centroid_flag"][single]) = refine_centroids(
            planes.stamp_data, stamps, src.x[single], src.y[single],
            iterations=meas_cfg.centroid_iterations, max_shift=meas_cfg.max_centroid_shift)
    joint_rows = np.flatnonzero(joint)
    for c in np.unique(cluster[joint_rows]):
        rows = joint_rows[cluster[joint_rows] == c]
        results = fit_blend(planes.image, planes.variance, planes.unusable, stamps, src.x[rows],
                            src.y[rows], iterations=max(meas_cfg.centroid_iterations, 1),
                            max_shift=meas_cfg.max_centroid_shift)
        src.x[rows], src.y[rows] = results[0], results[1]
        for name, values in zip(("xErr", "yErr", "psfFlux", "psfFluxErr", "psfChi2", "psfNdata",
                                 "centroid_flag"), results[2:]):
            columns[name][rows] = values
    return joint


def _fit_dipoles(planes: _Planes, src: _Sources, config, science, matched_template,
                 columns) -> int:
    """Dipole fits of two-sign footprints; returns the number of fits."""
    n = len(src)
    for name in ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr",
                 "dipoleSep", "dipoleAngle", "dipoleChi2"):
        columns[name] = np.full(n, np.nan)
    columns["dipoleNdata"] = np.zeros(n, dtype=np.int64)
    columns["isDipole"] = np.zeros(n, dtype=bool)
    columns["dipoleFitAttempted"] = np.zeros(n, dtype=bool)
    dip_cfg = config.dipole
    rows = np.flatnonzero(src.kind == 0)
    if rows.size == 0 or not dip_cfg.enabled:
        return 0
    direct = None
    psf = planes.psf
    psfs = (psf, psf, psf)
    bad = config.measurement.fit_bad_planes
    if science is not None and matched_template is not None and dip_cfg.direct_image_weight > 0:
        direct = [science.arrays(), matched_template.arrays()]
        psfs = (psf, science.psf or psf, matched_template.psf or psf)
    n_fits = 0
    for row in rows:
        if src.pixels_of(row).size > dip_cfg.max_footprint_area:
            continue
        box = src.footprint_box(row, 2, planes.shape)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        boxes = [_box_data(planes.image, planes.variance, planes.unusable, box)]
        if direct is not None:
            boxes += [_direct_pixels(*(plane[y0:y1, x0:x1] for plane in arrays), bad)
                      for arrays in direct]
        else:
            boxes += [None, None]
        xp, yp, xn, yn = src.lobes[row]
        fit = fit_dipole(boxes[0], boxes[1], boxes[2], psfs=psfs,
                         origin=(planes.origin[0] + x0, planes.origin[1] + y0),
                         start=(xp - x0, yp - y0, xn - x0, yn - y0),
                         direct_weight=dip_cfg.direct_image_weight,
                         max_evaluations=dip_cfg.max_evaluations)
        n_fits += 1
        values = {"dipoleMeanFlux": fit.mean_flux, "dipoleMeanFluxErr": fit.mean_flux_err,
                  "dipoleFluxDiff": fit.flux_diff, "dipoleFluxDiffErr": fit.flux_diff_err,
                  "dipoleSep": fit.separation, "dipoleAngle": fit.angle,
                  "dipoleChi2": fit.chi2_dof, "dipoleNdata": fit.n_data,
                  "dipoleFitAttempted": True,
                  "isDipole": classify_dipole(
                      fit, psf_sigma=planes.psf_sigma, min_snr=dip_cfg.min_snr,
                      max_lobe_fraction=dip_cfg.max_lobe_fraction,
                      max_separation_sigma=dip_cfg.max_separation_sigma)}
        for name, value in values.items():
            columns[name][row] = value
        if fit.converged:
            # The source position of a dipole is the midpoint of its lobes.
            src.x[row], src.y[row] = fit.x + x0, fit.y + y0
            columns["xErr"][row], columns["yErr"][row] = fit.x_err, fit.y_err
    return n_fits


def _resolve_unconfirmed_dipoles(planes: _Planes, src: _Sources, stamps: PsfStamps, config,
                                 columns) -> None:
    """Two-sign footprints not confirmed as dipoles become single-sign sources.

    Their lobes are unrelated (a transient next to a residual of the other
    sign) or one of them is noise, so the midpoint of the lobes describes
    nothing: the source takes the sign of its more significant peak, its
    centroid is refined from that lobe's position as a point source's, and the
    PSF flux is then measured there. The dipole-fit columns keep the fit.
    """
    rows = np.flatnonzero((src.kind == 0) & ~columns["isDipole"])
    if rows.size == 0:
        return
    sign = np.where(src.nu[rows] >= 0, 1, -1)
    lobes = src.lobes[rows]
    start_x = np.where(sign > 0, lobes[:, 0], lobes[:, 2])
    start_y = np.where(sign > 0, lobes[:, 1], lobes[:, 3])
    meas_cfg = config.measurement
    (src.x[rows], src.y[rows], columns["xErr"][rows], columns["yErr"][rows],
     columns["centroid_flag"][rows]) = refine_centroids(
        planes.stamp_data, stamps, start_x, start_y, iterations=meas_cfg.centroid_iterations,
        max_shift=meas_cfg.max_centroid_shift)
    src.kind[rows] = sign


def _photometry(planes: _Planes, src: _Sources, stamps: PsfStamps, joint, config,
                columns) -> None:
    """PSF fluxes (batched, except jointly fitted siblings) and aperture fluxes."""
    batch = np.flatnonzero(~joint)
    if batch.size:
        ix, iy = np.rint(src.x[batch]).astype(int), np.rint(src.y[batch]).astype(int)
        data, weight = planes.stamp_data(ix, iy)
        (columns["psfFlux"][batch], columns["psfFluxErr"][batch], columns["psfChi2"][batch],
         columns["psfNdata"][batch]) = fit_linear_flux(
            data, weight, stamps.render(src.x[batch], src.y[batch]))
    columns["psfFlux_flag"] = ~np.isfinite(columns["psfFlux"]) | (columns["psfNdata"] == 0)
    columns["apFlux"], columns["apFluxErr"], columns["apFlux_flag"] = aperture_flux(
        planes.image, planes.variance, planes.unusable, src.x, src.y,
        config.measurement.aperture_radius)


def _moments(planes: _Planes, src: _Sources, stamps: PsfStamps, config, columns) -> None:
    """Adaptive moments of sources and PSF, and extendedness."""
    n = len(src)
    psf_moments = np.asarray(
        stamps.moments(src.x + planes.origin[0], src.y + planes.origin[1]),
        dtype=float).reshape(n, 3)
    moments = np.full((n, 3), np.nan)
    shape_flag = np.ones(n, dtype=bool)
    measurable = np.flatnonzero(src.kind != 0)
    if measurable.size:
        x, y = src.x[measurable], src.y[measurable]
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        data, inside = gather(planes.image, iy, ix, planes.half_moments)
        bad, _ = gather(planes.unusable, iy, ix, planes.half_moments, fill=True)
        # Negative sources are measured on the flipped image.
        sign = np.where(np.nan_to_num(columns["psfFlux"][measurable]) < 0, -1.0, 1.0)
        moments[measurable], shape_flag[measurable] = adaptive_moments(
            sign[:, None, None] * data.astype(float), inside & ~bad, x - ix, y - iy,
            psf_moments[measurable], max_iterations=config.measurement.moments_max_iterations)
    det_src = moments[:, 0] * moments[:, 1] - moments[:, 2] ** 2
    det_psf = psf_moments[:, 0] * psf_moments[:, 1] - psf_moments[:, 2] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        area_ratio = np.sqrt(det_src / det_psf)
    columns["extendedness"] = np.where(
        np.isfinite(area_ratio),
        (area_ratio > config.measurement.extendedness_area_ratio).astype(float), np.nan)
    for k, name in enumerate(("ixx", "iyy", "ixy")):
        columns[name] = moments[:, k]
        columns[name + "PSF"] = psf_moments[:, k]
    columns["shape_flag"] = shape_flag


def _principal_axes(xx, yy, xy):
    """Major and minor variances and the major-axis angle (degrees) of 2x2 moments."""
    mean = 0.5 * (xx + yy)
    spread = np.sqrt((0.5 * (xx - yy)) ** 2 + xy**2)
    return mean + spread, mean - spread, np.degrees(0.5 * np.arctan2(2 * xy, xx - yy))


def _footprint_axes(src: _Sources):
    """Major and minor variances of each source's footprint pixel coordinates."""
    n, s = len(src), src.pixel_source
    safe = np.maximum(np.bincount(s, minlength=n).astype(float), 1.0)
    my = np.bincount(s, src.pixel_y, minlength=n) / safe
    mx = np.bincount(s, src.pixel_x, minlength=n) / safe
    dy, dx = src.pixel_y - my[s], src.pixel_x - mx[s]
    cyy = np.bincount(s, dy * dy, minlength=n) / safe + 1 / 12
    cxx = np.bincount(s, dx * dx, minlength=n) / safe + 1 / 12
    cxy = np.bincount(s, dx * dy, minlength=n) / safe
    major, minor, _ = _principal_axes(cxx, cyy, cxy)
    return major, np.maximum(minor, 1e-12)


def _fit_trails(planes: _Planes, src: _Sources, config, columns) -> int:
    """Trail fits of elongated point-like detections; returns the number of fits."""
    n = len(src)
    for name in ("trailFlux", "trailFluxErr", "trailLength", "trailAngle", "trailX", "trailY"):
        columns[name] = np.full(n, np.nan)
    columns["trail_flag"] = np.zeros(n, dtype=bool)
    tr = config.trail
    if not tr.enabled or n == 0:
        return 0
    fwhm = planes.fwhm
    major, minor, angle_est = _principal_axes(columns["ixx"], columns["iyy"], columns["ixy"])
    psf_major, _, _ = _principal_axes(columns["ixxPSF"], columns["iyyPSF"], columns["ixyPSF"])
    fp_major, fp_minor = _footprint_axes(src)
    with np.errstate(invalid="ignore", divide="ignore"):
        length_est = np.sqrt(12.0 * np.clip(major - psf_major, 0.0, None))
        axis_ratio = np.sqrt(major / minor)
        fp_aspect = np.sqrt(fp_major / fp_minor)
        fp_excess = np.sqrt(12 * fp_major) - np.sqrt(12 * fp_minor)
        # Moment distortion and its noise: σ_e = 2 / (S/N) per component for a point source
        # measured with adaptive moments, so noise alone elongates faint sources.
        distortion = (major - minor) / (major + minor)
        snr = np.abs(columns["psfFlux"] / columns["psfFluxErr"])
    elongated = (~columns["shape_flag"] & (axis_ratio >= tr.min_axis_ratio)
                 & (length_est >= tr.min_length_fwhm * fwhm)
                 & (distortion * snr >= 2.0 * tr.min_elongation_significance))
    # Long trails can defeat adaptive moments on the stamp; the footprint shape still shows
    # (only for undivided footprints: child footprints of a blend are arbitrary polygons).
    # (Not for two-sign footprints resolved to one lobe: their footprint spans both lobes.)
    single_sign = np.isnan(src.lobes[:, 0])
    elongated |= ((src.group_size == 1) & single_sign & (fp_aspect >= tr.min_footprint_aspect)
                  & (fp_excess >= tr.min_length_fwhm * fwhm))
    candidates = np.flatnonzero(src.point_like & (np.abs(src.nu) >= tr.min_snr) & elongated)
    length_est = np.nan_to_num(length_est)
    angle_est = np.nan_to_num(angle_est)
    # The grown footprint overshoots the trail by the growth and about a FWHM at each end.
    fp_length = np.sqrt(12 * fp_major) - 2 * planes.grow_radius - fwhm
    n_fits = 0
    for row in candidates:
        if src.pixels_of(row).size > tr.max_footprint_area:
            continue
        box = src.footprint_box(row, planes.half, planes.shape)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        image_box, weight_box = _box_data(planes.image, planes.variance, planes.unusable, box)
        fit = fit_trail((0, y1 - y0, 0, x1 - x0), image_box, weight_box, psf=planes.psf,
                        origin=(planes.origin[0] + x0, planes.origin[1] + y0),
                        start=(src.x[row] - x0, src.y[row] - y0,
                               max(length_est[row], fp_length[row], fwhm), angle_est[row]),
                        max_length=tr.max_length, max_evaluations=tr.max_evaluations)
        n_fits += 1
        for name, value in (("trailFlux", fit.flux), ("trailFluxErr", fit.flux_err),
                            ("trailLength", fit.length), ("trailAngle", fit.angle),
                            ("trailX", fit.x + x0), ("trailY", fit.y + y0),
                            ("trail_flag", not fit.converged)):
            columns[name][row] = value
    return n_fits


def _forced_photometry(planes: _Planes, src: _Sources, config, science, matched_template,
                       columns) -> None:
    """Forced PSF photometry at the source positions on the science image and template."""
    n = len(src)
    for exposure, flux_name, flag_name in ((science, "scienceFlux", "forced_PsfFlux_flag"),
                                           (matched_template, "templateFlux",
                                            "forced_template_PsfFlux_flag")):
        columns[flux_name] = np.full(n, np.nan)
        columns[flux_name + "Err"] = np.full(n, np.nan)
        columns[flag_name] = np.ones(n, dtype=bool)
        if exposure is None or n == 0 or not config.measurement.forced_photometry:
            continue
        stamps = PsfStamps(exposure.psf or planes.psf, planes.half, planes.shape, planes.origin,
                           expected_renders=n)
        ix, iy = np.rint(src.x).astype(int), np.rint(src.y).astype(int)
        image, variance, mask = exposure.arrays()
        data, inside = gather(image, iy, ix, planes.half)
        var, _ = gather(variance, iy, ix, planes.half)
        bits, _ = gather(mask, iy, ix, planes.half)
        data, weight = _direct_pixels(data, var, bits, config.measurement.fit_bad_planes, inside)
        flux, err, _, n_data = fit_linear_flux(data, weight, stamps.render(src.x, src.y))
        ny, nx = planes.shape
        off = (ix < 0) | (iy < 0) | (ix >= nx) | (iy >= ny)
        columns[flux_name] = np.where(off, np.nan, flux)
        columns[flux_name + "Err"] = np.where(off, np.nan, err)
        columns[flag_name] = off | (n_data == 0) | ~np.isfinite(flux)


def _pixel_flags(planes: _Planes, src: _Sources, columns) -> None:
    """Pixel flags (centre 3x3 and footprint) and the footprint box size."""
    any_bits, all_bits, off_image = center_flags(planes.mask, src.x, src.y)
    fp_bits = footprint_flags(planes.mask, src.pixel_y, src.pixel_x, src.pixel_source,
                              len(src)) | any_bits
    columns["pixelFlags_offimage"] = off_image
    for stem, plane in PIXEL_FLAG_PLANES.items():
        bit = np.uint32(1 << MASK_PLANES[plane])
        columns[f"pixelFlags_{stem}"] = (fp_bits & bit) != 0
        columns[f"pixelFlags_{stem}Center"] = (any_bits & bit) != 0
        if stem in CENTER_ALL_PLANES:
            columns[f"pixelFlags_{stem}CenterAll"] = (all_bits & bit) != 0
    columns["pixelFlags_edge"] = columns["pixelFlags_edge"] | off_image
    columns["pixelFlags_edgeCenter"] = columns["pixelFlags_edgeCenter"] | off_image
    # Side of the square box, centred on the centroid, that encloses the footprint.
    bbox_size = np.zeros(len(src), dtype=np.int64)
    if src.pixel_source.size:
        order = np.argsort(src.pixel_source, kind="stable")
        owners_sorted = src.pixel_source[order]
        starts = np.flatnonzero(np.r_[True, owners_sorted[1:] != owners_sorted[:-1]])
        owners = owners_sorted[starts]
        for pixels, centre in ((src.pixel_x, src.x), (src.pixel_y, src.y)):
            values = pixels[order].astype(float)
            lo = np.minimum.reduceat(values, starts) - 0.5
            hi = np.maximum.reduceat(values, starts) + 0.5
            reach = np.maximum(np.abs(centre[owners] - lo), np.abs(hi - centre[owners]))
            bbox_size[owners] = np.maximum(bbox_size[owners], np.ceil(2 * reach).astype(int))
    columns["bboxSize"] = bbox_size


# ---------------------------------------------------------------------------------------------
# Step 8: catalog, footprint labels, metadata.
# ---------------------------------------------------------------------------------------------


def _sky_coordinates(wcs, x, y, x_err, y_err):
    """RA, Dec and their errors/covariance from a local linearisation of the WCS."""
    n = x.size
    if wcs is None or n == 0:
        return tuple(np.full(n, np.nan) for _ in range(5))
    # astropy's WCS is not thread-safe: work on a copy.
    w = copy.deepcopy(wcs)
    ra, dec = w.all_pix2world(x, y, 0)
    step = 0.5
    ra_x1, dec_x1 = w.all_pix2world(x + step, y, 0)
    ra_x0, dec_x0 = w.all_pix2world(x - step, y, 0)
    ra_y1, dec_y1 = w.all_pix2world(x, y + step, 0)
    ra_y0, dec_y0 = w.all_pix2world(x, y - step, 0)
    # RA differences wrapped to (-180, 180].
    d_ra_dx = ((ra_x1 - ra_x0 + 180.0) % 360.0 - 180.0) / (2 * step)
    d_ra_dy = ((ra_y1 - ra_y0 + 180.0) % 360.0 - 180.0) / (2 * step)
    d_dec_dx = (dec_x1 - dec_x0) / (2 * step)
    d_dec_dy = (dec_y1 - dec_y0) / (2 * step)
    vx, vy = x_err**2, y_err**2
    var_ra = d_ra_dx**2 * vx + d_ra_dy**2 * vy
    var_dec = d_dec_dx**2 * vx + d_dec_dy**2 * vy
    cov = d_ra_dx * d_dec_dx * vx + d_ra_dy * d_dec_dy * vy
    return ra, dec, np.sqrt(var_ra), np.sqrt(var_dec), cov


def _njy_per_count(exposure: Exposure | None, default: float) -> float:
    if exposure is None or exposure.photo_calib is None:
        return default
    return exposure.photo_calib.njy_per_count


def _catalog(planes: _Planes, src: _Sources, difference, science, matched_template, config,
             id_offset, columns):
    """Calibrate, add coordinates and ids, and apply the flag filters."""
    n = len(src)
    info = difference.info
    diff_scale = _njy_per_count(difference, 1.0)
    scales = {"scienceFlux": _njy_per_count(science, diff_scale),
              "templateFlux": _njy_per_count(matched_template, diff_scale)}
    for name in ("psfFlux", "apFlux", "dipoleMeanFlux", "dipoleFluxDiff", "trailFlux",
                 "scienceFlux", "templateFlux"):
        scale = scales.get(name, diff_scale)
        columns[name] = columns[name] * scale
        columns[name + "Err"] = columns[name + "Err"] * scale
    x_parent, y_parent = src.x + planes.origin[0], src.y + planes.origin[1]
    wcs = science.wcs if science is not None and science.wcs is not None else difference.wcs
    (columns["ra"], columns["dec"], columns["raErr"], columns["decErr"],
     columns["ra_dec_Cov"]) = _sky_coordinates(wcs, x_parent, y_parent, columns["xErr"],
                                               columns["yErr"])
    trail_x, trail_y = columns.pop("trailX"), columns.pop("trailY")
    fitted = np.flatnonzero(np.isfinite(trail_x))
    columns["trailRa"], columns["trailDec"] = np.full(n, np.nan), np.full(n, np.nan)
    if fitted.size:
        coords = _sky_coordinates(wcs, trail_x[fitted] + planes.origin[0],
                                  trail_y[fitted] + planes.origin[1], np.zeros(fitted.size),
                                  np.zeros(fitted.size))
        columns["trailRa"][fitted], columns["trailDec"][fitted] = coords[0], coords[1]
    is_sky = src.is_sky
    columns.update({
        "diaSourceId": np.zeros(n, dtype=np.int64),
        "visit": np.full(n, int(info.visit), dtype=np.int64),
        "detector": np.full(n, int(info.detector), dtype=np.int16),
        "band": [info.band] * n,
        "midpointMjdTai": np.full(n, float(info.mjd)),
        "x": x_parent, "y": y_parent,
        "snr": np.where(is_sky, src.nu, np.abs(src.nu)),
        "isNegative": src.kind == -1,
        "isSky": is_sky,
    })
    catalog = catalog_from_columns(columns, n)
    keep_rows, dropped, n_removed = drop_flagged(catalog, config.filters.drop_flags)
    catalog = catalog.loc[keep_rows].reset_index(drop=True)
    catalog["diaSourceId"] = make_dia_source_id(
        int(info.visit), int(info.detector), id_offset + np.arange(len(catalog), dtype=np.int64))
    return catalog, dropped, n_removed, keep_rows


def _label_image(shape, src: _Sources, keep_rows) -> np.ndarray:
    """Footprint labels: ``k`` on the pixels of ``catalog.iloc[k - 1]``."""
    footprints = np.zeros(shape, dtype=np.int32)
    new_label = np.zeros(len(src), dtype=np.int32)
    new_label[keep_rows] = np.arange(1, int(keep_rows.sum()) + 1, dtype=np.int32)
    py, px = src.pixel_y, src.pixel_x
    inside = (py >= 0) & (py < shape[0]) & (px >= 0) & (px < shape[1])
    footprints[py[inside], px[inside]] = new_label[src.pixel_source[inside]]
    return footprints


def _mask_fractions(mask):
    """``<PLANE>_mask_fraction`` for every plane, from one histogram of the set mask values."""
    n_bits = len(MASK_PLANES)
    flat = mask.ravel()
    values_set = flat[np.flatnonzero(flat)] & np.uint32((1 << n_bits) - 1)
    counts = np.bincount(values_set, minlength=1 << n_bits)
    values = np.arange(counts.size)
    return {f"{plane}_mask_fraction": float(counts[(values >> bit) & 1 == 1].sum() / mask.size)
            for plane, bit in MASK_PLANES.items()}


def _metadata(catalog, found, src: _Sources, planes: _Planes, kernel, background, streaks,
              config, has_score, flux_unit, dropped, n_removed, n_rejected, n_dipole_fits,
              n_trail_fits):
    real = ~catalog["isSky"].to_numpy(dtype=bool)
    sky_rows = catalog.loc[~real]
    sky_flux = sky_rows["psfFlux"].to_numpy(dtype=float)
    sky_err = sky_rows["psfFluxErr"].to_numpy(dtype=float)
    finite = np.isfinite(sky_flux) & np.isfinite(sky_err)
    sky_std = float(np.std(sky_flux[finite], ddof=1)) if finite.sum() > 1 else math.nan
    sky_err_mean = float(np.mean(sky_err[finite])) if finite.any() else math.nan
    is_dipole = catalog["isDipole"].to_numpy()
    metadata: dict[str, Any] = {
        "n_positive_footprints": found.n_positive_footprints,
        "n_negative_footprints": found.n_negative_footprints,
        "n_merged_footprints": found.n_merged_footprints,
        "n_detections": len(found),
        "n_rejected_bad_mask_planes": n_rejected,
        "n_removed_flagged": n_removed,
        **{f"dropped_{flag}": count for flag, count in dropped.items()},
        "n_dia_sources": int(real.sum()),
        "n_positive": int((real & (catalog["psfFlux"].to_numpy() > 0) & ~is_dipole).sum()),
        "n_negative": int((real & catalog["isNegative"].to_numpy()).sum()),
        "n_dipoles": int((real & is_dipole).sum()),
        "n_dipole_fits": n_dipole_fits,
        "n_trail_fits": n_trail_fits,
        "n_deblended": int((src.group_size[:src.n_detections] > 1).sum()),
        "n_sky_sources": int((~real).sum()),
        "sky_psf_flux_std": sky_std,
        "sky_psf_flux_err_mean": sky_err_mean,
        "sky_noise_ratio": sky_std / sky_err_mean if sky_err_mean > 0 else math.nan,
        "sky_snr_std": (float(np.std(sky_flux[finite] / sky_err[finite], ddof=1))
                        if finite.sum() > 1 else math.nan),
        "n_streaks": len(streaks),
        "n_pixels_detected_positive": int(found.detected_positive.size),
        "n_pixels_detected_negative": int(found.detected_negative.size),
        "threshold": config.detection.threshold,
        "smoothing": "none (score image)" if has_score else kernel.kind,
        "smoothing_rank": len(kernel.terms),
        "psf_fwhm": planes.fwhm,
        "grow_radius": planes.grow_radius,
        "psf_fit_half_width": planes.half,
        "flux_unit": flux_unit,
        "background_mean": background.mean if background is not None else 0.0,
        "background_rms": background.rms if background is not None else 0.0,
        "background_bins_filled": background.n_filled if background is not None else 0,
    }
    metadata.update(_mask_fractions(planes.mask))
    return metadata
