"""Alard–Lupton PSF-matching subtraction: public entry points.

:func:`subtract_alard_lupton` follows the anchor ``AlardLuptonSubtractTask``
(``lsst-ip_diffim.md`` §3–§5):

1. validate the pair (same pixel grid, WCS and band), measure the coverage
   (``NoWorkFound`` below ``required_template_fraction``);
2. rescale both variance planes to the noise measured in source-free sky
   (:mod:`.variance`);
3. prepare masks: the science image loses DETECTED/DETECTED_NEGATIVE; the
   template keeps NO_DATA/BAD/HIGH_VARIANCE and its SAT/INJECTED planes become
   SAT_TEMPLATE/INJECTED_TEMPLATE;
4. choose the direction (``convolveTemplate`` default, ``convolveScience``, or
   ``auto``: convolve the science image only when the template PSF is wider on
   both axes) and build the basis from the two PSF widths (:mod:`._basis`);
5. select kernel stars (:mod:`._kernel_sources`) and fit the spatially varying
   kernel and background (:mod:`._solve`). Strategy ``auto`` uses the stars when
   enough of them (``auto_min_sources``, and ``auto_stars_per_term`` per spatial
   term) are usable and survive rejection, otherwise all pixels with
   sigma-clipping; if a star fit fails the quality gate it is retried on all
   pixels and the better result is kept;
6. convolve block by block (:mod:`._apply`), difference, decorrelate
   (:mod:`.decorrelation`, with each input's noise autocorrelation measured
   on its sky pixels when ``DecorrelationConfig.noise_model = 'measured'``)
   and propagate the variance; attach the PSF the difference really has;
7. compute the footprint residual ratio and apply the quality gate.

:func:`subtract_alard_lupton_preconvolved` is the score (preconvolution)
variant (§6). Inputs backed by dask arrays give lazy outputs: the inputs are
computed once for the fit (which needs the whole image), and the quality gate
is evaluated on star cut-outs of those in-memory inputs with the same block
functions, so the lazy outputs are not computed by this call.

Departures from the anchor (each where the anchor is weak, see the config docs):
flux-ratio and residual-flux tests against transients/variables among kernel
stars, a ridge on unconstrained spatial kernel terms, a model-tolerant clip in
the all-pixels fit, a noise-unbiased footprint ratio, data-calibrated residual
noise for deconvolution kernels, a template divided by the kernel sum in
``convolveScience`` mode, a decorrelation (and score) filter modelling the
measured noise correlation of resampled inputs, and the decorrelated PSF
whenever the filter changes PSF fluxes measurably.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np
import pandas as pd
from scipy.signal import fftconvolve

from .._parallel import default_threads
from ..errors import (BadInputDataError, ConfigurationError, InsufficientKernelSourcesError,
                      BadSubtractionError, NoWorkFound)
from ..exposure import Exposure, validate_pair
from ..masks import MASK_DTYPE, mask_bit, mask_value
from ..psf.models import FWHM_PER_SIGMA, GridPsf, ImagePsf
from ..noise_correlation import measure_noise_correlation
from . import _apply
from ._basis import make_basis
from ._convolve import dilate_bits, fft_convolve_same, grow_flags
from ._kernel_sources import _BgSub, _cutouts, flux_ratio_outliers, select_stars, tile_grid
from ._quality import disc, footprint_residual_ratios
from ._solve import FitFailure, KernelFitter, KernelSolution, fit_psf_models
from ._spatial import ChebyshevBasis2D
from ._stats import image_statistics
from ._threads import single_blas_thread
from .config import AlardLuptonConfig
from .decorrelation import (NOISE_POWER_FLOOR, decorrelation_kernel, mean_variance,
                            noise_correlation_factor, psf_flux_bias, score_kernel)
from .kernel import SpatialBackground
from .result import SubtractionResult
from .variance import measure_variance_scale

__all__ = ["subtract_alard_lupton", "subtract_alard_lupton_preconvolved"]

_NO_DATA = mask_value("NO_DATA")


# -- input preparation ---------------------------------------------------------------------------


def _xp_where(condition, a, b):
    if any(isinstance(v, da.Array) for v in (condition, a, b)):
        return da.where(condition, a, b)
    return np.where(condition, a, b)


def _require_psf(exposure: Exposure, what: str):
    if exposure.psf is not None:
        return exposure.psf
    try:
        from ..psf import estimate_psf  # written by another module; optional here
    except ImportError:
        raise ConfigurationError(
            f"the {what} exposure has no PSF model and diffim_dask.psf.estimate_psf is not "
            f"available; a PSF is required (attach one with exposure.replace(psf=...))") from None
    estimated = estimate_psf(exposure)
    psf = getattr(estimated, "psf", estimated)
    if psf is None:
        raise ConfigurationError(f"PSF estimation returned no model for the {what} exposure")
    return psf


def _psf_widths(psf, x: float, y: float) -> tuple[float, float, float]:
    """Trace FWHM and per-axis FWHMs from the PSF's second moments at ``(x, y)``."""
    ixx, iyy, _ = psf.moments(x, y)
    trace = FWHM_PER_SIGMA * math.sqrt(0.5 * (ixx + iyy))
    return trace, FWHM_PER_SIGMA * math.sqrt(ixx), FWHM_PER_SIGMA * math.sqrt(iyy)


class _Image:
    """Planes of one input: numpy copies for the fit, lazy-capable arrays for the outputs."""

    def __init__(self, exposure: Exposure, what: str):
        self.exposure = exposure
        self.what = what
        image, variance, mask = exposure.arrays()
        bad = ~(np.isfinite(image) & np.isfinite(variance))
        if bad.any():
            # Non-finite pixels are treated as NO_DATA (image 0, variance 0), per convention.
            image = np.where(bad, np.float32(0), image)
            variance = np.where(bad, np.float32(0), variance)
            mask = mask | np.where(bad, MASK_DTYPE(_NO_DATA), MASK_DTYPE(0))
        del bad
        self.image = image.astype(np.float32, copy=False)
        self.variance = variance.astype(np.float32, copy=False)
        self.mask = mask.astype(MASK_DTYPE, copy=False)
        ds = exposure.dataset
        lazy_image = ds["image"].data
        lazy_var = ds["variance"].data
        lazy_mask = ds["mask"].data
        if isinstance(lazy_image, da.Array):
            lazy_bad = ~da.isfinite(lazy_image) | ~da.isfinite(lazy_var)
            self.lazy_image = da.where(lazy_bad, np.float32(0), lazy_image)
            self.lazy_variance = da.where(lazy_bad, np.float32(0), lazy_var)
            self.lazy_mask = lazy_mask | da.where(lazy_bad, MASK_DTYPE(_NO_DATA), MASK_DTYPE(0))
        else:
            self.lazy_image, self.lazy_variance = self.image, self.variance
            self.lazy_mask = self.mask
        if not np.any(self.variance > 0):
            raise BadInputDataError(f"the {what} variance plane has no positive value")

    def scale_variance(self, factor: float) -> None:
        same = self.lazy_variance is self.variance
        self.variance = self.variance * np.float32(factor)
        self.lazy_variance = self.variance if same else self.lazy_variance * np.float32(factor)

    def set_mask(self, function) -> None:
        same = self.lazy_mask is self.mask
        self.mask = function(self.mask)
        self.lazy_mask = self.mask if same else function(self.lazy_mask)


def _template_mask_function(config: AlardLuptonConfig):
    keep = mask_value(config.preserve_template_mask)
    renames = [(mask_bit(name), mask_bit(f"{name}_TEMPLATE"))
               for name in config.rename_template_mask]

    def function(mask):
        out = mask & MASK_DTYPE(keep)
        if isinstance(mask, np.ndarray):
            present = int(np.bitwise_or.reduce(mask, axis=None)) if mask.size else 0
        else:
            present = 0xFFFFFFFF  # lazy: decide per block
        for source, target in renames:
            if not present & (1 << source):
                continue
            # Move bit `source` to bit `target` with shifts (no temporaries of other dtypes).
            moved = (mask >> MASK_DTYPE(source)) & MASK_DTYPE(1)
            moved <<= MASK_DTYPE(target)
            out |= moved
        return out

    return function


def _science_mask_function():
    clear = mask_value(["DETECTED", "DETECTED_NEGATIVE"])

    def function(mask):
        return mask & MASK_DTYPE(~clear & 0xFFFFFFFF)

    return function


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()
        self._last = self._start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time_{name}"] = now - self._last
        self._last = now

    def total(self) -> float:
        return time.perf_counter() - self._start


def _parse_sources(sources, origin) -> tuple[np.ndarray, np.ndarray] | None:
    if sources is None:
        return None
    if isinstance(sources, pd.DataFrame):
        missing = [c for c in ("x", "y") if c not in sources.columns]
        if missing:
            raise ConfigurationError(f"the kernel-source table lacks column(s) {missing}; "
                                     f"it needs parent-frame pixel positions 'x' and 'y'")
        return sources["x"].to_numpy(float), sources["y"].to_numpy(float)
    array = np.asarray(sources, float)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ConfigurationError("sources must be a DataFrame with x, y columns or an (n, 2) array")
    return array[:, 0], array[:, 1]


class _Prepared:
    """Validated, variance-scaled, mask-prepared inputs with their statistics."""

    def __init__(self, science: Exposure, template: Exposure, config: AlardLuptonConfig, timer):
        validate_pair(science, template)
        self.workers = _fft_workers(config, science, template)
        self.fft_dtype = np.float64 if config.fft_precision == "float64" else np.float32
        self.science_psf_source = "given" if science.psf is not None else "estimated"
        self.template_psf_source = "given" if template.psf is not None else "estimated"
        self.science_psf = _require_psf(science, "science")
        self.template_psf = _require_psf(template, "template")
        self.origin = science.origin
        self.shape = science.shape
        self.center = science.center
        sci = _Image(science, "science")
        tmpl = _Image(template, "template")
        no_data = ((sci.mask | tmpl.mask) & MASK_DTYPE(_NO_DATA)) != 0
        self.coverage = 1.0 - float(no_data.mean())
        if self.coverage < config.required_template_fraction:
            raise NoWorkFound(
                f"only {self.coverage:.1%} of the pixels have data in both images (required "
                f"{config.required_template_fraction:.0%}, "
                f"AlardLuptonConfig.required_template_fraction)")
        timer.lap("validate")
        cx, cy = self.center
        self.science_fwhm, *self.science_axes = _psf_widths(self.science_psf, cx, cy)
        self.template_fwhm, *self.template_axes = _psf_widths(self.template_psf, cx, cy)
        self.science_psf_stamp = self.science_psf.image(cx, cy)
        self.template_psf_stamp = self.template_psf.image(cx, cy)
        vcfg = config.variance
        ignore = mask_value(vcfg.ignore_mask_planes)
        jobs = [(image, stamp, fwhm) for image, stamp, fwhm in (
            (sci, self.science_psf_stamp, self.science_fwhm),
            (tmpl, self.template_psf_stamp, self.template_fwhm))]

        def statistics(job, workers):
            image, stamp, fwhm = job
            return image_statistics(image.image, image.variance, image.mask, stamp,
                                    ignore_bits=ignore, bin_size=vcfg.background_bin_size,
                                    threshold=vcfg.source_threshold, fwhm=fwhm, workers=workers)

        if self.workers > 1:
            # Numpy inputs and spare cores: both images at once (NumPy/SciPy release the GIL).
            with ThreadPoolExecutor(max_workers=2) as pool:
                stats = list(pool.map(lambda job: statistics(job, max(1, self.workers // 2)), jobs))
        else:
            stats = [statistics(job, self.workers) for job in jobs]
        self.science_stats, self.template_stats = stats
        timer.lap("statistics")
        self.science_scale = self.template_scale = None
        if vcfg.enabled:
            for image, stats, attr in ((sci, self.science_stats, "science_scale"),
                                       (tmpl, self.template_stats, "template_scale")):
                result = measure_variance_scale(
                    image.image, image.variance, image.mask, source_mask=stats.sources,
                    background=stats.background, limit=vcfg.limit,
                    bin_size=vcfg.background_bin_size, ignore_planes=vcfg.ignore_mask_planes,
                    what=image.what)
                image.scale_variance(result.factor)
                setattr(self, attr, result)
        timer.lap("variance_scaling")
        self.science_noise, self.template_noise = _noise_correlations(
            config.decorrelation, ((sci, self.science_stats), (tmpl, self.template_stats)))
        timer.lap("noise_correlation")
        # Keep only what later steps use (the science S/N map selects stars and footprints).
        self.science_stats = dataclasses.replace(self.science_stats, sources=None)
        self.template_stats = dataclasses.replace(self.template_stats, sources=None, snr=None)
        sci.set_mask(_science_mask_function())
        tmpl.set_mask(_template_mask_function(config))
        self.sci, self.tmpl = sci, tmpl

    @property
    def science_snr_scale(self) -> float:
        return 1.0 / math.sqrt(self.science_scale.factor) if self.science_scale else 1.0


@dataclasses.dataclass(frozen=True)
class _InputNoise:
    """Measured noise autocorrelation of one input and whether the filter models it."""

    measured: object  # diffim_dask.noise_correlation.NoiseCorrelation
    correlated: bool

    @property
    def acf(self):
        """Autocorrelation stamp used by the filter (``None``: white noise)."""
        return self.measured.acf if self.correlated else None


def _noise_correlations(dcfg, images):
    """Measured noise of each input (``None``, ``None`` unless the filter models it).

    Measured on sky pixels (good, outside the source mask, background
    removed); an input whose lag-1 correlation is below
    ``noise_correlation_threshold`` is modelled as white.
    """
    if not dcfg.enabled or dcfg.noise_model != "measured":
        return None, None
    out = []
    for image, stats in images:
        # Sources are already masked (PSF-smoothed S/N above the source threshold, grown);
        # the helper's own default clip (2.5σ, grown by 3 px) would also remove the positive
        # excursions of correlated noise and their neighbours, biasing the correlation low
        # (by ~8% in the sum for lag-1 ≈ 0.4), so only isolated > 5σ pixels are clipped.
        correlation = measure_noise_correlation(
            image.image, stats.good & ~stats.sources, stats.background,
            radius=dcfg.noise_correlation_radius, clip=5.0, grow=1)
        correlated = correlation.status(dcfg.noise_correlation_threshold) != "white"
        out.append(_InputNoise(correlation, correlated))
    return tuple(out)


def _choose_direction(mode: str, prep: _Prepared) -> str:
    if mode != "auto":
        return mode
    # Convolve the science image only if the template PSF is wider on both axes (§3.3).
    wider_x = prep.template_axes[0] > prep.science_axes[0]
    wider_y = prep.template_axes[1] > prep.science_axes[1]
    return "convolveScience" if (wider_x and wider_y) else "convolveTemplate"


# -- kernel fit ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Matching:
    """One matching problem: fit ``reference ≈ convolved ⊗ K + background``."""

    direction: str
    reference: np.ndarray
    var_reference: np.ndarray
    reference_mask: np.ndarray
    convolved: np.ndarray
    var_convolved: np.ndarray
    convolved_mask: np.ndarray
    reference_psf: np.ndarray
    extra_margin: int = 0
    #: Filter the reference's pixel noise went through (score variant: the preconvolution).
    reference_noise_filter: np.ndarray | None = None


#: Mask planes of injected sources (QA runs), in either input.
_INJECTED_BITS = mask_value(("INJECTED", "INJECTED_TEMPLATE"))


class _KernelFitting:
    """Kernel sources and the fit strategies (stars, all-pixels) for one matching problem."""

    def __init__(self, prep: _Prepared, config: AlardLuptonConfig, basis, matching: _Matching,
                 sources, timer: _Timer):
        self.prep, self.config, self.basis, self.matching = prep, config, basis, matching
        scfg = config.sources
        half = basis.half_width
        self.fit_half = basis.size  # fit region (2 size + 1)² keeps the kernel reach inside
        stamp_half = self.fit_half + half + matching.extra_margin
        self.exclude = mask_value(scfg.exclude_mask_planes)
        # Injected sources (QA runs) reject a kernel star only near its core; elsewhere in its
        # stamp they get zero weight (_star_usable), so dense injections leave stars to fit.
        # (A star whose aperture flux they bias fails the flux-ratio test instead.)
        self.soft = self.exclude & _INJECTED_BITS
        halo = int(math.ceil(max(prep.science_fwhm, prep.template_fwhm)))
        box = (prep.origin[0], prep.origin[0] + prep.shape[1] - 1,
               prep.origin[1], prep.origin[1] + prep.shape[0] - 1)
        self.box = box
        self.kernel_spatial = ChebyshevBasis2D(config.fit.spatial_kernel_order, box)
        self.background_spatial = ChebyshevBasis2D(config.fit.spatial_background_order, box)
        with single_blas_thread():
            stats = prep.science_stats
            self.science_bgsub = _BgSub(prep.sci.image, stats.background, stats.good)
            stars, counts = select_stars(
                stats, self.science_bgsub, (matching.reference_mask, matching.convolved_mask),
                self.exclude, prep.science_psf_stamp, prep.science_fwhm, scfg,
                stamp_half=stamp_half, origin=prep.origin,
                positions=_parse_sources(sources, prep.origin), snr_scale=prep.science_snr_scale,
                core_bits=self.soft, core_half=halo)
            if len(stars):
                tstats = prep.template_stats
                template_bgsub = _BgSub(prep.tmpl.image, tstats.background, tstats.good)
                radius = scfg.flux_aperture_fwhm * max(prep.science_fwhm, prep.template_fwhm)
                outlier, ratio = flux_ratio_outliers(
                    stars, self.science_bgsub, prep.sci.variance, template_bgsub,
                    prep.tmpl.variance, radius, scfg.max_flux_ratio_sigma,
                    scfg.flux_ratio_tolerance)
                stars = stars.assign(flux_ratio=ratio)[~outlier].reset_index(drop=True)
                counts["rejected_flux_ratio"] = int(outlier.sum())
                counts["n_selected"] = int(len(stars))
        self.stars, self.counts = stars, counts
        self._fitter = None
        self._usable = None
        # Injected pixels grown by a FWHM (INJECTED marks the cores only), per input: their
        # union is what the quality gate ignores (``injected``); the star fits give zero weight
        # to the excluded ones, on the convolved image over the kernel's reach as well.
        masks = (matching.reference_mask, matching.convolved_mask)
        grown = _grown_flags(masks, _INJECTED_BITS, halo)
        self.injected = None if grown is None else grown[0] | grown[1]
        soft = grown if self.soft == _INJECTED_BITS else _grown_flags(masks, self.soft, halo)
        self._star_usable = None if soft is None else (
            ~soft[0] & ~grow_flags(soft[1], self.basis.half_width))
        timer.lap("kernel_sources")

    def all_pixels_spatial(self) -> ChebyshevBasis2D:
        """Kernel spatial basis of an all-pixels fit, constrained by the image's stars.

        An all-pixels fit sees every pixel, but only point sources tell it how
        the kernel's shape varies: with a handful of stars a 2nd-order kernel
        bends locally around a variable or transient and absorbs part of it
        (on the 256² DECam frames, 9 stars: the variable's significance fell
        from 18 to 12). The order is lowered until each spatial term has
        ``auto_stars_per_term`` selected stars (0: no cap), the rule the
        'auto' strategy already applies to star fits.
        """
        order = self.config.fit.spatial_kernel_order
        per_term = self.config.sources.auto_stars_per_term
        # Stars lost to injected neighbours still count: an injection run keeps the order of
        # the run without injections.
        n_stars = len(self.stars) + self.counts.get("rejected_injected_neighbour", 0)
        if per_term > 0:
            while order > 0 and per_term * (order + 1) * (order + 2) // 2 > n_stars:
                order -= 1
        if order == self.kernel_spatial.order:
            return self.kernel_spatial
        return ChebyshevBasis2D(order, self.box)

    def fitter(self, need_usable: bool, kernel_spatial: ChebyshevBasis2D | None = None
               ) -> KernelFitter:
        m = self.matching
        if need_usable and self._usable is None:
            # Good reference pixel and convolved image good over the kernel footprint.
            bad_reference = (m.reference_mask & MASK_DTYPE(self.exclude)) != 0
            bad_convolved = (m.convolved_mask & MASK_DTYPE(self.exclude)) != 0
            self._usable = ~bad_reference & ~grow_flags(bad_convolved, self.basis.half_width)
        return KernelFitter(m.reference, m.convolved, m.var_reference, m.var_convolved,
                            self._usable if need_usable else self._star_usable, self.basis,
                            self.kernel_spatial if kernel_spatial is None else kernel_spatial,
                            self.background_spatial,
                            self.config.fit, self.config.basis, self.prep.origin,
                            reference_psf=m.reference_psf,
                            kernel_norm2=_kernel_norm2_estimate(self.basis),
                            threads=self.prep.workers,
                            reference_noise_filter=m.reference_noise_filter)

    def usable_fraction(self) -> float:
        """Fraction of the pixels an all-pixels fit could use."""
        self.fitter(True)  # builds the usable map
        return float(self._usable.mean())

    def fit_psf_models(self) -> KernelSolution:
        """Constant kernel matching the PSF models; sum from the photometric calibrations."""
        prep, matching = self.prep, self.matching
        calibs = (prep.sci.exposure.photo_calib, prep.tmpl.exposure.photo_calib)
        ratio = 1.0
        if all(c is not None for c in calibs):
            ratio = float(calibs[1].njy_per_count / calibs[0].njy_per_count)
        if matching.direction == "convolveScience":
            ratio = 1.0 / ratio
            convolved_psf = prep.science_psf_stamp
            skies = (prep.template_stats.sky_level, prep.science_stats.sky_level)
        else:
            convolved_psf = prep.template_psf_stamp
            skies = (prep.science_stats.sky_level, prep.template_stats.sky_level)
        return fit_psf_models(
            self.basis, matching.reference_psf, convolved_psf, self.kernel_spatial,
            self.background_spatial, kernel_sum=ratio,
            background_level=float(skies[0] - ratio * skies[1]),
            basis_config=self.config.basis, max_condition=self.config.fit.max_condition_number)

    def stars_needed(self, strategy: str) -> int:
        scfg = self.config.sources
        if strategy == "stars":
            return scfg.min_kernel_sources
        return max(scfg.auto_min_sources, scfg.min_kernel_sources,
                   scfg.auto_stars_per_term * len(self.kernel_spatial))

    def solve(self, strategy: str) -> KernelSolution:
        """Fit with ``strategy`` ('stars', 'all-pixels' or 'auto': stars, else all-pixels)."""
        failures: list[str] = []
        counts = dict(self.counts)
        solution = None
        with single_blas_thread():
            if strategy in ("stars", "auto"):
                needed = self.stars_needed(strategy)
                if len(self.stars) >= needed:
                    try:
                        solution = self.fitter(False).fit_stars(
                            self.stars, self.fit_half,
                            min_sources=self.config.sources.min_kernel_sources,
                            max_per_cell=self.config.sources.max_per_cell)
                    except FitFailure as exc:
                        failures.append(f"stars: {exc}")
                        counts.update(exc.metadata)
                    if (solution is not None and strategy == "auto"
                            and solution.metadata["n_used"] < needed):
                        failures.append(f"stars: only {solution.metadata['n_used']} stars left "
                                        f"after rejection (need {needed})")
                        solution = None
                else:
                    failures.append(f"stars: only {len(self.stars)} usable kernel stars "
                                    f"(need {needed})")
                if solution is None and strategy == "stars":
                    _raise_fit_failure(self.prep, self.config, failures, counts)
            if (solution is None and strategy == "auto"
                    and len(self.stars) < self.config.sources.auto_psf_model_below
                    and self.usable_fraction() >= self.config.sources.min_pixel_fraction):
                solution = self.fit_psf_models()
            if solution is None:
                iy, ix, tile_half = tile_grid(self.prep.shape, self.config.sources.tile_size,
                                              self.basis.half_width)
                try:
                    solution = self.fitter(True, self.all_pixels_spatial()).fit_all_pixels(
                        iy, ix, tile_half, self.config.sources)
                except FitFailure as exc:
                    failures.append(f"all-pixels: {exc}")
                    counts.update(exc.metadata)
                    _raise_fit_failure(self.prep, self.config, failures, counts)
        kernel_sum = float(solution.kernel.kernel_sum())
        if not (np.isfinite(kernel_sum) and kernel_sum > 0):
            raise InsufficientKernelSourcesError(
                f"fitted kernel sum {kernel_sum} is not positive; the kernel fit is unusable",
                {"kernel_sum": kernel_sum})
        solution.metadata["fallback_reason"] = "; ".join(failures)
        solution.metadata["selection"] = counts
        return solution

    def gate_stars(self, solution: KernelSolution) -> pd.DataFrame:
        """Stars for the quality gate: those used by a star fit, else the selected stars.

        With an all-pixels kernel, candidates whose template/science flux ratio
        is far from the fitted one (1 / kernel sum) are variables or transients:
        judging the kernel by their residual would fail a good subtraction. The
        flux-ratio test of the selection cannot catch them when fewer than three
        candidates exist, so it is applied here against the fitted kernel sum.
        """
        if solution.metadata["strategy"] == "stars":
            return solution.table[solution.table["used"]]
        stars = self.stars
        if len(stars) and "flux_ratio" in stars:
            ksum = float(np.mean(solution.kernel.kernel_sum(stars["x"].to_numpy(),
                                                            stars["y"].to_numpy())))
            consistent = np.abs(stars["flux_ratio"].to_numpy() * ksum - 1.0) <= _GATE_RATIO_TOLERANCE
            stars = stars[consistent]
        return stars

    def source_table(self, solution: KernelSolution) -> pd.DataFrame:
        if solution.metadata["strategy"] == "stars":
            return solution.table
        return _merge_tables(solution.table, self.stars)


#: Largest fractional mismatch between a gate star's flux ratio and the fitted kernel sum.
_GATE_RATIO_TOLERANCE = 0.25


def _kernel_norm2_estimate(basis) -> float:
    """‖K‖² of a unit-sum Gaussian of the basis's central width, 1/(4π σ²)."""
    sigma = basis.sigmas[len(basis.sigmas) // 2] if basis.sigmas else 1.0
    return 1.0 / (4.0 * math.pi * sigma**2)


def _raise_fit_failure(prep, config, failures, counts):
    if prep.coverage < config.min_template_fraction_for_expected_success:
        raise NoWorkFound(
            f"kernel fit failed with only {prep.coverage:.1%} template coverage (below "
            f"{config.min_template_fraction_for_expected_success:.0%}): " + "; ".join(failures))
    raise InsufficientKernelSourcesError(
        "could not fit the PSF-matching kernel: " + "; ".join(failures)
        + f". Selection counts: {counts}. Try KernelSourceConfig.strategy='all-pixels', a lower "
          "min_snr, or check the masks.",
        {"n_sources": int(counts.get("n_selected", 0)),
         "n_required": int(config.sources.min_kernel_sources), **counts})


# -- outputs ---------------------------------------------------------------------------------


def _odd(value: float) -> int:
    size = max(1, int(round(value)))
    return size if size % 2 == 1 else size + 1


def _node_positions(prep: _Prepared, grid: int):
    x0, y0 = prep.origin
    ny, nx = prep.shape
    xs = x0 + (np.arange(grid) + 0.5) * nx / grid - 0.5
    ys = y0 + (np.arange(grid) + 0.5) * ny / grid - 0.5
    return xs, ys


def _filter_nodes(kernel, xs, ys, image_kernel_fn, correlation_reference=None,
                  correlation_convolved=None, power_floor=NOISE_POWER_FLOOR):
    """FilterNodes of the decorrelation: per node the filter f(K_node), f itself acting on the
    unconvolved image's noise, and K_node ⊗ f acting on the convolved image's noise.

    With correlated input noise (normalised autocorrelation stamps, ``None`` = white) the
    variance kernels are scaled by the square root of their noise correlation factors
    ``c`` (:func:`.decorrelation.noise_correlation_factor`), so the propagated per-pixel
    variance is ``c_U V_U ‖f‖² + c_C V_C ‖K ⊗ f‖²``; the grams scale by ``c_C``.
    """
    image_k, ref_k, conv_k, grams = [], [], [], []
    for y in ys:
        image_row, ref_row, conv_row, gram_row = [], [], [], []
        for x in xs:
            k_node = kernel.image(x, y)
            filt = image_kernel_fn(k_node)
            effective = fftconvolve(k_node, filt, mode="full")
            factor_ref = noise_correlation_factor(filt, correlation_reference, power_floor)
            factor_conv = noise_correlation_factor(effective, correlation_convolved, power_floor)
            image_row.append(filt)
            ref_row.append(filt * math.sqrt(factor_ref))
            conv_row.append(effective * math.sqrt(factor_conv))
            gram_row.append(kernel.norm_gram(filt) * factor_conv)
        image_k.append(image_row)
        ref_k.append(ref_row)
        conv_k.append(conv_row)
        grams.append(gram_row)
    return _apply.FilterNodes(np.asarray(xs, float), np.asarray(ys, float), np.array(image_k),
                              np.array(ref_k), np.array(conv_k), np.array(grams))


def _single_node(kernel, filt, ref, conv, gram):
    cx, cy = kernel.center
    return _apply.FilterNodes(np.array([cx]), np.array([cy]), filt[None, None], ref[None, None],
                              conv[None, None], gram[None, None])


@dataclasses.dataclass
class _Outputs:
    difference: Exposure
    matched_image: Exposure
    background: SpatialBackground
    score: Exposure | None
    metadata: dict
    gate_planes: object  # (iy, ix, half) -> difference and variance stamps for the gate
    gate_science: _BgSub  # the science image they are compared with


def _plain_outputs(prep, config, fitting: _KernelFitting, solution: KernelSolution,
                   science: Exposure) -> _Outputs:
    """Matched image, difference, variance and masks of the plain Alard–Lupton subtraction."""
    direction = fitting.matching.direction
    kernel = solution.kernel
    kernel_sum = float(kernel.kernel_sum())
    sci, tmpl = prep.sci, prep.tmpl
    fill_bits = mask_value(config.bad_mask_planes)
    if direction == "convolveTemplate":
        ref_img, conv_img = sci, tmpl
        ref_corr, conv_corr = prep.science_noise, prep.template_noise
        conv_sky = prep.template_stats.sky_level
        sign, scale = 1.0, 1.0
        background = SpatialBackground(solution.background_coefficients, fitting.background_spatial)
    else:
        ref_img, conv_img = tmpl, sci
        ref_corr, conv_corr = prep.template_noise, prep.science_noise
        conv_sky = prep.science_stats.sky_level
        # D = (S ⊗ K − T) / κ: science flux units; the differential background flips sign.
        sign, scale = -1.0, 1.0 / kernel_sum
        background = SpatialBackground(-solution.background_coefficients / kernel_sum,
                                       fitting.background_spatial)
    dcfg = config.decorrelation
    half = kernel.half_width
    ignore = mask_value(dcfg.ignore_mask_planes)
    var_ref_mean = mean_variance(ref_img.variance, ref_img.mask, ignore)
    var_conv_mean = mean_variance(conv_img.variance, conv_img.mask, ignore)
    identity = np.ones((1, 1))
    k_centre = kernel.image()
    ref_acf = ref_corr.acf if ref_corr is not None else None
    conv_acf = conv_corr.acf if conv_corr is not None else None
    if dcfg.enabled:
        size = _odd(dcfg.kernel_size_factor * kernel.size)
        xs, ys = (_node_positions(prep, dcfg.grid) if dcfg.grid > 1
                  else ([kernel.center[0]], [kernel.center[1]]))

        def filter_at(k_node):
            return decorrelation_kernel(k_node, var_ref_mean, var_conv_mean, size,
                                        correlation_unconvolved=ref_acf,
                                        correlation_convolved=conv_acf,
                                        power_floor=dcfg.noise_power_floor)

        nodes = _filter_nodes(kernel, xs, ys, filter_at, ref_acf, conv_acf,
                              dcfg.noise_power_floor)
        filter_half = size // 2
        variance_nodes = nodes
    else:
        nodes, filter_half = None, 0
        variance_nodes = _single_node(kernel, identity, identity, k_centre, kernel.norm_gram())
    matched_nodes = _single_node(kernel, identity, np.zeros((1, 1)), k_centre, kernel.norm_gram())

    origin, workers, fft_dtype = prep.origin, prep.workers, prep.fft_dtype
    dilate_planes, keep_planes = _mask_planes(direction, config)
    zero_bits = fill_bits | mask_value("SAT_TEMPLATE")

    def pipeline(ref_image, ref_var, ref_mask, conv_image, conv_var, conv_mask_in,
                 block_offset=None):
        """All output planes from the (lazy, whole or cut-out) input planes."""
        run = dict(workers=workers, fft_dtype=fft_dtype, block_offset=block_offset)
        matched = _apply.convolve_image(conv_image, conv_mask_in, kernel=kernel, origin=origin,
                                        fill_bits=fill_bits, fill_value=conv_sky, scale=scale,
                                        **run)
        conv_mask = _apply.dilate_mask(conv_mask_in, dilate_half=half,
                                       dilate_planes=dilate_planes, keep_planes=keep_planes,
                                       block_offset=block_offset)
        source_masks = (ref_mask, conv_mask)
        difference = _apply.difference_image(
            ref_image, matched, source_masks, origin=origin, sign=sign, scale_reference=scale,
            background=background if config.subtract_background else None,
            zero_bits=zero_bits, nodes=nodes, full_shape=prep.shape, edge_width=half, **run)
        diff_var = _apply.propagate_variance(
            ref_var, conv_var, source_masks, origin=origin, nodes=variance_nodes,
            spatial=kernel.spatial, scale_reference=scale, scale_convolved=scale,
            propagation=config.variance_propagation, **run)
        return matched, conv_mask, difference, diff_var

    matched, conv_mask, difference, diff_var = pipeline(
        ref_img.lazy_image, ref_img.lazy_variance, ref_img.lazy_mask,
        conv_img.lazy_image, conv_img.lazy_variance, conv_img.lazy_mask)
    matched_mask = _apply.or_masks(conv_mask, None, full_shape=prep.shape, edge_width=half)
    matched_var = _apply.propagate_variance(
        conv_img.lazy_variance, conv_img.lazy_variance, (conv_mask,), origin=origin,
        nodes=matched_nodes, spatial=kernel.spatial, scale_reference=0.0, scale_convolved=scale,
        propagation=config.variance_propagation, workers=workers, fft_dtype=fft_dtype)
    diff_mask = _apply.or_masks(ref_img.lazy_mask, conv_mask, full_shape=prep.shape,
                                edge_width=half + filter_half)
    gate_planes = _gate_planes(
        difference, diff_var, lambda *cuts, block_offset: pipeline(
            *cuts, block_offset=block_offset)[2:],
        (ref_img.image, ref_img.variance, ref_img.mask, conv_img.image, conv_img.variance,
         conv_img.mask), 2 * half + filter_half + variance_nodes.var_half, prep.shape)

    matched_psf = prep.science_psf if direction == "convolveTemplate" else prep.template_psf
    diff_psf = matched_psf
    psf_choice = dcfg.difference_psf
    psf_bias, phi_centre = 0.0, None
    if dcfg.enabled:
        cx, cy = kernel.center
        phi_centre = filter_at(k_centre) if dcfg.grid > 1 else nodes.image_kernels[0, 0]
        psf_bias = psf_flux_bias(matched_psf.image(cx, cy), phi_centre)
        if psf_choice == "auto":
            psf_choice = "decorrelated" if abs(psf_bias) > dcfg.psf_bias_tolerance \
                else "unconvolved"
        if psf_choice == "decorrelated":
            diff_psf = _decorrelated_psf(prep, matched_psf, nodes, phi_centre)
    else:
        psf_choice = "unconvolved"
    metadata = {
        "decorrelation": bool(dcfg.enabled), "decorrelation_grid": int(dcfg.grid),
        "difference_psf": psf_choice, "decorrelation_kernel_size": 2 * filter_half + 1,
        "decorrelation_psf_flux_bias": psf_bias,
        "decorrelation_noise_model": dcfg.noise_model if dcfg.enabled else "none",
        "mean_variance_unconvolved": var_ref_mean, "mean_variance_convolved": var_conv_mean,
        **_correlation_metadata("unconvolved", ref_corr, phi_centre, dcfg.noise_power_floor),
        **_correlation_metadata("convolved", conv_corr, None if phi_centre is None else
                                fftconvolve(k_centre, phi_centre, mode="full"),
                                dcfg.noise_power_floor),
    }
    return _Outputs(
        science.with_planes(difference, diff_var, diff_mask).replace(psf=diff_psf),
        science.with_planes(matched, matched_var, matched_mask).replace(psf=matched_psf),
        background, None, metadata, gate_planes, fitting.science_bgsub)


def _decorrelated_psf(prep, psf, nodes, phi_centre):
    """The input PSF convolved with the decorrelation filter: what the difference really has.

    An ImagePsf when neither the PSF nor the filter varies; otherwise a GridPsf on the
    filter's nodes (or a 3 x 3 grid of tile centres for a single filter and a varying PSF).
    """
    varying_psf = bool(getattr(psf, "is_spatially_varying", True))
    n_nodes = nodes.image_kernels.shape[0] * nodes.image_kernels.shape[1]
    if n_nodes == 1 and not varying_psf:
        cx, cy = prep.center
        return ImagePsf(fftconvolve(psf.image(cx, cy), phi_centre, mode="full"))
    if n_nodes > 1:
        xs, ys = nodes.x_nodes, nodes.y_nodes
        filters = nodes.image_kernels
    else:
        xs, ys = _node_positions(prep, 3)
        filters = np.broadcast_to(phi_centre, (3, 3) + phi_centre.shape)
    size = psf.image(prep.center[0], prep.center[1]).shape[0]
    stamps = np.array([[fftconvolve(psf.image(x, y, size=size), filters[j, i], mode="full")
                        for i, x in enumerate(xs)] for j, y in enumerate(ys)])
    return GridPsf(xs, ys, stamps)


def _correlation_metadata(which: str, noise: _InputNoise | None, kernel, floor) -> dict:
    """Measured lag-1 correlation and ACF sum of one input, whether the filter models it, and
    the variance correlation factor of ``kernel`` (the filter acting on that input's noise)."""
    if noise is None:
        return {f"noise_correlated_{which}": False}
    meta = {f"noise_correlated_{which}": noise.correlated,
            f"noise_lag1_{which}": [float(v) for v in noise.measured.lag1],
            f"noise_acf_sum_{which}": noise.measured.matched_filter_factor}
    if kernel is not None:
        meta[f"noise_variance_factor_{which}"] = noise_correlation_factor(kernel, noise.acf,
                                                                          floor)
    return meta


def _gate_planes(difference, variance, pipeline, sources, reach: int, shape):
    """``(iy, ix, half) -> (difference stamps, variance stamps)`` for the quality gate.

    Numpy outputs are simply cut. For lazy (dask) outputs the stamps are
    recomputed from the numpy copies of the inputs (already in memory for the
    fit) by running the same block functions on cut-outs with their global
    offsets — exact, like chunked processing — so the gate never computes the
    whole lazy graph.
    """
    if not any(isinstance(a, da.Array) for a in (difference, variance)):
        def cut(iy, ix, half):
            return _cutouts(difference, iy, ix, half), _cutouts(variance, iy, ix, half)
        return cut

    def evaluate(iy, ix, half):
        radius = half + reach
        stamps, var_stamps = [], []
        for y, x in zip(iy, ix):
            y0, y1 = max(0, y - radius), min(shape[0], y + radius + 1)
            x0, x1 = max(0, x - radius), min(shape[1], x + radius + 1)
            diff, var = pipeline(*(plane[y0:y1, x0:x1] for plane in sources),
                                 block_offset=(int(y0), int(x0)))
            box = (slice(y - half - y0, y + half + 1 - y0), slice(x - half - x0, x + half + 1 - x0))
            stamps.append(diff[box])
            var_stamps.append(var[box])
        return np.array(stamps), np.array(var_stamps)

    return evaluate


def _gate_metrics(prep, config, gate_planes, science_bgsub: _BgSub, stars,
                  injected: np.ndarray | None = None) -> dict:
    """Footprint residual ratio (anchor §9.1) on the kernel stars.

    The anchor subtracts the typical sky ``|D|``; here the expected ``|D|`` of
    pure noise at each footprint pixel, ``sqrt(2/π) σ``, is subtracted, so the
    extra Poisson noise at faint stars does not read as a residual.
    """
    if stars is None or len(stars) == 0:
        return {"footprint_ratio_mean": float("nan"), "footprint_ratio_std": float("nan"),
                "footprint_ratio_n": 0, "quality_gate": "skipped: no kernel stars"}
    qcfg = config.quality
    if len(stars) > qcfg.max_stars:
        order = np.argsort(-stars["snr"].to_numpy(), kind="stable")
        stars = stars.iloc[order[np.linspace(0, len(stars) - 1, qcfg.max_stars).astype(int)]]
    shape = disc(qcfg.footprint_radius_fwhm * prep.science_fwhm)
    half = shape.shape[0] // 2
    ny, nx = prep.shape
    iy = stars["iy"].to_numpy()
    ix = stars["ix"].to_numpy()
    inside = (iy >= half) & (iy < ny - half) & (ix >= half) & (ix < nx - half)
    iy, ix = iy[inside], ix[inside]
    empty = np.zeros((0,) + shape.shape)
    stamps, var_stamps = gate_planes(iy, ix, half) if iy.size else (empty, empty)
    science = science_bgsub.cutouts(iy, ix, half) if iy.size else empty
    # Footprint: the star's pixels above the detection threshold of the S/N map, in a disc.
    threshold = config.sources.detection_threshold / prep.science_snr_scale
    snr = _cutouts(prep.science_stats.snr, iy, ix, half) if iy.size else empty
    noise = np.sqrt(2.0 / np.pi) * np.sqrt(np.clip(var_stamps, 0, None))
    footprints = shape[None] & (snr > threshold)
    if injected is not None and iy.size:
        # Injected sources (QA runs) near a star are real signal in the difference, not residual.
        footprints &= ~_cutouts(injected, iy, ix, half)
    ratios = footprint_residual_ratios(np.abs(stamps), np.abs(science), footprints, noise)
    ratios = ratios[np.isfinite(ratios)]
    mean = float(ratios.mean()) if ratios.size else float("nan")
    std = float(ratios.std()) if ratios.size > 1 else 0.0
    failed = bool(ratios.size) and (mean > qcfg.max_ratio_mean or std > qcfg.max_ratio_std)
    return {"footprint_ratio_mean": mean, "footprint_ratio_std": std,
            "footprint_ratio_n": int(ratios.size), "quality_gate": "failed" if failed else "passed"}


def _grown_flags(masks, bits: int, half: int) -> list[np.ndarray] | None:
    """Per mask, the pixels with any of ``bits`` grown by ``half``; ``None`` if none is set."""
    flagged = [(mask & MASK_DTYPE(bits)) != 0 for mask in masks]
    if not any(f.any() for f in flagged):
        return None
    return [grow_flags(f, half) for f in flagged]


def _check_gate(config, metrics: dict) -> None:
    qcfg = config.quality
    if metrics["quality_gate"] == "failed" and qcfg.enabled:
        raise BadSubtractionError(
            f"difference image fails the footprint residual gate: mean ratio "
            f"{metrics['footprint_ratio_mean']:.3f} (max {qcfg.max_ratio_mean}), std "
            f"{metrics['footprint_ratio_std']:.3f} (max {qcfg.max_ratio_std}) over "
            f"{metrics['footprint_ratio_n']} kernel stars (QualityGateConfig)",
            {"footprint_ratio_mean": metrics["footprint_ratio_mean"],
             "footprint_ratio_std": metrics["footprint_ratio_std"],
             "n_stars": metrics["footprint_ratio_n"]})


def _kernel_metadata(kernel, prep) -> dict:
    x0, y0 = prep.origin
    ny, nx = prep.shape
    gx, gy = np.meshgrid(np.linspace(x0, x0 + nx - 1, 9), np.linspace(y0, y0 + ny - 1, 9))
    sums = kernel.kernel_sum(gx, gy)
    return {"kernel_sum": float(kernel.kernel_sum()),
            "kernel_sum_min": float(sums.min()), "kernel_sum_max": float(sums.max()),
            "kernel_sum_std": float(sums.std())}


def _fft_workers(config, science: Exposure, template: Exposure) -> int:
    if config.fft_workers > 0:
        return int(config.fft_workers)
    if science.is_lazy or template.is_lazy:
        return 1
    return default_threads()


def _prepare_config(config):
    if config is None:
        return AlardLuptonConfig()
    if isinstance(config, dict):
        return AlardLuptonConfig.from_dict(config)
    if not isinstance(config, AlardLuptonConfig):
        raise ConfigurationError(
            f"config must be an AlardLuptonConfig, got {type(config).__name__}")
    return config


def _run(prep, config, fitting: _KernelFitting, build, timer, base_info) -> SubtractionResult:
    """Fit, build the outputs, apply the gate (retrying all-pixels in 'auto' if it fails)."""
    solution = fitting.solve(config.sources.strategy)
    timer.lap("fit")
    outputs = build(solution)
    timer.lap("apply")
    metrics = _gate_metrics(prep, config, outputs.gate_planes, outputs.gate_science,
                            fitting.gate_stars(solution), fitting.injected)
    retry = {}
    if (metrics["quality_gate"] == "failed" and config.sources.strategy == "auto"
            and solution.metadata["strategy"] == "stars"):
        # A star fit that fails the gate (too few or unrepresentative stars): try all pixels.
        try:
            alternative = fitting.solve("all-pixels")
        except InsufficientKernelSourcesError:
            alternative = None
        if alternative is not None:
            alt_outputs = build(alternative)
            alt_metrics = _gate_metrics(prep, config, alt_outputs.gate_planes,
                                        alt_outputs.gate_science, fitting.gate_stars(solution),
                                        fitting.injected)
            retry = {"gate_retry": "all-pixels",
                     "gate_retry_stars_ratio": metrics["footprint_ratio_mean"]}
            if alt_metrics["footprint_ratio_mean"] < metrics["footprint_ratio_mean"]:
                solution, outputs, metrics = alternative, alt_outputs, alt_metrics
                retry["gate_retry_used"] = True
            else:
                retry["gate_retry_used"] = False
    timer.lap("quality")
    metadata = _base_metadata(prep, config, base_info, solution)
    metadata.update(_kernel_metadata(solution.kernel, prep))
    metadata.update(outputs.metadata)
    metadata.update(metrics)
    metadata.update(retry)
    metadata.update(timer.times)
    metadata["time_total"] = timer.total()
    _check_gate(config, metrics)
    return SubtractionResult(outputs.difference, outputs.matched_image, solution.kernel,
                             outputs.background, fitting.source_table(solution), outputs.score,
                             metadata)


# -- public API ------------------------------------------------------------------------------


def subtract_alard_lupton(science: Exposure, template: Exposure,
                          config: AlardLuptonConfig | None = None,
                          sources=None) -> SubtractionResult:
    """Alard–Lupton PSF-matched difference ``science − template ⊗ K`` (or the other direction).

    Parameters
    ----------
    science, template : Exposure
        On the same pixel grid (same shape, origin and WCS), each with a PSF
        model (``diffim_dask.psf.estimate_psf`` is used when available and the
        PSF is missing). Numpy- or dask-backed; dask inputs give lazy outputs.
    config : AlardLuptonConfig or dict, optional
        Defaults follow the anchor (``convolveTemplate``, spatial kernel order
        1, background order 2, decorrelation and variance scaling on).
    sources : pandas.DataFrame or (n, 2) array, optional
        Candidate kernel-star positions ``x, y`` (parent frame); by default
        stars are found in the science image.

    Returns
    -------
    SubtractionResult

    Raises
    ------
    NoWorkFound
        Too little template coverage.
    BadInputDataError
        Mismatched grids/WCS/bands, unusable variance planes (scale factor
        outside ``[1/10, 10]``).
    ConfigurationError
        Invalid config, or no PSF and no estimator.
    InsufficientKernelSourcesError
        Neither the star fit nor the all-pixels fit worked; the message says
        why and how many sources were found.
    BadSubtractionError
        The footprint residual gate failed.
    """
    config = _prepare_config(config)
    timer = _Timer()
    prep = _Prepared(science, template, config, timer)
    direction = _choose_direction(config.mode, prep)
    fill_bits = mask_value(config.bad_mask_planes)
    sci, tmpl = prep.sci, prep.tmpl
    # The fit never uses pixels with an excluded plane (nor, for the convolved image, within a
    # kernel width of one), so only planes that are filled but not excluded need a filled copy.
    fit_fill = fill_bits & ~mask_value(config.sources.exclude_mask_planes)
    sci_filled = _apply.fill_bad(sci.image, sci.mask, fit_fill, prep.science_stats.sky_level)
    tmpl_filled = _apply.fill_bad(tmpl.image, tmpl.mask, fit_fill, prep.template_stats.sky_level)
    if direction == "convolveTemplate":
        matching = _Matching(direction, sci_filled, sci.variance, sci.mask, tmpl_filled,
                             tmpl.variance, tmpl.mask, prep.science_psf_stamp)
        target_fwhm, reference_fwhm = prep.template_fwhm, prep.science_fwhm
    else:
        matching = _Matching(direction, tmpl_filled, tmpl.variance, tmpl.mask, sci_filled,
                             sci.variance, sci.mask, prep.template_psf_stamp)
        target_fwhm, reference_fwhm = prep.science_fwhm, prep.template_fwhm
    basis, basis_info = make_basis(config.basis, target_fwhm, reference_fwhm)
    fitting = _KernelFitting(prep, config, basis, matching, sources, timer)
    return _run(prep, config, fitting,
                lambda solution: _plain_outputs(prep, config, fitting, solution, science),
                timer, {"mode": direction, **basis_info, "n_basis": len(basis)})


def subtract_alard_lupton_preconvolved(science: Exposure, template: Exposure,
                                       config: AlardLuptonConfig | None = None,
                                       sources=None) -> SubtractionResult:
    """Score (preconvolution) variant: ``science ⊗ P̄`` matched by ``template ⊗ K``.

    The science image is convolved with its own reflected PSF (a matched
    filter), the kernel is fitted with the template as the convolved image (the
    effective science FWHM is ``√2`` times larger), and the preconvolved
    difference is corrected by the likelihood filter (DMTN-179) and divided by
    its propagated noise: :attr:`SubtractionResult.score` is the per-pixel
    point-source matched-filter S/N, with unit variance in pure noise.
    ``mode`` must be ``convolveTemplate`` or ``auto`` (always convolves the
    template). Parameters, returns and errors as :func:`subtract_alard_lupton`.
    """
    config = _prepare_config(config)
    if config.mode == "convolveScience":
        raise ConfigurationError(
            "the preconvolution (score) variant always convolves the template; set "
            "AlardLuptonConfig.mode to 'convolveTemplate' or 'auto'")
    timer = _Timer()
    prep = _Prepared(science, template, config, timer)
    fill_bits = mask_value(config.bad_mask_planes)
    sci, tmpl = prep.sci, prep.tmpl
    workers = prep.workers
    # Preconvolution kernel: science PSF at the centre, unit sum, reflected (matched filter).
    preconv = prep.science_psf_stamp / prep.science_psf_stamp.sum()
    preconv = preconv[::-1, ::-1].copy()
    if preconv.shape[0] % 2 == 0 or preconv.shape[0] != preconv.shape[1]:
        raise ConfigurationError(
            f"the preconvolution kernel must be odd-sized, got {preconv.shape}")
    pre_half = preconv.shape[0] // 2
    sci_filled = _apply.fill_bad(sci.image, sci.mask, fill_bits, prep.science_stats.sky_level)
    fit_fill = fill_bits & ~mask_value(config.sources.exclude_mask_planes)
    tmpl_filled = _apply.fill_bad(tmpl.image, tmpl.mask, fit_fill, prep.template_stats.sky_level)
    (reference,) = fft_convolve_same(sci_filled, [preconv], workers=workers, dtype=prep.fft_dtype)
    del sci_filled
    reference = reference.astype(np.float32)
    (var_reference,) = fft_convolve_same(sci.variance, [preconv**2], workers=workers)
    matching = _Matching("convolveTemplate", reference, var_reference,
                         dilate_bits(sci.mask, pre_half, fill_bits), tmpl_filled, tmpl.variance,
                         tmpl.mask, fftconvolve(prep.science_psf_stamp, preconv),
                         extra_margin=pre_half, reference_noise_filter=preconv)
    basis, basis_info = make_basis(config.basis, prep.template_fwhm,
                                   prep.science_fwhm * math.sqrt(2.0))
    fitting = _KernelFitting(prep, config, basis, matching, sources, timer)
    # The gate compares the preconvolved difference with the preconvolved science image.
    (background_pre,) = fft_convolve_same(prep.science_stats.background, [preconv],
                                          workers=workers)
    gate_science = _BgSub(reference, background_pre, prep.science_stats.good)

    def build(solution):
        return _score_outputs(prep, config, solution, science, preconv, gate_science,
                              fitting.background_spatial)

    return _run(prep, config, fitting, build, timer,
                {"mode": "convolveTemplate", **basis_info, "n_basis": len(basis)})


def _score_outputs(prep, config, solution, science, preconv, gate_science,
                   background_spatial) -> _Outputs:
    """Preconvolved difference, matched template and normalised score."""
    kernel = solution.kernel
    sci, tmpl = prep.sci, prep.tmpl
    fill_bits = mask_value(config.bad_mask_planes)
    origin, workers, fft_dtype = prep.origin, prep.workers, prep.fft_dtype
    pre_half = preconv.shape[0] // 2
    background = SpatialBackground(solution.background_coefficients, background_spatial)
    ignore = mask_value(config.decorrelation.ignore_mask_planes)
    var_sci_mean = mean_variance(sci.variance, sci.mask, ignore)
    var_tmpl_mean = mean_variance(tmpl.variance, tmpl.mask, ignore)
    half = kernel.half_width
    size = max(_odd(config.decorrelation.kernel_size_factor * kernel.size), _odd(2 * pre_half + 1))
    k_centre = kernel.image()
    # Correlated input noise (measured, see _noise_correlations): in the score filter, and as
    # correlation factors c of each variance kernel (c V ‖g‖² is the per-pixel variance).
    floor = config.decorrelation.noise_power_floor
    sci_acf = prep.science_noise.acf if prep.science_noise is not None else None
    tmpl_acf = prep.template_noise.acf if prep.template_noise is not None else None
    corr = score_kernel(k_centre, preconv, var_sci_mean, var_tmpl_mean, size,
                        correlation_science=sci_acf, correlation_template=tmpl_acf,
                        power_floor=floor)
    identity = np.ones((1, 1))

    def variance_node(filt, ref, conv, gram):
        factor_ref = noise_correlation_factor(ref, sci_acf, floor)
        factor_conv = noise_correlation_factor(conv, tmpl_acf, floor)
        return _single_node(kernel, filt, ref * math.sqrt(factor_ref),
                            conv * math.sqrt(factor_conv), gram * factor_conv)

    score_nodes = variance_node(corr, fftconvolve(preconv, corr, mode="full"),
                                fftconvolve(k_centre, corr, mode="full"), kernel.norm_gram(corr))
    diff_nodes = variance_node(identity, preconv, k_centre, kernel.norm_gram())
    matched_nodes = _single_node(kernel, identity, np.zeros((1, 1)), k_centre, kernel.norm_gram())

    dilate_planes, keep_planes = _mask_planes("convolveTemplate", config)
    valid_half = max(half, pre_half)
    score_half = corr.shape[0] // 2
    zero_bits = fill_bits | mask_value("SAT_TEMPLATE")
    bg = background if config.subtract_background else None

    def pipeline(sci_image, sci_var, sci_mask, tmpl_image, tmpl_var, tmpl_mask,
                 block_offset=None):
        """Output planes from the (lazy, whole or cut-out) input planes."""
        run = dict(workers=workers, fft_dtype=fft_dtype, block_offset=block_offset)
        pre_image = _apply.preconvolve_image(sci_image, sci_mask, kernel=preconv,
                                             fill_bits=fill_bits,
                                             fill_value=prep.science_stats.sky_level, **run)
        pre_mask = _apply.or_masks(
            _apply.dilate_mask(sci_mask, dilate_half=pre_half, dilate_planes=fill_bits,
                               keep_planes=0xFFFFFFFF & ~fill_bits, block_offset=block_offset),
            None, full_shape=prep.shape, edge_width=pre_half, block_offset=block_offset)
        matched = _apply.convolve_image(tmpl_image, tmpl_mask, kernel=kernel, origin=origin,
                                        fill_bits=fill_bits,
                                        fill_value=prep.template_stats.sky_level, scale=1.0,
                                        **run)
        conv_mask = _apply.dilate_mask(tmpl_mask, dilate_half=half, dilate_planes=dilate_planes,
                                       keep_planes=keep_planes, block_offset=block_offset)
        source_masks = (pre_mask, conv_mask)
        common = dict(origin=origin, sign=1.0, scale_reference=1.0, background=bg,
                      zero_bits=zero_bits, full_shape=prep.shape, edge_width=valid_half, **run)
        difference = _apply.difference_image(pre_image, matched, source_masks, nodes=None,
                                             **common)
        variance_common = dict(origin=origin, spatial=kernel.spatial, scale_reference=1.0,
                               scale_convolved=1.0,
                               propagation=config.score_variance_propagation, **run)
        diff_var = _apply.propagate_variance(sci_var, tmpl_var, source_masks, nodes=diff_nodes,
                                             **variance_common)
        if block_offset is not None:
            return difference, diff_var  # the gate needs no more
        raw_score = _apply.difference_image(pre_image, matched, source_masks, nodes=score_nodes,
                                            **common)
        score_var = _apply.propagate_variance(sci_var, tmpl_var, source_masks,
                                              nodes=score_nodes, **variance_common)
        return (difference, diff_var, matched, pre_mask, conv_mask, source_masks, raw_score,
                score_var)

    (difference, diff_var, matched, pre_mask, conv_mask, source_masks, raw_score,
     score_var) = pipeline(sci.lazy_image, sci.lazy_variance, sci.lazy_mask, tmpl.lazy_image,
                           tmpl.lazy_variance, tmpl.lazy_mask)
    matched_mask = _apply.or_masks(conv_mask, None, full_shape=prep.shape, edge_width=half)
    matched_var = _apply.propagate_variance(
        tmpl.lazy_variance, tmpl.lazy_variance, (conv_mask,), origin=origin, nodes=matched_nodes,
        spatial=kernel.spatial, scale_reference=0.0, scale_convolved=1.0,
        propagation=config.variance_propagation, workers=workers, fft_dtype=fft_dtype)
    work_mask = _apply.or_masks(pre_mask, conv_mask, full_shape=prep.shape, edge_width=valid_half)
    score_mask = _apply.or_masks(pre_mask, conv_mask, full_shape=prep.shape,
                                 edge_width=valid_half + score_half)
    gate_planes = _gate_planes(
        difference, diff_var, pipeline,
        (sci.image, sci.variance, sci.mask, tmpl.image, tmpl.variance, tmpl.mask),
        pre_half + 2 * half + diff_nodes.var_half, prep.shape)
    score = _apply.normalise_score(raw_score, score_var, source_masks)
    pre_psf = ImagePsf(fftconvolve(prep.science_psf_stamp, preconv, mode="full"))
    ones = _xp_where(score_var > 0, np.float32(1), np.float32(0))
    metadata = {
        "preconvolved": True, "preconvolution_kernel_size": int(preconv.shape[0]),
        "score_kernel_size": int(corr.shape[0]),
        "mean_variance_science": var_sci_mean, "mean_variance_template": var_tmpl_mean,
        "decorrelation_noise_model": config.decorrelation.noise_model,
        **_correlation_metadata("science", prep.science_noise, None, floor),
        **_correlation_metadata("template", prep.template_noise, None, floor),
    }
    return _Outputs(
        science.with_planes(difference, diff_var, work_mask).replace(psf=pre_psf),
        science.with_planes(matched, matched_var, matched_mask).replace(psf=prep.science_psf),
        background, science.with_planes(score, ones, score_mask).replace(psf=pre_psf), metadata,
        gate_planes, gate_science)


# -- small helpers ---------------------------------------------------------------------------


def _mask_planes(direction: str, config) -> tuple[int, int]:
    """(planes dilated by the kernel, planes copied undilated) of the convolved image's mask."""
    if direction == "convolveTemplate":
        dilate = mask_value(config.preserve_template_mask)
        keep = mask_value([f"{name}_TEMPLATE" for name in config.rename_template_mask]) \
            if config.rename_template_mask else 0
        return dilate, keep
    keep = mask_value("INJECTED")
    return 0xFFFFFFFF & ~keep, keep


def _merge_tables(tiles: pd.DataFrame, stars: pd.DataFrame) -> pd.DataFrame:
    tiles = tiles.assign(kind="tile")
    if stars is None or len(stars) == 0:
        return tiles.reset_index(drop=True)
    stars = stars.assign(kind="star", status="not_fitted", used=False)
    return pd.concat([tiles, stars], ignore_index=True)


def _base_metadata(prep, config, base_info, solution) -> dict:
    meta = {
        **base_info,
        "config_mode": config.mode,
        "science_psf_fwhm": prep.science_fwhm,
        "template_psf_fwhm": prep.template_fwhm,
        "science_psf_source": prep.science_psf_source,
        "template_psf_source": prep.template_psf_source,
        "template_coverage": prep.coverage,
        "science_variance_scale": prep.science_scale.factor if prep.science_scale else 1.0,
        "template_variance_scale": prep.template_scale.factor if prep.template_scale else 1.0,
        "science_variance_scale_method": (prep.science_scale.method if prep.science_scale
                                          else "none"),
        "template_variance_scale_method": (prep.template_scale.method if prep.template_scale
                                           else "none"),
        "spatial_kernel_order": config.fit.spatial_kernel_order,
        # Lower for an all-pixels fit with few stars (_KernelFitting.all_pixels_spatial).
        "spatial_kernel_order_used": int(solution.kernel.spatial.order),
        "spatial_background_order": config.fit.spatial_background_order,
        "fft_precision": config.fft_precision,
        "fft_workers": prep.workers,
    }
    meta.update(solution.metadata)
    return meta
