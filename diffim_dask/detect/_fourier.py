"""Fourier-space PSF models and the small bounded least-squares solver of the model fits.

The PSF is rendered once at the source position, its FFT kept, and every
model evaluation of a nonlinear fit is one inverse FFT:

.. math::

    \\hat m(\\mathbf k) = \\hat P(\\mathbf k)\\, e^{-2\\pi i \\mathbf k\\cdot\\mathbf c}
        \\operatorname{sinc}(\\mathbf k\\cdot\\mathbf v),

a PSF centred at ``c`` convolved with a uniform segment of vector ``v``
(``v = 0`` gives a point source; ``sinc(z) = sin(πz)/(πz)``). The pixelized PSF
is treated as band-limited, which is accurate for PSFs with FWHM ≳ 2 pixels.
The derivatives with respect to ``c`` and ``v`` are exact in the same space,

.. math::

    \\partial_{\\mathbf c}\\hat m = -2\\pi i\\,\\mathbf k\\,\\hat m, \\qquad
    \\partial_{\\mathbf v}\\hat m = \\hat P\\, e^{-2\\pi i \\mathbf k\\cdot\\mathbf c}
        \\operatorname{sinc}'(\\mathbf k\\cdot\\mathbf v)\\,\\mathbf k,
    \\qquad \\operatorname{sinc}'(z) = \\frac{\\cos\\pi z - \\operatorname{sinc} z}{z},

so a model and its full Jacobian cost one batched inverse FFT.

:func:`levenberg_marquardt` minimises ``|r(p)|²`` for the few (four) nonlinear
parameters of the dipole and trail fits, given residuals and an analytic
Jacobian; it replaces ``scipy.optimize.least_squares``, whose per-call overhead
and finite-difference Jacobians dominated those fits.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from ..psf.models import PsfModel

__all__ = ["FourierPsf", "levenberg_marquardt"]


class FourierPsf:
    """A PSF ready for fast shifted / trailed rendering on a ``box_shape`` box.

    Parameters
    ----------
    psf : PsfModel
        The PSF model.
    x, y : float
        Parent-frame position where the PSF is evaluated.
    box_shape : (int, int)
        Shape of the data box the models are compared with.
    max_size : int
        Largest PSF stamp side used (odd); the PSF light outside it is
        accounted for, so models keep total flux normalisation.
    """

    def __init__(self, psf: PsfModel, x: float, y: float, box_shape, max_size: int = 61):
        full = psf.image(x, y)
        size = min(full.shape[0], max_size | 1)
        lo = (full.shape[0] - size) // 2
        stamp = full[lo:lo + size, lo:lo + size] / full.sum()
        self.box_shape = (int(box_shape[0]), int(box_shape[1]))
        grid = tuple(sfft.next_fast_len(n + size, real=True) for n in self.box_shape)
        work = np.zeros(grid)
        half = size // 2
        # Centre of the PSF at index (0, 0), wrapped around.
        work[:size, :size] = stamp
        work = np.roll(work, (-half, -half), axis=(0, 1))
        self.grid = grid
        self.transform = sfft.rfft2(work)
        self.ky = sfft.fftfreq(grid[0])[:, None]
        self.kx = sfft.rfftfreq(grid[1])[None, :]

    def model_with_gradient(self, cx: float, cy: float):
        """Unit-flux point model at ``(cx, cy)`` and its derivatives with respect to cx, cy."""
        spectrum = self.transform * np.exp(-2j * np.pi * (self.kx * cx + self.ky * cy))
        ny, nx = self.box_shape
        # d/dc multiplies the spectrum by -2 pi i k (the Nyquist terms carry no phase slope).
        kx = np.where(np.abs(self.kx) < 0.5, self.kx, 0.0)
        ky = np.where(np.abs(self.ky) < 0.5, self.ky, 0.0)
        stack = np.stack([spectrum, spectrum * (-2j * np.pi * kx), spectrum * (-2j * np.pi * ky)])
        images = sfft.irfft2(stack, s=self.grid, axes=(-2, -1))
        return images[0, :ny, :nx], images[1, :ny, :nx], images[2, :ny, :nx]

    def model(self, cx: float, cy: float, vx: float = 0.0, vy: float = 0.0) -> np.ndarray:
        """Unit-flux model on the box: PSF at ``(cx, cy)`` (box pixels) ⊗ segment ``v``."""
        phase = np.exp(-2j * np.pi * (self.kx * cx + self.ky * cy))
        spectrum = self.transform * phase
        if vx != 0.0 or vy != 0.0:
            spectrum = spectrum * np.sinc(self.kx * vx + self.ky * vy)
        image = sfft.irfft2(spectrum, s=self.grid)
        return image[:self.box_shape[0], :self.box_shape[1]]

    def trail_with_gradient(self, cx: float, cy: float, vx: float, vy: float) -> np.ndarray:
        """Unit-flux trailed model and its derivatives, shape ``(5, ny, nx)``.

        Planes: the model, then ``∂/∂cx``, ``∂/∂cy``, ``∂/∂vx``, ``∂/∂vy``.
        """
        # The shift phase is separable: two 1-D exponentials instead of one per grid point.
        spectrum = (self.transform * np.exp(-2j * np.pi * self.kx * cx)) \
            * np.exp(-2j * np.pi * self.ky * cy)
        z = self.kx * vx + self.ky * vy
        small = np.abs(z) < 1e-6
        safe = np.where(small, 1.0, z)
        sinc = np.sinc(z)
        # sinc'(z) = (cos(πz) - sinc(z)) / z, ≈ -π² z / 3 near 0.
        dsinc = np.where(small, -(np.pi**2) * z / 3.0, (np.cos(np.pi * safe) - sinc) / safe)
        kx = np.where(np.abs(self.kx) < 0.5, self.kx, 0.0)
        ky = np.where(np.abs(self.ky) < 0.5, self.ky, 0.0)
        trailed = spectrum * sinc
        slope = spectrum * dsinc
        stack = np.stack([trailed, trailed * (-2j * np.pi * kx), trailed * (-2j * np.pi * ky),
                          slope * self.kx, slope * self.ky])
        images = sfft.irfft2(stack, s=self.grid, axes=(-2, -1))
        return images[:, :self.box_shape[0], :self.box_shape[1]]


def levenberg_marquardt(evaluate, start, lower, upper, *, max_evaluations: int,
                        tolerance: float = 1e-3):
    """Bounded Levenberg–Marquardt least squares with an analytic Jacobian.

    Each iteration solves ``(JᵀJ + λ diag(JᵀJ)) δ = -Jᵀr`` (Marquardt's
    scaling) for the free parameters — those not held at a bound by the
    gradient — projects ``p + δ`` onto the bounds and keeps it when the cost
    ``|r|²`` drops (``λ ← λ/3``; otherwise ``λ ← 4λ`` and retry).

    Convergence is judged in χ² units (the residuals of the fits are in units
    of the pixel noise): the fit stops when the Gauss–Newton model predicts
    that the minimum is less than ``Δχ² = |P_J r|²`` away (``P_J`` the
    projection on the columns of ``J``), or when an accepted step gains less,
    with ``Δχ² < tolerance · max(1, χ²/n)`` — 1e-3 puts the parameters within
    ~0.03σ of the minimum (the reduced χ² scales σ when the model does not
    fit to the noise, e.g. bright residuals). Near a zero-length trail or a
    lobe of negligible flux the cost is flat to fourth order, and a tighter
    tolerance would cost hundreds of steps for no statistical gain.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(p) -> (r, J)``: residual vector and Jacobian ``∂r/∂p``.
    start, lower, upper : numpy.ndarray
        Starting point (clipped into the bounds) and bounds.
    max_evaluations : int
        Budget of ``evaluate`` calls.
    tolerance : float
        See above.

    Returns
    -------
    params : numpy.ndarray
    jacobian : numpy.ndarray
        ``J`` at ``params``.
    converged : bool
        False when the budget ran out first.
    """
    lower = np.asarray(lower, dtype=float)
    upper = np.asarray(upper, dtype=float)
    params = np.clip(np.asarray(start, dtype=float), lower, upper)
    resid, jac = evaluate(params)
    cost = float(resid @ resid)
    damping = 1e-3
    for _ in range(max_evaluations - 1):
        limit = tolerance * max(1.0, cost / max(resid.size, 1))
        downhill = -(jac.T @ resid)
        # Parameters held at a bound by the gradient stay there (active set); the step and
        # the convergence test use the free ones.
        free = ~(((params <= lower) & (downhill < 0)) | ((params >= upper) & (downhill > 0)))
        if not free.any() or _predicted_gain(jac[:, free], resid) < limit:
            return params, jac, True
        normal = jac[:, free].T @ jac[:, free]
        scale = np.maximum(np.diag(normal), 1e-12 * max(float(np.diag(normal).max()), 1e-300))
        step = np.zeros_like(params)
        try:
            step[free] = np.linalg.solve(normal + damping * np.diag(scale), downhill[free])
        except np.linalg.LinAlgError:
            return params, jac, False
        trial = np.clip(params + step, lower, upper)
        if not np.all(np.isfinite(trial)):
            return params, jac, False
        if np.array_equal(trial, params):
            # Pinned against the bounds.
            return params, jac, True
        trial_resid, trial_jac = evaluate(trial)
        trial_cost = float(trial_resid @ trial_resid)
        if trial_cost < cost:
            gain = cost - trial_cost
            params, resid, jac, cost = trial, trial_resid, trial_jac, trial_cost
            damping = max(damping / 3.0, 1e-9)
            if gain < limit:
                return params, jac, True
        else:
            damping *= 4.0
            if damping > 1e12:
                # No descent direction left: a minimum within numerical precision.
                return params, jac, True
    return params, jac, False


def _predicted_gain(jac, resid) -> float:
    """``|P_J r|²``: the cost decrease of the full Gauss–Newton step."""
    u, sv, _ = np.linalg.svd(jac, full_matrices=False)
    keep = sv > 1e-8 * max(float(sv.max()), 1e-300)
    return float(np.sum((u[:, keep].T @ resid) ** 2))
