"""ZOGY proper image subtraction of two exposures: the public entry point.

:func:`subtract_zogy` runs, in order:

1. validate the pair (same pixel grid, WCS and band) and measure the coverage
   (``NoWorkFound`` below ``required_template_fraction``); take the PSF models
   (estimated with :func:`diffim_dask.psf.estimate_psf` when missing);
2. fit a smooth background to each image (or trust that they are
   background-subtracted) and find their sky pixels;
3. rescale each variance plane to the noise of its source-free sky
   (:func:`diffim_dask.subtract.measure_variance_scale`) and measure each
   image's pixel-to-pixel noise correlation (:mod:`diffim_dask.noise_correlation`; resampled frames
   and coadds are not white); a measurement that does not look like noise
   correlation (lag-1 above ``noise_correlation_max_lag1``, or a plateau at the
   largest lags: the unresolved stars of a crowded sky) is rejected and that
   image is modelled white;
4. match bright isolated stars between the images (:mod:`.stars`): the flux
   ratio ``r = F_N / F_R`` (from the PhotoCalibs, or fitted; with neither,
   e.g. on a small stamp, ``ZogyConfig.flux_ratio`` is assumed), the template
   offset (removed by a Fourier shift) and the registration noise;
5. on overlapping tiles (:mod:`.tiles`; automatic size from the PSF
   variation, border from the kernels' support), each with its own PSFs and
   noise ``σ_N``, ``σ_R`` (medians of the variance planes over its sky
   pixels), compute the proper difference, its variance, the score and its
   full variance (:mod:`.core`); unusable pixels are filled smoothly first
   (the background beyond the image), so the band-limited registration shift
   does not ring; keep the inner boxes;
6. assemble the outputs: the difference in science flux units with its PSF
   ``P_D`` (a :class:`~diffim_dask.psf.GridPsf` over the tile centres) and
   variance, ``S_corr`` as the score, the registered template in science
   units as the matched image, masks (both inputs' planes, grown by the
   kernels' reach, EDGE border) and the metadata; ``S_corr`` is divided by
   its robust sigma over the valid interior when that is far from 1
   (``score_normalization``: variance planes that misstate the noise).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy import ndimage

from ..errors import AlgorithmError, BadInputDataError, ConfigurationError, NoWorkFound
from ..exposure import Exposure, validate_pair
from ..masks import MASK_DTYPE, mask_bit, mask_value
from ..psf.models import GridPsf, ImagePsf
from ..subtract.result import SubtractionResult
from ..subtract.variance import measure_variance_scale
from .background import fit_background
from .config import ZogyConfig
from .core import apply_zogy, zogy_kernels
from ..noise_correlation import measure_noise_correlation, white as white_noise
from .products import ZogyKernel
from .stars import find_candidates, fit_flux_ratio, fit_registration, isolated, measure_stars
from .._parallel import default_threads
from .tiles import cut_box, plan_tiles, run_tiles

__all__ = ["subtract_zogy"]

logger = logging.getLogger(__name__)

_NO_DATA = mask_value("NO_DATA")


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time_{name}"] = now - self._last
        self._last = now

    def total(self) -> float:
        return time.perf_counter() - self._start


# -- inputs ---------------------------------------------------------------------------------------


def _prepare_config(config) -> ZogyConfig:
    if config is None:
        return ZogyConfig()
    if isinstance(config, dict):
        return ZogyConfig.from_dict(config)
    if not isinstance(config, ZogyConfig):
        raise ConfigurationError(f"config must be a ZogyConfig, got {type(config).__name__}")
    return config


def _psf(exposure: Exposure, what: str):
    if exposure.psf is not None:
        return exposure.psf, "given"
    from ..psf import estimate_psf

    try:
        estimate = estimate_psf(exposure)
    except AlgorithmError as exc:
        raise AlgorithmError(f"the {what} exposure has no PSF model and PSF estimation failed: "
                             f"{exc}; attach one with exposure.replace(psf=...)",
                             exc.metadata) from exc
    return estimate.psf, "estimated"


class _Planes:
    """numpy planes of one input; non-finite pixels become NO_DATA (image 0, variance 0)."""

    def __init__(self, exposure: Exposure, what: str):
        image, variance, mask = exposure.arrays()
        image = np.asarray(image, dtype=np.float32)
        variance = np.asarray(variance, dtype=np.float32)
        mask = np.asarray(mask, dtype=MASK_DTYPE)
        bad = ~(np.isfinite(image) & np.isfinite(variance))
        if bad.any():
            image = np.where(bad, np.float32(0), image)
            variance = np.where(bad, np.float32(0), variance)
            mask = mask | np.where(bad, MASK_DTYPE(_NO_DATA), MASK_DTYPE(0))
        self.image, self.variance, self.mask, self.what = image, variance, mask, what

    def check_variance(self) -> None:
        if not np.any(self.variance > 0):
            raise BadInputDataError(f"the {self.what} variance plane has no positive value")


def _inpaint(image: np.ndarray, bad: np.ndarray, iterations: int = 16) -> None:
    """Fill ``bad`` pixels in place by repeated averaging of known 3×3 neighbours.

    Small holes (saturated cores, bad columns) get a smooth, continuous fill;
    what is still unknown after ``iterations`` rings (inside large no-data
    areas) is set to zero, the background.
    """
    rows = np.nonzero(bad.any(axis=1))[0]
    cols = np.nonzero(bad.any(axis=0))[0]
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, image.shape[0])
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, image.shape[1])
    block = image[y0:y1, x0:x1]
    known = ~bad[y0:y1, x0:x1]
    block[~known] = 0.0
    for _ in range(iterations):
        if known.all():
            break
        weight = known.astype(block.dtype)
        total = ndimage.uniform_filter(block * weight, 3, mode="constant")
        count = ndimage.uniform_filter(weight, 3, mode="constant")
        new = ~known & (count > 0)
        if not new.any():
            break
        block[new] = total[new] / count[new]
        known |= new
    block[~known] = 0.0


def _template_mask(mask: np.ndarray, config: ZogyConfig) -> np.ndarray:
    """Template planes kept in the outputs, with SAT/INJECTED renamed to *_TEMPLATE."""
    out = mask & MASK_DTYPE(mask_value(config.preserve_template_mask))
    renames = [(MASK_DTYPE(mask_value(name)), MASK_DTYPE(mask_value(f"{name}_TEMPLATE")))
               for name in config.rename_template_mask]
    if renames:
        bits = MASK_DTYPE(sum(int(source) for source, _ in renames))
        # Renamed planes are sparse (saturated cores, injections): work on their pixels only.
        flagged = np.flatnonzero(mask & bits)
        values = mask.ravel()[flagged]
        flat = out.ravel()
        for source, target in renames:
            flat[flagged[(values & source) != 0]] |= target
    return out


_GROW_BLOCK = 256


def _grow_planes(mask: np.ndarray, planes, radius: int) -> None:
    """Grow each named plane by ``radius`` pixels (square), in place.

    Works block by block on the blocks that hold flagged pixels (saturated
    stars and bad columns are sparse), each with a ``radius`` margin.
    """
    if radius <= 0:
        return
    ny, nx = mask.shape
    all_bits = MASK_DTYPE(mask_value(planes))
    flagged = np.flatnonzero(mask & all_bits)
    if flagged.size == 0:
        return
    values = mask.ravel()[flagged]
    for name in planes:
        bit = MASK_DTYPE(1 << mask_bit(name))
        positions = flagged[(values & bit) != 0]
        if positions.size == 0:
            continue
        flags = np.zeros(mask.shape, bool)
        flags.ravel()[positions] = True
        rows = np.unique(positions // nx // _GROW_BLOCK)
        for row in rows:
            y0, y1 = row * _GROW_BLOCK, min((row + 1) * _GROW_BLOCK, ny)
            cols = np.unique(np.nonzero(flags[y0:y1].any(axis=0))[0] // _GROW_BLOCK)
            for col in cols:
                x0, x1 = col * _GROW_BLOCK, min((col + 1) * _GROW_BLOCK, nx)
                gy0, gy1 = max(y0 - radius, 0), min(y1 + radius, ny)
                gx0, gx1 = max(x0 - radius, 0), min(x1 + radius, nx)
                block = np.zeros((gy1 - gy0, gx1 - gx0), np.uint8)
                block[y0 - gy0:y1 - gy0, x0 - gx0:x1 - gx0] = flags[y0:y1, x0:x1]
                grown = ndimage.maximum_filter1d(block, 2 * radius + 1, axis=0)
                grown = ndimage.maximum_filter1d(grown, 2 * radius + 1, axis=1)
                mask[gy0:gy1, gx0:gx1] |= grown.astype(MASK_DTYPE) << MASK_DTYPE(mask_bit(name))


def _set_edge(mask: np.ndarray, width: int) -> None:
    if width <= 0:
        return
    edge = MASK_DTYPE(mask_value("EDGE"))
    mask[:width] |= edge
    mask[-width:] |= edge
    mask[:, :width] |= edge
    mask[:, -width:] |= edge


# -- stars, flux ratio, registration --------------------------------------------------------------


_STRIP = 512


def _candidates(prep, threshold: float, window: int, border: int):
    """Star candidates of the background-subtracted science image, strip by strip."""
    ny, nx = prep.shape
    found_y, found_x, found_v = [], [], []
    planes = prep.sci
    for y0 in range(0, ny, _STRIP):
        y1 = min(y0 + _STRIP, ny)
        a0, a1 = max(y0 - window, 0), min(y1 + window, ny)
        residual = planes.image[a0:a1] - prep.background_n.image((a1 - a0, nx), prep.origin,
                                                                 offset=(a0, 0))
        variance = planes.variance[a0:a1] * np.float32(prep.factor_n)
        iy, ix = find_candidates(residual, variance, prep.usable_n[a0:a1], threshold=threshold,
                                 window=window, border=0)
        iy = iy + a0
        keep = (iy >= max(y0, border)) & (iy < min(y1, ny - border)) & (ix >= border) \
            & (ix < nx - border)
        found_y.append(iy[keep])
        found_x.append(ix[keep])
        found_v.append(residual[iy[keep] - a0, ix[keep]])
    iy, ix, values = (np.concatenate(v) for v in (found_y, found_x, found_v))
    order = np.argsort(-values, kind="stable")
    return iy[order], ix[order]


def _match_stars(prep, config: ZogyConfig) -> pd.DataFrame:
    scfg = config.stars
    fwhm = max(prep.science_fwhm, prep.template_fwhm)
    half = max(3, int(math.ceil(scfg.fit_radius_fwhm * fwhm)))
    exclude = mask_value(scfg.exclude_mask_planes)
    window = max(2, int(round(fwhm)))
    iy, ix = _candidates(prep, scfg.detection_threshold, window, half + 2)
    keep = isolated(iy, ix, scfg.isolation_radius_fwhm * fwhm)
    iy, ix = iy[keep][:scfg.max_stars], ix[keep][:scfg.max_stars]
    x0, y0 = prep.origin
    n_candidates = int(keep.size)
    if iy.size == 0:
        table = pd.DataFrame(columns=["x", "y", "status", "used_flux_ratio",
                                      "used_registration"])
        table.attrs["n_candidates"] = n_candidates
        return table
    fit = config.background == "fit"
    sci = measure_stars(prep.sci.image, prep.sci.variance, prep.sci.mask, prep.science_psf, ix,
                        iy, half=half, exclude_bits=exclude, variance_scale=prep.factor_n,
                        background=prep.background_n if fit else None, origin=prep.origin)
    tmpl = measure_stars(prep.tmpl.image, prep.tmpl.variance, prep.tmpl.mask, prep.template_psf,
                         ix, iy, half=half, exclude_bits=exclude, variance_scale=prep.factor_r,
                         background=prep.background_r if fit else None, origin=prep.origin)
    table = pd.DataFrame({
        "x": sci["x"] + x0, "y": sci["y"] + y0,
        "x_err": sci["x_err"], "y_err": sci["y_err"],
        "flux_science": sci["flux"], "flux_science_err": sci["flux_err"],
        "snr_science": sci["snr"],
        "template_x": tmpl["x"] + x0, "template_y": tmpl["y"] + y0,
        "template_x_err": tmpl["x_err"], "template_y_err": tmpl["y_err"],
        "flux_template": tmpl["flux"], "flux_template_err": tmpl["flux_err"],
        "snr_template": tmpl["snr"],
        "size_ratio_science": sci["size_ratio"], "size_ratio_template": tmpl["size_ratio"],
    })
    table["dx"] = table["template_x"] - table["x"]
    table["dy"] = table["template_y"] - table["y"]
    table["dx_err"] = np.hypot(table["x_err"], table["template_x_err"])
    table["dy_err"] = np.hypot(table["y_err"], table["template_y_err"])
    status = np.full(len(table), "good", dtype=object)
    size_limit = scfg.max_size_ratio if scfg.max_size_ratio > 0 else np.inf
    checks = [
        ("masked", sci["bad"].to_numpy() | tmpl["bad"].to_numpy()),
        ("not_converged", ~(sci["converged"].to_numpy() & tmpl["converged"].to_numpy())),
        ("low_snr", ~((sci["snr"].to_numpy() >= scfg.min_snr)
                      & (tmpl["snr"].to_numpy() >= scfg.min_snr))),
        ("resolved", ~((sci["size_ratio"].to_numpy() <= size_limit)
                       & (tmpl["size_ratio"].to_numpy() <= size_limit))),
    ]
    for name, failed in checks:
        status[(status == "good") & failed] = name
    table["status"] = status
    table["used_flux_ratio"] = False
    table["used_registration"] = False
    table.attrs["n_candidates"] = n_candidates
    return table


def _flux_ratio(prep, config: ZogyConfig, stars: pd.DataFrame, science: Exposure,
                template: Exposure) -> dict:
    scfg = config.stars
    good = (stars["status"] == "good").to_numpy() if len(stars) else np.zeros(0, bool)
    fitted = None
    if good.sum() >= scfg.min_stars:
        fitted = fit_flux_ratio(stars["flux_science"].to_numpy()[good],
                                stars["flux_science_err"].to_numpy()[good],
                                stars["flux_template"].to_numpy()[good],
                                stars["flux_template_err"].to_numpy()[good],
                                clip=scfg.clip_sigma, systematic=scfg.systematic_flux_error)
        if fitted.used.sum() < scfg.min_stars or not np.isfinite(fitted.ratio):
            fitted = None
        else:
            used = np.zeros(len(stars), bool)
            used[np.nonzero(good)[0][fitted.used]] = True
            stars["used_flux_ratio"] = used
    source = config.flux_ratio_source
    if source == "auto":
        has_calib = science.photo_calib is not None and template.photo_calib is not None
        source = "calibration" if has_calib else ("fit" if fitted is not None else "assumed")
    info = {"flux_ratio_fitted": fitted.ratio if fitted else float("nan"),
            "flux_ratio_fitted_err": fitted.error if fitted else float("nan"),
            "flux_ratio_fitted_chi2": fitted.chi2 if fitted else float("nan"),
            "n_flux_ratio_stars": int(fitted.used.sum()) if fitted else 0}
    if source == "calibration":
        missing = [w for w, e in (("science", science), ("template", template))
                   if e.photo_calib is None]
        if missing:
            raise BadInputDataError(
                f"ZogyConfig.flux_ratio_source = 'calibration' but the {' and '.join(missing)} "
                f"exposure has no PhotoCalib; use 'fit' or 'fixed'")
        ratio = template.photo_calib.njy_per_count / science.photo_calib.njy_per_count
        error = 0.0
    elif source == "fit":
        if fitted is None:
            raise AlgorithmError(
                f"cannot fit the flux ratio F_N/F_R: only {int(good.sum())} matched stars pass "
                f"the cuts (S/N >= {scfg.min_snr} in both images, isolated, unresolved, "
                f"unmasked; need {scfg.min_stars}) out of {len(stars)} candidates; give the "
                f"exposures PhotoCalibs, set flux_ratio_source='fixed', or lower "
                f"ZogyConfig.stars.min_snr",
                {"n_good_stars": int(good.sum()), "n_candidates": int(len(stars)),
                 "min_stars": int(scfg.min_stars)})
        ratio, error = fitted.ratio, fitted.error
    elif source == "assumed":
        # Too few stars to fit (on a small stamp the only one may be the transient) and no
        # calibrations: take the configured ratio, as the Alard-Lupton 'psf-model' strategy does.
        ratio, error = float(config.flux_ratio), float("nan")
        logger.warning("no PhotoCalibs and only %d usable matched stars (need %d): assuming the "
                       "flux ratio F_N/F_R = %g (ZogyConfig.flux_ratio)", int(good.sum()),
                       scfg.min_stars, ratio)
    else:
        ratio, error = float(config.flux_ratio), 0.0
    if not (np.isfinite(ratio) and ratio > 0):
        raise BadInputDataError(f"the flux ratio F_N/F_R = {ratio} is not positive")
    return {"flux_ratio": float(ratio), "flux_ratio_err": float(error),
            "flux_ratio_source": source, **info}


def _registration(prep, config: ZogyConfig, stars: pd.DataFrame):
    scfg = config.stars
    if config.registration == "none":
        return None, "disabled"
    good = (stars["status"] == "good").to_numpy() if len(stars) else np.zeros(0, bool)
    order = 0 if config.registration == "constant" else 1
    needed = max(scfg.min_stars, 2 if order == 0 else 4)
    if good.sum() < needed:
        return None, f"too few stars ({int(good.sum())} < {needed}); no offset applied"
    x0, y0 = prep.origin
    ny, nx = prep.shape
    fit = fit_registration(
        stars["x"].to_numpy()[good] - x0, stars["y"].to_numpy()[good] - y0,
        stars["dx"].to_numpy()[good], stars["dy"].to_numpy()[good],
        stars["dx_err"].to_numpy()[good], stars["dy_err"].to_numpy()[good], order=order,
        clip=scfg.clip_sigma, center=((nx - 1) / 2.0, (ny - 1) / 2.0),
        scale=(max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)))
    if fit.used.sum() < needed:
        return None, f"too few stars after clipping ({int(fit.used.sum())}); no offset applied"
    used = np.zeros(len(stars), bool)
    used[np.nonzero(good)[0][fit.used]] = True
    stars["used_registration"] = used
    corners_x = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    corners_y = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    dx, dy = fit.offset(corners_x, corners_y)
    largest = float(np.max(np.hypot(dx, dy)))
    if largest > config.max_registration_offset:
        raise BadInputDataError(
            f"the template is offset from the science image by up to {largest:.2f} px (measured "
            f"on {int(fit.used.sum())} stars), more than ZogyConfig.max_registration_offset = "
            f"{config.max_registration_offset}; the images are not on one pixel grid")
    return fit, "fitted"


# -- noise model checks ---------------------------------------------------------------------------


def _noise_status(correlation, config: ZogyConfig) -> str:
    """'white', 'correlated' or 'structured' (a measured ACF rejected as sky structure)."""
    return correlation.status(config.noise_correlation_threshold,
                              config.noise_correlation_max_lag1, config.noise_correlation_max_far)


_SCORE_INVALID = ("EDGE", "NO_DATA", "BAD", "SAT", "SAT_TEMPLATE")


def _normalize_score(score: np.ndarray, flux_variance, mask: np.ndarray,
                     config: ZogyConfig) -> dict:
    """Measure S_corr's robust sigma on the valid interior; divide it out when configured.

    ``S_corr`` is unit-variance by construction only as far as the variance
    planes and the noise model describe the real noise. The robust sigma
    ``0.7413 IQR`` of the score over the valid pixels (sources and the
    transient are a small fraction, which the interquartile range ignores)
    checks that; ``score`` is divided by it in place, and ``flux_variance``
    (of ``S / F_S``, whose S/N is the score) multiplied by its square.
    """
    valid = ((mask & MASK_DTYPE(mask_value(_SCORE_INVALID))) == 0) & np.isfinite(score)
    n_valid = int(valid.sum())
    info = {"score_normalization": config.score_normalization,
            "score_robust_sigma": float("nan"), "score_scale": 1.0,
            "n_score_normalization_pixels": n_valid}
    if n_valid < config.score_normalization_min_pixels:
        return info
    q25, q75 = np.percentile(score[valid], [25.0, 75.0])
    sigma = 0.741301109 * float(q75 - q25)
    info["score_robust_sigma"] = sigma
    apply = config.score_normalization == "empirical" or (
        config.score_normalization == "auto"
        and abs(sigma - 1.0) > config.score_normalization_tolerance)
    if apply and sigma > 0:
        score /= np.float32(sigma)
        if flux_variance is not None:
            flux_variance *= np.float32(sigma**2)
        info["score_scale"] = 1.0 / sigma
        logger.info("S_corr robust sigma %.3g on %d interior pixels: score rescaled to unit "
                    "variance", sigma, n_valid)
    return info


# -- the pipeline ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TileSummary:
    """What is kept of a tile's ZogyKernels after it is processed."""

    zero_point: float
    score_zero_point: float
    reach: int
    n_degenerate: int
    difference_psf: np.ndarray
    science_kernel: np.ndarray
    template_kernel: np.ndarray


class _Prepared:
    """Validated inputs, their backgrounds, variance factors and sky statistics.

    No full-size working copies are made: each tile cuts its outer box from
    the input planes and removes the background there (:meth:`tile_inputs`).
    """

    def __init__(self, science: Exposure, template: Exposure, config: ZogyConfig, timer: _Timer):
        validate_pair(science, template)
        self.origin = science.origin
        self.shape = science.shape
        self.fit_background = config.background == "fit"
        self.science_psf, self.science_psf_source = _psf(science, "science")
        self.template_psf, self.template_psf_source = _psf(template, "template")
        timer.lap("psf")
        sci, tmpl = _Planes(science, "science"), _Planes(template, "template")
        no_data = ((sci.mask | tmpl.mask) & MASK_DTYPE(_NO_DATA)) != 0
        self.coverage = 1.0 - float(no_data.mean())
        if self.coverage < config.required_template_fraction:
            raise NoWorkFound(
                f"only {self.coverage:.1%} of the pixels have data in both images (required "
                f"{config.required_template_fraction:.0%}, ZogyConfig.required_template_fraction)")
        sci.check_variance()
        tmpl.check_variance()
        self.no_data = no_data
        self.any_no_data = bool(no_data.any())
        self.sci, self.tmpl = sci, tmpl
        cx, cy = science.center
        self.science_fwhm = float(self.science_psf.fwhm(cx, cy))
        self.template_fwhm = float(self.template_psf.fwhm(cx, cy))
        fill = MASK_DTYPE(mask_value(config.fill_mask_planes))
        self.usable_n = ((sci.mask & fill) == 0) & (sci.variance > 0)
        self.usable_r = ((tmpl.mask & fill) == 0) & (tmpl.variance > 0)
        timer.lap("validate")

        def statistics(job):
            planes, usable = job
            background, sky = fit_background(
                planes.image, planes.variance, usable, bin_size=config.background_bin_size,
                origin=self.origin, fit=self.fit_background, what=planes.what)
            scale = self._variance_scale(planes, background, sky, usable, config) \
                if config.scale_variance else None
            if config.noise_correlation == "auto":
                correlation = measure_noise_correlation(
                    planes.image, usable, background if self.fit_background else None,
                    origin=self.origin, radius=config.noise_correlation_radius)
            else:
                correlation = white_noise(config.noise_correlation_radius)
            return background, sky, scale, correlation

        jobs = [(sci, self.usable_n), (tmpl, self.usable_r)]
        if min(config.workers or default_threads(), 2) > 1:
            # NumPy releases the GIL: both images at once.
            with ThreadPoolExecutor(max_workers=2) as pool:
                results = list(pool.map(statistics, jobs))
        else:
            results = [statistics(job) for job in jobs]
        (self.background_n, self.sky_n, self.scale_n, self.correlation_n), \
            (self.background_r, self.sky_r, self.scale_r, self.correlation_r) = results
        self.factor_n = self.scale_n.factor if self.scale_n else 1.0
        self.factor_r = self.scale_r.factor if self.scale_r else 1.0
        timer.lap("background_and_variance")

    def _variance_scale(self, planes: _Planes, background, sky, usable, config):
        step = sky.step
        sub = (slice(None, None, step), slice(None, None, step))
        bg = background.subsampled(planes.image.shape, self.origin, step)
        sources = ~sky.sky & usable[sub]
        return measure_variance_scale(planes.image[sub], planes.variance[sub], planes.mask[sub],
                                      source_mask=sources, background=bg,
                                      limit=config.variance_scale_limit, what=planes.what)

    def tile_inputs(self, which: str, box, dtype):
        """Background-subtracted image (bad pixels zero) and scaled variance of an outer box."""
        planes = self.sci if which == "n" else self.tmpl
        usable = self.usable_n if which == "n" else self.usable_r
        background = self.background_n if which == "n" else self.background_r
        factor = self.factor_n if which == "n" else self.factor_r
        image = cut_box(planes.image, box, 0.0, dtype)
        if self.fit_background:
            image -= background.image(image.shape, self.origin, offset=(box[0], box[2]))
        good = cut_box(usable, box, False)
        inside = (max(box[0], 0), min(box[1], self.shape[0]), max(box[2], 0),
                  min(box[3], self.shape[1]))
        bad = ~good
        # Outside the image stays zero; unusable pixels inside are filled smoothly, so a
        # (band-limited, non-local) registration shift does not ring around them.
        bad[:inside[0] - box[0]] = False
        bad[inside[1] - box[0]:] = False
        bad[:, :inside[2] - box[2]] = False
        bad[:, inside[3] - box[2]:] = False
        if bad.any():
            _inpaint(image, bad)
        variance = cut_box(planes.variance, box, 0.0, dtype)
        variance *= dtype(factor)
        return image, variance

    def tile_sigma(self, which: str, inner) -> float:
        """Background noise of one tile: sqrt(median scaled variance over its sky pixels)."""
        sky = self.sky_n if which == "n" else self.sky_r
        planes = self.sci if which == "n" else self.tmpl
        factor = self.factor_n if which == "n" else self.factor_r
        step = sky.step
        y0, y1, x0, x1 = inner
        sy0, sx0 = -(-y0 // step), -(-x0 // step)
        sy1, sx1 = -(-y1 // step), -(-x1 // step)
        flags = sky.sky[sy0:sy1, sx0:sx1]
        values = planes.variance[sy0 * step:sy1 * step:step, sx0 * step:sx1 * step:step][flags]
        if values.size < 20:
            return float("nan")
        return float(math.sqrt(np.median(values) * factor))

    def global_sigma(self, which: str) -> float:
        sky = self.sky_n if which == "n" else self.sky_r
        planes = self.sci if which == "n" else self.tmpl
        factor = self.factor_n if which == "n" else self.factor_r
        values = planes.variance[::sky.step, ::sky.step][sky.sky]
        return float(math.sqrt(np.median(values) * factor)) if values.size else float("nan")


_TILE_SIZES = (128, 160, 192, 256, 320, 384, 448, 512)


def _automatic_tile_size(prep, config: ZogyConfig) -> int:
    """Largest standard tile side over which neither PSF's FWHM changes by more than
    ``config.max_psf_change`` between a tile's centre and its corners (512 for constant PSFs).

    The largest relative FWHM gradient is measured on a 5×5 grid of positions.
    """
    psfs = [psf for psf in (prep.science_psf, prep.template_psf) if psf.is_spatially_varying]
    if not psfs:
        return _TILE_SIZES[-1]
    ny, nx = prep.shape
    x0, y0 = prep.origin
    xs = x0 + np.linspace(0, nx - 1, 5)
    ys = y0 + np.linspace(0, ny - 1, 5)
    gradient = 0.0
    for psf in psfs:
        log_fwhm = np.log([[psf.fwhm(x, y) for x in xs] for y in ys])
        gy, gx = np.gradient(log_fwhm, ys[1] - ys[0], xs[1] - xs[0])
        gradient = max(gradient, float(np.hypot(gx, gy).max()))
    if not gradient > 0:
        return _TILE_SIZES[-1]
    # The corner of a tile of side T is T / sqrt(2) from its centre.
    limit = config.max_psf_change * math.sqrt(2.0) / gradient
    fitting = [size for size in _TILE_SIZES if size <= limit]
    return fitting[-1] if fitting else _TILE_SIZES[0]


def _stamp_size(prep) -> int:
    size = max(prep.science_psf.default_size, prep.template_psf.default_size)
    return size if size % 2 else size + 1


def subtract_zogy(science: Exposure, template: Exposure,
                  config: ZogyConfig | dict | None = None) -> SubtractionResult:
    """ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016), tiled, with full score noise.

    Parameters
    ----------
    science, template : Exposure
        On the same pixel grid (same shape, origin and WCS; the template is
        warped already), each with a PSF model (estimated with
        :func:`diffim_dask.psf.estimate_psf` when missing). Dask-backed inputs
        are computed: the flux ratio, registration and noise levels need every
        pixel; the outputs are numpy-backed.
    config : ZogyConfig or dict, optional
        Defaults: flux ratio from the PhotoCalibs (fitted on matched stars
        without them, assumed 1 with too few stars), fitted backgrounds, variance scaling, constant
        registration offset with estimated registration noise, 256-pixel
        tiles, ``score_noise='full'``.

    Returns
    -------
    SubtractionResult
        ``difference``: the proper difference ``D`` scaled to science flux
        units (``D / F_D``; white noise of standard deviation
        ``sqrt(σ_N² + r² σ_R²)`` in the sky) with PSF ``P_D`` (ImagePsf, or
        GridPsf over the tile centres) and its full variance plane, so PSF
        fits on it give science-unit fluxes and errors.
        ``score``: ``S_corr`` (variance plane 1; detect on it without
        smoothing), divided by its measured robust sigma when
        ``score_normalization`` says so (``metadata["score_robust_sigma"]``,
        ``["score_scale"]``). ``matched_image`` (alias ``matched_template``): the
        template registered onto the science image and multiplied by the flux
        ratio (science units), with the template PSF. ``kernel``: a
        :class:`~diffim_dask.zogy.ZogyKernel` (``image(x, y)`` gives the
        template kernel applied there). ``background``: the differential
        background ``B_N − r B_R`` removed (a
        :class:`~diffim_dask.zogy.BinnedBackground`, science units).
        ``kernel_sources``: the matched stars with their fluxes, offsets,
        status and use. ``metadata``: ``F_D`` (``zero_point``, science-count
        zero point of ``D``), ``F_S``, flux ratio (and fitted value), ``σ_N``,
        ``σ_R``, variance scales, registration offset and noise, PSF sources,
        tile layout and per-tile table (``tiles``), ``flux_image`` (an Exposure
        of ``S / F_S`` with variance ``V(S) / F_S²``, when enabled) and the
        time of each step.

    Raises
    ------
    NoWorkFound
        Too little overlap of valid pixels.
    BadInputDataError
        Mismatched grids, WCS or bands; unusable variance planes; a measured
        offset above ``max_registration_offset``; a missing PhotoCalib when
        ``flux_ratio_source='calibration'``.
    AlgorithmError
        ``flux_ratio_source='fit'`` and too few stars are usable, or PSF
        estimation failed.
    ConfigurationError
        Invalid config.
    """
    config = _prepare_config(config)
    timer = _Timer()
    prep = _Prepared(science, template, config, timer)
    stars = _match_stars(prep, config)
    ratio_info = _flux_ratio(prep, config, stars, science, template)
    registration, registration_status = _registration(prep, config, stars)
    timer.lap("stars")
    ratio = ratio_info["flux_ratio"]

    stamp = _stamp_size(prep)
    sigma_n_global, sigma_r_global = prep.global_sigma("n"), prep.global_sigma("r")
    status_n, status_r = (_noise_status(c, config)
                          for c in (prep.correlation_n, prep.correlation_r))
    correlation_n = prep.correlation_n.acf if status_n == "correlated" else None
    correlation_r = prep.correlation_r.acf if status_r == "correlated" else None
    # The kernels' support at the image centre (on a generous grid) sets the tile border
    # (no wrap-around into the inner boxes) and the grid of the real-space kernels.
    cx, cy = science.center
    probe_grid = sfft.next_fast_len(max(256, 8 * stamp), real=True)
    probe = zogy_kernels(prep.science_psf.image(cx, cy, size=stamp),
                         prep.template_psf.image(cx, cy, size=stamp), (probe_grid, probe_grid),
                         sigma_n_global, sigma_r_global, ratio, floor=config.psf_spectrum_floor,
                         kernel_grid=probe_grid, science_correlation=correlation_n,
                         template_correlation=correlation_r, dtype=np.float64)
    # Noisy estimated PSF stamps leave a noise floor in the kernels that never decays: cap the
    # border at twice the stamp size (the floor is ~1e-6 of the kernels' peak there).
    support = min(probe.support, probe_grid // 2, 2 * stamp)
    kernel_grid = sfft.next_fast_len(max(64, 2 * support + 3, 4 * stamp), real=True)
    border = config.tile_border or max(16, support)
    tile_size = config.tile_size or _automatic_tile_size(prep, config)
    layout = plan_tiles(prep.shape, tile_size, border)
    workers = config.workers or default_threads()
    threads = min(workers, len(layout.tiles))
    fft_workers = max(1, workers // max(threads, 1))
    dtype = np.float32 if config.fft_precision == "float32" else np.float64
    x0, y0 = prep.origin
    shape = prep.shape
    difference = np.zeros(shape, np.float32)
    difference_var = np.zeros(shape, np.float32)
    score = np.zeros(shape, np.float32)
    matched = np.zeros(shape, np.float32)
    flux = np.zeros(shape, np.float32) if config.flux_image else None
    flux_var = np.zeros(shape, np.float32) if config.flux_image else None
    fixed_noise = config.registration_noise

    def process(tile):
        start = time.perf_counter()
        cx, cy = tile.center
        sigma_n = prep.tile_sigma("n", tile.inner)
        sigma_r = prep.tile_sigma("r", tile.inner)
        sigma_n = sigma_n if np.isfinite(sigma_n) else sigma_n_global
        sigma_r = sigma_r if np.isfinite(sigma_r) else sigma_r_global
        inner = tile.inner_slices
        if not (np.isfinite(sigma_n) and np.isfinite(sigma_r)) or prep.no_data[inner].all():
            return {"skipped": True}
        if registration is not None:
            shift = tuple(float(v[0]) for v in registration.offset(cx, cy))
            noise = tuple(float(v[0]) for v in registration.noise(cx, cy))
        else:
            shift, noise = (0.0, 0.0), (0.0, 0.0)
        if fixed_noise is not None:
            noise = (float(fixed_noise[0]), float(fixed_noise[1]))
        else:
            noise = tuple(max(v, config.min_registration_noise) for v in noise)
        psf_n = prep.science_psf.image(cx + x0, cy + y0, size=stamp)
        psf_r = prep.template_psf.image(cx + x0, cy + y0, size=stamp)
        kernels = zogy_kernels(psf_n, psf_r, layout.fft_shape, sigma_n, sigma_r, ratio,
                               floor=config.psf_spectrum_floor, stamp_size=stamp,
                               kernel_grid=kernel_grid, science_correlation=correlation_n,
                               template_correlation=correlation_r, template_shift=shift,
                               dtype=dtype)
        built = time.perf_counter()
        image_n, var_n = prep.tile_inputs("n", tile.outer, dtype)
        image_r, var_r = prep.tile_inputs("r", tile.outer, dtype)
        images = apply_zogy(image_n, image_r, var_n, var_r, kernels, registration_noise=noise,
                            score_noise=config.score_noise, flux=config.flux_image,
                            workers=fft_workers)
        keep = tile.inner_in_outer
        difference[inner] = images.difference[keep]
        difference_var[inner] = images.difference_variance[keep]
        score[inner] = images.score_corrected[keep]
        matched[inner] = images.registered_template[keep]
        if flux is not None:
            flux[inner] = images.flux[keep]
            flux_var[inner] = images.flux_variance[keep]
        done = time.perf_counter()
        # Keep only the small per-tile products (the spectra are megabytes per tile).
        summary = _TileSummary(kernels.zero_point, kernels.score_zero_point, kernels.reach,
                               kernels.n_degenerate, kernels.difference_psf,
                               kernels.science_kernel, kernels.template_kernel)
        return {"skipped": False, "kernels": summary, "sigma_science": sigma_n,
                "sigma_template": sigma_r, "shift": shift, "noise": noise,
                "time_kernels": built - start, "time_apply": done - built}

    results = run_tiles(process, layout, threads)
    timer.lap("tiles")

    valid = [r for r in results if not r["skipped"]]
    if not valid:
        raise NoWorkFound("no tile has data in both images")
    reach = max(r["kernels"].reach for r in valid)
    edge_width = config.edge_width or stamp // 2
    # Masks: both inputs' planes (template ones renamed), grown where the kernels spread them.
    clear = MASK_DTYPE(~mask_value(["DETECTED", "DETECTED_NEGATIVE"]) & 0xFFFFFFFF)
    template_planes = _template_mask(prep.tmpl.mask, config)
    diff_mask = prep.sci.mask & clear
    diff_mask |= template_planes
    _grow_planes(diff_mask, config.grow_mask_planes, reach)
    _set_edge(diff_mask, edge_width)
    matched_mask = template_planes
    _set_edge(matched_mask, edge_width)
    skipped = [tile for r, tile in zip(results, layout.tiles) if r["skipped"]]
    for tile in skipped:
        diff_mask[tile.inner_slices] |= MASK_DTYPE(_NO_DATA)
    score_info = _normalize_score(score, flux_var, diff_mask, config)
    matched *= np.float32(ratio)
    matched_var = prep.tmpl.variance * np.float32(prep.factor_r * ratio**2)
    score_var = np.ones(shape, np.float32)
    if prep.any_no_data or skipped:
        # NO_DATA pixels carry image 0 and variance 0 (the convention).
        no_data = (diff_mask & MASK_DTYPE(_NO_DATA)) != 0
        planes = [difference, difference_var, score, score_var, matched, matched_var]
        if flux is not None:
            planes += [flux, flux_var]
        for plane in planes:
            plane[no_data] = 0.0

    # Difference PSF and kernels per tile (the first valid tile stands in for skipped ones).
    gy, gx = layout.grid
    fallback = valid[0]["kernels"]
    node_kernels = [[(results[j * gx + i]["kernels"] if not results[j * gx + i]["skipped"]
                      else fallback) for i in range(gx)] for j in range(gy)]
    psf_stamps = np.array([[k.difference_psf for k in row] for row in node_kernels])
    xs, ys = layout.centers
    if gx * gy == 1:
        difference_psf = ImagePsf(psf_stamps[0, 0])
    else:
        difference_psf = GridPsf(xs + x0, ys + y0, psf_stamps)
    kernel = ZogyKernel(layout.x_edges + x0 - 0.5, layout.y_edges + y0 - 0.5,
                        np.array([[k.science_kernel for k in row] for row in node_kernels]),
                        np.array([[k.template_kernel for k in row] for row in node_kernels]))
    background = prep.background_n.combine(prep.background_r, ratio)

    diff_exposure = science.with_planes(difference, difference_var, diff_mask) \
        .replace(psf=difference_psf)
    score_exposure = science.with_planes(score, score_var, diff_mask).replace(psf=difference_psf)
    matched_exposure = science.with_planes(matched, matched_var, matched_mask) \
        .replace(psf=prep.template_psf)
    timer.lap("assemble")

    tile_rows = []
    for r, tile in zip(results, layout.tiles):
        row = {"row": tile.index[0], "column": tile.index[1],
               "x": tile.center[0] + x0, "y": tile.center[1] + y0, "skipped": r["skipped"]}
        if not r["skipped"]:
            k = r["kernels"]
            row.update(zero_point=k.zero_point, score_zero_point=k.score_zero_point,
                       sigma_science=r["sigma_science"], sigma_template=r["sigma_template"],
                       shift_x=r["shift"][0], shift_y=r["shift"][1],
                       registration_noise_x=r["noise"][0], registration_noise_y=r["noise"][1],
                       reach=k.reach, n_degenerate=k.n_degenerate,
                       time_kernels=r["time_kernels"], time_apply=r["time_apply"])
        tile_rows.append(row)
    tiles = pd.DataFrame(tile_rows)
    used = tiles[~tiles["skipped"]]
    metadata = {
        "method": "zogy",
        "zero_point": float(used["zero_point"].median()),
        "zero_point_min": float(used["zero_point"].min()),
        "zero_point_max": float(used["zero_point"].max()),
        "score_zero_point": float(used["score_zero_point"].median()),
        **ratio_info,
        "sigma_science": float(used["sigma_science"].median()),
        "sigma_template": float(used["sigma_template"].median()),
        "science_variance_scale": prep.factor_n,
        "template_variance_scale": prep.factor_r,
        "science_psf_source": prep.science_psf_source,
        "template_psf_source": prep.template_psf_source,
        "science_psf_fwhm": prep.science_fwhm,
        "template_psf_fwhm": prep.template_fwhm,
        "template_coverage": prep.coverage,
        "background": config.background,
        "registration": config.registration,
        "registration_status": registration_status,
        "registration_dx": float(used["shift_x"].median()),
        "registration_dy": float(used["shift_y"].median()),
        "registration_noise_x": float(used["registration_noise_x"].median()),
        "registration_noise_y": float(used["registration_noise_y"].median()),
        "registration_noise_source": "config" if fixed_noise is not None else (
            "estimated" if registration is not None else "none"),
        "registration_excess_x": float(registration.excess[0]) if registration else float("nan"),
        "registration_excess_y": float(registration.excess[1]) if registration else float("nan"),
        "n_registration_stars": int(stars["used_registration"].sum()) if len(stars) else 0,
        "n_star_candidates": int(stars.attrs.get("n_candidates", 0)),
        "n_stars_measured": int(len(stars)),
        "n_stars_good": int((stars["status"] == "good").sum()) if len(stars) else 0,
        "score_noise": config.score_noise,
        "noise_correlation": config.noise_correlation,
        "science_noise_correlated": correlation_n is not None,
        "template_noise_correlated": correlation_r is not None,
        "science_noise_status": status_n,
        "template_noise_status": status_r,
        "science_noise_far": prep.correlation_n.far_correlation,
        "template_noise_far": prep.correlation_r.far_correlation,
        **score_info,
        "science_noise_lag1": list(prep.correlation_n.lag1),
        "template_noise_lag1": list(prep.correlation_r.lag1),
        "science_noise_acf_sum": prep.correlation_n.matched_filter_factor,
        "template_noise_acf_sum": prep.correlation_r.matched_filter_factor,
        "kernel_reach": int(reach),
        "kernel_support": int(support),
        "kernel_grid": int(kernel_grid),
        "edge_width": int(edge_width),
        "psf_stamp_size": int(stamp),
        "psf_spectrum_floor": config.psf_spectrum_floor,
        "n_degenerate_frequencies": int(used["n_degenerate"].sum()),
        "fft_precision": config.fft_precision,
        "workers": int(threads),
        "tile_size": int(tile_size),
        **layout.summary(),
        "n_tiles_skipped": int(tiles["skipped"].sum()),
        "tiles": tiles,
        "time_tile_kernels_cpu": float(used["time_kernels"].sum()),
        "time_tile_apply_cpu": float(used["time_apply"].sum()),
    }
    if config.flux_image:
        metadata["flux_image"] = science.with_planes(flux, flux_var, diff_mask) \
            .replace(psf=difference_psf)
    timer.lap("metadata")
    metadata.update(timer.times)
    metadata["time_total"] = timer.total()
    return SubtractionResult(diff_exposure, matched_exposure, kernel, background, stars,
                             score_exposure, metadata)

