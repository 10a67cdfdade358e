"""Dipole fit: two opposite PSFs on the difference, jointly with the direct images.

Model (DMTN-007): on the difference ``D``,

.. math:: D \\approx f_+ P(\\mathbf x_+) - f_- P(\\mathbf x_-),

and, when the science image ``S`` and the matched template ``T`` are given,
``S ≈ f₊ P(x₊) + b_S`` and ``T ≈ f₋ P(x₋) + b_T`` (local constant
backgrounds). The fit minimises

.. math:: \\chi^2 = \\chi^2_D + \\lambda (\\chi^2_S + \\chi^2_T),

with **inverse-variance weights** in every term (the anchor's fit is
unweighted) and ``λ`` the direct-image weight. The four positions are fitted
by Levenberg–Marquardt (:func:`~diffim_dask.detect._fourier.levenberg_marquardt`);
for given positions the fluxes and backgrounds are the closed-form linear
solution (variable projection, through a QR factorisation of the weighted
design ``A = Q R``), with Kaufman's Jacobian
``J_k = −(I − Q Qᵀ) (∂A/∂p_k) c`` built from the Fourier derivatives of the
shifted PSFs.

Classification (anchor rule, with a variance-weighted significance):
``isDipole`` when the fit converged, both lobe fluxes are positive, the
dipole significance on the difference ``sqrt(χ²_null − χ²_D)`` exceeds
``min_snr`` (5√2), each lobe's share ``|f_lobe| / (|f₊| + |f₋|)`` is below
``max_lobe_fraction`` (0.65), and the separation is at most
``max_separation_sigma`` PSF sigmas.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from ._fourier import FourierPsf, levenberg_marquardt

__all__ = ["DipoleFit", "fit_dipole", "classify_dipole"]


@dataclasses.dataclass(frozen=True)
class DipoleFit:
    """Result of one dipole fit (positions in the local pixel frame, fluxes in counts)."""

    pos_flux: float
    neg_flux: float
    pos_flux_err: float
    neg_flux_err: float
    flux_covariance: float
    x_pos: float
    y_pos: float
    x_neg: float
    y_neg: float
    x: float
    y: float
    x_err: float
    y_err: float
    separation: float
    angle: float
    chi2_dof: float
    n_data: int
    significance: float
    converged: bool

    @property
    def mean_flux(self) -> float:
        """(|f₊| + |f₋|) / 2."""
        return 0.5 * (abs(self.pos_flux) + abs(self.neg_flux))

    @property
    def flux_diff(self) -> float:
        """|f₊| − |f₋|."""
        return abs(self.pos_flux) - abs(self.neg_flux)

    @property
    def mean_flux_err(self) -> float:
        """Uncertainty of :attr:`mean_flux` (lobe covariance included)."""
        var = self.pos_flux_err**2 + self.neg_flux_err**2 + 2 * self.flux_covariance
        return 0.5 * math.sqrt(max(var, 0.0))

    @property
    def flux_diff_err(self) -> float:
        """Uncertainty of :attr:`flux_diff`."""
        var = self.pos_flux_err**2 + self.neg_flux_err**2 - 2 * self.flux_covariance
        return math.sqrt(max(var, 0.0))


def fit_dipole(difference, science=None, template=None, *, psfs, origin, start,
               direct_weight: float = 0.5, max_evaluations: int = 400) -> DipoleFit:
    """Fit a dipole in one data box.

    Parameters
    ----------
    difference : (numpy.ndarray, numpy.ndarray)
        Image and inverse-variance weight (0 = unusable) of the difference box.
    science, template : (numpy.ndarray, numpy.ndarray) or None
        The same boxes of the science image and the matched template; the fit
        uses the difference only when either is None.
    psfs : (PsfModel, PsfModel, PsfModel)
        PSFs of the difference, science and matched template.
    origin : (int, int)
        Parent-frame ``(x, y)`` of the box's first pixel.
    start : (float, float, float, float)
        Starting ``(x₊, y₊, x₋, y₋)`` in box pixels.
    direct_weight : float
        ``λ``; the direct images are ignored when 0.
    max_evaluations : int
        Budget of residual evaluations.

    Returns
    -------
    DipoleFit
        Positions in box pixels, fluxes in the image's units.
    """
    d_img = np.asarray(difference[0], dtype=float)
    d_w = np.asarray(difference[1], dtype=float)
    shape = d_img.shape
    y0, y1, x0, x1 = 0, shape[0], 0, shape[1]
    cx, cy = 0.5 * (start[0] + start[2]) + origin[0], 0.5 * (start[1] + start[3]) + origin[1]
    use_direct = direct_weight > 0 and science is not None and template is not None
    psf_d = FourierPsf(psfs[0], cx, cy, shape)
    blocks = [(np.sqrt(d_w).ravel(), d_img.ravel())]
    if use_direct:
        psf_s = psf_d if psfs[1] is psfs[0] else FourierPsf(psfs[1], cx, cy, shape)
        psf_t = psf_d if psfs[2] is psfs[0] else FourierPsf(psfs[2], cx, cy, shape)
        for img, w in (science, template):
            blocks.append((np.sqrt(direct_weight * np.asarray(w, dtype=float)).ravel(),
                           np.asarray(img, dtype=float).ravel()))
    n_pix = d_img.size
    sqrt_w = np.concatenate([b[0] for b in blocks])
    target = sqrt_w * np.concatenate([b[1] for b in blocks])

    cache: dict = {}

    def evaluate(params):
        """Weighted design matrix, linear solution, residuals and Kaufman Jacobian."""
        key = tuple(np.round(params, 12))
        if cache.get("key") == key:
            return cache["value"]
        xp, yp, xn, yn = params
        mp, dpx, dpy = (m.ravel() for m in psf_d.model_with_gradient(xp, yp))
        mn, dnx, dny = (m.ravel() for m in psf_d.model_with_gradient(xn, yn))
        zero = np.zeros(n_pix)
        if not use_direct:
            columns = np.stack([mp, -mn], axis=1)
            # d(column)/d(parameter): (column index, derivative vector) per parameter.
            derivs = [(0, dpx), (0, dpy), (1, -dnx), (1, -dny)]
        else:
            ms, dsx, dsy = (m.ravel() for m in psf_s.model_with_gradient(xp, yp))
            mt, dtx, dty = (m.ravel() for m in psf_t.model_with_gradient(xn, yn))
            one = np.ones(n_pix)
            columns = np.column_stack([
                np.concatenate([mp, ms, zero]), np.concatenate([-mn, zero, mt]),
                np.concatenate([zero, one, zero]), np.concatenate([zero, zero, one])])
            derivs = [(0, np.concatenate([dpx, dsx, zero])), (0, np.concatenate([dpy, dsy, zero])),
                      (1, np.concatenate([-dnx, zero, dtx])), (1, np.concatenate([-dny, zero, dty]))]
        a = columns * sqrt_w[:, None]
        q, r = np.linalg.qr(a)
        diagonal = np.abs(np.diag(r))
        if diagonal.min() > 1e-10 * max(float(diagonal.max()), 1e-300):
            coeffs = np.linalg.solve(r, q.T @ target)
        else:
            # Degenerate design (coincident lobes, empty direct images): minimum-norm solution.
            coeffs, *_ = np.linalg.lstsq(a, target, rcond=None)
        resid = target - a @ coeffs
        grads = np.stack([sqrt_w * d * coeffs[col] for col, d in derivs], axis=1)
        jac = -(grads - q @ (q.T @ grads))       # Kaufman's variable-projection Jacobian
        value = (a, coeffs, resid, jac)
        cache["key"], cache["value"] = key, value
        return value

    lower = np.array([x0, y0, x0, y0], dtype=float)
    upper = np.array([x1 - 1, y1 - 1, x1 - 1, y1 - 1], dtype=float)
    p0 = np.clip(np.asarray(start, float), lower + 1e-3, upper - 1e-3)
    params, jac, converged = levenberg_marquardt(lambda p: evaluate(p)[2:], p0, lower, upper,
                                                 max_evaluations=max_evaluations)
    a, coeffs, _, _ = evaluate(params)
    resid = target - a @ coeffs
    chi2_d = float((resid[:n_pix] ** 2).sum())
    chi2_null = float((target[:n_pix] ** 2).sum())
    n_data = int(np.count_nonzero(d_w > 0))
    try:
        lin_cov = np.linalg.inv(a.T @ a)
    except np.linalg.LinAlgError:
        lin_cov = np.full((a.shape[1], a.shape[1]), np.nan)
    try:
        pos_cov = np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        pos_cov = np.full((4, 4), np.nan)
    xp, yp, xn, yn = params
    dx, dy = xp - xn, yp - yn
    x_err = 0.5 * math.sqrt(max(pos_cov[0, 0] + pos_cov[2, 2] + 2 * pos_cov[0, 2], 0.0)) \
        if np.all(np.isfinite(pos_cov)) else math.nan
    y_err = 0.5 * math.sqrt(max(pos_cov[1, 1] + pos_cov[3, 3] + 2 * pos_cov[1, 3], 0.0)) \
        if np.all(np.isfinite(pos_cov)) else math.nan
    return DipoleFit(
        pos_flux=float(coeffs[0]), neg_flux=float(coeffs[1]),
        pos_flux_err=float(math.sqrt(max(lin_cov[0, 0], 0.0))),
        neg_flux_err=float(math.sqrt(max(lin_cov[1, 1], 0.0))),
        flux_covariance=float(lin_cov[0, 1]),
        x_pos=float(xp), y_pos=float(yp), x_neg=float(xn), y_neg=float(yn),
        x=float(0.5 * (xp + xn)), y=float(0.5 * (yp + yn)), x_err=x_err, y_err=y_err,
        separation=float(math.hypot(dx, dy)), angle=float(math.degrees(math.atan2(dy, dx))),
        chi2_dof=chi2_d / max(n_data - 6, 1), n_data=n_data,
        significance=math.sqrt(max(chi2_null - chi2_d, 0.0)), converged=converged)


def classify_dipole(fit: DipoleFit, *, psf_sigma: float, min_snr: float, max_lobe_fraction: float,
                    max_separation_sigma: float) -> bool:
    """The ``isDipole`` rule (see the module docstring)."""
    total = abs(fit.pos_flux) + abs(fit.neg_flux)
    if not (fit.converged and fit.pos_flux > 0 and fit.neg_flux > 0 and total > 0):
        return False
    share = max(abs(fit.pos_flux), abs(fit.neg_flux)) / total
    return (fit.significance > min_snr and share < max_lobe_fraction
            and fit.separation <= max_separation_sigma * psf_sigma)
