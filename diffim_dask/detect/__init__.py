"""Detection and measurement of DIA sources on difference images.

The entry point is :func:`detect_and_measure`; it returns a
:class:`DetectionResult` whose ``catalog`` follows
:data:`diffim_dask.schema.DIA_SOURCE_SCHEMA`. Configuration lives in
:class:`DetectAndMeasureConfig` (nested :class:`DetectionConfig`,
:class:`MeasurementConfig`, ...). The building blocks (background, matched
filter, footprints, measurement, dipole and trail fits, sky sources, streak
masking) are public for reuse and testing.
"""

from .background import BackgroundModel, estimate_background
from .config import (
    BackgroundConfig,
    DetectAndMeasureConfig,
    DetectionConfig,
    DipoleConfig,
    FilterConfig,
    MeasurementConfig,
    SkySourceConfig,
    StreakConfig,
    TrailConfig,
)
from .detection import SmoothingKernel, make_smoothing_kernel, significance
from .dipole import DipoleFit, classify_dipole, fit_dipole
from .footprints import SourceList, build_sources
from .result import DetectionResult
from .sky_sources import place_sky_sources
from .streaks import Streak, find_streaks
from .task import detect_and_measure
from .trail import TrailFit, fit_trail

__all__ = [
    "BackgroundConfig",
    "BackgroundModel",
    "DetectAndMeasureConfig",
    "DetectionConfig",
    "DetectionResult",
    "DipoleConfig",
    "DipoleFit",
    "FilterConfig",
    "MeasurementConfig",
    "SkySourceConfig",
    "SmoothingKernel",
    "SourceList",
    "Streak",
    "StreakConfig",
    "TrailConfig",
    "TrailFit",
    "build_sources",
    "classify_dipole",
    "detect_and_measure",
    "estimate_background",
    "find_streaks",
    "fit_dipole",
    "fit_trail",
    "make_smoothing_kernel",
    "place_sky_sources",
    "significance",
]
