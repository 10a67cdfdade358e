"""Configuration of the Alard–Lupton PSF-matching subtraction.

:class:`AlardLuptonConfig` is the top-level config; its nested configs group
the kernel basis, the kernel sources, the kernel fit, variance scaling,
decorrelation and the quality gate. Defaults follow the LSST ``ip_diffim``
``AlardLuptonSubtractTask`` (see ``lsst-ip_diffim.md`` §3–§6) unless a field's
doc says otherwise.

Examples
--------
>>> config = AlardLuptonConfig.from_dict({"mode": "auto", "fit": {"spatial_kernel_order": 2}})
>>> config.fit.spatial_kernel_order
2
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigBase, config_field
from ..errors import ConfigurationError
from ..masks import MASK_PLANES

__all__ = [
    "AlardLuptonConfig",
    "KernelBasisConfig",
    "KernelSourceConfig",
    "KernelFitConfig",
    "VarianceScalingConfig",
    "DecorrelationConfig",
    "QualityGateConfig",
]

_PLANES = tuple(MASK_PLANES)


@dataclass(frozen=True)
class KernelBasisConfig(ConfigBase):
    """Kernel basis: Alard–Lupton Gaussians × polynomials or delta functions."""

    basis: str = config_field(
        "alard-lupton",
        "Basis family: 'alard-lupton' (Gaussians times monomials) or 'delta-function' (one "
        "basis per kernel pixel, regularised by a Laplacian penalty).",
        choices=("alard-lupton", "delta-function"))
    gauss_sigmas: tuple[float, ...] = config_field(
        (0.7, 1.5, 3.0),
        "Gaussian sigmas (pixels) used when PSF widths are unavailable, when scale_by_fwhm is "
        "False, or when both PSFs have the same width.", minimum=0.1, exclusive_minimum=False)
    gauss_degrees: tuple[int, ...] = config_field(
        (4, 2, 2),
        "Polynomial degree multiplying each Gaussian (same length as gauss_sigmas); degree d "
        "contributes (d+1)(d+2)/2 basis functions.", minimum=0, maximum=10)
    gauss_beta: float = config_field(
        2.0, "Ratio of successive Gaussian sigmas in the FWHM-scaled geometric series.",
        minimum=1.0, exclusive_minimum=True)
    min_sigma: float = config_field(
        0.7, "Floor (pixels) of the matching-kernel sigma and of the smallest basis sigma "
        "when the convolved image has the narrower PSF.", minimum=0.1)
    min_sigma_deconvolution: float = config_field(
        0.4, "Same floor when the convolved image has the broader PSF (deconvolution).",
        minimum=0.1)
    scale_by_fwhm: bool = config_field(
        True, "Derive the basis sigmas and the kernel size from the two PSF widths.")
    kernel_size_fwhm_scaling: float = config_field(
        6.0, "Kernel width = int(this × largest basis sigma), made odd, clamped to "
        "[kernel_size_min, kernel_size_max].", minimum=1.0)
    kernel_size_min: int = config_field(21, "Smallest kernel width (odd, pixels).", minimum=3)
    kernel_size_max: int = config_field(35, "Largest kernel width (odd, pixels).", minimum=3)
    kernel_size: int = config_field(
        21, "Kernel width (odd, pixels) when scale_by_fwhm is False, and the delta-function "
        "kernel width.", minimum=3)
    regularization: str = config_field(
        "central-difference",
        "Delta-function basis only: smoothness penalty. 'central-difference' is the 9-point "
        "Laplacian; 'forward-difference' penalises first and second forward differences; "
        "'none' disables regularisation.",
        choices=("central-difference", "forward-difference", "none"))
    regularization_border_penalty: float = config_field(
        3.0, "Delta-function basis only: extra penalty weight on the outermost kernel pixels.",
        minimum=0.0)
    lambda_type: str = config_field(
        "relative",
        "Delta-function basis only: 'relative' scales lambda_value by trace(M)/trace(H) of "
        "each normal system (unit-free; the anchor's 'absolute' default depends on the "
        "image units), 'absolute' uses lambda_value as is.", choices=("relative", "absolute"))
    lambda_value: float = config_field(
        0.02, "Delta-function basis only: regularisation strength (see lambda_type).",
        minimum=0.0)

    def validate(self) -> None:
        if len(self.gauss_sigmas) != len(self.gauss_degrees) or not self.gauss_sigmas:
            raise ConfigurationError(
                f"KernelBasisConfig: gauss_sigmas {self.gauss_sigmas} and gauss_degrees "
                f"{self.gauss_degrees} must be non-empty and of equal length")
        for name in ("kernel_size_min", "kernel_size_max", "kernel_size"):
            if getattr(self, name) % 2 == 0:
                raise ConfigurationError(
                    f"KernelBasisConfig.{name} = {getattr(self, name)} must be odd")
        if self.kernel_size_min > self.kernel_size_max:
            raise ConfigurationError(
                f"KernelBasisConfig.kernel_size_min = {self.kernel_size_min} exceeds "
                f"kernel_size_max = {self.kernel_size_max}")


@dataclass(frozen=True)
class KernelSourceConfig(ConfigBase):
    """Where the kernel is constrained: stars of the science image, or all pixels."""

    strategy: str = config_field(
        "auto",
        "'stars': fit on stamps around selected stars; 'all-pixels': fit on the whole image "
        "(minus masked pixels) with iterative sigma-clipping; 'auto': stars when at least "
        "auto_min_sources (and auto_stars_per_term per spatial term) usable stars are found "
        "and still used after rejection, else all-pixels.",
        choices=("auto", "stars", "all-pixels"))
    min_snr: float = config_field(10.0, "Lowest PSF-flux S/N of a kernel star.", minimum=0.0)
    max_snr: float = config_field(500.0, "Highest PSF-flux S/N of a kernel star.", minimum=0.0)
    detection_threshold: float = config_field(
        5.0, "S/N threshold (PSF-smoothed) of the peaks used for the isolation test.",
        minimum=1.0)
    isolation_radius_fwhm: float = config_field(
        2.0, "A star is isolated when no other detected peak lies within this many science "
        "PSF FWHMs. 0 disables the test.", minimum=0.0)
    max_size_ratio: float = config_field(
        1.5, "Reject resolved sources: ratio of the star's Gaussian-weighted second-moment "
        "radius to the PSF's (0 disables).", minimum=0.0)
    exclude_mask_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "EDGE", "HIGH_VARIANCE", "INJECTED", "SAT_TEMPLATE",
         "INJECTED_TEMPLATE"),
        "A star is rejected if any pixel of its stamp, in the science or template, has one of "
        "these planes; in the all-pixels strategy these pixels get zero weight.",
        choices=_PLANES)
    max_flux_ratio_sigma: float = config_field(
        5.0, "Reject stars whose template/science aperture-flux ratio is more than this many "
        "standard errors from the median ratio (transients without a template counterpart, "
        "strong variables); 0 disables. Not in the anchor, whose single-kernel sums are too "
        "noisy to catch faint transients.", minimum=0.0)
    flux_ratio_tolerance: float = config_field(
        0.02, "Fractional systematic floor added in quadrature to the flux-ratio error "
        "(aperture losses, blends), so very bright stars are not rejected for 0.1% effects.",
        minimum=0.0)
    flux_aperture_fwhm: float = config_field(
        2.0, "Radius of the aperture for the flux-ratio test, in units of the larger PSF FWHM.",
        minimum=0.5)
    max_kernel_sources: int = config_field(
        1000, "Keep at most this many stars, highest S/N first.", minimum=1)
    min_kernel_sources: int = config_field(
        3, "Fewer usable stars than this is an error in the 'stars' strategy.", minimum=1)
    auto_min_sources: int = config_field(
        10, "'auto' strategy: use stars when at least this many are usable.", minimum=1)
    auto_stars_per_term: int = config_field(
        5, "'auto' strategy: also require this many usable stars per spatial kernel term "
        "(3 terms for order 1), so the spatial variation is constrained by stars. An "
        "all-pixels fit (any strategy) lowers the spatial kernel order until each term has "
        "this many selected stars, so a kernel shape constrained by a handful of stars cannot "
        "bend around a variable or transient; 0 disables both rules.", minimum=0)
    auto_psf_model_below: int = config_field(
        3, "'auto' strategy: with fewer usable kernel stars than this (a small cut-out, or an "
        "empty field) the kernel matches the two PSF models instead of being fitted on all "
        "pixels: the image's few sources may be variables or the transient itself, whose "
        "change an image fit absorbs into the kernel. The kernel sum is then the ratio of the "
        "photometric calibrations (1 without them). 0 disables. Not in the anchor (its "
        "ModelPsfMatchTask matches PSF models the same way).", minimum=0)
    cell_size: int = config_field(
        128, "Side (pixels) of the spatial cells that spread stars over the image.", minimum=16)
    max_per_cell: int = config_field(
        5, "Stars fitted per cell at a time; rejected ones are replaced by the next best.",
        minimum=1)
    tile_size: int = config_field(
        64, "All-pixels strategy: side (pixels) of the fit tiles.", minimum=16)
    clip_sigma: float = config_field(
        4.0, "All-pixels strategy: pixels whose normalised residual exceeds this are clipped.",
        minimum=1.0)
    clip_model_fraction: float = config_field(
        0.05, "All-pixels strategy: the clip threshold tolerates this fraction of the local "
        "model (σ_eff² = σ² + (f · model)²), so bright stars with a small kernel mismatch in "
        "an early iteration are not clipped (which would bias the kernel sum), while "
        "transients and strong variables, which have no template counterpart, still are.",
        minimum=0.0)
    clip_grow: int = config_field(
        2, "All-pixels strategy: clipped pixels are grown by this many pixels.", minimum=0)
    max_clip_iterations: int = config_field(
        4, "All-pixels strategy: maximum clip-and-refit iterations.", minimum=1)
    min_pixel_fraction: float = config_field(
        0.05, "All-pixels strategy: fail if fewer than this fraction of pixels are usable.",
        minimum=0.0, maximum=1.0)

    def validate(self) -> None:
        if self.min_snr >= self.max_snr:
            raise ConfigurationError(
                f"KernelSourceConfig: min_snr = {self.min_snr} must be below "
                f"max_snr = {self.max_snr}")


@dataclass(frozen=True)
class KernelFitConfig(ConfigBase):
    """Least-squares fit of the spatially varying kernel and differential background."""

    spatial_kernel_order: int = config_field(
        1, "Order of the 2-D Chebyshev polynomial of each kernel coefficient.",
        minimum=0, maximum=5)
    spatial_background_order: int = config_field(
        2, "Order of the 2-D Chebyshev polynomial of the differential background.",
        minimum=0, maximum=5)
    fit_background: bool = config_field(True, "Fit a differential background with the kernel.")
    constant_kernel_sum: bool = config_field(
        True, "Hold the kernel sum (photometric scale) constant over the image.")
    variance_weighting: str = config_field(
        "constant",
        "'constant': each stamp weighted by 1/median(variance) (unbiased by source Poisson "
        "noise; anchor default); 'pixel': per-pixel inverse variance.",
        choices=("constant", "pixel"))
    candidate_residual_mean_max: float = config_field(
        0.25, "Reject a stamp when |mean normalised residual| exceeds this.", minimum=0.0)
    candidate_residual_std_max: float = config_field(
        1.5, "Reject a stamp when the rms normalised residual exceeds this.", minimum=0.0)
    max_ksum_sigma: float = config_field(
        3.0, "Reject stars whose single-kernel sum is this many clipped sigmas off the mean.",
        minimum=0.0, exclusive_minimum=True)
    max_residual_flux_snr: float = config_field(
        5.0, "Reject a star whose spatial-fit residual has a PSF-weighted flux above this S/N "
        "and above max_residual_flux_fraction of the star's flux (catches variables the "
        "residual rms misses); 0 disables.", minimum=0.0)
    max_residual_flux_fraction: float = config_field(
        0.02, "See max_residual_flux_snr.", minimum=0.0)
    spatial_regularization: float = config_field(
        1e-3, "Ridge on the spatially varying kernel coefficients, in units of each "
        "coefficient's own information (the Jacobi-scaled normal matrix has unit diagonal): "
        "variation the data do not constrain (few or clustered stars, sparse fields) shrinks "
        "towards a constant kernel instead of running wild; 0 disables. Not in the anchor.",
        minimum=0.0)
    max_spatial_iterations: int = config_field(
        3, "Maximum reject-and-refit iterations of the spatial solution.", minimum=1)
    max_condition_number: float = config_field(
        1e10, "Eigenvalues below largest/this are dropped when solving (pseudo-inverse).",
        minimum=1.0)


@dataclass(frozen=True)
class VarianceScalingConfig(ConfigBase):
    """Rescale each variance plane to the noise measured in source-free pixels."""

    enabled: bool = config_field(True, "Scale the variance planes before matching.")
    limit: float = config_field(
        10.0, "A factor above this (or below its inverse) is refused as bad input data.",
        minimum=1.0)
    background_bin_size: int = config_field(
        32, "Bin size (pixels) of the background removed before measuring the noise.",
        minimum=4)
    ignore_mask_planes: tuple[str, ...] = config_field(
        ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP", "CR", "EDGE"),
        "Pixels with these planes are not used.", choices=_PLANES)
    source_threshold: float = config_field(
        5.0, "Pixels within a PSF radius of a PSF-smoothed peak above this S/N are sources.",
        minimum=1.0)


@dataclass(frozen=True)
class DecorrelationConfig(ConfigBase):
    """Decorrelation afterburner (Reiss & Lupton 2016; DMTN-021)."""

    enabled: bool = config_field(True, "Whiten the difference image's noise.")
    grid: int = config_field(
        1, "Decorrelation kernels on a grid x grid of tile centres, blended bilinearly; 1 uses "
        "the kernel at the image centre only.", minimum=1, maximum=8)
    kernel_size_factor: float = config_field(
        1.0, "Real-space decorrelation kernel width as a multiple of the matching-kernel "
        "width (made odd).", minimum=0.5)
    ignore_mask_planes: tuple[str, ...] = config_field(
        ("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE"),
        "Pixels with these planes are ignored when measuring the mean variances.",
        choices=_PLANES)
    noise_model: str = config_field(
        "measured",
        "Noise of the inputs assumed by the filter and the variance plane: 'white' (the "
        "published afterburner), or 'measured': each input's normalised noise autocorrelation "
        "is measured on its sky pixels and its power spectrum R(k) replaces the white-noise "
        "sigma^2 (see diffim_dask.subtract.decorrelation), so resampled or coadded inputs, "
        "whose noise is correlated between pixels, give a difference that is white with a "
        "variance plane right on the PSF scale. An input whose lag-1 correlation is below "
        "noise_correlation_threshold is treated as white, so white inputs give exactly the "
        "'white' result.", choices=("measured", "white"))
    noise_correlation_radius: int = config_field(
        3, "Largest lag (pixels, per axis) of the measured noise autocorrelation.",
        minimum=1, maximum=10)
    noise_correlation_threshold: float = config_field(
        0.05, "'measured': an input is modelled as correlated only when its measured lag-1 "
        "correlation along x or y exceeds this (faint source wings bias white images by "
        "~0.01).", minimum=0.0)
    noise_power_floor: float = config_field(
        0.2, "'measured': floor of each input's normalised noise power spectrum R(k) (white "
        "noise has R = 1), which bounds the filter's high-frequency gain where the transform "
        "of the truncated measured autocorrelation rings towards zero.", minimum=0.01,
        maximum=1.0)
    difference_psf: str = config_field(
        "auto",
        "PSF attached to the decorrelated difference: 'unconvolved' = the PSF of the image that "
        "was not convolved (anchor behaviour); 'decorrelated' = that PSF convolved with the "
        "decorrelation kernel (what the difference really has; a GridPsf over the filter nodes "
        "when the filter or the PSF varies, else an ImagePsf); 'auto' = 'decorrelated' when "
        "the filter measurably changes PSF fluxes, i.e. when |<P, P ⊗ φ> / <P, P> - 1| (the "
        "fractional PSF-flux bias of fitting the unfiltered PSF P to a filtered point source) "
        "exceeds psf_bias_tolerance at the image centre, else 'unconvolved' (which keeps the "
        "input's own, possibly spatially varying, PSF model).",
        choices=("auto", "unconvolved", "decorrelated"))
    psf_bias_tolerance: float = config_field(
        0.02, "'auto' difference_psf: largest PSF-flux bias accepted from attaching the "
        "unfiltered PSF (a template with ~10% of the science noise variance gives ~1%; a "
        "template as noisy as the science image gives tens of percent).", minimum=0.0)


@dataclass(frozen=True)
class QualityGateConfig(ConfigBase):
    """Footprint residual ratio gate (anchor §9.1)."""

    enabled: bool = config_field(True, "Raise BadSubtractionError when the gate fails.")
    max_ratio_mean: float = config_field(
        0.2, "Largest allowed mean footprint residual ratio.", minimum=0.0)
    max_ratio_std: float = config_field(
        0.4, "Largest allowed standard deviation of the footprint residual ratio.", minimum=0.0)
    max_stars: int = config_field(
        300, "Evaluate the gate on at most this many kernel stars, evenly spread over their "
        "S/N ranking (the mean and scatter of the ratio need no more).", minimum=1)
    footprint_radius_fwhm: float = config_field(
        3.0, "A star's footprint is its pixels above the detection threshold of the PSF-smoothed "
        "S/N map (like a detection footprint) within this many science PSF FWHMs.", minimum=0.5)


@dataclass(frozen=True)
class AlardLuptonConfig(ConfigBase):
    """Alard–Lupton subtraction: direction, masks, and the nested step configs."""

    mode: str = config_field(
        "convolveTemplate",
        "'convolveTemplate' (default) matches the template to the science image; "
        "'convolveScience' matches the science image to the template; 'auto' convolves the "
        "science image only when the template PSF is wider on both axes.",
        choices=("convolveTemplate", "convolveScience", "auto"))
    subtract_background: bool = config_field(
        False, "Subtract the fitted differential background from the difference image (the "
        "anchor leaves it to detection).")
    required_template_fraction: float = config_field(
        0.1, "NoWorkFound when fewer pixels than this fraction have data in both images.",
        minimum=0.0, maximum=1.0)
    min_template_fraction_for_expected_success: float = config_field(
        0.2, "If the kernel fit fails and the coverage is below this, raise NoWorkFound instead.",
        minimum=0.0, maximum=1.0)
    bad_mask_planes: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        "Pixels with these planes are filled with the image's sky level before convolution.",
        choices=_PLANES)
    preserve_template_mask: tuple[str, ...] = config_field(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"),
        "Template planes carried (dilated by the kernel) into the difference mask.",
        choices=_PLANES)
    rename_template_mask: tuple[str, ...] = config_field(
        ("SAT", "INJECTED"),
        "Template planes copied to '<name>_TEMPLATE' (not dilated).", choices=("SAT", "INJECTED"))
    variance_propagation: str = config_field(
        "pointwise",
        "'pointwise' (anchor default): each input variance times the squared norm of the "
        "kernel acting on it at that position; 'convolve': input variance planes convolved "
        "with the squared kernels (kernel at the image or tile centre, rescaled by the spatial "
        "change of the squared norm), which spreads the Poisson variance of bright stars "
        "correctly at the cost of four more FFTs per plane.",
        choices=("convolve", "pointwise"))
    score_variance_propagation: str = config_field(
        "convolve",
        "variance_propagation of the preconvolution (score) variant's outputs: the "
        "preconvolved difference and the score. Their filters span the PSF twice over, so "
        "'pointwise' (the anchor's) puts a bright star's Poisson variance only on the pixel "
        "where it arises: its wings get too little (false 5-sigma peaks around bright stars) "
        "and a faint transient's peak too much (its score 1.3 % low on the simulated 2048² "
        "pair). 'convolve' propagates each pixel's variance through the filter.",
        choices=("convolve", "pointwise"))
    fft_precision: str = config_field(
        "float32",
        "Precision of the image-plane FFT convolutions (outputs are float32 either way). "
        "'float32': round-off ~1e-7 of the brightest input pixel values (far below the "
        "noise; chunked and whole-image results agree to that level); 'float64': about 1.5x "
        "slower and ~40% more memory at 4k x 4k, agreement ~1e-12.",
        choices=("float32", "float64"))
    fft_workers: int = config_field(
        0, "Threads used by each FFT; 0 = automatic: all available cores for numpy-backed "
        "inputs, 1 for dask-backed inputs or inside a Dask worker (the scheduler already runs "
        "chunks and units in parallel).", minimum=0)
    basis: KernelBasisConfig = config_field(
        doc="Kernel basis.", default_factory=KernelBasisConfig)
    sources: KernelSourceConfig = config_field(
        doc="Kernel sources.", default_factory=KernelSourceConfig)
    fit: KernelFitConfig = config_field(doc="Kernel fit.", default_factory=KernelFitConfig)
    variance: VarianceScalingConfig = config_field(
        doc="Variance scaling.", default_factory=VarianceScalingConfig)
    decorrelation: DecorrelationConfig = config_field(
        doc="Decorrelation afterburner.", default_factory=DecorrelationConfig)
    quality: QualityGateConfig = config_field(
        doc="Residual quality gate.", default_factory=QualityGateConfig)

    def validate(self) -> None:
        if self.min_template_fraction_for_expected_success < self.required_template_fraction:
            raise ConfigurationError(
                "AlardLuptonConfig: min_template_fraction_for_expected_success "
                f"({self.min_template_fraction_for_expected_success}) must be >= "
                f"required_template_fraction ({self.required_template_fraction})")
