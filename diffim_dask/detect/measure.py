"""Batched source measurement: centroids, PSF and aperture fluxes, moments, pixel flags.

Every source gets a square stamp of side ``S = 2h + 1`` centred on the pixel
nearest its position; stamps of all sources are gathered into one
``(N, S, S)`` array so the fits below are a handful of vectorised numpy
operations whatever the number of sources.

PSF fit
    With data ``d``, weights ``w = 1/V`` (0 for unusable pixels) and the PSF
    model ``P`` rendered at the sub-pixel position (scaled by the fraction of
    the PSF's light inside the stamp, so the flux is total flux), the
    weighted least-squares flux and its error are closed-form:

    .. math:: f = \\frac{\\sum w P d}{\\sum w P^2}, \\qquad
              \\sigma_f = \\left(\\sum w P^2\\right)^{-1/2}.

Centroid
    Starting from the sub-pixel peak of the matched-filtered image (the
    maximum-likelihood position for a point source when the filter is the
    PSF), Gauss–Newton steps fit ``(f, f δx, f δy)`` to the linearised model
    ``f P + f δx ∂P/∂x + f δy ∂P/∂y``; ``δ = (a₁, a₂) / a₀`` and the
    centroid errors come from the inverse normal matrix,
    ``σ_x = sqrt(C₁₁) / |a₀|``.

Blends
    Deblended siblings (several peaks of one sign in a footprint) are fitted
    jointly: the same linearised model with one ``(P, ∂P/∂x, ∂P/∂y)`` triple
    per sibling, then a joint flux fit whose errors are the marginal ones.
"""

from __future__ import annotations

import math

import numpy as np

from ..masks import mask_value
from ..psf.models import PsfModel

__all__ = [
    "gather",
    "PsfStamps",
    "fit_linear_flux",
    "refine_centroids",
    "fit_blend",
    "aperture_flux",
    "adaptive_moments",
    "center_flags",
    "footprint_flags",
]

#: Step (pixels) of the forward differences giving the PSF derivatives.
_DERIVATIVE_STEP = 0.02
#: Sub-pixel offsets at which a constant PSF is pre-rendered (1/20 pixel, a little beyond ±1/2).
_OFFSET_NODES = np.linspace(-0.6, 0.6, 25)


def gather(array: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int, fill=0):
    """Stamps ``array[iy-h:iy+h+1, ix-h:ix+h+1]`` for every source.

    Returns
    -------
    stamps : numpy.ndarray, shape (N, 2h+1, 2h+1)
        Pixels off the image are ``fill``.
    inside : numpy.ndarray of bool, same shape
        Whether each stamp pixel is on the image.
    """
    ny, nx = array.shape
    offsets = np.arange(-half, half + 1)
    yy = np.asarray(iy)[:, None, None] + offsets[None, :, None]
    xx = np.asarray(ix)[:, None, None] + offsets[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    stamps = array[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
    if not inside.all():
        stamps = np.where(inside, stamps, fill)
    return stamps, inside


def _field(psf: PsfModel, func, shape, origin, n_nodes: int = 5):
    """Evaluate ``func(x, y)`` of a PSF on a coarse grid; return a bilinear interpolator.

    Constant PSFs are evaluated once at the image centre.
    """
    ny, nx = shape
    x0, y0 = origin
    if not psf.is_spatially_varying:
        value = np.asarray(func(x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0), dtype=float)
        return lambda x, y: np.broadcast_to(value, np.shape(x) + value.shape)
    gx = np.linspace(0, nx - 1, n_nodes)
    gy = np.linspace(0, ny - 1, n_nodes)
    table = np.array([[np.asarray(func(x0 + x, y0 + y), dtype=float) for x in gx] for y in gy])

    def interp(x, y):
        u = np.clip(np.asarray(x, float) / max(nx - 1, 1) * (n_nodes - 1), 0, n_nodes - 1)
        v = np.clip(np.asarray(y, float) / max(ny - 1, 1) * (n_nodes - 1), 0, n_nodes - 1)
        i = np.clip(np.floor(u).astype(int), 0, n_nodes - 2)
        j = np.clip(np.floor(v).astype(int), 0, n_nodes - 2)
        tu, tv = u - i, v - j
        extra = (slice(None),) + (None,) * (table.ndim - 2)
        tu, tv = tu[extra], tv[extra]
        return ((1 - tu) * (1 - tv) * table[j, i] + tu * (1 - tv) * table[j, i + 1]
                + (1 - tu) * tv * table[j + 1, i] + tu * tv * table[j + 1, i + 1])

    return interp


class PsfStamps:
    """Renders PSF model stamps at sub-pixel positions, normalised to total flux.

    ``psf.image`` normalises a stamp to unit sum; the stamp is multiplied by
    the fraction of the PSF's light (over its full ``default_size`` stamp)
    that falls in the ``S x S`` box, so a fitted amplitude is a total flux.

    Parameters
    ----------
    psf : PsfModel
        The PSF of the image measured.
    half : int
        Stamp half-width ``h``.
    moments_half : int, optional
        Half-width of the stamp on which the PSF's adaptive moments are
        measured (that of the source moments; default ``h``).
    shape, origin : tuple
        Image shape ``(ny, nx)`` and parent-frame origin ``(x0, y0)``.
    expected_renders : int, optional
        How many stamps the caller will render in all. A constant PSF is
        pre-rendered on a table of ``25 x 25`` sub-pixel offsets only when
        more stamps than that are expected (default: always); fewer are
        rendered one by one (small images, alert stamps).
    """

    def __init__(self, psf: PsfModel, half: int, shape, origin, moments_half: int | None = None,
                 expected_renders: int | None = None):
        self.psf = psf
        self._use_table = (not psf.is_spatially_varying
                           and (expected_renders is None
                                or expected_renders >= _OFFSET_NODES.size ** 2))
        self.half = int(half)
        self.size = 2 * self.half + 1
        self.origin = origin

        def inner_fraction(x, y):
            full = psf.image(x, y)
            n = full.shape[0]
            if n <= self.size:
                return 1.0
            lo = (n - self.size) // 2
            return float(full[lo:lo + self.size, lo:lo + self.size].sum() / full.sum())

        def psf_moments(x, y):
            # Adaptive moments of the PSF stamp itself, so source and PSF sizes compare
            # like with like (unweighted moments of a Moffat are dominated by its wings).
            stamp = psf.image(x, y, size=2 * (moments_half or self.half) + 1)
            start = (psf.fwhm(x, y) / 2.3548) ** 2
            values, failed = adaptive_moments(
                stamp[None], np.ones((1,) + stamp.shape, dtype=bool), np.zeros(1), np.zeros(1),
                np.array([[start, start, 0.0]]))
            return values[0] if not failed[0] else np.array(psf.moments(x, y))

        self.shape = tuple(shape)
        self._table = None
        self.fraction = _field(psf, inner_fraction, shape, origin)
        self.moments = _field(psf, psf_moments, shape, origin)

    def _offset_table(self) -> np.ndarray:
        """Stamps of a constant PSF on a grid of sub-pixel offsets (built on first use)."""
        if self._table is None:
            x0, y0 = self.origin
            cx, cy = x0 + (self.shape[1] - 1) / 2.0, y0 + (self.shape[0] - 1) / 2.0
            nodes = _OFFSET_NODES
            self._table = np.array([[self.psf.image(cx, cy, size=self.size, offset=(dx, dy))
                                     for dx in nodes] for dy in nodes])
        return self._table

    def render(self, x: np.ndarray, y: np.ndarray, ix=None, iy=None) -> np.ndarray:
        """``(N, S, S)`` stamps of local positions ``(x, y)`` centred on pixels ``(iy, ix)``.

        The centre pixels default to ``rint(x), rint(y)``; derivatives pass the
        same centres for shifted positions so every stamp shares one grid.
        A PSF that does not vary over the image is rendered once on a grid of
        sub-pixel offsets (step 1/20 pixel) and interpolated bilinearly in the
        offset (error a few 1e-4 of the peak) when many stamps are expected; a
        varying PSF, or a constant one needed for few stamps, is rendered per
        source.
        """
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        ix = np.rint(x) if ix is None else np.asarray(ix, float)
        iy = np.rint(y) if iy is None else np.asarray(iy, float)
        off_x, off_y = x - ix, y - iy
        out = np.empty((x.size, self.size, self.size))
        lo, step = _OFFSET_NODES[0], _OFFSET_NODES[1] - _OFFSET_NODES[0]
        cached = np.zeros(x.size, dtype=bool)
        if self._use_table:
            cached = ((off_x >= lo) & (off_x <= -lo) & (off_y >= lo) & (off_y <= -lo))
        if cached.any():
            table = self._offset_table()
            u = (off_x[cached] - lo) / step
            v = (off_y[cached] - lo) / step
            i = np.clip(np.floor(u).astype(int), 0, _OFFSET_NODES.size - 2)
            j = np.clip(np.floor(v).astype(int), 0, _OFFSET_NODES.size - 2)
            tu, tv = (u - i)[:, None, None], (v - j)[:, None, None]
            out[cached] = ((1 - tu) * (1 - tv) * table[j, i] + tu * (1 - tv) * table[j, i + 1]
                           + (1 - tu) * tv * table[j + 1, i] + tu * tv * table[j + 1, i + 1])
        x0, y0 = self.origin
        for k in np.flatnonzero(~cached):
            out[k] = self.psf.image(x[k] + x0, y[k] + y0, size=self.size,
                                    offset=(off_x[k], off_y[k]))
        return out * self.fraction(x, y)[:, None, None]


def fit_linear_flux(data: np.ndarray, weight: np.ndarray, model: np.ndarray):
    """Closed-form weighted flux fit of ``model`` to ``data`` (batched over axis 0).

    Returns
    -------
    flux, flux_err, chi2, n_data : numpy.ndarray
        NaN flux and error where no pixel has weight.
    """
    a = np.einsum("nij,nij,nij->n", weight, model, model)
    b = np.einsum("nij,nij,nij->n", weight, model, data)
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(a > 0, b / a, np.nan)
        err = np.where(a > 0, 1.0 / np.sqrt(a), np.nan)
    resid = data - np.nan_to_num(flux)[:, None, None] * model
    chi2 = np.einsum("nij,nij,nij->n", weight, resid, resid)
    n_data = np.count_nonzero(weight > 0, axis=(1, 2))
    return flux, err, chi2, n_data


def _design(stamps: PsfStamps, x, y):
    """PSF and its derivatives with respect to the source position."""
    h = _DERIVATIVE_STEP
    ix, iy = np.rint(x), np.rint(y)
    p = stamps.render(x, y, ix, iy)
    px = (stamps.render(x + h, y, ix, iy) - p) / h
    py = (stamps.render(x, y + h, ix, iy) - p) / h
    return p, px, py


def refine_centroids(data_fn, stamps: PsfStamps, x, y, *, iterations: int, max_shift: float):
    """Gauss–Newton centroid refinement of isolated sources (batched).

    Parameters
    ----------
    data_fn : callable
        ``data_fn(ix, iy) -> (data, weight)`` stamps centred on integer pixels.
    stamps : PsfStamps
    x, y : numpy.ndarray
        Starting local positions.
    iterations : int
    max_shift : float
        Largest allowed distance from the starting position.

    Returns
    -------
    x, y, x_err, y_err : numpy.ndarray
    failed : numpy.ndarray of bool
        Sources whose centroid ran away (reset to the start).
    """
    x_start, y_start = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    x, y = x_start.copy(), y_start.copy()
    n = x.size
    x_err = np.full(n, np.nan)
    y_err = np.full(n, np.nan)
    failed = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        data, weight = data_fn(ix, iy)
        p, px, py = _design(stamps, x, y)
        basis = np.stack([p, px, py], axis=1)                        # (N, 3, S, S)
        normal = np.einsum("nij,nkij,nlij->nkl", weight, basis, basis)
        rhs = np.einsum("nij,nkij,nij->nk", weight, basis, data)
        ok = np.linalg.det(normal) > 0
        normal[~ok] = np.eye(3)
        rhs[~ok] = 0.0
        coeffs = np.linalg.solve(normal, rhs[..., None])[..., 0]
        cov = np.linalg.inv(normal)
        amp = coeffs[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = np.clip(coeffs[:, 1] / amp, -1.0, 1.0)
            dy = np.clip(coeffs[:, 2] / amp, -1.0, 1.0)
            x_err = np.sqrt(cov[:, 1, 1]) / np.abs(amp)
            y_err = np.sqrt(cov[:, 2, 2]) / np.abs(amp)
        good = ok & np.isfinite(dx) & np.isfinite(dy)
        x = np.where(good, x + np.nan_to_num(dx), x)
        y = np.where(good, y + np.nan_to_num(dy), y)
        failed |= ~good
    far = np.hypot(x - x_start, y - y_start) > max_shift
    failed |= far
    x = np.where(failed, x_start, x)
    y = np.where(failed, y_start, y)
    return x, y, x_err, y_err, failed


def _spd_solve(normal, rhs):
    """Solution and inverse of a symmetric positive-definite system, or None."""
    try:
        np.linalg.cholesky(normal)
    except np.linalg.LinAlgError:
        return None
    cov = np.linalg.inv(normal)
    return cov @ rhs, cov


def fit_blend(image, variance, unusable, stamps: PsfStamps, x, y, *, iterations: int,
              max_shift: float):
    """Joint centroid and flux fit of deblended siblings.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Full data and variance images (local frame).
    unusable : numpy.ndarray of bool
        Pixels given zero weight.
    stamps : PsfStamps
    x, y : numpy.ndarray
        Starting positions of the siblings.

    Returns
    -------
    x, y, x_err, y_err, flux, flux_err, chi2, n_data, failed : numpy.ndarray
    """
    x_start, y_start = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    x, y = x_start.copy(), y_start.copy()
    k = x.size
    h = stamps.half
    ny, nx = image.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    y_lo, y_hi = max(iy.min() - h, 0), min(iy.max() + h + 1, ny)
    x_lo, x_hi = max(ix.min() - h, 0), min(ix.max() + h + 1, nx)
    data = image[y_lo:y_hi, x_lo:x_hi].astype(float)
    var = variance[y_lo:y_hi, x_lo:x_hi].astype(float)
    usable = (var > 0) & ~unusable[y_lo:y_hi, x_lo:x_hi]
    weight = np.where(usable, 1.0 / np.where(usable, var, 1.0), 0.0)

    def place(stack, xs, ys):
        """Paste (k, S, S) stamps centred on rint(xs, ys) into the union box."""
        out = np.zeros((stack.shape[0],) + data.shape)
        for i in range(stack.shape[0]):
            cy, cx = int(np.rint(ys[i])) - y_lo, int(np.rint(xs[i])) - x_lo
            sy0, sx0 = cy - h, cx - h
            ay0, ax0 = max(sy0, 0), max(sx0, 0)
            ay1, ax1 = min(sy0 + 2 * h + 1, data.shape[0]), min(sx0 + 2 * h + 1, data.shape[1])
            if ay1 > ay0 and ax1 > ax0:
                out[i, ay0:ay1, ax0:ax1] = stack[i, ay0 - sy0:ay1 - sy0, ax0 - sx0:ax1 - sx0]
        return out

    x_err = np.full(k, np.nan)
    y_err = np.full(k, np.nan)
    failed = np.zeros(k, dtype=bool)
    for _ in range(iterations):
        p, px, py = _design(stamps, x, y)
        basis = np.concatenate([place(p, x, y), place(px, x, y), place(py, x, y)])  # (3k, ...)
        normal = np.einsum("ij,kij,lij->kl", weight, basis, basis)
        rhs = np.einsum("ij,kij,ij->k", weight, basis, data)
        solved = _spd_solve(normal, rhs)
        if solved is None:
            failed[:] = True
            break
        coeffs, cov = solved
        amp = coeffs[:k]
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = np.clip(coeffs[k:2 * k] / amp, -1.0, 1.0)
            dy = np.clip(coeffs[2 * k:] / amp, -1.0, 1.0)
            x_err = np.sqrt(np.diag(cov)[k:2 * k]) / np.abs(amp)
            y_err = np.sqrt(np.diag(cov)[2 * k:]) / np.abs(amp)
        good = np.isfinite(dx) & np.isfinite(dy)
        x = np.where(good, x + np.nan_to_num(dx), x)
        y = np.where(good, y + np.nan_to_num(dy), y)
        failed |= ~good
    far = np.hypot(x - x_start, y - y_start) > max_shift
    failed |= far
    x = np.where(failed, x_start, x)
    y = np.where(failed, y_start, y)
    models = place(stamps.render(x, y), x, y)
    normal = np.einsum("ij,kij,lij->kl", weight, models, models)
    rhs = np.einsum("ij,kij,ij->k", weight, models, data)
    flux = np.full(k, np.nan)
    flux_err = np.full(k, np.nan)
    chi2 = np.full(k, np.nan)
    solved = _spd_solve(normal, rhs)
    if solved is not None:
        flux = solved[0]
        flux_err = np.sqrt(np.diag(solved[1]))
        resid = data - np.tensordot(flux, models, axes=1)
        chi2 = np.full(k, float((weight * resid**2).sum()))
    n_data = np.full(k, int(np.count_nonzero(weight > 0)))
    return x, y, x_err, y_err, flux, flux_err, chi2, n_data, failed


def aperture_flux(image, variance, unusable, x, y, radius: float):
    """Circular-aperture flux and error (batched).

    Each pixel is weighted by ``clip(r + 1/2 - d, 0, 1)`` with ``d`` the
    distance of its centre from ``(x, y)`` (a linear approximation of the
    pixel's overlap area with the circle). Unusable or off-image pixels are
    left out and flag the measurement.

    Returns
    -------
    flux, flux_err : numpy.ndarray
    flag : numpy.ndarray of bool
    """
    half = int(math.ceil(radius + 0.5))
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    data, inside = gather(image, iy, ix, half)
    var, _ = gather(variance, iy, ix, half)
    bad, _ = gather(unusable, iy, ix, half, fill=True)
    offsets = np.arange(-half, half + 1, dtype=float)
    dy = offsets[None, :, None] + (iy - y)[:, None, None]
    dx = offsets[None, None, :] + (ix - x)[:, None, None]
    weight = np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)
    lost = (weight > 0) & (bad | ~inside)
    use = np.where(lost, 0.0, weight)
    flux = np.einsum("nij,nij->n", use, data)
    err = np.sqrt(np.einsum("nij,nij->n", use**2, var))
    return flux, err, lost.any(axis=(1, 2))


def adaptive_moments(data, weight_ok, x_off, y_off, psf_moments, *, max_iterations: int = 20):
    """Adaptive Gaussian-weighted second moments (batched), deweighted.

    For an object with covariance ``C`` and a Gaussian weight ``W``, the
    weighted moments are ``M = (C⁻¹ + W⁻¹)⁻¹``, so ``C = (M⁻¹ - W⁻¹)⁻¹``;
    iterating ``W ← C`` converges to the adaptive moments (exact for a
    Gaussian object, in one step). Where ``M⁻¹ - W⁻¹`` is not positive
    definite (a profile flatter than the weight, e.g. along a trail) the
    step is the HSM one, ``W ← 2M``, which has the same fixed point.

    Parameters
    ----------
    data : numpy.ndarray, shape (N, S, S)
        Stamps with the source made positive.
    weight_ok : numpy.ndarray of bool
        Usable pixels.
    x_off, y_off : numpy.ndarray
        Centroid minus the stamp's central pixel.
    psf_moments : numpy.ndarray, shape (N, 3)
        ``(ixx, iyy, ixy)`` of the PSF, the starting weight.

    Returns
    -------
    moments : numpy.ndarray, shape (N, 3)
        ``(ixx, iyy, ixy)``; NaN where the iteration failed.
    failed : numpy.ndarray of bool
    """
    n, size, _ = data.shape
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=float)
    values_all = np.where(weight_ok, data, 0.0)
    w_all = np.asarray(psf_moments, dtype=float)[:, :3].copy()   # current weights (xx, yy, xy)
    failed = np.zeros(n, dtype=bool)
    result = np.full((n, 3), np.nan)
    active = np.arange(n)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        # Only the sources still iterating are computed.
        values = values_all[active]
        dy = grid[None, :, None] - y_off[active, None, None]
        dx = grid[None, None, :] - x_off[active, None, None]
        w_xx, w_yy, w_xy = w_all[active, 0], w_all[active, 1], w_all[active, 2]
        det_w = w_xx * w_yy - w_xy**2
        bad_w = ~(det_w > 0) | ~(w_xx > 0)
        det_w = np.where(bad_w, 1.0, det_w)
        inv_xx, inv_yy, inv_xy = w_yy / det_w, w_xx / det_w, -w_xy / det_w
        q = (inv_xx[:, None, None] * dx**2 + inv_yy[:, None, None] * dy**2
             + 2 * inv_xy[:, None, None] * dx * dy)
        g = np.exp(-0.5 * np.clip(q, 0.0, 100.0)) * values
        m0 = g.sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            gx = (g * dx).sum(axis=1)             # sum over y first: (k, S) along x
            m_xx = (gx * dx[:, 0, :]).sum(axis=1) / m0
            m_yy = ((g.sum(axis=2)) * dy[:, :, 0] ** 2).sum(axis=1) / m0
            m_xy = (g * dx * dy).sum(axis=(1, 2)) / m0
            det_m = m_xx * m_yy - m_xy**2
            a_xx = m_yy / det_m - inv_xx
            a_yy = m_xx / det_m - inv_yy
            a_xy = -m_xy / det_m - inv_xy
            det_a = a_xx * a_yy - a_xy**2
            c_xx, c_yy, c_xy = a_yy / det_a, a_xx / det_a, -a_xy / det_a
        # Deweighted estimate where it exists; otherwise the adaptive step W <- 2M (same
        # fixed point for a Gaussian object, always positive definite).
        deweighted = (det_a > 0) & (a_xx > 0) & np.isfinite(c_xx)
        c_xx = np.where(deweighted, c_xx, 2 * m_xx)
        c_yy = np.where(deweighted, c_yy, 2 * m_yy)
        c_xy = np.where(deweighted, c_xy, 2 * m_xy)
        ok = (m0 > 0) & (det_m > 0) & ~bad_w & np.isfinite(c_xx)
        ok &= (c_xx < 4.0 * size**2) & (c_yy < 4.0 * size**2)
        failed[active[~ok]] = True
        change = np.abs(c_xx - w_xx) + np.abs(c_yy - w_yy) + np.abs(c_xy - w_xy)
        converged = ok & (change < 1e-4 * (np.abs(w_xx) + np.abs(w_yy)))
        new = np.stack([c_xx, c_yy, c_xy], axis=1)
        w_all[active[ok]] = new[ok]
        result[active[converged]] = new[converged]
        active = active[ok & ~converged]
    # Sources still iterating keep their last estimate.
    result[active] = w_all[active]
    result[failed] = np.nan
    return result, failed


def center_flags(mask: np.ndarray, x, y):
    """OR and AND of the mask bits over the 3x3 pixels around each centroid, and off-image."""
    ny, nx = mask.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    off = (ix < 0) | (ix >= nx) | (iy < 0) | (iy >= ny)
    stamps, inside = gather(mask, np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1), 1)
    any_bits = np.bitwise_or.reduce(np.where(inside, stamps, 0).reshape(x.size, 9), axis=1)
    all_bits = np.bitwise_and.reduce(
        np.where(inside, stamps, mask_value("EDGE")).reshape(x.size, 9), axis=1)
    return any_bits.astype(np.uint32), all_bits.astype(np.uint32), off


def footprint_flags(mask: np.ndarray, pixel_y, pixel_x, pixel_source, n_sources: int):
    """OR of the mask bits over each source's footprint pixels."""
    out = np.zeros(n_sources, dtype=np.uint32)
    if pixel_source.size == 0:
        return out
    order = np.argsort(pixel_source, kind="stable")
    src = pixel_source[order]
    bits = mask[pixel_y[order], pixel_x[order]]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    out[src[starts]] = np.bitwise_or.reduceat(bits, starts)
    return out
