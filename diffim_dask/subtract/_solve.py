"""Least-squares fit of the spatially varying PSF-matching kernel and background.

Model (``lsst-ip_diffim.md`` §4): the reference image :math:`Y` (the one
matched to) is modelled as the convolved image :math:`X` convolved with the
kernel plus a smooth background,

.. math:: Y(x, y) \\approx \\sum_i a_i(x, y)\\,(X \\otimes B_i)(x, y) + b(x, y).

Per stamp :math:`c` (a star or, in the all-pixels strategy, an image tile) the
design matrix :math:`C_c` has the columns :math:`X \\otimes B_i` on the stamp's
fit region and a column of ones; the normal equations are
:math:`M_c = C_c^T W_c C_c`, :math:`\\beta_c = C_c^T W_c Y_c` with
:math:`W_c = 1/\\mathrm{median}(V_Y + V_X)` ('constant' weighting) or per-pixel
inverse variance ('pixel'), times the pixel mask.

Spatial model: :math:`a_0` constant (the kernel sum; see :mod:`._basis`),
:math:`a_{i>0}(x, y) = \\sum_s c_{is} P_s(x, y)`, :math:`b(x, y) = \\sum_t d_t Q_t(x, y)`
(Chebyshev terms). With :math:`\\alpha_c = A_c \\theta` the stamp's local
parameters as a linear function of the global unknowns :math:`\\theta`
(spatial terms evaluated at the stamp centre), the global normal equations are
:math:`\\sum_c A_c^T M_c A_c\\, \\theta = \\sum_c A_c^T \\beta_c`, solved by a
Jacobi-scaled eigen-decomposition pseudo-inverse, with a small ridge
(``spatial_regularization`` × diagonal) on the spatially varying coefficients so
that variation the stars do not constrain shrinks towards a constant kernel.

Stamp quality: the normalised residual
:math:`z = (Y - C\\alpha)/\\sqrt{V_Y + \\lVert K \\rVert^2 V_X}` over the fit
region (:math:`\\lVert K \\rVert^2` calibrated on single-kernel fits of the
brightest stars, so sharpening kernels get the right noise); a star is rejected
when :math:`|\\bar z| > 0.25` or :math:`\\mathrm{std}(z) > 1.5`, first with its
own single-kernel fit, then with the spatial solution, or when the spatial
residual has a significant PSF-weighted flux (variables); stars whose
single-kernel sum lies more than 3 clipped sigmas from the mean are rejected.
Rejected stars are replaced by the next best star of the same spatial cell; at
most ``max_spatial_iterations`` rounds. All statistics are small quadratic
forms of per-stamp sums (:class:`_Moments`), so rejection rounds never rebuild
the stamp designs.

All-pixels strategy: the image is cut into tiles that play the role of stamps;
pixels whose residual exceeds ``clip_sigma`` times
:math:`\\sqrt{V_Y + \\lVert K \\rVert^2 V_X + (f\\,\\mathrm{model})^2}` (grown by
``clip_grow``; :math:`f` = ``clip_model_fraction``, so bright stars with a small
early mismatch are kept) get zero weight, and the fit is repeated until the
clipped set stops changing, so transients, variables and bad pixels do not
bias it.

PSF-model strategy (:func:`fit_psf_models`, for images with too few sources,
e.g. alert cut-outs): the same basis fitted to the noise-free PSF models,
:math:`P_Y \\approx K \\otimes P_X`, with the kernel sum held at a given value
(the ratio of the photometric calibrations); a constant kernel and background.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.signal import fftconvolve

from ._convolve import stamp_raw_convolutions
from ._kernel_sources import _cutouts
from ._stats import clipped_mean_std
from .kernel import SpatialKernel

__all__ = []

#: Budget (bytes) of one batch of design matrices.
_BATCH_BYTES = 64 * 2**20


def _map_batches(function, batches, threads: int):
    """``function`` over ``batches``, in order; on ``threads`` threads when more than one.

    The batch work is large GEMMs with single-threaded BLAS (:mod:`._threads`), which
    release the GIL: threads over batches use the cores without OpenBLAS's per-call
    thread start-up on small matrices.
    """
    if threads <= 1 or len(batches) <= 1:
        return map(function, batches)
    pool = ThreadPoolExecutor(max_workers=min(threads, len(batches)))
    try:
        return list(pool.map(function, batches))
    finally:
        pool.shutdown()


class FitFailure(Exception):
    """The kernel could not be fitted with the chosen strategy (reason + counts)."""

    def __init__(self, message: str, metadata: dict | None = None):
        super().__init__(message)
        self.metadata = dict(metadata or {})


@dataclasses.dataclass(frozen=True, eq=False)
class KernelSolution:
    """Output of a kernel fit."""

    kernel: SpatialKernel
    background_coefficients: np.ndarray
    table: pd.DataFrame
    metadata: dict


def _solve_batched(matrix: np.ndarray, rhs: np.ndarray, max_condition: float) -> np.ndarray:
    """Solve a batch of small symmetric systems: Cholesky, eigen pseudo-inverse as fallback.

    Cholesky is an order of magnitude faster than the eigen-decomposition for
    the many 28×28 stamp systems; singular or indefinite batches fall back to
    :func:`_solve_pinv`.
    """
    diag = np.diagonal(matrix, axis1=-2, axis2=-1)
    if np.all(diag > 0):
        scale = 1.0 / np.sqrt(diag)
        scaled = matrix * scale[..., :, None] * scale[..., None, :]
        try:
            lower = np.linalg.cholesky(scaled)
            # A tiny pivot means a near-singular system: use the pseudo-inverse instead.
            pivots = np.diagonal(lower, axis1=-2, axis2=-1) ** 2
            if np.all(pivots > 1.0 / max_condition):
                solution = np.linalg.solve(scaled, (rhs * scale)[..., None])[..., 0]
                return solution * scale
        except np.linalg.LinAlgError:
            pass
    return _solve_pinv(matrix, rhs, max_condition)[0]


def _solve_pinv(matrix: np.ndarray, rhs: np.ndarray, max_condition: float
                ) -> tuple[np.ndarray, float]:
    """Solve symmetric (batched) systems by a Jacobi-scaled eigen pseudo-inverse.

    Returns the solution and the condition number (largest / smallest kept
    eigenvalue of the scaled matrix).
    """
    diag = np.diagonal(matrix, axis1=-2, axis2=-1)
    scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    scaled = matrix * scale[..., :, None] * scale[..., None, :]
    values, vectors = np.linalg.eigh(scaled)
    top = values[..., -1:]
    keep = values > top / max_condition
    inverse = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    projected = np.einsum("...ji,...j->...i", vectors, rhs * scale)
    solution = np.einsum("...ij,...j->...i", vectors, inverse * projected) * scale
    smallest = np.where(keep, values, np.inf).min(axis=-1)
    condition = np.squeeze(top, -1) / smallest
    return solution, condition


class _Layout:
    """Map between the global unknowns θ and the local stamp parameters."""

    def __init__(self, n_basis: int, kernel_spatial, background_spatial, constant_sum: bool,
                 fit_background: bool):
        self.n_basis = n_basis
        self.kernel_spatial = kernel_spatial
        self.background_spatial = background_spatial
        self.constant_sum = constant_sum
        self.fit_background = fit_background
        self.n_local = n_basis + (1 if fit_background else 0)
        n_terms = len(kernel_spatial)
        groups = []
        if constant_sum:
            groups.append(("const", np.array([0]), 1))
            groups.append(("kernel", np.arange(1, n_basis), n_terms))
        else:
            groups.append(("kernel", np.arange(n_basis), n_terms))
        if fit_background:
            groups.append(("bg", np.array([n_basis]), len(background_spatial)))
        self.groups = []
        offset = 0
        for kind, local, n_feat in groups:
            self.groups.append((kind, local, n_feat, offset))
            offset += local.size * n_feat
        self.n_theta = offset

    def features(self, kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if kind == "const":
            return np.ones((x.size, 1))
        if kind == "kernel":
            return self.kernel_spatial.evaluate(x, y).T.reshape(x.size, -1)
        return self.background_spatial.evaluate(x, y).T.reshape(x.size, -1)

    def normal_equations(self, matrices, vectors, x, y):
        n_c = x.size
        feats = {kind: self.features(kind, x, y) for kind, *_ in self.groups}
        big_m = np.zeros((self.n_theta, self.n_theta))
        big_b = np.zeros(self.n_theta)
        for kind1, local1, n1, off1 in self.groups:
            f1 = feats[kind1]
            rhs = np.einsum("ci,cs->is", vectors[:, local1], f1)
            big_b[off1:off1 + local1.size * n1] = rhs.reshape(-1)
            for kind2, local2, n2, off2 in self.groups:
                f2 = feats[kind2]
                sub = matrices[:, local1][:, :, local2].reshape(n_c, -1)
                outer = (f1[:, :, None] * f2[:, None, :]).reshape(n_c, -1)
                block = (sub.T @ outer).reshape(local1.size, local2.size, n1, n2)
                block = block.transpose(0, 2, 1, 3).reshape(local1.size * n1, local2.size * n2)
                big_m[off1:off1 + block.shape[0], off2:off2 + block.shape[1]] = block
        return big_m, big_b

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """θ → kernel coefficients ``(n_basis, n_terms)`` and background coefficients."""
        coefficients = np.zeros((self.n_basis, len(self.kernel_spatial)))
        background = np.zeros(len(self.background_spatial))
        for kind, local, n_feat, off in self.groups:
            values = theta[off:off + local.size * n_feat].reshape(local.size, n_feat)
            if kind == "const":
                coefficients[0, 0] = values[0, 0]
            elif kind == "kernel":
                coefficients[local] = values
            else:
                background[:] = values[0]
        return coefficients, background

    def local_parameters(self, coefficients, background, x, y) -> np.ndarray:
        """Stamp parameters α (kernel coefficients and background) at stamp centres."""
        terms = self.kernel_spatial.evaluate(x, y).reshape(len(self.kernel_spatial), -1)
        alpha = np.zeros((x.size, self.n_local))
        alpha[:, :self.n_basis] = (coefficients @ terms).T
        if self.fit_background:
            bg_terms = self.background_spatial.evaluate(x, y).reshape(
                len(self.background_spatial), -1)
            alpha[:, self.n_basis] = background @ bg_terms
        return alpha

    def spatial_indices(self) -> np.ndarray:
        """Indices in θ of the kernel coefficients of non-constant spatial terms."""
        out = []
        for kind, local, n_feat, off in self.groups:
            if kind == "kernel" and n_feat > 1:
                for pos in range(local.size):
                    out.extend(off + pos * n_feat + np.arange(1, n_feat))
        return np.asarray(out, dtype=int)

    def global_penalty(self, penalty: np.ndarray) -> np.ndarray:
        """Σ_s E_sᵀ H E_s: the coefficient penalty applied to every spatial term."""
        n_terms = len(self.kernel_spatial)
        total = np.zeros((self.n_theta, self.n_theta))
        for s in range(n_terms):
            embed = np.zeros((self.n_basis, self.n_theta))
            for kind, local, n_feat, off in self.groups:
                if kind == "const" and s == 0:
                    embed[0, off] = 1.0
                elif kind == "kernel":
                    embed[local, off + np.arange(local.size) * n_feat + s] = 1.0
            total += embed.T @ penalty @ embed
        return total


def _row_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median of each row over its ``valid`` entries (NaN when none)."""
    if valid.all():
        return np.median(values, axis=1)
    work = np.where(valid, values, np.nan)
    work.sort(axis=1)
    count = valid.sum(axis=1)
    low = np.take_along_axis(work, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    high = np.take_along_axis(work, np.maximum(count, 1)[:, None] // 2, axis=1)[:, 0]
    return np.where(count > 0, 0.5 * (low + high), np.nan)


@dataclasses.dataclass
class _Moments:
    """Per-stamp sums that make every later statistic a small quadratic form.

    With the design ``D`` (``m x P``), target ``y``, fit weights ``w`` and
    statistics weights ``s = 1/σ²`` (σ² = V_Y + V_X ‖K‖², usable pixels only):
    ``M = D w Dᵀ``, ``b = D w y`` (the normal equations) and, for residuals
    ``r = y − Dᵀα``, ``Σ s r² = c − 2 α·a + αᵀ A α``, ``Σ √s r = v − α·u``,
    ``Σ P r = Py − α·DP`` (PSF-weighted residual flux).
    """

    matrix: np.ndarray
    vector: np.ndarray
    stat_matrix: np.ndarray
    stat_vector: np.ndarray
    stat_yy: np.ndarray
    stat_sum_d: np.ndarray
    stat_sum_y: np.ndarray
    count: np.ndarray
    psf_d: np.ndarray
    psf_y: np.ndarray
    psf_var: np.ndarray
    psf_sum: np.ndarray

    @classmethod
    def empty(cls, n: int, m: int) -> "_Moments":
        return cls(np.zeros((n, m, m)), np.zeros((n, m)), np.zeros((n, m, m)), np.zeros((n, m)),
                   np.zeros(n), np.zeros((n, m)), np.zeros(n), np.zeros(n), np.zeros((n, m)),
                   np.zeros(n), np.zeros(n), np.zeros(n))

    def put(self, index, other: "_Moments") -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name)[index] = getattr(other, field.name)

    def take(self, index) -> "_Moments":
        return _Moments(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


class KernelFitter:
    """Fits the kernel on stamps of a reference image ``Y`` and a convolved image ``X``.

    Parameters
    ----------
    reference, convolved : numpy.ndarray
        ``Y`` and ``X`` (bad pixels already filled).
    var_reference, var_convolved : numpy.ndarray
        Their variance planes.
    usable : numpy.ndarray of bool
        Pixels that may enter a fit (reference pixel good and the convolved
        image good over the kernel footprint).
    basis : KernelBasis
    kernel_spatial, background_spatial : ChebyshevBasis2D
    config : KernelFitConfig
    basis_config : KernelBasisConfig
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of the arrays.
    reference_psf : numpy.ndarray, optional
        PSF of ``Y`` (for the residual-flux test).
    kernel_norm2 : float
        Estimate of ``‖K‖²`` used in the residual variance ``V_Y + V_X ‖K‖²``.
    threads : int
        Threads for the per-star fits (batches of stamps run concurrently).
    reference_noise_filter : numpy.ndarray, optional
        Filter ``f`` the reference's (white) pixel noise went through, e.g. the
        preconvolution kernel of the score variant. The weighted least squares
        still treats pixels as independent, but the stamp rejection limits
        account for the correlation: a stamp's mean normalised residual has
        ``(Σf)²/Σf²`` times the white variance, so its limit grows by the root
        of that; a PSF-weighted residual flux ``Σ w r`` has variance
        ``‖w ⋆ f‖² V / ‖f‖²`` instead of ``‖w‖² V``, so its error grows by
        ``‖w ⋆ f‖ / (‖w‖ ‖f‖)``. ``None``: white noise.
    """

    def __init__(self, reference, convolved, var_reference, var_convolved, usable, basis,
                 kernel_spatial, background_spatial, config, basis_config, origin=(0, 0),
                 reference_psf=None, kernel_norm2: float = 0.1, threads: int = 1,
                 reference_noise_filter=None):
        self.reference = reference
        self.convolved = convolved
        self.var_reference = var_reference
        self.var_convolved = var_convolved
        self.usable = usable
        self.basis = basis
        self.config = config
        self.basis_config = basis_config
        self.origin = origin
        self.kernel_spatial = kernel_spatial
        self.background_spatial = background_spatial
        self.layout = _Layout(len(basis), kernel_spatial, background_spatial,
                              config.constant_kernel_sum, config.fit_background)
        self.reference_psf = reference_psf
        self.kernel_norm2 = float(kernel_norm2)
        self.threads = max(1, int(threads))
        self.reference_noise_filter = reference_noise_filter
        flat = basis.stamps.reshape(len(basis), -1)
        self._basis_gram = flat @ flat.T

    def kernel_norm2_of(self, alpha: np.ndarray) -> np.ndarray:
        """‖K‖² of the kernels with (local) coefficients ``alpha`` (``(n, m)``)."""
        coeff = alpha[:, :len(self.basis)]
        return np.einsum("ni,ij,nj->n", coeff, self._basis_gram, coeff)

    def _correlation_scales(self, psf, fit_half) -> tuple[float, float]:
        """(residual-mean limit factor, residual-flux error factor) of the noise filter."""
        filt = self.reference_noise_filter
        if filt is None:
            return 1.0, 1.0
        filt = np.asarray(filt, dtype=float)
        norm2 = float((filt**2).sum())
        mean_scale = float(np.sqrt(filt.sum() ** 2 / norm2))
        if psf is None:
            return mean_scale, 1.0
        side = 2 * fit_half + 1
        weights = psf.reshape(side, side)
        correlated = float((fftconvolve(weights, filt[::-1, ::-1]) ** 2).sum())
        return mean_scale, float(np.sqrt(correlated / (norm2 * (weights**2).sum())))

    def _psf_on(self, fit_half):
        """Reference PSF cropped or padded to the fit region, flattened."""
        psf = self.reference_psf
        half = psf.shape[0] // 2
        if half > fit_half:
            psf = psf[half - fit_half:half + fit_half + 1, half - fit_half:half + fit_half + 1]
        elif half < fit_half:
            psf = np.pad(psf, fit_half - half)
        return psf.reshape(-1)

    # -- per-stamp data ------------------------------------------------------------------------

    def _batches(self, n: int, fit_half: int):
        columns = 2 * self.layout.n_local + len(self.basis.raw_x_index)
        per_stamp = (2 * fit_half + 1) ** 2 * columns * 8
        size = max(1, int(_BATCH_BYTES // max(per_stamp, 1)))
        for start in range(0, n, size):
            yield np.arange(start, min(n, start + size))

    def stamp_data(self, iy, ix, fit_half, kernel_norm2=None):
        """Design ``(n, m, P)``, target, residual variance and usable flags of stamps.

        The residual variance is ``V_Y + ‖K‖² V_X`` (``kernel_norm2``: scalar or
        per stamp; default the fitter's current estimate).
        """
        half = self.basis.half_width
        n = iy.size
        pixels = (2 * fit_half + 1) ** 2
        nb = len(self.basis)
        cut_x = _cutouts(self.convolved, iy, ix, fit_half + half).astype(np.float64)
        raw = stamp_raw_convolutions(cut_x, self.basis, fit_half)
        mixed = self.basis.transform @ raw.reshape(raw.shape[0], n * pixels)
        design = np.empty((n, self.layout.n_local, pixels))
        design[:, :nb, :] = mixed.reshape(nb, n, pixels).transpose(1, 0, 2)
        if self.config.fit_background:
            design[:, nb, :] = 1.0
        target = _cutouts(self.reference, iy, ix, fit_half).reshape(n, pixels).astype(np.float64)
        var_ref = _cutouts(self.var_reference, iy, ix, fit_half).reshape(n, pixels)
        var_conv = _cutouts(self.var_convolved, iy, ix, fit_half).reshape(n, pixels)
        if self.usable is None:
            usable = np.ones((n, pixels), bool)
        else:
            usable = _cutouts(self.usable, iy, ix, fit_half).reshape(n, pixels)
        norm2 = self.kernel_norm2 if kernel_norm2 is None else kernel_norm2
        sigma2 = var_ref.astype(np.float64) + np.reshape(norm2, (-1, 1)) * var_conv
        fit_var = var_ref.astype(np.float64) + var_conv
        return design, target, sigma2, fit_var, usable

    def _fit_weights(self, fit_var, pixel_weight):
        valid = pixel_weight > 0
        if self.config.variance_weighting == "pixel":
            weights = np.where(fit_var > 0, 1.0 / np.where(fit_var > 0, fit_var, 1.0), 0.0)
        else:
            typical = _row_median(fit_var, valid)
            typical = np.where(np.isfinite(typical) & (typical > 0), typical, 1.0)
            weights = np.broadcast_to((1.0 / typical)[:, None], fit_var.shape)
        return weights * pixel_weight

    def moments(self, design, target, sigma2, fit_var, pixel_weight, psf=None) -> _Moments:
        """Normal equations and residual-statistics sums of a batch of stamps."""
        weights = self._fit_weights(fit_var, pixel_weight)
        weighted = design * weights[:, None, :]
        matrix = np.matmul(weighted, design.transpose(0, 2, 1))
        vector = np.einsum("nip,np->ni", weighted, target)
        stat_w = np.where(sigma2 > 0, pixel_weight / np.where(sigma2 > 0, sigma2, 1.0), 0.0)
        weighted = design * stat_w[:, None, :]
        stat_matrix = np.matmul(weighted, design.transpose(0, 2, 1))
        stat_vector = np.einsum("nip,np->ni", weighted, target)
        stat_yy = (stat_w * target**2).sum(axis=1)
        root_w = np.sqrt(stat_w)
        stat_sum_d = np.einsum("nip,np->ni", design, root_w)
        stat_sum_y = (root_w * target).sum(axis=1)
        count = (pixel_weight > 0).sum(axis=1).astype(float)
        n, m = vector.shape
        if psf is not None:
            psf_d = design @ psf
            psf_y = target @ psf
            psf_var = (np.where(pixel_weight > 0, sigma2, 0.0) * psf**2).sum(axis=1)
            psf_sum = np.full(n, psf.sum())
        else:
            psf_d, psf_y, psf_var, psf_sum = np.zeros((n, m)), np.zeros(n), np.zeros(n), np.zeros(n)
        return _Moments(matrix, vector, stat_matrix, stat_vector, stat_yy, stat_sum_d, stat_sum_y,
                        count, psf_d, psf_y, psf_var, psf_sum)

    def residual_stats(self, mom: _Moments, alpha: np.ndarray, psf_norm2: float | None):
        """Mean and std of the normalised residuals; PSF-flux S/N and fraction of the residual."""
        sum_z = mom.stat_sum_y - np.einsum("ni,ni->n", alpha, mom.stat_sum_d)
        sum_z2 = (mom.stat_yy - 2.0 * np.einsum("ni,ni->n", alpha, mom.stat_vector)
                  + np.einsum("ni,nij,nj->n", alpha, mom.stat_matrix, alpha))
        with np.errstate(all="ignore"):
            mean = sum_z / mom.count
            std = np.sqrt(np.maximum(sum_z2 - mom.count * mean**2, 0.0)
                          / np.maximum(mom.count - 1, 1))
            if psf_norm2:
                flux_res = (mom.psf_y - np.einsum("ni,ni->n", alpha, mom.psf_d)) / psf_norm2
                flux_err = np.sqrt(mom.psf_var) / psf_norm2
                bg = alpha[:, -1] if self.config.fit_background else 0.0
                flux_star = (mom.psf_y - bg * mom.psf_sum) / psf_norm2
                snr = flux_res / flux_err
                fraction = flux_res / np.abs(flux_star)
            else:
                snr = fraction = np.zeros_like(mean)
        return mean, std, snr, fraction

    def _local_penalty(self, matrices):
        penalty = self.basis.penalty
        if penalty is None:
            return None
        nb = len(self.basis)
        lam = self.basis_config.lambda_value
        if self.basis_config.lambda_type == "relative":
            trace_m = np.trace(matrices[:, :nb, :nb], axis1=1, axis2=2)
            lam = lam * trace_m / np.trace(penalty)
        else:
            lam = np.full(matrices.shape[0], lam)
        full = np.zeros((matrices.shape[0],) + matrices.shape[1:])
        full[:, :nb, :nb] = lam[:, None, None] * penalty[None]
        return full

    # -- spatial solution ----------------------------------------------------------------------

    def _solve_spatial(self, matrices, vectors, x, y):
        big_m, big_b = self.layout.normal_equations(matrices, vectors, x, y)
        if self.basis.penalty is not None:
            penalty = self.layout.global_penalty(self.basis.penalty)
            lam = self.basis_config.lambda_value
            if self.basis_config.lambda_type == "relative":
                kernel_idx = np.concatenate([
                    off + np.arange(local.size * n_feat)
                    for kind, local, n_feat, off in self.layout.groups if kind != "bg"])
                lam *= (np.trace(big_m[np.ix_(kernel_idx, kernel_idx)])
                        / max(np.trace(penalty), 1e-300))
            big_m = big_m + lam * penalty
        ridge = self.config.spatial_regularization
        spatial = self.layout.spatial_indices()
        if ridge > 0 and spatial.size:
            # λ·diag(M) on the variation terms = λ·I in Jacobi-scaled units.
            big_m = big_m.copy()
            big_m[spatial, spatial] *= 1.0 + ridge
        theta, condition = _solve_pinv(big_m, big_b, self.config.max_condition_number)
        if not np.all(np.isfinite(theta)):
            raise FitFailure("the spatial kernel solution is not finite")
        coefficients, background = self.layout.unpack(theta)
        return coefficients, background, float(condition)

    def _kernel(self, coefficients):
        return SpatialKernel(self.basis.stamps.copy(), coefficients, self.kernel_spatial)

    # -- strategies ----------------------------------------------------------------------------

    def fit_stars(self, table: pd.DataFrame, fit_half: int, *, min_sources: int,
                  max_per_cell: int) -> KernelSolution:
        """Fit on star stamps with single-kernel, kernel-sum and spatial rejection."""
        cfg = self.config
        t0 = time.perf_counter()
        n = len(table)
        m = self.layout.n_local
        # Memory guard for large (delta-function) bases: keep the best stars only.
        max_n = max(min_sources, int(768 * 2**20 // (2 * m * m * 8)))
        if n > max_n:
            table = table.iloc[:max_n]
            n = max_n
        iy = table["iy"].to_numpy()
        ix = table["ix"].to_numpy()
        x = ix + self.origin[0]
        y = iy + self.origin[1]
        cells = table["cell"].to_numpy()
        psf = self._psf_on(fit_half) if self.reference_psf is not None else None
        psf_norm2 = float((psf**2).sum()) if psf is not None else None
        mean_scale, flux_err_scale = self._correlation_scales(psf, fit_half)
        mean_max = cfg.candidate_residual_mean_max * mean_scale
        moments = _Moments.empty(n, m)
        single = np.full((n, m), np.nan)
        fitted = np.zeros(n, bool)
        status = np.array(["unused"] * n, dtype=object)
        rejected = np.zeros(n, bool)
        res_mean = np.full(n, np.nan)
        res_std = np.full(n, np.nan)
        counts = {"rejected_single_residual": 0, "rejected_kernel_sum": 0,
                  "rejected_spatial_residual": 0, "rejected_residual_flux": 0,
                  "rejected_singular": 0}

        def active():
            ok = ~rejected
            rank = pd.Series(np.where(ok, 1, 0)).groupby(cells).cumsum().to_numpy()
            return ok & (rank <= max_per_cell)

        def reject(idx, reason):
            rejected[idx] = True
            status[idx] = reason
            counts[reason] += int(np.size(idx))

        def fit_batch(idx):
            design, target, sigma2, fit_var, usable = self.stamp_data(iy[idx], ix[idx],
                                                                      fit_half)
            mom = self.moments(design, target, sigma2, fit_var, usable.astype(float), psf)
            del design
            penalty = self._local_penalty(mom.matrix)
            system = mom.matrix if penalty is None else mom.matrix + penalty
            return idx, mom, _solve_batched(system, mom.vector, cfg.max_condition_number)

        def fit_singles(indices):
            batches = [indices[batch] for batch in self._batches(indices.size, fit_half)]
            for idx, mom, alpha in _map_batches(fit_batch, batches, self.threads):
                moments.put(idx, mom)
                single[idx] = alpha
                fitted[idx] = True
                bad = ~np.all(np.isfinite(alpha), axis=1)
                mean, std, _, _ = self.residual_stats(mom, np.nan_to_num(alpha), None)
                res_mean[idx], res_std[idx] = mean, std
                failed = bad | ~np.isfinite(mean) | ~np.isfinite(std)
                poor = ~failed & ((np.abs(mean) > mean_max)
                                  | (std > cfg.candidate_residual_std_max))
                reject(idx[failed], "rejected_singular")
                reject(idx[poor], "rejected_single_residual")

        def assess(indices, coefficients, background):
            alpha = self.layout.local_parameters(coefficients, background, x[indices], y[indices])
            mean, std, snr, fraction = self.residual_stats(moments.take(indices), alpha,
                                                           psf_norm2)
            return mean, std, snr / flux_err_scale, fraction

        # Calibrate ‖K‖² of the residual noise model on the brightest stars first: the
        # Gaussian prior is far off for deconvolution (sharpening) kernels.
        probe = np.flatnonzero(active())[:50]
        if probe.size >= 3:
            design, target, sigma2, fit_var, usable = self.stamp_data(iy[probe], ix[probe],
                                                                      fit_half)
            mom = self.moments(design, target, sigma2, fit_var, usable.astype(float), None)
            alpha = _solve_batched(mom.matrix, mom.vector, cfg.max_condition_number)
            norm2 = self.kernel_norm2_of(alpha)
            norm2 = norm2[np.isfinite(norm2)]
            if norm2.size:
                self.kernel_norm2 = float(np.median(norm2))

        coefficients = background = None
        condition = np.nan
        iterations = 0
        spatial_mean = np.full(n, np.nan)
        spatial_std = np.full(n, np.nan)
        spatial_snr = np.full(n, np.nan)
        act_idx = np.zeros(0, int)
        converged = False
        for iteration in range(cfg.max_spatial_iterations):
            iterations = iteration + 1
            # Single kernels for the active stars, replacing rejected ones, until stable; then
            # one kernel-sum clip per iteration (repeated clipping would erode a clean sample).
            clipped = False
            for _ in range(50):
                act = active()
                need = np.flatnonzero(act & ~fitted)
                if need.size:
                    fit_singles(need)
                    continue
                if clipped:
                    break
                clipped = True
                ksum = single[act, 0]
                if ksum.size < 3:
                    break
                mean, std = clipped_mean_std(ksum, 3.0, 3)
                if not std > 0:
                    break
                outlier = np.abs(ksum - mean) > cfg.max_ksum_sigma * std
                reject(np.flatnonzero(act)[outlier], "rejected_kernel_sum")
            act_idx = np.flatnonzero(active() & fitted)
            if act_idx.size < min_sources:
                raise FitFailure(
                    f"only {act_idx.size} kernel stars left after rejection (need {min_sources}) "
                    f"from {n} selected", {"n_selected": n, "n_good": int(act_idx.size), **counts})
            coefficients, background, condition = self._solve_spatial(
                moments.matrix[act_idx], moments.vector[act_idx], x[act_idx], y[act_idx])
            means, stds, snr, fraction = assess(act_idx, coefficients, background)
            spatial_mean[act_idx], spatial_std[act_idx], spatial_snr[act_idx] = means, stds, snr
            poor = ~np.isfinite(means) | (np.abs(means) > mean_max) | \
                ~np.isfinite(stds) | (stds > cfg.candidate_residual_std_max)
            flux_bad = ~poor & (cfg.max_residual_flux_snr > 0) & (
                np.abs(snr) > cfg.max_residual_flux_snr) & (
                np.abs(fraction) > cfg.max_residual_flux_fraction)
            if not (poor.any() or flux_bad.any()):
                converged = True
                break
            reject(act_idx[poor], "rejected_spatial_residual")
            reject(act_idx[flux_bad], "rejected_residual_flux")
        if not converged:
            # Still rejecting after the last iteration: final fit without the rejected stars.
            act_idx = np.flatnonzero(active() & fitted)
            if act_idx.size < min_sources:
                raise FitFailure(
                    f"only {act_idx.size} kernel stars left after rejection (need {min_sources})",
                    {"n_selected": n, "n_good": int(act_idx.size), **counts})
            coefficients, background, condition = self._solve_spatial(
                moments.matrix[act_idx], moments.vector[act_idx], x[act_idx], y[act_idx])
            means, stds, snr, _ = assess(act_idx, coefficients, background)
            spatial_mean[act_idx], spatial_std[act_idx], spatial_snr[act_idx] = means, stds, snr
        status[act_idx] = "used"
        out = table.copy()
        out["kernel_sum_single"] = single[:, 0]
        out["single_residual_mean"] = res_mean
        out["single_residual_std"] = res_std
        out["residual_mean"] = spatial_mean
        out["residual_std"] = spatial_std
        out["residual_flux_snr"] = spatial_snr
        out["status"] = status.astype(str)
        out["used"] = status == "used"
        metadata = {
            "strategy": "stars",
            "n_candidates": int(n),
            "n_used": int(act_idx.size),
            "n_rejected": int(rejected.sum()),
            **counts,
            "spatial_iterations": iterations,
            "condition_number": condition,
            "n_unknowns": self.layout.n_theta,
            "residual_mean_mean": float(np.nanmean(spatial_mean[act_idx])),
            "residual_std_mean": float(np.nanmean(spatial_std[act_idx])),
            "residual_std_max": float(np.nanmax(spatial_std[act_idx])),
            "time_fit": time.perf_counter() - t0,
        }
        if act_idx.size * (m - 1) < self.layout.n_theta:
            metadata["warning"] = "underconstrained spatial fit: few stars for the spatial terms"
        return KernelSolution(self._kernel(coefficients), background, out, metadata)

    def fit_all_pixels(self, iy, ix, fit_half, source_config) -> KernelSolution:
        """Fit on image tiles with iterative sigma-clipping of residual pixels."""
        t0 = time.perf_counter()
        n = iy.size
        m = self.layout.n_local
        pixels = (2 * fit_half + 1) ** 2
        x = ix + self.origin[0]
        y = iy + self.origin[1]
        clip = np.zeros((n, pixels), bool)
        matrices = np.zeros((n, m, m))
        vectors = np.zeros((n, m))
        coefficients = background = None
        usable_fraction = np.nan
        condition = np.nan
        grow = source_config.clip_grow
        side = 2 * fit_half + 1
        iterations = 0
        z_mean = np.zeros(n)
        z_std = np.zeros(n)
        for iteration in range(source_config.max_clip_iterations + 1):
            iterations = iteration
            changed = False
            n_usable = 0
            for batch in self._batches(n, fit_half):
                alpha = norm2 = None
                if coefficients is not None:
                    alpha = self.layout.local_parameters(coefficients, background, x[batch],
                                                         y[batch])
                    norm2 = self.kernel_norm2_of(alpha)  # the noise model of the current kernel
                design, target, sigma2, fit_var, usable = self.stamp_data(
                    iy[batch], ix[batch], fit_half, norm2)
                if coefficients is not None:
                    model = np.einsum("nip,ni->np", design, alpha)
                    residual = target - model
                    if self.config.fit_background:
                        model -= alpha[:, -1:]  # tolerance on the source model, not the sky
                    tolerance = sigma2 + (source_config.clip_model_fraction * model) ** 2
                    with np.errstate(all="ignore"):
                        z = residual / np.sqrt(np.where(sigma2 > 0, tolerance, np.inf))
                    outlier = (np.abs(z) > source_config.clip_sigma) & usable
                    if grow > 0:
                        outlier = ndimage.maximum_filter(
                            outlier.reshape(-1, side, side).astype(np.uint8),
                            size=(1, 2 * grow + 1, 2 * grow + 1))
                        outlier = outlier.reshape(-1, side * side).astype(bool)
                    if not np.array_equal(outlier, clip[batch]):
                        changed = True
                    clip[batch] = outlier
                    good = usable & ~outlier
                    count = np.maximum(good.sum(axis=1), 1)
                    z_mean[batch] = np.where(good, z, 0).sum(axis=1) / count
                    z_std[batch] = np.sqrt(np.where(good, (z - z_mean[batch][:, None]) ** 2, 0)
                                           .sum(axis=1) / np.maximum(count - 1, 1))
                pixel_weight = (usable & ~clip[batch]).astype(float)
                n_usable += int(pixel_weight.sum())
                weights = self._fit_weights(fit_var, pixel_weight)
                weighted = design * weights[:, None, :]
                matrices[batch] = np.matmul(weighted, design.transpose(0, 2, 1))
                vectors[batch] = np.einsum("nip,np->ni", weighted, target)
            usable_fraction = n_usable / float(n * pixels)
            if usable_fraction < source_config.min_pixel_fraction:
                raise FitFailure(
                    f"all-pixels fit: only {usable_fraction:.1%} of the tile pixels are usable "
                    f"(need {source_config.min_pixel_fraction:.0%})",
                    {"usable_fraction": usable_fraction, "n_tiles": int(n)})
            if coefficients is not None and not changed:
                break
            coefficients, background, condition = self._solve_spatial(matrices, vectors, x, y)
        table = pd.DataFrame({
            "x": x.astype(float), "y": y.astype(float), "ix": ix, "iy": iy,
            "snr": np.nan, "flux": np.nan, "size_ratio": np.nan, "cell": np.arange(n),
            "kernel_sum_single": np.nan, "single_residual_mean": np.nan,
            "single_residual_std": np.nan, "residual_mean": z_mean, "residual_std": z_std,
            "clipped_fraction": clip.mean(axis=1), "status": "used", "used": True})
        metadata = {
            "strategy": "all-pixels",
            "n_candidates": int(n),
            "n_used": int(n),
            "n_rejected": 0,
            "clip_iterations": iterations,
            "clipped_fraction": float(clip.mean()),
            "usable_fraction": float(usable_fraction),
            "condition_number": condition,
            "n_unknowns": self.layout.n_theta,
            "residual_mean_mean": float(np.mean(z_mean)),
            "residual_std_mean": float(np.mean(z_std)),
            "residual_std_max": float(np.max(z_std)) if n else float("nan"),
            "time_fit": time.perf_counter() - t0,
        }
        return KernelSolution(self._kernel(coefficients), background, table, metadata)


def _pad_to(stamp: np.ndarray, half: int) -> np.ndarray:
    """Odd square ``stamp`` cropped or zero-padded (centred) to ``2 half + 1`` pixels."""
    own = stamp.shape[0] // 2
    if own > half:
        return stamp[own - half:own + half + 1, own - half:own + half + 1]
    return np.pad(stamp, half - own)


def fit_psf_models(basis, reference_psf: np.ndarray, convolved_psf: np.ndarray,
                   kernel_spatial, background_spatial, *, kernel_sum: float,
                   background_level: float, basis_config, max_condition: float
                   ) -> KernelSolution:
    """Kernel matching the two PSF models: ``P_ref ≈ K ⊗ P_conv`` (no image pixels used).

    The stamps are noise-free unit-sum PSF images, so the least-squares
    coefficients of the basis (its sum-carrying function :math:`B_0` held at
    ``kernel_sum``, the zero-sum functions free; with the basis penalty for
    delta functions) give the shape of the matching kernel exactly as far as
    the basis can express it. The kernel is constant over the image and the
    background is the constant ``background_level``. For images with too few
    sources to constrain a fit: their only sources may be variables or the
    transient itself, whose change an image fit would absorb.

    Returns
    -------
    KernelSolution
        Strategy ``"psf-model"``; ``metadata["psf_model_residual"]`` is
        ``‖P_ref − K ⊗ P_conv‖ / ‖P_ref‖``.
    """
    t0 = time.perf_counter()
    half = basis.half_width
    fit_half = max(reference_psf.shape[0] // 2, convolved_psf.shape[0] // 2 + half)
    target = _pad_to(reference_psf / reference_psf.sum(), fit_half).reshape(-1)
    source = _pad_to(convolved_psf / convolved_psf.sum(), fit_half + half)
    raw = stamp_raw_convolutions(source[None].astype(np.float64), basis, fit_half)
    design = basis.transform @ raw.reshape(raw.shape[0], -1)  # (n_basis, pixels)
    matrix = design @ design.T
    vector = design @ (target * kernel_sum)
    if basis.penalty is not None:
        lam = basis_config.lambda_value
        if basis_config.lambda_type == "relative":
            lam *= np.trace(matrix) / max(np.trace(basis.penalty), 1e-300)
        matrix = matrix + lam * basis.penalty
    alpha = np.empty(len(basis))
    alpha[0] = kernel_sum
    free = np.arange(1, len(basis))
    alpha[free], condition = _solve_pinv(matrix[np.ix_(free, free)],
                                         vector[free] - matrix[free, 0] * kernel_sum,
                                         max_condition)
    if not np.all(np.isfinite(alpha)):
        raise FitFailure("the PSF-model kernel solution is not finite")
    coefficients = np.zeros((len(basis), len(kernel_spatial)))
    coefficients[:, 0] = alpha  # T_0 = 1: a constant kernel
    background = np.zeros(len(background_spatial))
    background[0] = background_level
    residual = target * kernel_sum - alpha @ design
    table = pd.DataFrame({"x": np.zeros(0), "y": np.zeros(0), "ix": np.zeros(0, int),
                          "iy": np.zeros(0, int), "status": np.zeros(0, str),
                          "used": np.zeros(0, bool)})
    metadata = {
        "strategy": "psf-model", "n_candidates": 0, "n_used": 0, "n_rejected": 0,
        "condition_number": float(condition), "n_unknowns": len(basis) - 1,
        "psf_model_residual": float(np.linalg.norm(residual)
                                    / np.linalg.norm(target * kernel_sum)),
        "time_fit": time.perf_counter() - t0,
    }
    kernel = SpatialKernel(basis.stamps.copy(), coefficients, kernel_spatial)
    return KernelSolution(kernel, background, table, metadata)
