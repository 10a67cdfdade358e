"""Coadd builder: warp exposures onto the sky-map patches they touch and combine them.

:func:`build_coadd` does, for one band:

1. **Select inputs.** Every exposure must be of the band (else
   :class:`ConfigurationError`) and carry a WCS, a PSF and a PhotoCalib (else
   :class:`BadInputDataError`). Its seeing is the PSF FWHM at the detector
   centre in arcsec. Optional best-seeing selection (as the anchor's
   ``BestSeeingSelectVisitsTask``): drop inputs above ``max_psf_fwhm``, then keep
   the ``n_best_seeing`` smallest. No input left: :class:`NoWorkFound`.
2. **Scale** each input to the coadd zero point :math:`Z` (default: the median
   of the inputs'): :math:`s_i = 10^{0.4 (Z - Z_i)}`, image × :math:`s_i`,
   variance × :math:`s_i^2`.
3. **Warp** each input once per tract onto the union of the outer boxes of the
   patches it touches (:func:`~diffim_dask.template.warp.warp_planes`, same
   kernel and flux conservation as :func:`get_template`); outside the input's
   footprint the warp is NO_DATA.
4. **Combine** per patch pixel over the inputs with valid data there (not
   NO_DATA, none of ``bad_mask_planes``, positive variance), with one weight
   per input :math:`w_i = 1 / \\mathrm{median}(V_i)`:

   .. math::

       I = \\frac{\\sum_i w_i I_i}{\\sum_i w_i}, \\qquad
       V = \\frac{\\sum_i w_i^2 V_i}{(\\sum_i w_i)^2}.

   The weight is per input, not per pixel: per-pixel inverse variances include
   the sources' own Poisson noise, which would down-weight bright stars in
   the deeper or better-seeing inputs, biasing their fluxes and distorting the
   coadd PSF. With ``combine='clipped_mean'`` inputs are first rejected per
   pixel when :math:`|I_i - c| > k \\max(s, \\sqrt{V_i})`: the first pass uses
   the median and the normalised median absolute deviation
   (:math:`1.4826\\,\\mathrm{MAD}`) as :math:`c, s`, later passes the weighted
   mean and standard deviation of the kept values; the floor
   :math:`\\sqrt{V_i}` keeps agreeing inputs from being clipped on noise. With
   two inputs nothing can be clipped (either could be the outlier).
5. **Masks**: NO_DATA where no input is valid; each plane in
   ``propagate_planes`` where the weight fraction of covering inputs that have
   it exceeds ``propagation_threshold`` (the anchor propagates SAT at 0.1).
6. **PSF**: a :class:`~diffim_dask.psf.GridPsf` with nodes every
   ``warp.psf_grid_step`` tract pixels; at each node the weighted mean
   :math:`\\sum_i w_i P_i / \\sum_i w_i` of the input PSFs warped into the tract
   frame (:func:`~diffim_dask.template.warp.warp_psf_stamp`) over the inputs
   valid there — exactly how the coadd image combines their stars. Nodes
   without data take the nearest covered node's PSF.

A single exposure gives a valid single-visit coadd. Memory: the warps of the
inputs touching one tract are held at once (each about the size of its input).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..config import ConfigBase, config_field
from ..errors import BadInputDataError, ConfigurationError, NoWorkFound
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, MASK_PLANES, mask_value
from ..psf.models import GridPsf
from .skymap import PatchInfo, RingsSkyMap, box_boundary
from .warp import PixelMapping, WarpConfig, input_margin, warp_planes, warp_psf_stamp

__all__ = ["CoaddConfig", "CoaddResult", "build_coadd"]

_NO_DATA = MASK_DTYPE(mask_value("NO_DATA"))


@dataclass(frozen=True)
class CoaddConfig(ConfigBase):
    """Configuration of :func:`build_coadd`."""

    combine: str = config_field(
        "mean", "Inverse-variance weighted mean, or the same after per-pixel sigma clipping.",
        choices=("mean", "clipped_mean"))
    clip_sigma: float = config_field(3.0, "Clipping threshold k (sigma).", minimum=0.0,
                                     exclusive_minimum=True)
    clip_iterations: int = config_field(2, "Clipping passes.", minimum=1)
    n_best_seeing: int = config_field(
        0, "Keep only the N inputs with the smallest PSF FWHM (0 keeps all).", minimum=0)
    max_psf_fwhm: float | None = config_field(
        None, "Drop inputs whose PSF FWHM at the detector centre exceeds this (arcsec).",
        minimum=0.0, exclusive_minimum=True)
    bad_mask_planes: tuple[str, ...] = config_field(
        ("BAD", "SAT", "CR", "NO_DATA", "EDGE", "SUSPECT"),
        "Input pixels with any of these planes are left out of the combination.",
        choices=tuple(MASK_PLANES))
    propagate_planes: tuple[str, ...] = config_field(
        ("SAT",), "Planes set in the coadd where enough covering inputs had them.",
        choices=tuple(MASK_PLANES))
    propagation_threshold: float = config_field(
        0.1, "Weight fraction of covering inputs above which a plane propagates.", minimum=0.0,
        maximum=1.0)
    zero_point: float | None = config_field(
        None, "Zero point of the coadd (AB mag of one count); None: the inputs' median.")
    warp: WarpConfig = config_field(default_factory=WarpConfig,
                                    doc="Resampling of pixels and PSFs.")


@dataclass(frozen=True, eq=False)
class CoaddResult:
    """Output of :func:`build_coadd`.

    Attributes
    ----------
    patches : dict
        ``(tract, patch) -> Exposure`` on the patch's outer box (tract WCS, GridPsf).
    inputs : pandas.DataFrame
        One row per input: ``visit, detector, psf_fwhm`` (arcsec), ``zero_point``,
        ``scale``, ``weight``, ``selected``, ``reason`` (why not selected).
    band : str
    metadata : dict
        Zero point, counts, combine mode.
    """

    patches: dict[tuple[int, int], Exposure]
    inputs: pd.DataFrame
    band: str
    metadata: dict[str, Any]

    def write(self, store, *, subfilter: int | None = None, overwrite: bool = False) -> list[str]:
        """Write every patch to a :class:`~diffim_dask.template.CoaddStore`."""
        return [store.write(exposure, self.band, tract, patch, subfilter=subfilter,
                            overwrite=overwrite)
                for (tract, patch), exposure in sorted(self.patches.items())]


def _pixel_scale_arcsec(wcs, x: float, y: float) -> float:
    xs = np.array([x, x + 1.0, x])
    ys = np.array([y, y, y + 1.0])
    ra, dec = copy.deepcopy(wcs).all_pix2world(xs, ys, 0)
    cos_dec = math.cos(math.radians(dec[0]))
    d1 = np.array([(ra[1] - ra[0]) * cos_dec, dec[1] - dec[0]])
    d2 = np.array([(ra[2] - ra[0]) * cos_dec, dec[2] - dec[0]])
    return math.sqrt(abs(d1[0] * d2[1] - d1[1] * d2[0])) * 3600.0


def _describe(exposure: Exposure) -> str:
    return f"visit {exposure.info.visit}, detector {exposure.info.detector}"


def _select_inputs(exposures, band: str, config: CoaddConfig) -> pd.DataFrame:
    rows = []
    for index, exposure in enumerate(exposures):
        if exposure.info.band != band:
            raise ConfigurationError(
                f"exposure {_describe(exposure)} is in band {exposure.info.band!r}, not the coadd "
                f"band {band!r}")
        for attribute in ("wcs", "psf", "photo_calib"):
            if getattr(exposure, attribute) is None:
                raise BadInputDataError(
                    f"exposure {_describe(exposure)} has no {attribute}; coadd inputs need a WCS, "
                    "a PSF and a PhotoCalib")
        x, y = exposure.center
        fwhm = exposure.psf.fwhm(x, y) * _pixel_scale_arcsec(exposure.wcs, x, y)
        rows.append({"index": index, "visit": exposure.info.visit,
                     "detector": exposure.info.detector, "psf_fwhm": fwhm,
                     "zero_point": exposure.photo_calib.zero_point, "selected": True, "reason": ""})
    table = pd.DataFrame(rows, columns=["index", "visit", "detector", "psf_fwhm", "zero_point",
                                        "selected", "reason"])
    if config.max_psf_fwhm is not None:
        too_wide = table["psf_fwhm"] > config.max_psf_fwhm
        table.loc[too_wide, "selected"] = False
        table.loc[too_wide, "reason"] = f"PSF FWHM above max_psf_fwhm = {config.max_psf_fwhm}″"
    if config.n_best_seeing:
        candidates = table[table["selected"]].sort_values(["psf_fwhm", "index"])
        dropped = candidates.index[config.n_best_seeing:]
        table.loc[dropped, "selected"] = False
        table.loc[dropped, "reason"] = f"not among the {config.n_best_seeing} best-seeing inputs"
    if not table["selected"].any():
        raise NoWorkFound(
            f"no input exposure qualifies for the {band!r} coadd ({len(table)} given; "
            f"max_psf_fwhm = {config.max_psf_fwhm}, n_best_seeing = {config.n_best_seeing})")
    return table


@dataclass
class _Warp:
    """One input warped onto a tract region."""

    index: int
    weight: float
    box: tuple[int, int, int, int]  # x0, y0, nx, ny in tract pixels
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    mapping: PixelMapping


def _warp_input(exposure: Exposure, index: int, planes, weight: float, tract, patches,
                config: CoaddConfig) -> _Warp | None:
    image, variance, mask = planes
    x0, y0 = exposure.origin
    ny, nx = exposure.shape
    # Tract-pixel bounding box of the input footprint, intersected with the patches' outer boxes.
    bx, by = box_boundary(x0 - 0.5, y0 - 0.5, nx, ny, samples=17)
    ra, dec = copy.deepcopy(exposure.wcs).all_pix2world(bx, by, 0)
    tx, ty = tract.sky_to_pixel(ra, dec)
    lo_x = max(int(math.floor(tx.min())) - 1, min(p.outer_bbox[0] for p in patches))
    lo_y = max(int(math.floor(ty.min())) - 1, min(p.outer_bbox[1] for p in patches))
    hi_x = min(int(math.ceil(tx.max())) + 1, max(p.outer_bbox[0] + p.outer_bbox[2] for p in patches))
    hi_y = min(int(math.ceil(ty.max())) + 1, max(p.outer_bbox[1] + p.outer_bbox[3] for p in patches))
    if lo_x >= hi_x or lo_y >= hi_y:
        return None
    box = (lo_x, lo_y, hi_x - lo_x, hi_y - lo_y)
    warp = config.warp
    mapping = PixelMapping(tract.wcs, exposure.wcs, box, grid_step=warp.grid_step,
                           tolerance=warp.mapping_tolerance)
    xs = np.arange(lo_x, hi_x, dtype=float)
    ys = np.arange(lo_y, hi_y, dtype=float)
    x_in, y_in = mapping.grid(xs, ys)
    area = mapping.area_ratio(xs, ys)
    # Pad the input with NO_DATA so every kernel tap exists; far positions clamp onto the pad.
    margin = input_margin(warp.kernel) + 1
    padded_image = np.pad(image, margin)
    padded_variance = np.pad(variance, margin)
    padded_mask = np.pad(mask, margin, constant_values=_NO_DATA)
    reach = margin - input_margin(warp.kernel)  # clamped positions keep every tap in the pad
    x_in = np.clip(x_in, x0 - reach, x0 + nx - 1 + reach)
    y_in = np.clip(y_in, y0 - reach, y0 + ny - 1 + reach)
    w_image, w_variance, w_mask = warp_planes(
        padded_image, padded_variance, padded_mask, (x0 - margin, y0 - margin), x_in, y_in, area,
        kernel=warp.kernel, mask_footprint=warp.mask_footprint)
    if np.all((w_mask & _NO_DATA) != 0):
        return None
    return _Warp(index, weight, box, w_image, w_variance, w_mask, mapping)


def _slice_into(warp: _Warp, patch: PatchInfo):
    """Intersection of a warp with a patch's outer box: (patch slices, warp slices) or None."""
    px0, py0, pnx, pny = patch.outer_bbox
    wx0, wy0, wnx, wny = warp.box
    x0, x1 = max(px0, wx0), min(px0 + pnx, wx0 + wnx)
    y0, y1 = max(py0, wy0), min(py0 + pny, wy0 + wny)
    if x0 >= x1 or y0 >= y1:
        return None
    return ((slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0)),
            (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0)))


def _masked_median(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the ``good`` entries (0 where there is none)."""
    ordered = np.sort(np.where(good, values, np.inf), axis=0)
    count = good.sum(axis=0)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
    high = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0] if ordered.shape[0] > 1 \
        else low
    high = np.where(count > 1, high, low)
    return np.where(count > 0, 0.5 * (low + high), 0.0)


def _combine(values, variances, masks, weights, config: CoaddConfig):
    """Combine stacks (n, ny, nx) into image, variance, mask and the per-input kept flags."""
    bad_bits = MASK_DTYPE(mask_value(config.bad_mask_planes)) if config.bad_mask_planes else 0
    covered = (masks & _NO_DATA) == 0
    good = covered & ((masks & bad_bits) == 0) & (variances > 0) & np.isfinite(values)
    w = weights[:, None, None]
    keep = good
    if config.combine == "clipped_mean":
        sigma = np.sqrt(np.where(good, variances, 0.0))
        centre = _masked_median(values, good)
        spread = 1.4826 * _masked_median(np.abs(values - centre[None]), good)
        with np.errstate(invalid="ignore"):
            for iteration in range(config.clip_iterations):
                if iteration > 0:
                    total = np.where(keep, w, 0.0).sum(axis=0)
                    safe = np.where(total > 0, total, 1.0)
                    centre = np.where(keep, w * values, 0.0).sum(axis=0) / safe
                    spread = np.sqrt(np.where(keep, w * (values - centre) ** 2, 0.0).sum(axis=0)
                                     / safe)
                scale = np.maximum(np.nan_to_num(spread)[None], sigma)
                candidate = good & (np.abs(values - np.nan_to_num(centre)[None])
                                    <= config.clip_sigma * scale)
                # Never reject every input of a pixel.
                keep = np.where(candidate.any(axis=0)[None], candidate, good)
    weight_sum = np.where(keep, w, 0.0).sum(axis=0)
    valid = weight_sum > 0
    safe = np.where(valid, weight_sum, 1.0)
    image = np.where(keep, w * values, 0.0).sum(axis=0) / safe
    variance = np.where(keep, w * w * variances, 0.0).sum(axis=0) / safe ** 2
    mask = np.zeros(image.shape, dtype=MASK_DTYPE)
    covered_weight = np.where(covered, w, 0.0).sum(axis=0)
    for plane in config.propagate_planes:
        bit = MASK_DTYPE(mask_value(plane))
        with_plane = np.where(covered & ((masks & bit) != 0), w, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fraction = np.where(covered_weight > 0, with_plane / covered_weight, 0.0)
        mask[fraction > config.propagation_threshold] |= bit
    image[~valid] = 0.0
    variance[~valid] = 0.0
    mask[~valid] |= _NO_DATA
    return image.astype(np.float32), variance.astype(np.float32), mask, keep


def _coadd_psf(patch: PatchInfo, contributions, good: np.ndarray, exposures,
               config: CoaddConfig):
    """GridPsf of the weighted warped input PSFs over the patch (None if no node has data)."""
    warp = config.warp
    x0, y0 = patch.origin
    ny, nx = patch.shape
    n_x = max(2, int(math.ceil((nx - 1) / warp.psf_grid_step)) + 1)
    n_y = max(2, int(math.ceil((ny - 1) / warp.psf_grid_step)) + 1)
    x_nodes = np.linspace(x0, x0 + nx - 1, n_x)
    y_nodes = np.linspace(y0, y0 + ny - 1, n_y)
    size = None

    def stamp_at(xn: float, yn: float):
        nonlocal size
        stamps, weights = [], []
        for index, warp_input in enumerate(contributions):
            if not good[index, int(round(yn)) - y0, int(round(xn)) - x0]:
                continue
            (xi,), (yi,) = warp_input.mapping.points(xn, yn)
            jacobian = warp_input.mapping.jacobian(xn, yn)
            stamp = warp_psf_stamp(exposures[warp_input.index].psf, xi, yi, jacobian, size,
                                   warp.kernel)
            size = stamp.shape[0]
            stamps.append(stamp)
            weights.append(warp_input.weight)
        if not stamps:
            return None
        return sum(w * s for w, s in zip(weights, stamps)) / sum(weights)

    grid = [[stamp_at(xn, yn) for xn in x_nodes] for yn in y_nodes]
    covered = [(j, i) for j in range(n_y) for i in range(n_x) if grid[j][i] is not None]
    if not covered:
        # No node has data: one PSF at the valid pixel nearest the valid region's centroid.
        vy, vx = np.nonzero(good.any(axis=0))
        if vy.size == 0:
            return None
        k = int(np.argmin(np.hypot(vx - vx.mean(), vy - vy.mean())))
        xk, yk = float(vx[k] + x0), float(vy[k] + y0)
        return GridPsf([xk], [yk], stamp_at(xk, yk)[None, None])
    for j in range(n_y):
        for i in range(n_x):
            if grid[j][i] is None:
                nj, ni = min(covered, key=lambda c: (x_nodes[c[1]] - x_nodes[i]) ** 2
                             + (y_nodes[c[0]] - y_nodes[j]) ** 2)
                grid[j][i] = grid[nj][ni]
    return GridPsf(x_nodes, y_nodes, np.array(grid))


def build_coadd(exposures, skymap: RingsSkyMap, band: str, config: CoaddConfig | None = None, *,
                patches=None) -> CoaddResult:
    """Warp exposures onto the sky-map patches they touch and combine them (see module notes).

    Parameters
    ----------
    exposures : sequence of Exposure
        Calibrated single-visit exposures (numpy or dask) of one band.
    skymap : RingsSkyMap
    band : str
    config : CoaddConfig, optional
    patches : iterable of (int, int), optional
        Build only these ``(tract, patch)``; default every patch touched.

    Returns
    -------
    CoaddResult

    Raises
    ------
    ConfigurationError
        An input is in another band.
    BadInputDataError
        An input lacks a WCS, PSF or PhotoCalib, or has no valid pixel.
    NoWorkFound
        No input survives the seeing selection, or none touches a requested patch.
    """
    config = CoaddConfig() if config is None else config
    exposures = list(exposures)
    if not exposures:
        raise NoWorkFound(f"no input exposures for the {band!r} coadd")
    table = _select_inputs(exposures, band, config)
    selected = table[table["selected"]]
    zero_point = (float(np.median(selected["zero_point"])) if config.zero_point is None
                  else float(config.zero_point))
    table["scale"] = 10.0 ** (0.4 * (zero_point - table["zero_point"]))
    table["weight"] = 0.0
    selected = table[table["selected"]]
    wanted = None if patches is None else {(int(t), int(p)) for t, p in patches}
    bad_bits = MASK_DTYPE(mask_value(config.bad_mask_planes)) if config.bad_mask_planes else 0

    warps_by_tract: dict[int, list[_Warp]] = {}
    patch_infos: dict[tuple[int, int], PatchInfo] = {}
    for row in selected.itertuples():
        exposure = exposures[row.index]
        image, variance, mask = exposure.arrays()
        image = image.astype(np.float64) * row.scale
        variance = variance.astype(np.float64) * row.scale ** 2
        usable = (((mask & bad_bits) == 0) & (variance > 0) & np.isfinite(variance)
                  & np.isfinite(image))
        if not usable.any():
            raise BadInputDataError(f"exposure {_describe(exposure)} has no valid pixel")
        # NaNs would poison the interpolation; they are masked NO_DATA by convention.
        nan = ~(np.isfinite(image) & np.isfinite(variance))
        if nan.any():
            image, variance = np.where(nan, 0.0, image), np.where(nan, 0.0, variance)
            mask = np.where(nan, mask | _NO_DATA, mask).astype(MASK_DTYPE)
        weight = 1.0 / float(np.median(variance[usable]))
        table.loc[row.Index, "weight"] = weight
        touched = skymap.patches_overlapping(exposure.wcs, exposure.shape, origin=exposure.origin)
        if wanted is not None:
            touched = [p for p in touched if p.key in wanted]
        by_tract: dict[int, list[PatchInfo]] = {}
        for patch in touched:
            by_tract.setdefault(patch.tract, []).append(patch)
        for tract_id, tract_patches in by_tract.items():
            warped = _warp_input(exposure, row.index, (image, variance, mask), weight,
                                 skymap.tract(tract_id), tract_patches, config)
            if warped is not None:
                warps_by_tract.setdefault(tract_id, []).append(warped)
                patch_infos.update({p.key: p for p in tract_patches})
    if not patch_infos:
        raise NoWorkFound(f"no selected input of band {band!r} covers any requested patch")

    out: dict[tuple[int, int], Exposure] = {}
    exposure_times = [exposures[i].info.exposure_time for i in selected["index"]]
    info = VisitInfo(visit=-1, detector=-1, band=band,
                     mjd=float(np.mean([exposures[i].info.mjd for i in selected["index"]])),
                     exposure_time=float(np.nansum(exposure_times)),
                     instrument=exposures[int(selected["index"].iloc[0])].info.instrument)
    for key, patch in sorted(patch_infos.items()):
        contributions = []
        stacks = []
        ny, nx = patch.shape
        for warp_input in warps_by_tract.get(patch.tract, []):
            slices = _slice_into(warp_input, patch)
            if slices is None:
                continue
            target, source = slices
            planes = [np.zeros((ny, nx), dtype=np.float32), np.zeros((ny, nx), dtype=np.float32),
                      np.full((ny, nx), _NO_DATA, dtype=MASK_DTYPE)]
            for plane, data in zip(planes, (warp_input.image, warp_input.variance,
                                            warp_input.mask)):
                plane[target] = data[source]
            contributions.append(warp_input)
            stacks.append(planes)
        if not contributions:
            continue
        values = np.stack([s[0] for s in stacks])
        variances = np.stack([s[1] for s in stacks])
        masks = np.stack([s[2] for s in stacks])
        weights = np.array([c.weight for c in contributions])
        image, variance, mask, keep = _combine(values, variances, masks, weights, config)
        if np.all((mask & _NO_DATA) != 0):
            continue
        psf = _coadd_psf(patch, contributions, keep, exposures, config)
        out[key] = Exposure.from_arrays(image, variance, mask, wcs=patch.wcs, psf=psf,
                                        photo_calib=PhotoCalib(zero_point), info=info,
                                        origin=patch.origin)
    if not out:
        raise NoWorkFound(f"no valid coadd pixel in band {band!r} for the requested patches")
    metadata = {"zero_point": zero_point, "combine": config.combine,
                "n_inputs": int(len(table)), "n_selected": int(table["selected"].sum()),
                "n_patches": len(out), "kernel": config.warp.kernel}
    return CoaddResult(patches=out, inputs=table.drop(columns=["index"]), band=band,
                       metadata=metadata)
