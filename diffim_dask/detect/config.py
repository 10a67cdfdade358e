"""Configuration of DIA source detection and measurement.

:class:`DetectAndMeasureConfig` is the top-level config; nested configs group
background removal, detection, streak masking, measurement, the dipole and
trail fits, sky sources and the source filters. Defaults follow the LSST
``DetectAndMeasureTask`` (``lsst-ip_diffim.md`` §8) unless a field's doc says
otherwise.

Examples
--------
>>> config = DetectAndMeasureConfig.from_dict({"detection": {"threshold": 6.0}})
>>> config.detection.threshold
6.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigBase, config_field
from ..errors import ConfigurationError
from ..masks import MASK_PLANES
from ..schema import CENTER_ALL_PLANES, PIXEL_FLAG_PLANES

__all__ = [
    "BackgroundConfig",
    "DetectionConfig",
    "StreakConfig",
    "MeasurementConfig",
    "DipoleConfig",
    "TrailConfig",
    "SkySourceConfig",
    "FilterConfig",
    "DetectAndMeasureConfig",
    "DROPPABLE_FLAGS",
]

_PLANES = tuple(MASK_PLANES)

#: Catalog flag columns that :attr:`FilterConfig.drop_flags` may name.
DROPPABLE_FLAGS: tuple[str, ...] = (
    ("pixelFlags_offimage", "centroid_flag", "psfFlux_flag")
    + tuple(f"pixelFlags_{stem}" for stem in PIXEL_FLAG_PLANES)
    + tuple(f"pixelFlags_{stem}Center" for stem in PIXEL_FLAG_PLANES)
    + tuple(f"pixelFlags_{stem}CenterAll" for stem in CENTER_ALL_PLANES)
)


@dataclass(frozen=True)
class BackgroundConfig(ConfigBase):
    """Two-pass background removal of the difference image (anchor §8.2 step 2)."""

    enabled: bool = config_field(True, "Fit and subtract a background from the difference image.")
    initial_bin_size: int = config_field(
        8, "Super-pixel side (pixels) of the first-pass background, fitted before the detection "
        "that masks sources for the final pass.", minimum=2)
    final_bin_size: int = config_field(
        40, "Super-pixel side (pixels) of the final background, fitted with DETECTED and "
        "DETECTED_NEGATIVE pixels ignored and subtracted from the difference.", minimum=2)
    ignore_planes: tuple[str, ...] = config_field(
        ("BAD", "EDGE", "NO_DATA"), "Mask planes ignored in both passes (the final pass also "
        "ignores DETECTED and DETECTED_NEGATIVE).", choices=_PLANES)
    min_valid_fraction: float = config_field(
        0.1, "Super-pixels with a smaller fraction of usable pixels take the value of the "
        "nearest valid super-pixel.", minimum=0.0, maximum=1.0)
    filter_size: int = config_field(
        3, "Side of the median filter applied to the super-pixel grid (1 disables).", minimum=1)


@dataclass(frozen=True)
class DetectionConfig(ConfigBase):
    """Matched-filter detection, footprint growth, merging and peak separation."""

    threshold: float = config_field(
        5.0, "Detection threshold in sigma of the matched-filter S/N image "
        "(image ⊗ K) / sqrt(variance ⊗ K²).", minimum=0.0, exclusive_minimum=True)
    polarity: str = config_field(
        "both", "Which signs to detect.", choices=("both", "positive", "negative"))
    smoothing: str = config_field(
        "psf", "Matched-filter kernel K: 'psf' (the difference PSF at the image centre, applied "
        "as a sum of separable terms from its SVD) or 'gaussian' (circular Gaussian with the "
        "PSF's sigma, as the anchor).", choices=("psf", "gaussian"))
    kernel_width_sigma: float = config_field(
        7.0, "Width of the smoothing kernel in PSF sigmas (made odd), as the anchor's "
        "nSigmaForKernel.", minimum=2.0)
    smoothing_max_rank: int = config_field(
        3, "Largest number of separable terms used for a non-separable PSF kernel.", minimum=1)
    smoothing_tolerance: float = config_field(
        5e-3, "Separable terms whose singular value is below this fraction of the largest are "
        "dropped.", minimum=0.0)
    grow_sigma: float = config_field(
        2.4, "Footprints are grown isotropically by int(grow_sigma * PSF sigma + 0.5) pixels.",
        minimum=0.0)
    min_pixels: int = config_field(
        1, "Smallest footprint (pixels above threshold, before growth).", minimum=1)
    min_peak_separation_fwhm: float = config_field(
        1.0, "Peaks of the same sign closer than this many PSF FWHM to a brighter peak of the "
        "same footprint are dropped.", minimum=0.0)
    min_peak_contrast: float = config_field(
        3.0, "A secondary peak is kept as its own source only if its S/N exceeds the lowest S/N "
        "on the straight line to the nearest brighter kept peak by this many sigma.", minimum=0.0)
    min_peak_contrast_fraction: float = config_field(
        0.1, "A secondary peak must also rise above that lowest S/N by this fraction of its own "
        "S/N, so noise on the ridge of a bright extended or trailed source does not split it "
        "(two equal point sources 1.5 FWHM apart dip by ~12%).", minimum=0.0, maximum=1.0)
    max_peaks_per_footprint: int = config_field(
        100, "Largest number of same-sign peaks kept (the brightest) in one footprint; bounds "
        "the work on pathological footprints such as a flooded image.", minimum=1)
    dipole_link_fwhm: float = config_field(
        2.0, "Kept peaks of opposite signs in one merged footprint are one source (a dipole "
        "candidate) when they are at most this many PSF FWHM apart and the significance runs "
        "monotonically between them (dipole lobes are ~1.2 FWHM apart); farther peaks stay "
        "separate sources unless their thresholded regions touch (dipole_max_gap_fwhm).",
        minimum=0.0)
    dipole_max_gap_fwhm: float = config_field(
        0.5, "Opposite-sign peaks farther apart than dipole_link_fwhm are still one source when "
        "the segment joining them runs below threshold for at most this many PSF FWHM (the "
        "touching lobes of a strong, widely separated dipole; at least one pixel is sampled "
        "below threshold at the zero crossing) and the significance is monotonic along it.",
        minimum=0.0)
    exclude_planes: tuple[str, ...] = config_field(
        (), "Pixels in these planes get zero image and variance before filtering (NO_DATA "
        "and non-finite pixels always do).", choices=_PLANES)
    mask_edge: bool = config_field(
        True, "Set EDGE within half the smoothing-kernel width of the image border, where the "
        "filter runs off the image (anchor behaviour).")


@dataclass(frozen=True)
class StreakConfig(ConfigBase):
    """Masking of long linear features (satellite trails) in the STREAK plane."""

    enabled: bool = config_field(True, "Detect streaks and set the STREAK plane.")
    bin_factor: int = config_field(
        4, "The background-subtracted difference is binned this many pixels on a side before "
        "the line search (anchor streakBinFactor).", minimum=1)
    threshold: float = config_field(
        5.0, "Per-binned-pixel S/N threshold of streak candidate pixels.", minimum=0.0,
        exclusive_minimum=True)
    min_length: float = config_field(
        100.0, "Shortest streak (pixels, unbinned) that is masked; shorter trails stay sources.",
        minimum=1.0)
    min_aspect: float = config_field(
        4.0, "Connected binned regions must be at least this elongated (length / width) to "
        "contribute to the line search.", minimum=1.0)
    line_tolerance: float = config_field(
        2.0, "Binned pixels within this distance (binned pixels) of a line support it.",
        minimum=0.5)
    width_sigma: float = config_field(
        2.0, "Masked half-width = width_sigma * fitted profile sigma + PSF FWHM (pixels).",
        minimum=0.0)
    mask_full_line: bool = config_field(
        True, "Mask the line across the whole image (a satellite crosses the detector); "
        "otherwise only the detected extent plus min_length / 4 on both ends.")
    max_streaks: int = config_field(10, "Largest number of streaks masked per image.", minimum=0)


@dataclass(frozen=True)
class MeasurementConfig(ConfigBase):
    """Centroids, PSF and aperture photometry, moments, forced photometry."""

    psf_fit_radius_fwhm: float = config_field(
        2.0, "Half-width of the square PSF-fit stamp in PSF FWHM (at least 3 pixels); the "
        "flux is corrected for the PSF light outside the stamp.", minimum=0.5)
    centroid_iterations: int = config_field(
        2, "Gauss-Newton refinements of the centroid by a weighted fit of the PSF and its "
        "derivatives, starting from the matched-filter peak.", minimum=0, maximum=10)
    max_centroid_shift: float = config_field(
        2.0, "A centroid that moves farther (pixels) from the peak is rejected: the peak "
        "position is kept and centroid_flag set (anchor maxDistToPeak is 5).", minimum=0.0)
    fit_bad_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "CR"), "Pixels in these planes get zero weight in PSF, "
        "forced, dipole and trail fits.", choices=_PLANES)
    aperture_radius: float = config_field(
        12.0, "Radius (pixels) of the circular aperture flux, as the anchor's single 12 px "
        "aperture; pixels are weighted by their (linearly approximated) overlap area.",
        minimum=0.5)
    moments_max_iterations: int = config_field(
        20, "Iterations of the adaptive (Gaussian-weighted) second moments.", minimum=1)
    extendedness_area_ratio: float = config_field(
        1.5, "extendedness = 1 when sqrt(det(I_source) / det(I_psf)) exceeds this ratio.",
        minimum=1.0)
    forced_photometry: bool = config_field(
        True, "Forced PSF photometry on the science image and the matched template "
        "(when they are given).")


@dataclass(frozen=True)
class DipoleConfig(ConfigBase):
    """Dipole fit of merged footprints (two opposite PSFs; DMTN-007)."""

    enabled: bool = config_field(True, "Fit a dipole model to footprints with peaks of both signs.")
    direct_image_weight: float = config_field(
        0.5, "Relative chi-square weight of the science and matched-template residuals in the "
        "joint fit (anchor relWeight); 0 fits the difference only.", minimum=0.0)
    max_footprint_area: int = config_field(
        1200, "Footprints larger than this (pixels) are not fitted (anchor limit).", minimum=1)
    max_separation_sigma: float = config_field(
        5.0, "Largest lobe separation, in PSF sigmas, for a dipole classification.", minimum=0.0)
    min_snr: float = config_field(
        5.0 * math.sqrt(2.0), "Smallest dipole significance sqrt(chi2_null - chi2_dipole) on the "
        "difference for isDipole (anchor 5 sqrt 2).", minimum=0.0)
    max_lobe_fraction: float = config_field(
        0.65, "Each lobe's share |f_lobe| / (|f+| + |f-|) must stay below this for isDipole.",
        minimum=0.5, maximum=1.0)
    max_evaluations: int = config_field(
        400, "Budget of model evaluations for the least-squares fit.", minimum=10)


@dataclass(frozen=True)
class TrailConfig(ConfigBase):
    """Trailed-source fit: a PSF convolved with a line segment, by least squares."""

    enabled: bool = config_field(True, "Fit trails to elongated sources.")
    min_snr: float = config_field(
        10.0, "Only sources at least this significant are considered.", minimum=0.0)
    min_axis_ratio: float = config_field(
        1.3, "Trail candidates, criterion 1: adaptive-moment axis ratio above this and moment "
        "length estimate above min_length_fwhm.",
        minimum=1.0)
    min_length_fwhm: float = config_field(
        0.5, "Smallest moment-based length estimate sqrt(12 (major - major_psf)), in PSF FWHM, "
        "of a trail candidate.", minimum=0.0)
    min_elongation_significance: float = config_field(
        3.0, "Criterion 1 also needs the elongation to be real: the moment distortion "
        "|e| = (major - minor) / (major + minor) at least this many times its noise 2 / (S/N) "
        "(S/N of the PSF flux; a round source passes by chance with probability "
        "exp(-k^2 / 2), 1 % at 3). Without it noise makes about half the sources at S/N 10 "
        "pass the axis-ratio cut.", minimum=0.0)
    min_footprint_aspect: float = config_field(
        1.5, "Trail candidates, criterion 2 (undivided footprints): footprint elongation at least "
        "this and footprint length excess above min_length_fwhm; long trails can defeat the "
        "adaptive moments.",
        minimum=1.0)
    max_footprint_area: int = config_field(
        4000, "Footprints larger than this (pixels) are not fitted (a 200 px trail covers "
        "about 3000).", minimum=1)
    max_length: float = config_field(
        300.0, "Upper bound (pixels) of the fitted length.", minimum=1.0)
    max_evaluations: int = config_field(
        200, "Budget of model evaluations for the least-squares fit.", minimum=10)


@dataclass(frozen=True)
class SkySourceConfig(ConfigBase):
    """Sky sources: apertures on empty sky, measured like detections, flagged isSky."""

    n_sources: int = config_field(
        100, "Number of sky sources to place (fewer when empty sky is scarce); 0 disables "
        "(ApPipe enables 100).", minimum=0)
    radius: float = config_field(
        8.0, "Footprint radius (pixels); no pixel within it may be in avoid_planes.", minimum=1.0)
    avoid_planes: tuple[str, ...] = config_field(
        ("DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE"),
        "Mask planes a sky footprint must avoid.", choices=_PLANES)
    seed: int = config_field(
        0, "Seed of the placement, combined with visit and detector so placement is "
        "reproducible per image.", minimum=0)


@dataclass(frozen=True)
class FilterConfig(ConfigBase):
    """Removal of unusable detections (anchor badSourceFlags and bad-peak rejection)."""

    reject_peak_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "EDGE"), "Detections whose peak pixel is in one of these "
        "planes are dropped before measurement (anchor doRejectBadMaskPlaneDetections).",
        choices=_PLANES)
    drop_flags: tuple[str, ...] = config_field(
        ("pixelFlags_offimage", "pixelFlags_interpolatedCenterAll", "pixelFlags_badCenter",
         "pixelFlags_edgeCenter", "pixelFlags_nodataCenter", "pixelFlags_saturatedCenter",
         "pixelFlags_sat_templateCenter", "pixelFlags_crCenter"),
        "Measured sources with any of these flags are removed (anchor badSourceFlags, plus "
        "cosmic-ray centres as the anchor's association filter does); sky sources are never "
        "removed.", choices=DROPPABLE_FLAGS)


@dataclass(frozen=True)
class DetectAndMeasureConfig(ConfigBase):
    """Detection and measurement of DIA sources on a difference image."""

    background: BackgroundConfig = config_field(
        doc="Background removal.", default_factory=BackgroundConfig)
    detection: DetectionConfig = config_field(
        doc="Detection and footprints.", default_factory=DetectionConfig)
    streaks: StreakConfig = config_field(doc="Streak masking.", default_factory=StreakConfig)
    measurement: MeasurementConfig = config_field(
        doc="Source measurement.", default_factory=MeasurementConfig)
    dipole: DipoleConfig = config_field(doc="Dipole fitting.", default_factory=DipoleConfig)
    trail: TrailConfig = config_field(doc="Trail fitting.", default_factory=TrailConfig)
    sky_sources: SkySourceConfig = config_field(
        doc="Sky sources.", default_factory=SkySourceConfig)
    filters: FilterConfig = config_field(doc="Source filters.", default_factory=FilterConfig)
    raise_on_no_sources: bool = config_field(
        False, "Raise AlgorithmError when no DIA source (sky sources excluded) survives; the "
        "anchor raises, we return an empty catalog by default.")
    workers: int = config_field(
        0, "Threads for the whole-image steps (convolutions, background medians and "
        "interpolation run two at a time); 0 = all available cores, or 1 inside a Dask worker "
        "(the scheduler already runs images in parallel). Results do not depend on it.",
        minimum=0)

    def validate(self) -> None:
        if self.background.final_bin_size < self.background.initial_bin_size:
            raise ConfigurationError(
                f"background.final_bin_size ({self.background.final_bin_size}) must be >= "
                f"background.initial_bin_size ({self.background.initial_bin_size})")
