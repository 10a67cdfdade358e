"""Streak masking: long linear features (satellite and meteor trails) → STREAK plane.

Algorithm (after the anchor's MaskStreaksTask, §8.2 step 6, with a simpler
line finder than its kernel Hough transform):

1. Bin the background-subtracted difference ``b x b`` (sums of image and of
   variance) and threshold the binned significance ``|Σ D| / sqrt(Σ V)`` at
   ``threshold`` — binning is the matched filter of a wide line. Both signs
   are searched (a satellite in the template leaves a negative streak).
2. Label connected binned regions; keep the elongated ones
   (length / width ≥ ``min_aspect`` from their second moments).
3. Join collinear pieces (direction within the angle a ``line_tolerance``
   offset subtends over the piece, centres within ``line_tolerance`` of each
   other's line) so broken streaks count as one.
4. Fit each joined line by principal axes; it is a streak when its extent
   along the line is at least ``min_length`` pixels.
5. Measure the across-line profile width ``σ`` on the unbinned image (signal
   weighted RMS distance, at least the PSF sigma) and mask pixels within
   ``width_sigma · σ + FWHM / 2`` of the line — along the whole image when
   ``mask_full_line`` (satellites cross the detector), else along the
   detected extent plus ``min_length / 4`` at both ends.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from ..psf.models import FWHM_PER_SIGMA

__all__ = ["Streak", "find_streaks"]

_STRUCTURE8 = np.ones((3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class Streak:
    """A masked streak (local pixel frame).

    Attributes
    ----------
    x0, y0, x1, y1 : float
        Ends of the detected extent.
    angle : float
        Direction in degrees in [0, 180), counter-clockwise from +x.
    half_width : float
        Masked half-width in pixels.
    length : float
        Detected extent in pixels.
    sign : int
        +1 for a positive streak (science), -1 for a negative one (template).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    angle: float
    half_width: float
    length: float
    sign: int


def _bin_sum(array: np.ndarray, b: int, gy: int, gx: int) -> np.ndarray:
    """Sums over b x b blocks (rows first: contiguous reductions are fast)."""
    rows = array[:gy * b].reshape(gy, b, array.shape[1]).sum(axis=1, dtype=np.float64)
    return rows[:, :gx * b].reshape(gy, gx, b).sum(axis=2)


def _component_stats(labels: np.ndarray, n: int):
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    count = np.bincount(lab, minlength=n + 1).astype(float)
    safe = np.maximum(count, 1)
    my = np.bincount(lab, ys, minlength=n + 1) / safe
    mx = np.bincount(lab, xs, minlength=n + 1) / safe
    dy, dx = ys - my[lab], xs - mx[lab]
    cyy = np.bincount(lab, dy * dy, minlength=n + 1) / safe + 1.0 / 12
    cxx = np.bincount(lab, dx * dx, minlength=n + 1) / safe + 1.0 / 12
    cxy = np.bincount(lab, dx * dy, minlength=n + 1) / safe
    return ys, xs, lab, count, my, mx, cxx, cyy, cxy


def _principal(cxx, cyy, cxy):
    """Major/minor variances and the major-axis angle (radians)."""
    mean = 0.5 * (cxx + cyy)
    diff = np.sqrt((0.5 * (cxx - cyy)) ** 2 + cxy**2)
    return mean + diff, np.maximum(mean - diff, 1e-12), 0.5 * np.arctan2(2 * cxy, cxx - cyy)


def _rasterize_band(shape, cx, cy, ux, uy, t_lo, t_hi, half_width):
    ny, nx = shape
    t = np.arange(t_lo, t_hi + 0.5, 0.5)
    s = np.arange(-half_width, half_width + 0.25, 0.5)
    xx = cx + t[:, None] * ux - s[None, :] * uy
    yy = cy + t[:, None] * uy + s[None, :] * ux
    ix, iy = np.rint(xx).astype(int).ravel(), np.rint(yy).astype(int).ravel()
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    return iy[inside], ix[inside]


def _full_line_range(shape, cx, cy, ux, uy):
    """Parameter range of the line c + t u inside the image (with a margin)."""
    ny, nx = shape
    bounds = []
    for c, u, n in ((cx, ux, nx), (cy, uy, ny)):
        if abs(u) > 1e-9:
            a, b = (-1 - c) / u, (n - c) / u
            bounds.append((min(a, b), max(a, b)))
    lo = max(b[0] for b in bounds)
    hi = min(b[1] for b in bounds)
    return lo, hi


def find_streaks(image: np.ndarray, variance: np.ndarray, usable: np.ndarray | None, *,
                 psf_fwhm: float,
                 bin_factor: int = 4, threshold: float = 5.0, min_length: float = 100.0,
                 min_aspect: float = 4.0, line_tolerance: float = 2.0, width_sigma: float = 2.0,
                 mask_full_line: bool = True, max_streaks: int = 10):
    """Find streaks and return the STREAK mask and the streak list.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Background-subtracted difference and its variance.
    usable : numpy.ndarray of bool or None
        Pixels to use (others count as zero); None: all (unusable pixels
        already hold zero image and variance).
    psf_fwhm : float
        PSF FWHM in pixels.
    Other parameters
        See :class:`~diffim_dask.detect.config.StreakConfig`.

    Returns
    -------
    mask : numpy.ndarray of bool
    streaks : list of Streak
    """
    ny, nx = image.shape
    out = np.zeros((ny, nx), dtype=bool)
    b = int(bin_factor)
    gy, gx = ny // b, nx // b
    if max_streaks == 0 or gy < 2 or gx < 2:
        return out, []
    if usable is not None:
        image = np.where(usable, image, np.float32(0))
        variance = np.where(usable, variance, np.float32(0))
    img = _bin_sum(image, b, gy, gx)
    var = _bin_sum(variance, b, gy, gx)
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = np.where(var > 0, img / np.sqrt(var), 0.0)

    candidates = []  # (sign, ys, xs) of elongated binned components
    for sign in (1, -1):
        labels, n = ndimage.label(sign * nu >= threshold, structure=_STRUCTURE8)
        if n == 0:
            continue
        ys, xs, lab, count, my, mx, cxx, cyy, cxy = _component_stats(labels, n)
        major, minor, _ = _principal(cxx, cyy, cxy)
        length = np.sqrt(12 * major)
        aspect = np.sqrt(major / minor)
        good = np.flatnonzero((aspect >= min_aspect) & (length >= 4) & (count >= 3))
        good = good[good > 0]
        if good.size == 0:
            continue
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], good)
        ends = np.searchsorted(lab[order], good, side="right")
        for start, end in zip(starts, ends):
            idx = order[start:end]
            candidates.append((sign, ys[idx].astype(float), xs[idx].astype(float)))
    if not candidates:
        return out, []

    # Per-candidate line: centre, direction, half length.
    lines = []
    for sign, ys, xs in candidates:
        cy, cx = ys.mean(), xs.mean()
        cxx = ((xs - cx) ** 2).mean() + 1 / 12
        cyy = ((ys - cy) ** 2).mean() + 1 / 12
        cxy = ((xs - cx) * (ys - cy)).mean()
        major, _, theta = _principal(np.array(cxx), np.array(cyy), np.array(cxy))
        lines.append((sign, cx, cy, math.cos(float(theta)), math.sin(float(theta)),
                      math.sqrt(12 * float(major))))
    parent = list(range(len(lines)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(lines)):
        si, xi, yi, uxi, uyi, li = lines[i]
        for j in range(i + 1, len(lines)):
            sj, xj, yj, uxj, uyj, lj = lines[j]
            if si != sj:
                continue
            cos_angle = abs(uxi * uxj + uyi * uyj)
            max_angle = math.atan2(2 * line_tolerance, min(li, lj)) + 0.02
            if cos_angle < math.cos(max_angle):
                continue
            d_ij = abs((xj - xi) * uyi - (yj - yi) * uxi)
            d_ji = abs((xi - xj) * uyj - (yi - yj) * uxj)
            if d_ij <= 2 * line_tolerance and d_ji <= 2 * line_tolerance:
                parent[find(j)] = find(i)

    groups: dict[int, list[int]] = {}
    for i in range(len(lines)):
        groups.setdefault(find(i), []).append(i)

    found = []
    for members in groups.values():
        sign = candidates[members[0]][0]
        ys = np.concatenate([candidates[m][1] for m in members])
        xs = np.concatenate([candidates[m][2] for m in members])
        cy, cx = ys.mean(), xs.mean()
        major, _, theta = _principal(np.array(((xs - cx) ** 2).mean()),
                                     np.array(((ys - cy) ** 2).mean()),
                                     np.array(((xs - cx) * (ys - cy)).mean()))
        ux, uy = math.cos(float(theta)), math.sin(float(theta))
        t = (xs - cx) * ux + (ys - cy) * uy
        d = -(xs - cx) * uy + (ys - cy) * ux
        on_line = np.abs(d) <= line_tolerance
        if on_line.sum() < 3:
            continue
        t_lo, t_hi = t[on_line].min() - 0.5, t[on_line].max() + 0.5
        length = (t_hi - t_lo) * b
        if length < min_length:
            continue
        # Back to unbinned pixels: binned pixel i covers [i b, (i+1) b).
        found.append((length, sign, (cx + 0.5) * b - 0.5, (cy + 0.5) * b - 0.5, ux, uy,
                      t_lo * b, t_hi * b))
    found.sort(key=lambda item: -item[0])

    streaks = []
    psf_sigma = psf_fwhm / FWHM_PER_SIGMA
    for length, sign, cx, cy, ux, uy, t_lo, t_hi in found[:max_streaks]:
        # Across-line profile width from the unbinned pixels near the line.
        iy, ix = _rasterize_band((ny, nx), cx, cy, ux, uy, t_lo, t_hi, 3.0 * b)
        dist = -(ix - cx) * uy + (iy - cy) * ux
        # Mean profile across the line in 1-pixel bins: averaging along the streak beats
        # the noise down before the (clipped) profile's RMS width is taken.
        use = usable[iy, ix] if usable is not None else np.ones(iy.size, dtype=bool)
        bins = np.rint(dist[use] + 3.0 * b).astype(int)
        n_bins = int(6 * b) + 1
        keep = (bins >= 0) & (bins < n_bins)
        sums = np.bincount(bins[keep], sign * image[iy, ix][use][keep], minlength=n_bins)
        counts = np.bincount(bins[keep], minlength=n_bins)
        profile = np.clip(np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), 0.0, None)
        centres = np.arange(n_bins) - 3.0 * b
        total = profile.sum()
        sigma = math.sqrt(float((profile * centres**2).sum() / total)) if total > 0 else psf_sigma
        sigma = max(min(sigma, 3.0 * b), psf_sigma)
        half_width = width_sigma * sigma + 0.5 * psf_fwhm
        if mask_full_line:
            lo, hi = _full_line_range((ny, nx), cx, cy, ux, uy)
        else:
            lo, hi = t_lo - min_length / 4, t_hi + min_length / 4
        my, mx = _rasterize_band((ny, nx), cx, cy, ux, uy, lo, hi, half_width)
        out[my, mx] = True
        streaks.append(Streak(x0=cx + t_lo * ux, y0=cy + t_lo * uy, x1=cx + t_hi * ux,
                              y1=cy + t_hi * uy, angle=math.degrees(math.atan2(uy, ux)) % 180.0,
                              half_width=half_width, length=length, sign=int(sign)))
    return out, streaks
