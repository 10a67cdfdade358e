"""Configuration of ZOGY proper image subtraction.

:class:`ZogyConfig` is the top-level config; :class:`ZogyStarConfig` groups the
selection of the matched stars that measure the flux ratio and the template
registration. Every field is documented; ``ZogyConfig.from_dict`` names bad keys.

Examples
--------
>>> config = ZogyConfig.from_dict({"tile_size": 512, "stars": {"min_snr": 30.0}})
>>> config.stars.min_snr
30.0
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigBase, config_field
from ..errors import ConfigurationError
from ..masks import MASK_PLANES

__all__ = ["ZogyConfig", "ZogyStarConfig"]

_PLANES = tuple(MASK_PLANES)


@dataclass(frozen=True)
class ZogyStarConfig(ConfigBase):
    """Stars matched between the two images: flux ratio, registration shift and noise."""

    detection_threshold: float = config_field(
        5.0, "Peak-pixel threshold (in units of the science sky noise) of star candidates.",
        minimum=1.0)
    min_snr: float = config_field(
        20.0, "Lowest PSF-flux S/N, in both images, of a star used for the flux ratio and the "
        "registration.", minimum=1.0)
    isolation_radius_fwhm: float = config_field(
        2.5, "A star is used only if no other candidate lies within this many (larger) PSF "
        "FWHMs.", minimum=0.0)
    fit_radius_fwhm: float = config_field(
        1.5, "Half-width of the PSF-fit stamp, in units of the larger PSF FWHM.", minimum=0.5)
    max_size_ratio: float = config_field(
        1.1, "Reject resolved sources and blends: ratio of the source's Gaussian-weighted "
        "second-moment radius to the PSF's, in either image (0 disables).", minimum=0.0)
    max_stars: int = config_field(
        200, "Measure at most this many isolated candidates, brightest first.", minimum=1)
    min_stars: int = config_field(
        3, "Fewest good stars needed to fit the flux ratio or the registration.", minimum=1)
    clip_sigma: float = config_field(
        4.0, "Stars whose flux ratio or offset is more than this many errors from the fit "
        "(variables, transients, blends, proper motions) are rejected, iteratively.",
        minimum=1.0)
    systematic_flux_error: float = config_field(
        0.01, "Fractional error added in quadrature to each star's flux ratio (PSF-model and "
        "aperture systematics), so very bright stars do not dominate the ratio.", minimum=0.0)
    exclude_mask_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP", "SUSPECT"),
        "A star with any of these planes in its fit stamp, in either image, is not used.",
        choices=_PLANES)


@dataclass(frozen=True)
class ZogyConfig(ConfigBase):
    """ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016) on overlapping tiles.

    The difference ``D`` is whitened (unit variance) and returned in the
    science image's flux units; the score is ``S_corr`` (the matched filter
    ``S`` divided by the square root of its full variance: image noise,
    source noise and astrometric noise).
    """

    # -- inputs -----------------------------------------------------------------------------
    flux_ratio_source: str = config_field(
        "auto",
        "Where the flux ratio r = F_N/F_R (science counts per template count of one source) "
        "comes from: 'calibration' (the two PhotoCalibs), 'fit' (PSF fluxes of matched stars), "
        "'fixed' (the flux_ratio field), 'auto' (calibration when both images have one, else fit "
        "when at least stars.min_stars matched stars are usable, else the flux_ratio field, "
        "reported as 'assumed': a small stamp's only star may be the transient itself, as the "
        "Alard-Lupton 'psf-model' strategy does).",
        choices=("auto", "calibration", "fit", "fixed"))
    flux_ratio: float = config_field(
        1.0, "Flux ratio used when flux_ratio_source is 'fixed', and by 'auto' when the images "
        "have no PhotoCalibs and too few stars to fit it.", minimum=0.0, exclusive_minimum=True)
    background: str = config_field(
        "fit",
        "'fit': fit a smooth background (median of source-masked bins, bilinearly "
        "interpolated) to each image and subtract it; 'none': the inputs are background-"
        "subtracted already.", choices=("fit", "none"))
    background_bin_size: int = config_field(
        128, "Bin side (pixels) of the fitted backgrounds.", minimum=8)
    scale_variance: bool = config_field(
        True, "Rescale each variance plane to the noise measured in its source-free sky "
        "(diffim_dask.subtract.measure_variance_scale) before anything uses it.")
    variance_scale_limit: float = config_field(
        10.0, "A variance scale factor above this (or below its inverse) is refused as bad "
        "input data.", minimum=1.0)
    noise_correlation: str = config_field(
        "auto",
        "'auto': measure each image's pixel-to-pixel noise autocorrelation on its sky pixels "
        "(resampled frames and coadds are not white) and use its power spectrum in place of "
        "the white-noise sigma^2 (insignificant lags are zeroed, so white images stay exactly "
        "white); 'white': assume white noise (the published ZOGY).",
        choices=("auto", "white"))
    noise_correlation_threshold: float = config_field(
        0.05, "'auto' models an image's noise as correlated only when its measured lag-1 "
        "correlation (along x or y) exceeds this; below it the image is treated as white "
        "(faint source wings bias the measurement of white images by ~0.01).", minimum=0.0)
    noise_correlation_max_far: float = config_field(
        0.4, "'auto' rejects a measured autocorrelation whose mean on the outermost ring of "
        "lags (distance noise_correlation_radius) exceeds this fraction of its largest lag-1 "
        "correlation: resampling correlates noise over a pixel or two only (the DECam stacks: "
        "0.02-0.1), so a plateau there is structure in the sky pixels (crowded fields, "
        "nebulosity, background residuals; 0.5-0.85 on ZTF stamps), and whitening with it "
        "would amplify the real high-frequency noise; such an image is treated as white.",
        minimum=0.0)
    noise_correlation_max_lag1: float = config_field(
        0.6, "'auto' also rejects a measured lag-1 correlation above this as sky structure: "
        "interpolation kernels give at most ~0.5 (a half-pixel linear shift; the DECam stacks "
        "0.35-0.5), while unresolved stars of a crowded field correlate the sky over a PSF "
        "(0.75-0.95 on ZTF stamps and simulated confusion); such an image is treated as white. "
        "Raise it for images smoothed on purpose (e.g. large-pixfrac drizzle).",
        minimum=0.0, maximum=1.0)
    noise_correlation_radius: int = config_field(
        3, "Largest lag (pixels, per axis) of the measured noise autocorrelation.", minimum=1,
        maximum=10)
    required_template_fraction: float = config_field(
        0.1, "NoWorkFound when fewer pixels than this fraction have data in both images.",
        minimum=0.0, maximum=1.0)
    fill_mask_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT"),
        "Pixels with these planes (in the image concerned) are set to the background (zero) "
        "before the Fourier transforms; their variance is kept.", choices=_PLANES)
    preserve_template_mask: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"),
        "Template planes carried into the difference mask (grown like the science planes).",
        choices=_PLANES)
    rename_template_mask: tuple[str, ...] = config_field(
        ("SAT", "INJECTED"), "Template planes copied to '<name>_TEMPLATE' in the difference mask.",
        choices=("SAT", "INJECTED"))
    grow_mask_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "SAT_TEMPLATE"),
        "Difference-mask planes grown by the reach of the ZOGY kernels (both images are "
        "convolved).", choices=_PLANES)

    # -- registration -----------------------------------------------------------------------
    registration: str = config_field(
        "constant",
        "Template-to-science offset measured on matched stars and removed by a Fourier shift "
        "of the template: 'constant' (one offset), 'linear' (offset linear in x and y, taken "
        "at each tile centre), 'none' (the images are registered).",
        choices=("constant", "linear", "none"))
    registration_noise: tuple[float, float] | None = config_field(
        None, "Astrometric registration noise (sigma_x, sigma_y) in pixels for the "
        "astrometric-noise terms of S_corr; None: estimated from the matched stars (excess "
        "scatter of their offsets about the registration model plus the model's own "
        "uncertainty).", minimum=0.0)
    min_registration_noise: float = config_field(
        0.0, "Floor (pixels) of an estimated registration noise.", minimum=0.0)
    max_registration_offset: float = config_field(
        2.0, "Largest acceptable measured offset (pixels); larger means the images are not "
        "on one grid (BadInputDataError).", minimum=0.0, exclusive_minimum=True)

    # -- tiles ------------------------------------------------------------------------------
    tile_size: int = config_field(
        0, "Side (pixels) of the inner boxes; each tile has its own PSFs (at its centre) and "
        "noise levels, so it bounds the PSF change a tile ignores. 0 = automatic: the largest "
        "of 128, 160, 192, 256, 320, 384, 448, 512 over which neither PSF's FWHM changes by "
        "more than max_psf_change (512 when both PSF models are constant). A value at least "
        "the image size processes the whole image as one tile.", minimum=0)
    max_psf_change: float = config_field(
        0.02, "Automatic tile size: largest fractional change of a PSF's FWHM between a tile's "
        "centre and its corners (bright stars leave residuals in proportion to it).",
        minimum=0.0, exclusive_minimum=True)
    tile_border: int = config_field(
        0, "Border (pixels) added on every side of an inner box to make the outer box that is "
        "Fourier transformed (zero-padded beyond the image); enlarged to a fast FFT size. "
        "0 = automatic: the radius enclosing all but 1e-6 of the ZOGY kernels at the image "
        "centre (at least 16, at most twice the PSF stamp size), so no wrap-around reaches "
        "the kept pixels.", minimum=0)

    # -- numerics ---------------------------------------------------------------------------
    psf_spectrum_floor: float = config_field(
        1e-6, "Regularisation: this constant is added to both PSF spectra (a tiny delta "
        "function in each PSF), so the denominator never vanishes; where both PSFs carry no "
        "power the difference keeps unit white noise with the limiting weights.",
        minimum=0.0)
    fft_precision: str = config_field(
        "float32",
        "Precision of the image FFTs and products (the PSF spectra and kernels are built in "
        "float64). 'float32' has round-off ~1e-7 of the brightest pixel values, far below the "
        "noise, at half the cost of 'float64'.", choices=("float32", "float64"))
    workers: int = config_field(
        0, "Threads working on tiles (and on the two images' statistics) at once; 0 = all "
        "available cores, or 1 inside a Dask worker (the scheduler already runs units in "
        "parallel).", minimum=0)

    # -- outputs ----------------------------------------------------------------------------
    score_noise: str = config_field(
        "full",
        "Variance that normalises the score: 'full' = V(S_N) + V(S_R) from the variance "
        "planes (image and source noise) + the astrometric terms (S_corr); 'source' = without "
        "the astrometric terms; 'background' = the constant background-only variance F_S "
        "(the classic S / sqrt(V_S) of uniform noise).",
        choices=("full", "source", "background"))
    score_normalization: str = config_field(
        "auto",
        "Empirical check of S_corr's normalisation: its robust sigma (0.7413 IQR) over the "
        "valid interior pixels (no EDGE, NO_DATA, BAD, SAT, SAT_TEMPLATE). 'auto': divide the "
        "score by it (and scale the flux image's variance) when it departs from 1 by more than "
        "score_normalization_tolerance (variance planes that do not describe the noise, e.g. "
        "derived from a crowded sky); 'empirical': always; 'model': never (the variance "
        "planes and noise model alone).", choices=("auto", "empirical", "model"))
    score_normalization_tolerance: float = config_field(
        0.2, "'auto' score normalisation applies when |robust sigma - 1| exceeds this.",
        minimum=0.0)
    score_normalization_min_pixels: int = config_field(
        200, "Fewest valid interior pixels needed to measure the score's robust sigma.",
        minimum=10)
    flux_image: bool = config_field(
        True, "Also return metadata['flux_image']: an Exposure whose image is the PSF flux "
        "estimate S / F_S (science counts) at every pixel and whose variance is its full "
        "variance V(S) / F_S^2.")
    edge_width: int = config_field(
        0, "Width (pixels) of the EDGE border set on the outputs; 0 = the ZOGY kernels' reach.",
        minimum=0)

    stars: ZogyStarConfig = config_field(
        doc="Matched-star selection and fits.", default_factory=ZogyStarConfig)

    def validate(self) -> None:
        if self.registration_noise is not None and len(self.registration_noise) != 2:
            raise ConfigurationError(
                f"ZogyConfig.registration_noise = {self.registration_noise!r} must be "
                f"(sigma_x, sigma_y) in pixels or None")
        if 0 < self.tile_size < 32:
            raise ConfigurationError(
                f"ZogyConfig.tile_size = {self.tile_size} is too small (use >= 32, or 0 for the "
                f"automatic choice)")
