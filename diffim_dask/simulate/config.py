"""Configuration of the survey simulator.

Units used throughout :mod:`diffim_dask.simulate`:

* fluxes in nJy (AB: ``m = 31.4 - 2.5 log10(f / nJy)``), converted to counts
  with each image's :class:`~diffim_dask.exposure.PhotoCalib`;
* pixel quantities (FWHM, trail lengths, margins) in pixels of the simulated
  images, sky quantities (offsets, galaxy sizes) in arcseconds;
* sky level and saturation in counts (ADU), read noise in electrons, gain in
  electrons per count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigBase, config_field
from ..errors import ConfigurationError

__all__ = ["SurveyConfig"]

_RANGE_FIELDS = (
    "star_flux_range",
    "galaxy_flux_range",
    "galaxy_size_range",
    "galaxy_sersic_range",
    "galaxy_axis_ratio_range",
    "variable_amplitude_range",
    "variable_period_range",
    "science_fwhm_range",
    "transient_snr_range",
    "moving_snr_range",
    "trail_length_range",
    "cosmic_ray_energy_range",
)


@dataclass(frozen=True)
class SurveyConfig(ConfigBase):
    """Everything that defines a simulated survey; the same config and seed give the same pixels.

    The sky (stars, galaxies, variables) is drawn once over the area covered by
    all visits; each science image (visit, detector) and each template patch
    renders that sky through its own WCS and PSF. Transients, moving objects,
    cosmic rays and noise are drawn per image from a seed derived from
    ``(seed, visit, detector)`` (or the patch id), so any image can be
    simulated alone.

    Examples
    --------
    >>> config = SurveyConfig(seed=3, n_visits=2, detector_shape=(512, 512))
    >>> config.n_visits
    2
    """

    # -- survey layout -------------------------------------------------------------------------
    seed: int = config_field(42, "Master random seed; every random stream is derived from it.",
                             minimum=0)
    ra: float = config_field(150.0, "Right ascension of the survey centre (deg).",
                             minimum=0.0, maximum=360.0)
    dec: float = config_field(2.0, "Declination of the survey centre (deg).",
                              minimum=-89.0, maximum=89.0)
    pixel_scale: float = config_field(0.2, "Pixel scale of visits and templates (arcsec/pixel).",
                                      minimum=0.01, exclusive_minimum=True)
    band: str = config_field("r", "Filter band.", choices=("u", "g", "r", "i", "z", "y"))
    instrument: str = config_field("SimCam", "Instrument name written to VisitInfo.")
    n_visits: int = config_field(2, "Number of science visits.", minimum=1)
    n_detectors: int = config_field(1, "Detectors per visit, laid out on a near-square grid.",
                                    minimum=1)
    detector_shape: tuple[int, int] = config_field(
        (2048, 2048), "Detector size (ny, nx) in pixels.", minimum=32)
    detector_gap: int = config_field(100, "Gap between neighbouring detectors (pixels).",
                                     minimum=0)
    pointing_offset: float = config_field(
        30.0, "Maximum dither of a visit pointing from the survey centre, per axis (arcsec).",
        minimum=0.0)
    rotation_range: float = config_field(
        1.0, "Maximum absolute rotation of a visit about its pointing (deg).", minimum=0.0,
        maximum=180.0)
    distortion: float = config_field(
        0.0, "Radial cubic optical distortion (SIP): displacement in pixels at the focal-plane "
        "corner; 0 gives a pure TAN WCS.", minimum=0.0, maximum=50.0)
    first_mjd: float = config_field(61000.0, "MJD (TAI) of the first visit.")
    visit_cadence: float = config_field(1.0, "Days between consecutive visits.", minimum=0.0)
    exposure_time: float = config_field(30.0, "Exposure time of one visit (s).", minimum=0.0,
                                        exclusive_minimum=True)

    # -- static sky ----------------------------------------------------------------------------
    star_density: float = config_field(2.0e5, "Stars per square degree.", minimum=0.0)
    star_flux_range: tuple[float, float] = config_field(
        (100.0, 3.0e7), "Star flux range (nJy).", minimum=0.0, exclusive_minimum=True)
    star_flux_slope: float = config_field(
        0.75, "Slope a of the cumulative star counts N(>F) ∝ F^-a.", minimum=0.0,
        exclusive_minimum=True)
    galaxy_density: float = config_field(3.0e4, "Galaxies per square degree.", minimum=0.0)
    galaxy_flux_range: tuple[float, float] = config_field(
        (300.0, 3.0e5), "Galaxy flux range (nJy).", minimum=0.0, exclusive_minimum=True)
    galaxy_flux_slope: float = config_field(
        1.0, "Slope a of the cumulative galaxy counts N(>F) ∝ F^-a.", minimum=0.0,
        exclusive_minimum=True)
    galaxy_size_range: tuple[float, float] = config_field(
        (0.3, 1.5), "Range of galaxy half-light radii (arcsec, circularised); drawn log-uniformly.",
        minimum=0.01)
    galaxy_sersic_range: tuple[float, float] = config_field(
        (0.8, 2.5),
        "Range of Sérsic indices (0.5 = Gaussian, 1 = exponential, 4 = de Vaucouleurs).",
        minimum=0.5, maximum=4.0)
    galaxy_axis_ratio_range: tuple[float, float] = config_field(
        (0.3, 1.0), "Range of galaxy axis ratios b/a.", minimum=0.05, maximum=1.0)
    variable_fraction: float = config_field(
        0.02, "Fraction of stars that are variable (sinusoidal light curves).", minimum=0.0,
        maximum=1.0)
    variable_amplitude_range: tuple[float, float] = config_field(
        (0.1, 0.5), "Fractional amplitude range of variables: f(t) = f̄ (1 + A sin(2πt/P + φ)).",
        minimum=0.0, maximum=1.0)
    variable_period_range: tuple[float, float] = config_field(
        (0.3, 30.0), "Period range of variables (days), drawn log-uniformly.", minimum=0.0,
        exclusive_minimum=True)

    # -- templates -----------------------------------------------------------------------------
    template_fwhm: float = config_field(2.5, "PSF FWHM of the template coadd (pixels).",
                                        minimum=0.5)
    template_depth: int = config_field(
        16, "Number of visits the template coadd stands for: its noise is the single-visit noise "
        "divided by sqrt(template_depth).", minimum=1)
    patch_size: int = config_field(2000, "Inner side of a template patch (pixels).", minimum=64)
    patch_border: int = config_field(
        100, "Overlap border added on every side of a patch (pixels).", minimum=0)

    # -- science PSF ---------------------------------------------------------------------------
    psf_profile: str = config_field("gaussian", "Radial profile of every PSF.",
                                    choices=("gaussian", "moffat"))
    moffat_beta: float = config_field(3.0, "Moffat β when psf_profile is 'moffat'.", minimum=1.0,
                                      exclusive_minimum=True)
    science_fwhm_range: tuple[float, float] = config_field(
        (3.0, 4.0), "Range of the science PSF FWHM at the detector centre, one value per visit "
        "(pixels).", minimum=0.5)
    psf_variation: float = config_field(
        0.15, "Maximum fractional change of the science PSF FWHM across a detector (a quadratic "
        "polynomial in x and y scaled so that |ΔFWHM/FWHM| reaches this value).", minimum=0.0,
        maximum=0.5)

    # -- detector and noise --------------------------------------------------------------------
    sky_level: float = config_field(800.0, "Mean sky background (counts per pixel).", minimum=0.0)
    sky_level_variation: float = config_field(
        0.1, "Fractional visit-to-visit scatter of the sky level (uniform ±).", minimum=0.0,
        maximum=0.9)
    sky_gradient: float = config_field(
        0.0, "Fractional linear sky gradient across a detector (0 = flat).", minimum=0.0,
        maximum=0.9)
    sky_subtracted: bool = config_field(
        True, "Subtract the true sky model from the images (the variance keeps the sky term), as "
        "calibrated exposures are.")
    gain: float = config_field(1.2, "Electrons per count.", minimum=0.0, exclusive_minimum=True)
    read_noise: float = config_field(6.0, "Read noise (electrons).", minimum=0.0)
    zero_point: float = config_field(
        32.0, "AB magnitude of one count in a visit (PhotoCalib zero point).", minimum=0.0)
    zero_point_variation: float = config_field(
        0.02, "Visit-to-visit scatter of the zero point (mag, uniform ±).", minimum=0.0)
    saturation: float = config_field(
        90000.0, "Saturation level (counts, before sky subtraction): pixels above it are clipped "
        "and flagged SAT.", minimum=0.0, exclusive_minimum=True)
    n_bad_columns: int = config_field(
        2, "Bad columns per detector (fixed per detector; flagged BAD).", minimum=0)
    cosmic_ray_rate: float = config_field(
        10.0, "Cosmic rays per megapixel per visit (not flagged; kept in the truth table).",
        minimum=0.0)
    cosmic_ray_energy_range: tuple[float, float] = config_field(
        (500.0, 20000.0), "Range of the charge deposited by one cosmic ray (electrons), "
        "log-uniform.", minimum=0.0, exclusive_minimum=True)

    # -- injected transients, variables and movers ---------------------------------------------
    n_transients: int = config_field(20, "Transients per (visit, detector).", minimum=0)
    transient_snr_range: tuple[float, float] = config_field(
        (3.0, 100.0), "Range of transient S/N (see :func:`point_source_snr`), log-uniform.",
        minimum=0.0, exclusive_minimum=True)
    transient_host_fraction: float = config_field(
        0.3, "Fraction of transients placed on a galaxy.", minimum=0.0, maximum=1.0)
    n_moving: int = config_field(0, "Moving objects (trails) per (visit, detector).", minimum=0)
    moving_snr_range: tuple[float, float] = config_field(
        (5.0, 50.0), "Range of moving-object S/N (matched filter on the trail), log-uniform.",
        minimum=0.0, exclusive_minimum=True)
    trail_length_range: tuple[float, float] = config_field(
        (5.0, 30.0), "Range of trail lengths within one exposure (pixels).", minimum=0.0)
    edge_margin: int = config_field(
        20, "Transients and movers keep at least this distance from detector edges (pixels).",
        minimum=0)

    def validate(self) -> None:
        for name in _RANGE_FIELDS:
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigurationError(
                    f"SurveyConfig.{name} = {value!r} must be a (low, high) pair with low <= high")
        if len(self.detector_shape) != 2:
            raise ConfigurationError(
                f"SurveyConfig.detector_shape = {self.detector_shape!r} must be (ny, nx)")
        smallest = min(self.detector_shape)
        if 2 * self.edge_margin >= smallest:
            raise ConfigurationError(
                f"SurveyConfig.edge_margin = {self.edge_margin} leaves no room on a detector of "
                f"shape {self.detector_shape}")
