"""Assemble a template on a science exposure's pixel grid from coadd patches (GetTemplateTask).

:func:`get_template` follows the anchor's ``GetTemplateTask``
(``lsst-ip_diffim.md`` §2), block by block so memory is bounded by the
detector size:

1. **Select** the sky-map patches whose outer box overlaps the science box
   grown by ``border`` pixels (:meth:`RingsSkyMap.patches_overlapping`) and keep
   those stored for the science band. None: :class:`NoWorkFound`. A store
   without that band: :class:`ConfigurationError`. A stored patch whose box or
   WCS disagrees with the sky map, or whose zero point differs from the
   others: :class:`BadInputDataError` naming it.
2. **Map** science pixels to each tract's pixels (:class:`PixelMapping`: exact
   WCS transforms on a node grid, bicubic spline in between).
3. For each output block (``block_size`` pixels square) and each tract:
   compute the tract-pixel box holding every kernel tap of the block, **read
   only that box** of each patch (slicing the lazy arrays), **merge the
   patches** in the tract frame, and **warp** the merged box onto the block
   (:func:`~diffim_dask.template.warp.warp_planes`; kernel and flux
   conservation documented there).
4. **Merge tracts** per pixel with weights :math:`w = V^{-1/2}` over the
   tracts with valid data: :math:`I = \\sum w I_t / \\sum w`,
   :math:`V = \\sum w V_t / \\sum w`. The variance is averaged linearly, not in
   quadrature, because overlapping patches and tracts are built from the same
   input exposures: their noise is correlated, and for identical noise this
   returns it unchanged (the anchor's choice). Patches of one tract share the
   tract pixel grid and are merged the same way before warping, so patch
   boundaries involve no interpolation at all. Mask bits are the OR over the
   contributing inputs; pixels with no valid contribution get ``NO_DATA``
   (image and variance 0).
5. **Coverage**: fewer than ``min_valid_fraction`` valid pixels:
   :class:`NoWorkFound` (the workflow skips the detector and records why).
6. **HIGH_VARIANCE**: the variance plane is smoothed by medians in
   ``high_variance_bin_size`` bins (bilinearly interpolated between bin
   centres, so bright stars' Poisson variance does not count) and pixels where
   it exceeds ``high_variance_threshold`` × its median are flagged; skipped
   when fewer than ``high_variance_min_fraction`` of the pixels are usable.
7. **PSF**: a :class:`~diffim_dask.psf.GridPsf` on nodes every
   ``warp.psf_grid_step`` science pixels; at each node the coadd PSF of the
   patch covering it in each tract is warped through the local Jacobian of
   the pixel mapping with the image's kernel
   (:func:`~diffim_dask.template.warp.warp_psf_stamp`) and the tracts covering
   the node are averaged; nodes without coverage take the stamp of the nearest
   covered node.

The result has exactly the science pixel grid (shape, origin) and WCS, the
coadd's PhotoCalib, and a VisitInfo with the science visit and detector ids
and the band.

Memory and laziness
-------------------
Patches are opened lazily; each block reads only the tract-pixel box its
kernel taps need (with dask's synchronous scheduler: one call is one task of a
per-detector graph, so parallelism belongs across detectors, and library code
never borrows a cluster). Peak memory is the output planes plus one block's
temporaries: for a 4096 × 4096 detector from four 2400² patches the numpy
peak is ~365 MB (192 MB of it the output) and a call takes ~7 s on one core
(``benchmarks/bench_template.py``); a 256² detector cut from a lazily
generated 12200² patch (1.7 GB) peaks at ~26 MB.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from ..config import ConfigBase, config_field
from ..errors import BadInputDataError, ConfigurationError, NoWorkFound
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, mask_value
from ..psf.models import GridPsf
from .coadd_store import check_patch_geometry
from .skymap import PatchInfo, TractInfo
from .warp import PixelMapping, WarpConfig, input_margin, warp_planes, warp_psf_stamp

__all__ = ["GetTemplateConfig", "TemplateResult", "get_template"]

_NO_DATA = MASK_DTYPE(mask_value("NO_DATA"))
_HIGH_VARIANCE = MASK_DTYPE(mask_value("HIGH_VARIANCE"))


@dataclass(frozen=True)
class GetTemplateConfig(ConfigBase):
    """Configuration of :func:`get_template` (defaults follow the anchor's GetTemplateTask)."""

    border: int = config_field(
        20, "Science box grown by this many pixels when selecting patches (templateBorderSize).",
        minimum=0)
    warp: WarpConfig = config_field(
        default_factory=WarpConfig, doc="Resampling of pixels and PSFs (kernel, mapping grid).")
    min_valid_fraction: float = config_field(
        0.1, "Minimum fraction of science pixels with template data; below it the detector is "
        "skipped with NoWorkFound.", minimum=0.0, maximum=1.0)
    high_variance_threshold: float = config_field(
        4.0, "Flag HIGH_VARIANCE where the smoothed variance exceeds this multiple of its "
        "median.", minimum=1.0)
    high_variance_bin_size: int = config_field(
        32, "Bin side (pixels) of the median-smoothed variance map.", minimum=1)
    high_variance_min_fraction: float = config_field(
        0.1, "Skip HIGH_VARIANCE flagging when fewer than this fraction of pixels are usable.",
        minimum=0.0, maximum=1.0)
    block_size: int = config_field(
        1024, "Side of the output blocks assembled one at a time (bounds memory).", minimum=16)
    wcs_tolerance: float = config_field(
        0.01, "Largest disagreement (pixels) between a stored patch's WCS and its sky-map "
        "tract WCS before the patch is rejected as bad data.", minimum=0.0,
        exclusive_minimum=True)


@dataclass(frozen=True, eq=False)
class TemplateResult:
    """Output of :func:`get_template`.

    Attributes
    ----------
    template : Exposure
        The template on the science pixel grid (numpy-backed).
    patches : tuple of (int, int)
        ``(tract, patch)`` of every patch read.
    valid_fraction : float
        Fraction of pixels with template data.
    metadata : dict
        Diagnostics: band, kernel, number of blocks, per-tract valid
        fractions, HIGH_VARIANCE fraction, mapping errors, timings.
    """

    template: Exposure
    patches: tuple[tuple[int, int], ...]
    valid_fraction: float
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Component:
    """One coadd summed into the template: a band (or DCR sub-band) shifted by ``offset``."""

    band: str
    subfilter: int | None = None
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def label(self) -> str:
        return self.band if self.subfilter is None else f"{self.band}[subfilter {self.subfilter}]"


def get_template(science: Exposure, store, config: GetTemplateConfig | None = None
                 ) -> TemplateResult:
    """Warp and merge the coadd patches covering a science exposure onto its pixel grid.

    Parameters
    ----------
    science : Exposure
        Only its WCS, box (shape, origin) and VisitInfo are used; its pixels are
        never read.
    store : CoaddStore
        Template store (or any object with ``skymap``, ``bands()``,
        ``patches(band)``, ``exists(band, tract, patch)`` and
        ``open(band, tract, patch)`` returning lazy or numpy exposures).
    config : GetTemplateConfig, optional

    Returns
    -------
    TemplateResult

    Raises
    ------
    NoWorkFound
        No stored patch overlaps the science box, or fewer than
        ``min_valid_fraction`` of its pixels are covered.
    ConfigurationError
        The science exposure has no band, or the store has no coadds in it.
    BadInputDataError
        The science exposure has no WCS, or a patch is inconsistent with the
        sky map or with the other patches.
    """
    config = GetTemplateConfig() if config is None else config
    band = _science_band(science)
    if band not in store.bands():
        raise ConfigurationError(
            f"science band {band!r} (visit {science.info.visit}, detector "
            f"{science.info.detector}) has no coadds in the template store; it holds band(s) "
            f"{store.bands()}")
    return _assemble_template(science, store, [_Component(band)], config)


def _science_band(science: Exposure) -> str:
    if science.wcs is None:
        raise BadInputDataError(
            f"science exposure (visit {science.info.visit}, detector {science.info.detector}) has "
            "no WCS; a template cannot be placed on it")
    band = science.info.band
    if not band:
        raise ConfigurationError(
            f"science exposure (visit {science.info.visit}, detector {science.info.detector}) has "
            "no band in its VisitInfo; the template band cannot be chosen")
    return band


# ----------------------------------------------------------------------------------------------
# Engine shared by the plain and DCR templates.
# ----------------------------------------------------------------------------------------------


@dataclass
class _TractInput:
    tract: TractInfo
    mapping: PixelMapping
    patches: list[tuple[PatchInfo, Exposure]]


def _unit_name(science: Exposure) -> str:
    return f"visit {science.info.visit}, detector {science.info.detector}"


def _open_component(science: Exposure, store, component: _Component, selected: list[PatchInfo],
                    config: GetTemplateConfig) -> dict[int, list[tuple[PatchInfo, Exposure]]]:
    by_tract: dict[int, list[tuple[PatchInfo, Exposure]]] = {}
    for patch in selected:
        if not store.exists(component.band, patch.tract, patch.id, subfilter=component.subfilter):
            continue
        exposure = store.open(component.band, patch.tract, patch.id, subfilter=component.subfilter)
        check_patch_geometry(exposure, patch, band=component.label,
                             tolerance=config.wcs_tolerance)
        by_tract.setdefault(patch.tract, []).append((patch, exposure))
    if not by_tract:
        tracts = sorted({p.tract for p in selected})
        raise NoWorkFound(
            f"no stored {component.label} template patch overlaps {_unit_name(science)} "
            f"(the sky map has {len(selected)} overlapping patch(es) in tract(s) {tracts}, none "
            "of them in the store)")
    return by_tract


def _check_calibrations(opened: list[tuple[_Component, PatchInfo, Exposure]]) -> PhotoCalib | None:
    reference = None
    reference_name = ""
    for component, patch, exposure in opened:
        calib = exposure.photo_calib
        name = f"{component.label} patch (tract {patch.tract}, patch {patch.id})"
        if reference is None:
            reference, reference_name = calib, name
            continue
        same = (calib is None and reference is None) or (
            calib is not None and reference is not None
            and math.isclose(calib.zero_point, reference.zero_point, abs_tol=1e-6))
        if not same:
            raise BadInputDataError(
                f"{name} has zero point {getattr(calib, 'zero_point', None)} but {reference_name} "
                f"has {getattr(reference, 'zero_point', None)}; template patches must share one "
                "photometric calibration")
    return reference


def _compute(*arrays):
    if any(hasattr(a, "dask") for a in arrays):
        # One synchronous compute: library code never starts or borrows a cluster here.
        return dask.compute(*arrays, scheduler="synchronous")
    return tuple(np.asarray(a) for a in arrays)


def _valid_pixels(image, variance, mask) -> np.ndarray:
    return (((mask & _NO_DATA) == 0) & (variance > 0) & np.isfinite(variance)
            & np.isfinite(image))


def _read_tract_box(patches: list[tuple[PatchInfo, Exposure]], box: tuple[int, int, int, int]):
    """Merge the patches of one tract over the tract-pixel box ``(x0, y0, x1, y1)`` (exclusive).

    Only the box is read from each (lazy) patch. Returns None when no patch
    overlaps the box.
    """
    bx0, by0, bx1, by1 = box
    shape = (by1 - by0, bx1 - bx0)
    pieces = []
    for patch, exposure in patches:
        px0, py0 = exposure.origin
        pny, pnx = exposure.shape
        x0, x1 = max(bx0, px0), min(bx1, px0 + pnx)
        y0, y1 = max(by0, py0), min(by1, py0 + pny)
        if x0 >= x1 or y0 >= y1:
            continue
        sy, sx = slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0)
        ds = exposure.dataset
        planes = _compute(ds["image"].data[sy, sx], ds["variance"].data[sy, sx],
                          ds["mask"].data[sy, sx])
        target = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
        pieces.append((target, *planes))
    if not pieces:
        return None
    if len(pieces) == 1 and pieces[0][1].shape == shape:
        # The common case: one patch holds the whole box; no merging arithmetic needed.
        _, image, variance, mask = pieces[0]
        valid = _valid_pixels(image, variance, mask)
        if valid.all():
            return image, variance, mask
        return (np.where(valid, image, 0.0), np.where(valid, variance, 0.0),
                np.where(valid, mask, _NO_DATA).astype(MASK_DTYPE))
    weight_sum = np.zeros(shape)
    image_sum = np.zeros(shape)
    variance_sum = np.zeros(shape)
    mask_out = np.zeros(shape, dtype=MASK_DTYPE)
    for target, image, variance, mask in pieces:
        valid = _valid_pixels(image, variance, mask)
        safe_variance = np.where(valid, variance, 1.0)
        weight = np.where(valid, 1.0 / np.sqrt(safe_variance), 0.0)
        weight_sum[target] += weight
        image_sum[target] += weight * np.where(valid, image, 0.0)
        variance_sum[target] += weight * np.where(valid, variance, 0.0)
        mask_out[target] |= np.where(valid, mask, MASK_DTYPE(0)).astype(MASK_DTYPE)
    covered = weight_sum > 0
    safe = np.where(covered, weight_sum, 1.0)
    image = np.where(covered, image_sum / safe, 0.0)
    variance = np.where(covered, variance_sum / safe, 0.0)
    mask_out[~covered] = _NO_DATA
    return image, variance, mask_out


def _warp_tract_block(tract_input: _TractInput, xs: np.ndarray, ys: np.ndarray,
                      offset: tuple[float, float], warp: WarpConfig):
    """Warp one tract's merged patches onto the output block ``ys × xs``; None if not covered."""
    qx, qy = xs - offset[0], ys - offset[1]
    x_in, y_in = tract_input.mapping.grid(qx, qy)
    margin = input_margin(warp.kernel)
    box = (int(math.floor(x_in.min())) - margin, int(math.floor(y_in.min())) - margin,
           int(math.floor(x_in.max())) + margin + 1, int(math.floor(y_in.max())) + margin + 1)
    merged = _read_tract_box(tract_input.patches, box)
    if merged is None:
        return None
    image, variance, mask = merged
    area = tract_input.mapping.area_ratio(qx, qy)
    return warp_planes(image, variance, mask, (box[0], box[1]), x_in, y_in, area,
                       kernel=warp.kernel, mask_footprint=warp.mask_footprint)


def _merge_weighted(parts):
    """Per-pixel merge with w = V^(-1/2); returns image, variance, mask, valid."""
    weight_sum = image_sum = variance_sum = mask_out = None
    if len(parts) == 1:
        image, variance, mask = parts[0]
        return image, variance, mask, _valid_pixels(image, variance, mask)
    for image, variance, mask in parts:
        valid = _valid_pixels(image, variance, mask)
        weight = np.where(valid, 1.0 / np.sqrt(np.where(valid, variance, 1.0)), 0.0)
        if weight_sum is None:
            weight_sum = np.zeros(image.shape)
            image_sum = np.zeros(image.shape)
            variance_sum = np.zeros(image.shape)
            mask_out = np.zeros(image.shape, dtype=MASK_DTYPE)
        weight_sum += weight
        image_sum += weight * image
        variance_sum += weight * variance
        mask_out |= np.where(valid, mask, MASK_DTYPE(0)).astype(MASK_DTYPE)
    valid = weight_sum > 0
    safe = np.where(valid, weight_sum, 1.0)
    image = np.where(valid, image_sum / safe, 0.0)
    variance = np.where(valid, variance_sum / safe, 0.0)
    return image, variance, mask_out, valid


def _bin_medians(values: np.ndarray, usable_rows, bin_size: int) -> tuple[np.ndarray, int]:
    """Median of the usable pixels in each ``bin_size`` bin (NaN for bins without any).

    Bins are processed one bin-row at a time, from a regular subsample of at
    most 16 × 16 pixels per bin, so memory stays at one strip.
    ``usable_rows(rows)`` returns the usable-pixel map of a row slice. Also
    returns the number of usable pixels.
    """
    ny, nx = values.shape
    nby, nbx = -(-ny // bin_size), -(-nx // bin_size)
    stride = max(1, bin_size // 16)
    medians = np.full((nby, nbx), np.nan)
    n_usable = 0
    for j in range(nby):
        rows = slice(j * bin_size, min((j + 1) * bin_size, ny))
        usable = usable_rows(rows)
        n_usable += int(np.count_nonzero(usable))
        strip = np.where(usable, values[rows], np.inf)[::stride].astype(np.float64)
        strip = np.pad(strip, ((0, 0), (0, nbx * bin_size - nx)), constant_values=np.inf)
        strip = strip[:, ::stride].reshape(strip.shape[0], nbx, -1).transpose(1, 0, 2)
        strip = np.sort(strip.reshape(nbx, -1), axis=1)
        count = np.isfinite(strip).sum(axis=1)
        low = strip[np.arange(nbx), np.maximum(count - 1, 0) // 2]
        high = strip[np.arange(nbx), np.minimum(count // 2, strip.shape[1] - 1)]
        medians[j] = np.where(count > 0, 0.5 * (low + high), np.nan)
    return medians, n_usable


def _interpolation_matrix(n_pixels: int, n_bins: int, bin_size: int) -> np.ndarray:
    """Bilinear weights from bin centres to pixels (constant beyond the outer centres)."""
    matrix = np.zeros((n_pixels, n_bins))
    if n_bins == 1:
        matrix[:, 0] = 1.0
        return matrix
    centres = (np.arange(n_bins) + 0.5) * bin_size - 0.5
    position = np.clip(np.arange(n_pixels, dtype=float), centres[0], centres[-1])
    i = np.clip(np.searchsorted(centres, position) - 1, 0, n_bins - 2)
    t = (position - centres[i]) / (centres[i + 1] - centres[i])
    matrix[np.arange(n_pixels), i] = 1.0 - t
    matrix[np.arange(n_pixels), i + 1] = t
    return matrix


def _flag_high_variance(variance: np.ndarray, mask: np.ndarray, valid: np.ndarray,
                        config: GetTemplateConfig) -> float:
    """Set HIGH_VARIANCE in ``mask`` in place; return the flagged fraction (NaN if skipped).

    The smooth variance is the bilinear interpolation of the bin medians; the
    reference is the median of the bin medians (the anchor compares its fitted
    variance background with that background's median).
    """
    ignore = MASK_DTYPE(mask_value(["BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA"]))

    def usable_rows(rows):
        return valid[rows] & ((mask[rows] & ignore) == 0) & (variance[rows] > 0)

    size = config.high_variance_bin_size
    medians, n_usable = _bin_medians(variance, usable_rows, size)
    if n_usable < config.high_variance_min_fraction * variance.size:
        return math.nan
    empty = np.isnan(medians)
    reference = float(np.median(medians[~empty]))
    if empty.any():
        from scipy import ndimage

        _, (iy, ix) = ndimage.distance_transform_edt(empty, return_indices=True)
        medians = medians[iy, ix]
    ny, nx = variance.shape
    weights_y = _interpolation_matrix(ny, medians.shape[0], size)
    across = medians @ _interpolation_matrix(nx, medians.shape[1], size).T
    flagged = 0
    for start in range(0, ny, 256):
        rows = slice(start, min(start + 256, ny))
        smooth = weights_y[rows] @ across
        high = valid[rows] & (smooth > config.high_variance_threshold * reference)
        mask[rows][high] |= _HIGH_VARIANCE
        flagged += int(np.count_nonzero(high))
    return flagged / float(ny * nx)


def _patch_for_position(patches: list[tuple[PatchInfo, Exposure]], x: float, y: float, margin: int):
    """The stored patch of a tract whose inner box (else outer box, less a margin) holds (x, y)."""
    for use_inner in (True, False):
        for patch, exposure in patches:
            x0, y0, nx, ny = patch.inner_bbox if use_inner else patch.outer_bbox
            m = 0 if use_inner else margin
            if x0 - 0.5 + m <= x < x0 + nx - 0.5 - m and y0 - 0.5 + m <= y < y0 + ny - 0.5 - m:
                return patch, exposure
    return None


def _template_psf(science: Exposure, inputs: list[tuple[_Component, list[_TractInput]]],
                  valid: np.ndarray, warp: WarpConfig) -> GridPsf | None:
    """GridPsf of the warped coadd PSFs over the science box (see module notes)."""
    x0, y0 = science.origin
    ny, nx = science.shape
    n_x = max(2, int(math.ceil((nx - 1) / warp.psf_grid_step)) + 1) if nx > 1 else 1
    n_y = max(2, int(math.ceil((ny - 1) / warp.psf_grid_step)) + 1) if ny > 1 else 1
    x_nodes = np.linspace(x0, x0 + nx - 1, n_x)
    y_nodes = np.linspace(y0, y0 + ny - 1, n_y)
    margin = input_margin(warp.kernel)
    size = None

    def stamp_at(x: float, y: float):
        nonlocal size
        component_stamps = []
        for component, tract_inputs in inputs:
            stamps = []
            for tract_input in tract_inputs:
                (xi,), (yi,) = tract_input.mapping.points(x - component.offset[0],
                                                           y - component.offset[1])
                found = _patch_for_position(tract_input.patches, xi, yi, margin)
                if found is None or found[1].psf is None:
                    continue
                jacobian = tract_input.mapping.jacobian(x - component.offset[0],
                                                        y - component.offset[1])
                stamp = warp_psf_stamp(found[1].psf, xi, yi, jacobian, size, warp.kernel,
                                       offset=component.offset)
                size = stamp.shape[0]
                stamps.append(stamp)
            if not stamps:
                return None
            component_stamps.append(sum(stamps) / len(stamps))
        return sum(component_stamps) / len(component_stamps)

    # Nodes on pixels without template data take their neighbours' PSF below.
    grid: list[list[np.ndarray | None]] = [
        [stamp_at(x, y) if valid[int(round(y - y0)), int(round(x - x0))] else None
         for x in x_nodes] for y in y_nodes]
    covered = [(j, i) for j in range(n_y) for i in range(n_x) if grid[j][i] is not None]
    if not covered:
        # No node is covered: use the valid pixel nearest the centroid of the valid region.
        vy, vx = np.nonzero(valid)
        if vy.size == 0:
            return None
        k = int(np.argmin(np.hypot(vx - vx.mean(), vy - vy.mean())))
        stamp = stamp_at(float(vx[k] + x0), float(vy[k] + y0))
        if stamp is None:
            return None
        return GridPsf([float(vx[k] + x0)], [float(vy[k] + y0)], stamp[None, None])
    for j in range(n_y):
        for i in range(n_x):
            if grid[j][i] is None:
                nearest = min(covered, key=lambda c: (x_nodes[c[1]] - x_nodes[i]) ** 2
                              + (y_nodes[c[0]] - y_nodes[j]) ** 2)
                grid[j][i] = grid[nearest[0]][nearest[1]]
    sizes = {s.shape[0] for row in grid for s in row}
    if len(sizes) > 1:  # the first stamp fixed the size; this cannot differ, but be explicit
        raise BadInputDataError(f"warped PSF stamps have inconsistent sizes {sorted(sizes)}")
    return GridPsf(x_nodes, y_nodes, np.array(grid))


def _assemble_template(science: Exposure, store, components: list[_Component],
                      config: GetTemplateConfig) -> TemplateResult:
    """Sum of the warped, tract-merged coadds of ``components`` on the science grid.

    The plain template has one component; the DCR template one per sub-band,
    each shifted by its differential refraction. Pixels not covered by every
    component are NO_DATA.
    """
    started = time.perf_counter()
    warp = config.warp
    x0, y0 = science.origin
    ny, nx = science.shape
    skymap = store.skymap
    selected = skymap.patches_overlapping(science.wcs, (ny, nx), border=config.border,
                                          origin=(x0, y0))
    pad = 8 + int(math.ceil(max([abs(v) for c in components for v in c.offset] + [0.0])))
    mappings: dict[int, PixelMapping] = {}
    inputs: list[tuple[_Component, list[_TractInput]]] = []
    opened = []
    for component in components:
        by_tract = _open_component(science, store, component, selected, config)
        tract_inputs = []
        for tract_id, patches in sorted(by_tract.items()):
            if tract_id not in mappings:
                mappings[tract_id] = PixelMapping(
                    science.wcs, skymap.tract(tract_id).wcs, (x0, y0, nx, ny),
                    grid_step=warp.grid_step, tolerance=warp.mapping_tolerance, pad=pad)
            tract_inputs.append(_TractInput(skymap.tract(tract_id), mappings[tract_id], patches))
            opened.extend((component, p, e) for p, e in patches)
        inputs.append((component, tract_inputs))
    photo_calib = _check_calibrations(opened)
    prepared = time.perf_counter()

    image = np.zeros((ny, nx), dtype=np.float32)
    variance = np.zeros((ny, nx), dtype=np.float32)
    mask = np.zeros((ny, nx), dtype=MASK_DTYPE)
    valid = np.zeros((ny, nx), dtype=bool)
    tract_valid = {t: 0 for t in mappings}
    n_blocks = 0
    step = config.block_size
    for by in range(0, ny, step):
        for bx in range(0, nx, step):
            n_blocks += 1
            xs = np.arange(x0 + bx, x0 + min(bx + step, nx), dtype=float)
            ys = np.arange(y0 + by, y0 + min(by + step, ny), dtype=float)
            block = (slice(by, by + ys.size), slice(bx, bx + xs.size))
            block_valid = np.ones((ys.size, xs.size), dtype=bool)
            block_image = np.zeros((ys.size, xs.size))
            block_variance = np.zeros((ys.size, xs.size))
            block_mask = np.zeros((ys.size, xs.size), dtype=MASK_DTYPE)
            for component, tract_inputs in inputs:
                parts = []
                for tract_input in tract_inputs:
                    warped = _warp_tract_block(tract_input, xs, ys, component.offset, warp)
                    if warped is not None:
                        parts.append(warped)
                        tract_valid[tract_input.tract.id] += int(
                            np.count_nonzero((warped[2] & _NO_DATA) == 0))
                if not parts:
                    block_valid[:] = False
                    continue
                part_image, part_variance, part_mask, part_valid = _merge_weighted(parts)
                block_image += part_image
                block_variance += part_variance
                block_mask |= part_mask
                block_valid &= part_valid
            block_image[~block_valid] = 0.0
            block_variance[~block_valid] = 0.0
            block_mask[~block_valid] = _NO_DATA
            image[block] = block_image
            variance[block] = block_variance
            mask[block] = block_mask
            valid[block] = block_valid
    warped_at = time.perf_counter()

    valid_fraction = float(valid.mean())
    if valid_fraction < config.min_valid_fraction:
        raise NoWorkFound(
            f"the template covers only {valid_fraction:.1%} of {_unit_name(science)} "
            f"(minimum {config.min_valid_fraction:.0%}, GetTemplateConfig.min_valid_fraction)")
    high_variance_fraction = _flag_high_variance(variance, mask, valid, config)
    psf = _template_psf(science, inputs, valid, warp)
    finished = time.perf_counter()

    first_exposure = opened[0][2]
    info = VisitInfo(visit=science.info.visit, detector=science.info.detector,
                     band=components[0].band, instrument=first_exposure.info.instrument,
                     saturation=first_exposure.info.saturation)
    template = Exposure.from_arrays(image, variance, mask, wcs=copy.deepcopy(science.wcs), psf=psf,
                                    photo_calib=photo_calib, info=info, origin=(x0, y0))
    n_pixels = float(nx * ny)
    metadata = {
        "band": components[0].band,
        "components": [dataclasses.asdict(c) for c in components],
        "kernel": warp.kernel,
        "n_blocks": n_blocks,
        "n_patches": len(opened),
        "tract_valid_fraction": {t: v / n_pixels for t, v in tract_valid.items()},
        "high_variance_fraction": high_variance_fraction,
        "mapping_max_error": {t: m.max_error for t, m in mappings.items()},
        "mapping_grid_step": {t: m.grid_step for t, m in mappings.items()},
        "seconds": {"prepare": prepared - started, "warp": warped_at - prepared,
                    "finish": finished - warped_at, "total": finished - started},
    }
    patches = tuple(sorted({(p.tract, p.id) for _, p, _ in opened}))
    return TemplateResult(template=template, patches=patches, valid_fraction=valid_fraction,
                          metadata=metadata)
