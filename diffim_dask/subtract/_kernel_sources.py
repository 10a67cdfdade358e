"""Kernel sources: stars selected from the science image (or a supplied list), or fit tiles.

Star selection (``lsst-ip_diffim.md`` §3.4): point-source peaks of the
PSF-matched-filter S/N map with S/N in ``[min_snr, max_snr]``, isolated (no
other detected peak within ``isolation_radius_fwhm`` PSF FWHMs), unresolved
(Gaussian-weighted second-moment radius at most ``max_size_ratio`` times the
PSF's), whose whole stamp lies inside the image and is free of the excluded mask
planes in *both* images; at most ``max_kernel_sources``, highest S/N first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ._stats import local_maxima

__all__ = []

#: Columns of the kernel-source table.
SOURCE_COLUMNS = ("x", "y", "ix", "iy", "snr", "flux", "size_ratio", "cell")


def _weighted_radius2(stamps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted second-moment radius² (x² + y²)/2 of centred stamps."""
    half = stamps.shape[-1] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r2 = (xx**2 + yy**2).astype(float)
    weight = np.exp(-0.5 * r2 / sigma**2)
    flux = (stamps * weight).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * (stamps * weight * r2).sum(axis=(-2, -1)) / flux


def _cutouts(array: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(array, (2 * half + 1, 2 * half + 1))
    return windows[iy - half, ix - half]


def _padded_cutouts(array: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int) -> np.ndarray:
    """Cut-outs that may reach beyond the image (zeros there)."""
    inside = ((iy - half).min(initial=0) >= 0 and (ix - half).min(initial=0) >= 0
              and (iy + half).max(initial=0) < array.shape[0]
              and (ix + half).max(initial=0) < array.shape[1])
    if inside:
        return _cutouts(array, iy, ix, half)
    return _cutouts(np.pad(array, half), iy + half, ix + half, half)


class _BgSub:
    """Background-subtracted image evaluated only on cut-outs (no full-size temporary)."""

    def __init__(self, image, background, good):
        self.image, self.background, self.good = image, background, good

    def cutouts(self, iy, ix, half):
        values = (_padded_cutouts(self.image, iy, ix, half)
                  - _padded_cutouts(self.background, iy, ix, half))
        return np.where(_padded_cutouts(self.good, iy, ix, half), values, 0.0)


def _bad_in_boxes(masks, bits: int, iy, ix, half) -> np.ndarray:
    """Whether any of ``bits`` is set in any of ``masks`` within the box around each centre."""
    bad = np.zeros(iy.size, bool)
    for mask in masks:
        bad |= (_cutouts(mask, iy, ix, half) & np.uint32(bits)).any(axis=(1, 2))
    return bad


def select_stars(stats, image_bgsub, masks, exclude_bits: int, psf_stamp: np.ndarray,
                 fwhm: float, config, *, stamp_half: int, origin=(0, 0), positions=None,
                 snr_scale: float = 1.0, core_bits: int = 0,
                 core_half: int = 0) -> tuple[pd.DataFrame, dict]:
    """Select kernel stars.

    Parameters
    ----------
    stats : ImageStatistics
        Of the image the stars are measured on (its ``snr`` map).
    image_bgsub : _BgSub
        Background-subtracted image (cut-outs for the size test and fluxes).
    masks : sequence of numpy.ndarray
        Mask planes of both images.
    exclude_bits : int
        A stamp touching any of these bits in any mask is rejected (but see
        ``core_bits``).
    core_bits, core_half : int
        Those of ``exclude_bits`` that reject a star only within ``core_half``
        of its centre (the fit gives them zero weight elsewhere in the stamp).
    psf_stamp : numpy.ndarray
        PSF at the image centre.
    fwhm : float
        Its FWHM (pixels).
    config : KernelSourceConfig
    stamp_half : int
        Half-width of the stamp that must be inside the image and unmasked.
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of the image.
    positions : (x, y) arrays, optional
        Supplied parent-frame positions; otherwise peaks of the S/N map.
    snr_scale : float
        Multiplies the S/N map (1/sqrt(variance factor) after variance scaling).

    Returns
    -------
    table : pandas.DataFrame
        Selected stars, columns :data:`SOURCE_COLUMNS`, highest S/N first.
    counts : dict
        How many candidates each cut removed.
    """
    snr_map = stats.snr
    ny, nx = snr_map.shape
    det_iy, det_ix = local_maxima(snr_map, config.detection_threshold / snr_scale)
    if positions is None:
        iy, ix = det_iy, det_ix
        x = ix.astype(float)
        y = iy.astype(float)
        supplied = False
    else:
        x = np.asarray(positions[0], float) - origin[0]
        y = np.asarray(positions[1], float) - origin[1]
        ix = np.rint(x).astype(int)
        iy = np.rint(y).astype(int)
        supplied = True
    counts = {"n_peaks": int(det_iy.size), "n_input": int(ix.size)}
    inside = ((ix >= stamp_half) & (ix < nx - stamp_half)
              & (iy >= stamp_half) & (iy < ny - stamp_half))
    counts["rejected_edge"] = int((~inside).sum())
    ix, iy, x, y = ix[inside], iy[inside], x[inside], y[inside]
    if supplied and ix.size:
        # Re-centre supplied positions on the local S/N peak (within one pixel).
        windows = _cutouts(np.pad(snr_map, 1), iy + 1, ix + 1, 1).reshape(ix.size, 9)
        best = np.argmax(windows, axis=1)
        iy = iy + best // 3 - 1
        ix = ix + best % 3 - 1
    snr = snr_map[iy, ix].astype(float) * snr_scale
    in_range = (snr >= config.min_snr) & (snr <= config.max_snr)
    counts["rejected_snr"] = int((~in_range).sum())
    ix, iy, x, y, snr = ix[in_range], iy[in_range], x[in_range], y[in_range], snr[in_range]

    masked = np.zeros(ix.size, bool)
    if ix.size:
        masked = _bad_in_boxes(masks, exclude_bits & ~core_bits, iy, ix, stamp_half)
        if exclude_bits & core_bits:
            soft = _bad_in_boxes(masks, exclude_bits & core_bits, iy, ix,
                                 min(core_half, stamp_half))
            # Real stars lost only to a neighbouring injected source (not injected themselves).
            own = _bad_in_boxes(masks, exclude_bits & core_bits, iy, ix, 0)
            counts["rejected_injected_neighbour"] = int((soft & ~masked & ~own).sum())
            masked |= soft
    counts["rejected_mask"] = int(masked.sum())
    keep = ~masked
    ix, iy, x, y, snr = ix[keep], iy[keep], x[keep], y[keep], snr[keep]

    if config.isolation_radius_fwhm > 0 and ix.size and det_ix.size > 1:
        tree = cKDTree(np.column_stack([det_ix, det_iy]))
        radius = config.isolation_radius_fwhm * fwhm
        neighbours = tree.query_ball_point(np.column_stack([ix, iy]), r=radius, return_length=True)
        # A peak finds itself (detected peaks include the candidate).
        isolated = neighbours <= 1
    else:
        isolated = np.ones(ix.size, bool)
    counts["rejected_isolation"] = int((~isolated).sum())
    ix, iy, x, y, snr = ix[isolated], iy[isolated], x[isolated], y[isolated], snr[isolated]

    sigma = fwhm / 2.3548
    size_half = max(3, int(np.ceil(3 * sigma)))
    size_half = min(size_half, stamp_half)
    if ix.size:
        stamps = image_bgsub.cutouts(iy, ix, size_half)
        psf_half = psf_stamp.shape[0] // 2
        psf = psf_stamp
        if psf_half > size_half:
            psf = psf_stamp[psf_half - size_half:psf_half + size_half + 1,
                            psf_half - size_half:psf_half + size_half + 1]
        elif psf_half < size_half:
            pad = size_half - psf_half
            psf = np.pad(psf_stamp, pad)
        r2_psf = _weighted_radius2(psf[None], sigma)[0]
        r2 = _weighted_radius2(stamps, sigma)
        size_ratio = np.sqrt(np.clip(r2, 0, None) / r2_psf)
        # Centroid refinement: first moments of the 3×3 core of the S/N map.
        core = _cutouts(snr_map, iy, ix, 1).astype(float)
        core = np.clip(core, 0, None)
        total = core.sum(axis=(1, 2))
        offsets = np.array([-1.0, 0.0, 1.0])
        with np.errstate(invalid="ignore", divide="ignore"):
            dx = (core.sum(axis=1) * offsets).sum(axis=1) / total
            dy = (core.sum(axis=2) * offsets).sum(axis=1) / total
        x = ix + np.nan_to_num(dx)
        y = iy + np.nan_to_num(dy)
    else:
        size_ratio = np.zeros(0)
    if config.max_size_ratio > 0:
        resolved = ~(size_ratio <= config.max_size_ratio)
    else:
        resolved = np.zeros(ix.size, bool)
    counts["rejected_resolved"] = int(resolved.sum())
    keep = ~resolved
    ix, iy, x, y, snr, size_ratio = (a[keep] for a in (ix, iy, x, y, snr, size_ratio))

    order = np.argsort(-snr, kind="stable")[:config.max_kernel_sources]
    ix, iy, x, y, snr, size_ratio = (a[order] for a in (ix, iy, x, y, snr, size_ratio))
    flux = psf_fluxes(image_bgsub, iy, ix, psf_stamp) if ix.size else np.zeros(0)
    table = pd.DataFrame({
        "x": x + origin[0],
        "y": y + origin[1],
        "ix": ix.astype(np.int64),
        "iy": iy.astype(np.int64),
        "snr": snr,
        "flux": flux,
        "size_ratio": size_ratio,
    })
    cells_x = ix // config.cell_size
    cells_y = iy // config.cell_size
    table["cell"] = (cells_y * (nx // config.cell_size + 1) + cells_x).astype(np.int64)
    counts["n_selected"] = int(len(table))
    return table, counts


def psf_fluxes(image_bgsub: _BgSub, iy: np.ndarray, ix: np.ndarray, psf_stamp: np.ndarray
               ) -> np.ndarray:
    """PSF-weighted flux estimate ``Σ P I / Σ P²`` at integer positions."""
    half = psf_stamp.shape[0] // 2
    stamps = image_bgsub.cutouts(iy, ix, half)
    return (stamps * psf_stamp).sum(axis=(1, 2)) / float((psf_stamp**2).sum())


def tile_grid(shape, tile_size: int, margin: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Centres ``(iy, ix)`` and half-width of fit tiles covering the image inside ``margin``."""
    # A tile (plus the kernel margin on both sides) must fit inside the image: small
    # images such as alert stamps get one tile as large as they allow.
    half = max(1, min(tile_size // 2, (min(shape) - 2 * margin - 1) // 2))
    side = 2 * half + 1
    centres = []
    for n in shape:
        usable = n - 2 * margin
        count = max(1, usable // side)
        start = margin + half + (usable - count * side) // 2
        centres.append(start + side * np.arange(count))
    iy, ix = np.meshgrid(centres[0], centres[1], indexing="ij")
    return iy.ravel(), ix.ravel(), half


def flux_ratio_outliers(table: pd.DataFrame, science, science_var, template, template_var,
                        radius: float, nsigma: float, tolerance: float = 0.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Flag stars whose template/science aperture-flux ratio is off the median.

    The ratio :math:`r = F_T / F_S` of background-subtracted aperture fluxes
    (radius ``radius`` pixels) has standard error
    :math:`\\sigma_r = |r| \\sqrt{(\\sigma_T/F_T)^2 + (\\sigma_S/F_S)^2}`; a star is
    an outlier when :math:`|r - \\mathrm{median}(r)| > n \\sigma_r'` with
    :math:`\\sigma_r'` computed at the median ratio (so a missing template
    counterpart, :math:`F_T \\approx 0`, is caught); ``tolerance`` (fractional)
    is added in quadrature to :math:`\\sigma_r'`.

    Returns
    -------
    outlier : numpy.ndarray of bool
    ratio : numpy.ndarray
    """
    n = len(table)
    if n == 0 or nsigma <= 0:
        return np.zeros(n, bool), np.full(n, np.nan)
    half = int(np.ceil(radius))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    aperture = (xx**2 + yy**2) <= radius**2
    iy = table["iy"].to_numpy()
    ix = table["ix"].to_numpy()
    fluxes = []
    for image, var in ((science, science_var), (template, template_var)):
        stamps = image.cutouts(iy, ix, half)
        vstamps = _padded_cutouts(var, iy, ix, half)
        fluxes.append(((stamps * aperture).sum(axis=(1, 2)), (vstamps * aperture).sum(axis=(1, 2))))
    (f_s, v_s), (f_t, v_t) = fluxes
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = f_t / f_s
    finite = np.isfinite(ratio) & (f_s > 0)
    if finite.sum() < 3:
        return ~finite, ratio
    median = float(np.median(ratio[finite]))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.hypot(np.sqrt(v_t + median**2 * v_s) / f_s, tolerance * median)
        outlier = ~finite | (np.abs(ratio - median) > nsigma * sigma)
    return outlier, ratio
