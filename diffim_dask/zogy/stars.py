"""Stars matched between the science image and the template: flux ratio and registration.

Candidates are bright, isolated local maxima of the (background-subtracted)
science image. Each is fitted in both images with that image's own PSF model
by iterated linearised least squares (model ``a P(x − x₀) + b ∂P/∂x +
c ∂P/∂y + d``; the position moves by ``−b/a``, ``−c/a`` until it settles), so
positions and fluxes are measured on the PSF models' own centring — exactly
what the ZOGY operators assume. Resolved sources are rejected by their
Gaussian-weighted second moments relative to the PSF's.

From the matched stars:

* the flux ratio ``r = F_N / F_R`` is the weighted, iteratively clipped fit of
  ``f_N = r f_R`` with errors in both fluxes (variables and transients are
  clipped);
* the template offset ``(dx, dy)`` (template position minus science
  position) is a weighted constant or linear fit; its *registration noise* is
  the excess scatter of the offsets about the model (beyond their measurement
  errors, solved from ``χ²/dof = 1``) plus the model's own uncertainty.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

__all__ = ["find_candidates", "measure_stars", "fit_flux_ratio", "fit_registration",
           "FluxRatioFit", "RegistrationFit"]


def find_candidates(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, *,
                    threshold: float, window: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Array indices ``(iy, ix)`` of star candidates, brightest first.

    A candidate pixel exceeds ``threshold`` times its own noise, is usable, is
    at least ``border`` pixels from the edges and is the maximum of the
    ``(2 window + 1)²`` box around it.
    """
    ny, nx = image.shape
    inner = (slice(border, ny - border), slice(border, nx - border))
    if ny <= 2 * border or nx <= 2 * border:
        return np.zeros(0, int), np.zeros(0, int)
    sub = image[inner]
    above = usable[inner] & (sub > 0) & (sub * sub > threshold**2 * variance[inner])
    iy, ix = np.nonzero(above)
    iy += border
    ix += border
    values = image[iy, ix]
    for radius in (1, int(window)):
        keep = np.ones(iy.size, bool)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if (dy or dx) and (radius == 1 or max(abs(dy), abs(dx)) > 1):
                    yy = np.clip(iy + dy, 0, ny - 1)
                    xx = np.clip(ix + dx, 0, nx - 1)
                    keep &= values >= image[yy, xx]
        iy, ix, values = iy[keep], ix[keep], values[keep]
    order = np.argsort(-values, kind="stable")
    return iy[order], ix[order]


def isolated(iy: np.ndarray, ix: np.ndarray, radius: float) -> np.ndarray:
    """Whether each position has no other position within ``radius`` pixels."""
    if iy.size < 2 or radius <= 0:
        return np.ones(iy.size, bool)
    tree = cKDTree(np.column_stack([ix, iy]).astype(float))
    counts = np.array([len(n) for n in tree.query_ball_point(
        np.column_stack([ix, iy]).astype(float), r=radius)])
    return counts <= 1


def _gather(plane: np.ndarray, cy: np.ndarray, cx: np.ndarray, half: int) -> np.ndarray:
    offsets = np.arange(-half, half + 1)
    return plane[(cy[:, None] + offsets[None, :])[:, :, None],
                 (cx[:, None] + offsets[None, :])[:, None, :]].astype(np.float64)


def measure_stars(image, variance, mask, psf, x, y, *, half: int, exclude_bits: int = 0,
                  variance_scale: float = 1.0, background=None, origin=(0, 0),
                  iterations: int = 4) -> pd.DataFrame:
    """PSF-fit positions, fluxes, errors and sizes of stars in one image.

    Parameters
    ----------
    image, variance, mask : numpy.ndarray
        The image's planes.
    psf : PsfModel
        The image's PSF (parent-frame positions).
    x, y : numpy.ndarray
        Initial array positions; stamps of side ``2 half + 1`` around the
        nearest pixels must lie inside the image.
    half : int
        Stamp half-width.
    exclude_bits : int
        A stamp with any of these mask bits (or a non-positive variance) is
        flagged ``bad``.
    variance_scale : float
        Factor applied to the variance plane.
    background : callable, optional
        ``background(x, y)`` at parent-frame positions, subtracted from the
        stamps (a constant term is fitted as well).
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of ``image[0, 0]``.
    iterations : int
        Position updates.

    Returns
    -------
    pandas.DataFrame
        ``x, y`` (array positions), ``x_err, y_err``, ``flux`` (total, i.e.
        corrected for the PSF light outside the stamp), ``flux_err``, ``snr``,
        ``size_ratio`` (second-moment radius relative to the PSF's), ``bad``
        (a flagged pixel in the stamp) and ``converged``.
    """
    x = np.asarray(x, float).copy()
    y = np.asarray(y, float).copy()
    n = x.size
    size = 2 * half + 1
    cx = np.rint(x).astype(int)
    cy = np.rint(y).astype(int)
    grid = np.arange(-half, half + 1, dtype=float)
    data = _gather(image, cy, cx, half)
    var = _gather(variance, cy, cx, half) * float(variance_scale)
    offsets = np.arange(-half, half + 1)
    mask_stamps = mask[(cy[:, None] + offsets[None, :])[:, :, None],
                       (cx[:, None] + offsets[None, :])[:, None, :]]
    flagged = ((mask_stamps & np.uint32(exclude_bits)) != 0).any(axis=(1, 2)) | \
        ~(var > 0).all(axis=(1, 2))
    if background is not None and n:
        px = (cx[:, None, None] + offsets[None, None, :] + origin[0]).astype(float)
        py = (cy[:, None, None] + offsets[None, :, None] + origin[1]).astype(float)
        px, py = np.broadcast_arrays(px, py)
        data = data - background(px, py)
    ones = np.ones((size, size))
    converged = np.ones(n, bool)
    coef = np.zeros((n, 4))
    cov = np.zeros((n, 4, 4))
    models = np.zeros((n, size, size))
    for iteration in range(iterations + 1):
        for i in range(n):
            models[i] = psf.image(x[i] + origin[0], y[i] + origin[1], size=size,
                                  offset=(x[i] - cx[i], y[i] - cy[i]))
        grad_y, grad_x = np.gradient(models, axis=(1, 2))
        design = np.stack([models, grad_x, grad_y, np.broadcast_to(ones, models.shape)], axis=-1)
        design = design.reshape(n, size * size, 4)
        normal = np.einsum("npi,npj->nij", design, design)
        inverse = np.linalg.inv(normal)
        rhs = np.einsum("npi,np->ni", design, data.reshape(n, -1))
        coef = np.einsum("nij,nj->ni", inverse, rhs)
        if iteration == iterations:
            middle = np.einsum("npi,npj->nij", design * var.reshape(n, -1, 1), design)
            cov = np.einsum("nij,njk,nkl->nil", inverse, middle, inverse, optimize=True)
            break
        amplitude = np.where(np.abs(coef[:, 0]) > 0, coef[:, 0], np.inf)
        step_x = np.clip(-coef[:, 1] / amplitude, -0.5, 0.5)
        step_y = np.clip(-coef[:, 2] / amplitude, -0.5, 0.5)
        x += step_x
        y += step_y
        wandered = (np.abs(x - cx) > 1.0) | (np.abs(y - cy) > 1.0)
        converged &= ~wandered
        x = np.where(wandered, cx, x)
        y = np.where(wandered, cy, y)
    amplitude = coef[:, 0]
    # The stamp holds only part of the PSF's light: the fit amplitude is that part.
    fraction = np.ones(n)
    for i in range(n):
        full = psf.image(x[i] + origin[0], y[i] + origin[1])
        m = full.shape[0]
        if m > size:
            lo = (m - size) // 2
            fraction[i] = full[lo:lo + size, lo:lo + size].sum() / full.sum()
    flux = amplitude / fraction
    flux_err = np.sqrt(np.clip(cov[:, 0, 0], 0, None)) / fraction
    with np.errstate(divide="ignore", invalid="ignore"):
        x_err = np.sqrt(np.clip(cov[:, 1, 1], 0, None)) / np.abs(amplitude)
        y_err = np.sqrt(np.clip(cov[:, 2, 2], 0, None)) / np.abs(amplitude)
        snr = flux / flux_err
    # Gaussian-weighted second moments about the fitted centre, source vs PSF model.
    sigma = np.array([psf.sigma(xi + origin[0], yi + origin[1]) for xi, yi in zip(x, y)])
    dx = grid[None, None, :] - (x - cx)[:, None, None]
    dy = grid[None, :, None] - (y - cy)[:, None, None]
    r2 = dx**2 + dy**2
    weight = np.exp(-0.5 * r2 / (sigma**2)[:, None, None])
    source = data - coef[:, 3][:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m_source = (weight * source * r2).sum(axis=(1, 2)) / (weight * source).sum(axis=(1, 2))
        m_model = (weight * models * r2).sum(axis=(1, 2)) / (weight * models).sum(axis=(1, 2))
        size_ratio = np.sqrt(m_source / m_model)
    return pd.DataFrame({"x": x, "y": y, "x_err": x_err, "y_err": y_err, "flux": flux,
                         "flux_err": flux_err, "snr": snr, "size_ratio": size_ratio,
                         "bad": flagged, "converged": converged})


def _robust_scale(values: np.ndarray) -> float:
    if values.size < 3:
        return 1.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


@dataclasses.dataclass(frozen=True)
class FluxRatioFit:
    """Result of :func:`fit_flux_ratio`: ratio, its error, stars used, reduced χ²."""

    ratio: float
    error: float
    used: np.ndarray
    chi2: float


def fit_flux_ratio(flux_science, err_science, flux_template, err_template, *, clip: float,
                   systematic: float, max_iterations: int = 20) -> FluxRatioFit:
    """Weighted, clipped fit of ``f_N = r f_R`` with errors in both fluxes.

    Each star's variance is ``e_N² + r² e_R² + (s f_N)²`` (``s`` =
    ``systematic``); stars more than ``clip`` times the (robust, ≥ 1) spread of
    the normalised residuals away are dropped, until the set is stable. The
    error is scaled by ``sqrt(χ²/dof)`` when that exceeds 1.
    """
    fn = np.asarray(flux_science, float)
    fr = np.asarray(flux_template, float)
    en = np.asarray(err_science, float)
    er = np.asarray(err_template, float)
    used = np.isfinite(fn) & np.isfinite(fr) & (fr > 0) & (fn > 0) & (en > 0) & (er > 0)
    if used.sum() == 0:
        return FluxRatioFit(float("nan"), float("nan"), used, float("nan"))
    ratio = float(np.median(fn[used] / fr[used]))
    for _ in range(max_iterations):
        var = en**2 + ratio**2 * er**2 + (systematic * fn) ** 2
        w = 1.0 / var
        ratio = float((w * fn * fr)[used].sum() / (w * fr * fr)[used].sum())
        z = (fn - ratio * fr) / np.sqrt(var)
        spread = max(1.0, _robust_scale(z[used]))
        new = used & np.isfinite(z) & (np.abs(z) <= clip * spread)
        if np.array_equal(new, used):
            break
        if new.sum() < 2:
            break
        used = new
    var = en**2 + ratio**2 * er**2 + (systematic * fn) ** 2
    n = int(used.sum())
    chi2 = float(((fn - ratio * fr) ** 2 / var)[used].sum() / max(n - 1, 1))
    error = math.sqrt(1.0 / (fr * fr / var)[used].sum()) * math.sqrt(max(1.0, chi2))
    return FluxRatioFit(ratio, error, used, chi2)


@dataclasses.dataclass(frozen=True)
class RegistrationFit:
    """Template offset model (template minus science position) from matched stars.

    Attributes
    ----------
    order : int
        0 (constant) or 1 (linear in x and y).
    coefficients : numpy.ndarray
        ``(2, n_terms)``: x and y offset models.
    covariance : numpy.ndarray
        ``(2, n_terms, n_terms)``.
    excess : numpy.ndarray
        ``(σ_x, σ_y)``: scatter of the offsets about the model beyond their errors.
    center, scale : (float, float)
        Normalisation ``u = (x - cx) / sx``, ``v = (y - cy) / sy`` (array positions).
    used : numpy.ndarray of bool
        Stars kept.
    chi2 : (float, float)
        Reduced χ² per axis with the excess included (≈ 1).
    """

    order: int
    coefficients: np.ndarray
    covariance: np.ndarray
    excess: np.ndarray
    center: tuple[float, float]
    scale: tuple[float, float]
    used: np.ndarray
    chi2: tuple[float, float]

    def _terms(self, x, y) -> np.ndarray:
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        if self.order == 0:
            return np.ones((x.size, 1))
        u = (x - self.center[0]) / self.scale[0]
        v = (y - self.center[1]) / self.scale[1]
        return np.column_stack([np.ones_like(u), u, v])

    def offset(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Model offset ``(dx, dy)`` at array positions."""
        terms = self._terms(x, y)
        return terms @ self.coefficients[0], terms @ self.coefficients[1]

    def noise(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Registration noise ``(σ_x, σ_y)`` at array positions: excess ⊕ model uncertainty."""
        terms = self._terms(x, y)
        out = []
        for axis in range(2):
            model_var = np.einsum("ni,ij,nj->n", terms, self.covariance[axis], terms)
            out.append(np.sqrt(self.excess[axis] ** 2 + np.clip(model_var, 0, None)))
        return out[0], out[1]


def _solve_excess(residual, error, dof) -> float:
    """``s`` with ``Σ r² / (e² + s²) = dof`` (0 when the errors already explain the scatter)."""
    if dof <= 0 or (residual**2 / error**2).sum() <= dof:
        return 0.0
    lo, hi = 0.0, float(np.max(residual**2)) + 1e-12
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (residual**2 / (error**2 + mid)).sum() > dof:
            lo = mid
        else:
            hi = mid
    return math.sqrt(0.5 * (lo + hi))


def fit_registration(x, y, dx, dy, err_x, err_y, *, order: int, clip: float,
                     center: tuple[float, float], scale: tuple[float, float],
                     max_iterations: int = 20) -> RegistrationFit:
    """Fit the template offsets ``(dx, dy)`` of matched stars (see module notes)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    values = [np.asarray(dx, float), np.asarray(dy, float)]
    errors = [np.maximum(np.asarray(err_x, float), 1e-4),
              np.maximum(np.asarray(err_y, float), 1e-4)]
    used = np.isfinite(values[0]) & np.isfinite(values[1]) & np.isfinite(errors[0]) \
        & np.isfinite(errors[1])
    n_terms = 1 if order == 0 else 3
    proto = RegistrationFit(order, np.zeros((2, n_terms)), np.zeros((2, n_terms, n_terms)),
                            np.zeros(2), center, scale, used, (float("nan"),) * 2)
    terms = proto._terms(x, y)
    if used.sum() >= n_terms + 1:
        # Robust start: residuals about a median (constant) or plain least-squares (linear)
        # model, normalised by their errors, clipped at `clip` robust spreads, so outliers
        # cannot inflate the excess scatter that would otherwise shield them.
        keep = used.copy()
        for axis in range(2):
            v, e = values[axis], errors[axis]
            if order == 0:
                model = np.full(v.size, np.median(v[used]))
            else:
                coef, *_ = np.linalg.lstsq(terms[used], v[used], rcond=None)
                model = terms @ coef
            z = (v - model) / e
            spread = max(1.0, _robust_scale(z[used]))
            keep &= np.abs(z - np.median(z[used])) <= clip * spread
        if keep.sum() >= n_terms + 1:
            used = keep
    coefficients = np.zeros((2, n_terms))
    covariance = np.zeros((2, n_terms, n_terms))
    excess = np.zeros(2)
    chi2 = [float("nan"), float("nan")]
    for _ in range(max_iterations):
        if used.sum() < n_terms + 1:
            break
        z = np.zeros((2, x.size))
        for axis in range(2):
            t, v, e = terms[used], values[axis][used], errors[axis][used]
            s = excess[axis]
            for _inner in range(5):
                w = 1.0 / (e**2 + s**2)
                normal = (t * w[:, None]).T @ t
                cov = np.linalg.pinv(normal)
                coef = cov @ ((t * w[:, None]).T @ v)
                s = _solve_excess(v - t @ coef, e, v.size - n_terms)
            coefficients[axis], covariance[axis], excess[axis] = coef, cov, s
            resid = values[axis] - terms @ coef
            z[axis] = resid / np.sqrt(errors[axis] ** 2 + s**2)
            w = 1.0 / (e**2 + s**2)
            chi2[axis] = float(((v - t @ coef) ** 2 * w).sum() / max(v.size - n_terms, 1))
        distance = np.hypot(z[0], z[1]) / math.sqrt(2.0)
        new = used & (distance <= clip)
        if np.array_equal(new, used) or new.sum() < n_terms + 1:
            break
        used = new
    return RegistrationFit(order, coefficients, covariance, excess, center, scale, used,
                           (chi2[0], chi2[1]))
