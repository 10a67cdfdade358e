"""Trailed-source fit: a PSF convolved with a line segment, by weighted least squares.

The model of a source moving uniformly during the exposure is

.. math:: m(\\mathbf r) = F \\int_{-1/2}^{1/2} P(\\mathbf r - \\mathbf c - t\\,\\mathbf v)\\,dt,

with total flux ``F``, centre ``c`` and segment vector ``v`` (length ``|v|``,
angle ``atan2(v_y, v_x)``). It is evaluated in Fourier space
(:class:`~diffim_dask.detect._fourier.FourierPsf`), ``F`` is the closed-form
weighted linear solution for given ``(c, v)`` (variable projection), and
``(c, v)`` are fitted by Levenberg–Marquardt from a start taken from the
source's moments. With ``a = √w m₁`` (unit-flux model), ``t = √w d``,
``F = a·t / a·a`` and residuals ``r = t − F a``, the Jacobian is exact:

.. math:: \\partial_p r = -\\Big(F g_p + a\\,\\frac{g_p\\cdot r - F\\,a\\cdot g_p}{a\\cdot a}\\Big),
          \\qquad g_p = \\partial_p a,

with ``∂m₁/∂p`` from the same inverse FFT as the model
(:meth:`~diffim_dask.detect._fourier.FourierPsf.trail_with_gradient`).
Only sources that look elongated are fitted (see :class:`TrailConfig`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from ._fourier import FourierPsf, levenberg_marquardt

__all__ = ["TrailFit", "fit_trail"]


@dataclasses.dataclass(frozen=True)
class TrailFit:
    """Result of one trail fit (local frame, counts)."""

    flux: float
    flux_err: float
    length: float
    angle: float
    x: float
    y: float
    chi2: float
    converged: bool


def fit_trail(box, image, weight, *, psf, origin, start, max_length: float,
              max_evaluations: int = 400) -> TrailFit:
    """Fit one trail.

    Parameters
    ----------
    box : (int, int, int, int)
        ``(y0, y1, x0, x1)`` local bounds of the data box.
    image, weight : numpy.ndarray
        Full local images (weights 0 for unusable pixels).
    psf : PsfModel
        The difference PSF.
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of the local frame.
    start : (float, float, float, float)
        Starting centre ``(x, y)`` (local), length and angle (degrees).
    max_length : float
        Bound on each component of ``v``.
    """
    y0, y1, x0, x1 = box
    shape = (y1 - y0, x1 - x0)
    data = image[y0:y1, x0:x1].astype(float).ravel()
    sqrt_w = np.sqrt(weight[y0:y1, x0:x1].astype(float)).ravel()
    xs, ys, length0, angle0 = start
    model_psf = FourierPsf(psf, xs + origin[0], ys + origin[1], shape)

    target = sqrt_w * data

    def evaluate(params):
        """Residuals and their exact Jacobian (variable projection, one linear flux)."""
        planes = model_psf.trail_with_gradient(params[0] - x0, params[1] - y0, params[2],
                                               params[3]).reshape(5, -1) * sqrt_w
        a, grads = planes[0], planes[1:]
        norm = float(a @ a)
        if not norm > 0:
            return target.copy(), np.zeros((target.size, 4))
        flux = float(a @ target) / norm
        resid = target - flux * a
        d_flux = (grads @ resid - flux * (grads @ a)) / norm
        jac = -(flux * grads + d_flux[:, None] * a[None, :]).T
        return resid, jac

    def solve(params):
        m = model_psf.model(params[0] - x0, params[1] - y0, params[2], params[3]).ravel() * sqrt_w
        norm = float(m @ m)
        flux = float(m @ target) / norm if norm > 0 else 0.0
        return m, flux, norm

    theta = math.radians(angle0)
    p0 = np.array([xs, ys, length0 * math.cos(theta), length0 * math.sin(theta)])
    lower = np.array([x0, y0, -max_length, -max_length])
    upper = np.array([x1 - 1, y1 - 1, max_length, max_length])
    p0 = np.clip(p0, lower + 1e-3, upper - 1e-3)
    params, _, converged = levenberg_marquardt(evaluate, p0, lower, upper,
                                               max_evaluations=max_evaluations)
    m, flux, norm = solve(params)
    chi2 = float(((target - flux * m) ** 2).sum())
    length = float(math.hypot(params[2], params[3]))
    angle = float(math.degrees(math.atan2(params[3], params[2])) % 180.0)
    at_bound = (np.any(np.isclose(params[2:], lower[2:]))
                or np.any(np.isclose(params[2:], upper[2:])))
    return TrailFit(flux=flux, flux_err=1.0 / math.sqrt(norm) if norm > 0 else math.nan,
                    length=length, angle=angle, x=float(params[0]), y=float(params[1]), chi2=chi2,
                    converged=converged and not at_bound)
