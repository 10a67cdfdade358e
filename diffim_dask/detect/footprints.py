"""Footprints: thresholding, isotropic growth, peaks, merging of polarities, deblending.

Footprints are handled as sorted arrays of flat pixel indices: a 4k x 4k
image with a thousand sources has only ~10⁵ footprint pixels, so labelling
(connected components of the pixel graph), growth and peak finding cost
little beyond the one thresholding pass over the image.

Rules (anchor §8.2 steps 4–5, plus peak separation):

* Footprints are connected (8-connectivity) regions of ``ν ≥ t`` (positive)
  or ``ν ≤ -t`` (negative) with at least ``min_pixels`` pixels, each grown
  isotropically by ``r`` pixels (a disc).
* The grown positive and negative footprints are merged: connected regions of
  their union are *merged footprints*.
* Peaks of each sign in a merged footprint are culled: a peak is kept when it
  is at least ``min_separation`` pixels from every brighter kept peak of its
  sign and rises above the lowest significance on the straight line to the
  nearest brighter kept peak by ``min_contrast`` sigma and by
  ``min_contrast_fraction`` of its own significance.
* Kept peaks of opposite signs are *linked* when ν runs monotonically from one
  to the other (no stronger extremum on the segment joining them) and they
  are either close (``dipole_link_distance``) or their thresholded regions
  touch (at most ``dipole_max_gap`` pixels below threshold on the segment).
  Linked peaks (transitively) form **one** source, a dipole candidate: the two
  lobes of a dipole, or the lobes of a mis-subtracted bright star, are never
  split. Every other kept peak is a source of its own, so a transient beside
  a dipole residual, inside the residual's grown footprint, keeps its row.
* The footprint's pixels go to the source of the nearest kept peak (child
  footprints).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

__all__ = [
    "disk_offsets",
    "threshold_pixels",
    "label_pixels",
    "grow_pixels",
    "find_peaks",
    "subpixel_peak",
    "SourceList",
    "build_sources",
]

_EIGHT = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def disk_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets ``(dy, dx)`` with ``dy² + dx² ≤ radius²``."""
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    return dy[keep], dx[keep]


def _neighbour_index(flat: np.ndarray, shape, dy: int, dx: int) -> np.ndarray:
    """Position in ``flat`` (sorted) of each pixel's (dy, dx) neighbour, or -1."""
    ny, nx = shape
    ys, xs = np.divmod(flat, nx)
    yy, xx = ys + dy, xs + dx
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    target = yy * nx + xx
    pos = np.searchsorted(flat, target)
    pos_c = np.clip(pos, 0, max(flat.size - 1, 0))
    found = inside & (pos < flat.size)
    if flat.size:
        found &= flat[pos_c] == target
    return np.where(found, pos_c, -1)


def label_pixels(flat: np.ndarray, shape) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of a sorted set of flat pixel indices.

    Returns
    -------
    labels : numpy.ndarray of int
        Component number (0-based) of each pixel of ``flat``.
    n : int
        Number of components.
    """
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    rows, cols = [], []
    # Half of the 8 neighbours suffices: edges are undirected.
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        nb = _neighbour_index(flat, shape, dy, dx)
        has = nb >= 0
        rows.append(np.flatnonzero(has))
        cols.append(nb[has])
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    graph = sparse.coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)),
                              shape=(flat.size, flat.size))
    n, labels = csgraph.connected_components(graph, directed=False)
    return labels.astype(np.int64), int(n)


def threshold_pixels(nu: np.ndarray, threshold: float, sign: int, min_pixels: int = 1):
    """Sorted flat indices of footprint pixels above threshold (components ≥ ``min_pixels``)."""
    flat = np.flatnonzero(nu >= threshold) if sign > 0 else np.flatnonzero(nu <= -threshold)
    if min_pixels > 1 and flat.size:
        labels, n = label_pixels(flat, nu.shape)
        sizes = np.bincount(labels, minlength=n)
        flat = flat[sizes[labels] >= min_pixels]
    return flat


def grow_pixels(flat: np.ndarray, shape, radius: int, scratch: np.ndarray | None = None):
    """Isotropic growth of a pixel set by a disc of ``radius`` (sorted flat indices).

    Only boundary pixels are dilated: a disc around an interior pixel is
    covered by the region plus the discs of its boundary pixels.

    Parameters
    ----------
    scratch : numpy.ndarray of bool, optional
        An all-False image of ``shape`` to work in (left all-False again).
    """
    if radius <= 0 or flat.size == 0:
        return flat
    ny, nx = shape
    boundary = np.zeros(flat.size, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        boundary |= _neighbour_index(flat, shape, dy, dx) < 0
    by, bx = np.divmod(flat[boundary], nx)
    work = np.zeros(shape, dtype=bool) if scratch is None else scratch
    view = work.ravel()
    view[flat] = True
    for dy, dx in zip(*disk_offsets(radius)):
        yy, xx = by + dy, bx + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        view[yy[inside] * nx + xx[inside]] = True
    # Only rows that can hold grown pixels are scanned.
    y_lo = max(int(flat[0] // nx) - radius, 0)
    y_hi = min(int(flat[-1] // nx) + radius + 1, ny)
    grown = np.flatnonzero(view[y_lo * nx:y_hi * nx]) + y_lo * nx
    view[grown] = False
    return grown


def find_peaks(nu: np.ndarray, flat: np.ndarray, sign: int) -> np.ndarray:
    """Flat indices of local extrema (of ``sign * nu``) among the pixels ``flat``.

    A pixel is a peak when it is at least as large as its 8 neighbours
    (neighbours off the image do not count).
    """
    if flat.size == 0:
        return flat
    ny, nx = nu.shape
    ys, xs = np.divmod(flat, nx)
    values = sign * nu.ravel()[flat]
    is_peak = np.ones(flat.size, dtype=bool)
    for dy, dx in _EIGHT:
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        neighbour = np.full(flat.size, -np.inf, dtype=np.float32)
        neighbour[inside] = sign * nu[yy[inside], xx[inside]]
        is_peak &= values >= neighbour
    return flat[is_peak]


def subpixel_peak(values: np.ndarray, ys: np.ndarray, xs: np.ndarray, sign: np.ndarray):
    """Sub-pixel extremum positions by 3-point Gaussian (or parabolic) interpolation.

    Along each axis, with samples ``a, b, c`` around the peak ``b``, the offset is
    ``(ln a - ln c) / (2 (ln a - 2 ln b + ln c))`` (exact for a sampled
    Gaussian, which a PSF-filtered point source nearly is), or the parabolic
    ``(a - c) / (2 (a - 2b + c))`` when a sample is not positive. Offsets are
    clipped to ±1.

    Returns
    -------
    y, x : numpy.ndarray of float
    """
    ny, nx = values.shape
    sign = np.asarray(sign, dtype=float)

    def axis_offset(lo_y, lo_x, hi_y, hi_x):
        inside = (lo_y >= 0) & (lo_x >= 0) & (hi_y < ny) & (hi_x < nx)
        ly, lx = np.clip(lo_y, 0, ny - 1), np.clip(lo_x, 0, nx - 1)
        hy, hx = np.clip(hi_y, 0, ny - 1), np.clip(hi_x, 0, nx - 1)
        a = sign * values[ly, lx]
        b = sign * values[ys, xs]
        c = sign * values[hy, hx]
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = (a > 0) & (b > 0) & (c > 0)
            la, lb, lc = (np.log(np.where(positive, v, 1.0)) for v in (a, b, c))
            gauss = (la - lc) / (2.0 * (la - 2.0 * lb + lc))
            parab = (a - c) / (2.0 * (a - 2.0 * b + c))
            offset = np.where(positive, gauss, parab)
        offset = np.where(inside & np.isfinite(offset), offset, 0.0)
        return np.clip(offset, -1.0, 1.0)

    dx = axis_offset(ys, xs - 1, ys, xs + 1)
    dy = axis_offset(ys - 1, xs, ys + 1, xs)
    return ys + dy, xs + dx


@dataclasses.dataclass(frozen=True, eq=False)
class SourceList:
    """Sources built from the merged footprints.

    Attributes
    ----------
    peak_y, peak_x : numpy.ndarray of int
        Primary peak pixel of each source.
    nu : numpy.ndarray of float
        Signed significance at the primary peak.
    kind : numpy.ndarray of int
        +1 positive, -1 negative, 0 both signs (dipole candidate).
    footprint : numpy.ndarray of int
        Merged-footprint number of each source.
    group_size : numpy.ndarray of int
        Number of sources sharing the merged footprint (deblended siblings).
    pos_y, pos_x, neg_y, neg_x : numpy.ndarray of int
        Strongest positive and negative peaks of dipole candidates (-1 otherwise).
    pixel_y, pixel_x, pixel_source : numpy.ndarray of int
        Every footprint pixel and the source (row index) it belongs to; child
        footprints of deblended sources are the nearest-peak partitions.
    detected_positive, detected_negative : numpy.ndarray of int
        Flat indices of the grown positive and negative footprints
        (DETECTED and DETECTED_NEGATIVE).
    n_positive_footprints, n_negative_footprints, n_merged_footprints : int
        Counts before and after merging.
    """

    peak_y: np.ndarray
    peak_x: np.ndarray
    nu: np.ndarray
    kind: np.ndarray
    footprint: np.ndarray
    group_size: np.ndarray
    pos_y: np.ndarray
    pos_x: np.ndarray
    neg_y: np.ndarray
    neg_x: np.ndarray
    pixel_y: np.ndarray
    pixel_x: np.ndarray
    pixel_source: np.ndarray
    detected_positive: np.ndarray
    detected_negative: np.ndarray
    n_positive_footprints: int
    n_negative_footprints: int
    n_merged_footprints: int

    def __len__(self) -> int:
        return int(self.peak_y.size)


def _line_minimum(nu: np.ndarray, sign: int, y0, x0, y1, x1) -> float:
    """Lowest ``sign * nu`` on the straight line between two pixels."""
    n = int(np.ceil(2 * np.hypot(y1 - y0, x1 - x0))) + 1
    t = np.linspace(0.0, 1.0, n)
    yy = np.rint(y0 + t * (y1 - y0)).astype(int)
    xx = np.rint(x0 + t * (x1 - x0)).astype(int)
    return float((sign * nu[yy, xx]).min())


def _cull_peaks(nu, ys, xs, sign, min_separation, min_contrast, min_fraction):
    """Indices (into ys/xs) of the peaks kept in one footprint, brightest first."""
    signed = sign * nu[ys, xs]
    order = np.argsort(-signed, kind="stable")
    kept: list[int] = []
    for i in order:
        if not kept:
            kept.append(i)
            continue
        dist = np.hypot(ys[kept] - ys[i], xs[kept] - xs[i])
        if dist.min() < min_separation:
            continue
        j = kept[int(np.argmin(dist))]
        low = _line_minimum(nu, sign, ys[i], xs[i], ys[j], xs[j])
        if signed[i] - low >= max(min_contrast, min_fraction * signed[i]):
            kept.append(i)
    return kept


def _segment_profiles(nu: np.ndarray, above: np.ndarray, ys0, xs0, ys1, xs1):
    """Profiles of ``nu`` on the segments between pairs of peaks.

    Each segment is sampled every half pixel or finer; ``above`` marks the
    thresholded pixels (either sign). Both ends are peaks, hence above.

    Returns
    -------
    gap : numpy.ndarray of float
        Longest run (pixels) of sub-threshold samples on each segment.
    high, low : numpy.ndarray of float
        Largest and smallest ``nu`` on each segment.
    """
    dist = np.hypot(ys1 - ys0, xs1 - xs0)
    n = int(np.ceil(2 * dist.max())) + 2 if dist.size else 2
    t = np.linspace(0.0, 1.0, n)
    yy = np.rint(ys0[:, None] + t[None, :] * (ys1 - ys0)[:, None]).astype(np.int64)
    xx = np.rint(xs0[:, None] + t[None, :] * (xs1 - xs0)[:, None]).astype(np.int64)
    steps = np.arange(n)
    last_above = np.maximum.accumulate(np.where(above[yy, xx], steps, 0), axis=1)
    gap = (steps - last_above).max(axis=1) * dist / (n - 1)
    values = nu[yy, xx]
    return gap, values.max(axis=1), values.min(axis=1)


def _link_opposite_peaks(nu, above, peak_y, peak_x, peak_sign, peak_fp, mixed, link_distance,
                         max_gap, tolerance):
    """Edges ``(i, j)`` between opposite-sign kept peaks that form one dipole-like source.

    In a footprint holding both signs, a positive peak ``i`` and a negative
    peak ``j`` belong together when ``nu`` runs from one to the other without
    passing a stronger extremum (on the segment joining them,
    ``max nu ≤ nu_i + tolerance`` and ``min nu ≥ nu_j - tolerance``: a source
    beside a dipole reaches the far lobe only across the near lobe), and
    either they are at most ``link_distance`` apart (the lobes of a dipole
    are about 1.2 FWHM apart in the matched-filtered image) or the segment
    leaves the thresholded pixels for at most ``max_gap`` pixels (the lobes
    of a strong, widely separated dipole touch at the zero crossing; an
    unrelated source sits across a stretch of sky).
    """
    rows, cols = [], []
    for fp in np.flatnonzero(mixed):
        members = np.flatnonzero(peak_fp == fp)
        pos = members[peak_sign[members] > 0]
        neg = members[peak_sign[members] < 0]
        ii = np.repeat(pos, neg.size)
        jj = np.tile(neg, pos.size)
        linked = np.zeros(ii.size, dtype=bool)
        for chunk in np.array_split(np.arange(ii.size), max(1, ii.size // 256)):
            i, j = ii[chunk], jj[chunk]
            gap, high, low = _segment_profiles(nu, above, peak_y[i], peak_x[i], peak_y[j],
                                               peak_x[j])
            dist = np.hypot(peak_y[i] - peak_y[j], peak_x[i] - peak_x[j])
            monotone = ((high <= nu[peak_y[i], peak_x[i]] + tolerance)
                        & (low >= nu[peak_y[j], peak_x[j]] - tolerance))
            linked[chunk] = monotone & ((dist <= link_distance) | (gap <= max_gap))
        rows.append(ii[linked])
        cols.append(jj[linked])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def build_sources(nu: np.ndarray, positive: np.ndarray | None, negative: np.ndarray | None,
                  *, grow_radius: int, min_separation: float, min_contrast: float,
                  min_contrast_fraction: float = 0.1, max_peaks: int = 100,
                  dipole_link_distance: float | None = None,
                  dipole_max_gap: float | None = None) -> SourceList:
    """Grow, merge and deblend thresholded footprints into a :class:`SourceList`.

    Parameters
    ----------
    nu : numpy.ndarray
        Significance image.
    positive, negative : numpy.ndarray of int or None
        Sorted flat indices of the thresholded pixels of each polarity (None:
        polarity not detected), from :func:`threshold_pixels`.
    grow_radius : int
        Isotropic growth in pixels.
    min_separation, min_contrast, min_contrast_fraction : float
        Peak-separation rules (pixels, sigma, fraction of the peak's S/N).
    max_peaks : int
        Largest number of same-sign peaks kept in one footprint (the brightest);
        it bounds the work on pathological footprints (e.g. a flooded image).
    dipole_link_distance, dipole_max_gap : float, optional
        Opposite-sign peaks of a merged footprint form one source (a dipole
        candidate) when they are at most ``dipole_link_distance`` pixels
        apart, or when the segment joining them crosses at most
        ``dipole_max_gap`` pixels below threshold; other peaks of the
        footprint stay sources of their own. Defaults: ``2 * min_separation``
        and ``0.5 * min_separation`` (2 and 0.5 FWHM with the default
        separation of 1 FWHM).

    Notes
    -----
    Peaks linked by the dipole rule are grouped transitively (connected
    components), so a residual with several lobes of both signs is one
    source; a group of one sign is a single peak. Each source's child
    footprint is the set of footprint pixels nearest to one of its peaks.
    """
    if dipole_link_distance is None:
        dipole_link_distance = 2.0 * min_separation
    if dipole_max_gap is None:
        dipole_max_gap = 0.5 * min_separation
    shape = nu.shape
    nx = shape[1]
    empty = np.zeros(0, dtype=np.int64)
    positive = empty if positive is None else positive
    negative = empty if negative is None else negative
    n_pos = label_pixels(positive, shape)[1]
    n_neg = label_pixels(negative, shape)[1]
    scratch = np.zeros(shape, dtype=bool)
    grown_pos = grow_pixels(positive, shape, grow_radius, scratch)
    grown_neg = grow_pixels(negative, shape, grow_radius, scratch)
    union = np.union1d(grown_pos, grown_neg)
    merged, n_merged = label_pixels(union, shape)

    peaks_pos = find_peaks(nu, positive, +1)
    peaks_neg = find_peaks(nu, negative, -1)
    peak_flat = np.concatenate([peaks_pos, peaks_neg])
    peak_y, peak_x = np.divmod(peak_flat, nx)
    peak_sign = np.concatenate([np.ones(peaks_pos.size, int), -np.ones(peaks_neg.size, int)])
    peak_fp = merged[np.searchsorted(union, peak_flat)] if peak_flat.size else empty

    # Per (footprint, sign): keep the best peak; cull secondary peaks where there are several.
    keep = np.zeros(peak_flat.size, dtype=bool)
    key = peak_fp * 2 + (peak_sign > 0)
    order = np.lexsort((-np.abs(nu[peak_y, peak_x]), key))
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]]) if key.size else empty
    ends = np.r_[starts[1:], sorted_key.size] if key.size else empty
    single = (ends - starts) == 1
    keep[order[starts[single]]] = True
    for start, end in zip(starts[~single], ends[~single]):
        members = order[start:min(end, start + 4 * max_peaks)]     # brightest first
        kept = _cull_peaks(nu, peak_y[members], peak_x[members], int(peak_sign[members[0]]),
                           min_separation, min_contrast, min_contrast_fraction)[:max_peaks]
        keep[members[kept]] = True
    peak_y, peak_x, peak_sign, peak_fp = peak_y[keep], peak_x[keep], peak_sign[keep], peak_fp[keep]
    peak_nu = nu[peak_y, peak_x].astype(float)
    n_peaks = peak_y.size

    # Group the kept peaks: opposite-sign peaks of one dipole-like residual are one source.
    has_pos = np.zeros(n_merged, dtype=bool)
    has_neg = np.zeros(n_merged, dtype=bool)
    has_pos[peak_fp[peak_sign > 0]] = True
    has_neg[peak_fp[peak_sign < 0]] = True
    mixed = has_pos & has_neg
    group = np.arange(n_peaks, dtype=np.int64)
    if mixed.any():
        above = scratch.ravel()
        above[positive] = True
        above[negative] = True
        ii, jj = _link_opposite_peaks(nu, scratch, peak_y, peak_x, peak_sign, peak_fp, mixed,
                                      dipole_link_distance, dipole_max_gap, min_contrast)
        above[positive] = False
        above[negative] = False
        graph = sparse.coo_matrix((np.ones(ii.size, dtype=np.int8), (ii, jj)),
                                  shape=(n_peaks, n_peaks))
        group = csgraph.connected_components(graph, directed=False)[1].astype(np.int64)
    group_pos = np.zeros(n_peaks, dtype=bool)
    group_neg = np.zeros(n_peaks, dtype=bool)
    group_pos[group[peak_sign > 0]] = True
    group_neg[group[peak_sign < 0]] = True
    is_mixed = (group_pos & group_neg)[group] if n_peaks else np.zeros(0, bool)

    # Sources: one per group, ordered by footprint then brightness; the primary peak is the
    # brightest of the group.
    order = np.lexsort((-np.abs(peak_nu), peak_fp))
    peak_y, peak_x, peak_sign, peak_fp, peak_nu, group, is_mixed = (
        a[order] for a in (peak_y, peak_x, peak_sign, peak_fp, peak_nu, group, is_mixed))
    _, first = np.unique(group, return_index=True)
    rows = np.zeros(n_peaks, dtype=bool)
    rows[first] = True
    source_of_group = np.full(n_peaks, -1, dtype=np.int64)
    source_of_group[group[rows]] = np.arange(int(rows.sum()))
    peak_source = source_of_group[group]
    kind = np.where(is_mixed, 0, peak_sign)[rows]
    src_fp = peak_fp[rows]
    n_sources = int(rows.sum())
    pos_y = np.full(n_sources, -1, dtype=np.int64)
    pos_x, neg_y, neg_x = pos_y.copy(), pos_y.copy(), pos_y.copy()
    for sgn, ty, tx in ((1, pos_y, pos_x), (-1, neg_y, neg_x)):
        # Brightest peak of each sign in every mixed group (order is brightest-first).
        sel = np.flatnonzero(is_mixed & (peak_sign == sgn))
        if sel.size:
            _, first_sel = np.unique(peak_source[sel], return_index=True)
            lobe = sel[first_sel]
            ty[peak_source[lobe]] = peak_y[lobe]
            tx[peak_source[lobe]] = peak_x[lobe]
    per_fp = np.bincount(src_fp, minlength=n_merged)
    group_size = per_fp[src_fp] if n_sources else empty

    # Footprint pixels -> sources: the footprint's only source, or the source of the nearest
    # kept peak.
    pix_y, pix_x = np.divmod(union, nx)
    first_source = np.full(n_merged, -1, dtype=np.int64)
    if n_sources:
        starts = np.flatnonzero(np.r_[True, src_fp[1:] != src_fp[:-1]])
        first_source[src_fp[starts]] = starts
    pix_source = first_source[merged] if union.size else empty
    blended = np.flatnonzero(per_fp > 1)
    if blended.size:
        in_blend = np.flatnonzero(np.isin(merged, blended))
        for fp in blended:
            members = np.flatnonzero(peak_fp == fp)
            sel = in_blend[merged[in_blend] == fp]
            tree = cKDTree(np.column_stack([peak_y[members], peak_x[members]]))
            _, nearest = tree.query(np.column_stack([pix_y[sel], pix_x[sel]]))
            pix_source[sel] = peak_source[members[nearest]]
    keep_pix = pix_source >= 0
    return SourceList(
        peak_y=peak_y[rows], peak_x=peak_x[rows], nu=peak_nu[rows], kind=kind, footprint=src_fp,
        group_size=group_size, pos_y=pos_y, pos_x=pos_x, neg_y=neg_y, neg_x=neg_x,
        pixel_y=pix_y[keep_pix], pixel_x=pix_x[keep_pix], pixel_source=pix_source[keep_pix],
        detected_positive=grown_pos, detected_negative=grown_neg,
        n_positive_footprints=int(n_pos), n_negative_footprints=int(n_neg),
        n_merged_footprints=int(n_merged))
