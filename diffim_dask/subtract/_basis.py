"""PSF-matching kernel bases: Alard–Lupton (Gaussians × monomials) and delta functions.

Alard–Lupton basis (Alard & Lupton 1998; Alard 2000). For each Gaussian
:math:`g_\\sigma(u) = \\exp(-u^2 / 2\\sigma^2)` sampled on the integer grid
:math:`u, v \\in [-h, h]` and each monomial of total degree :math:`j + k \\le d_\\sigma`,

.. math:: R_{\\sigma jk}(u, v) = g_\\sigma(u) (u/h)^j \\; g_\\sigma(v) (v/h)^k .

Every raw function is separable. The basis used in the fit is a linear
transform of the raw functions:

.. math::
    B_0 = R_0 / \\textstyle\\sum R_0, \\qquad
    B_i = \\frac{R_i - (\\sum R_i) B_0}{\\lVert R_i - (\\sum R_i) B_0 \\rVert_2}\\ (i > 0),

so :math:`\\sum B_0 = 1` and :math:`\\sum B_i = 0` for :math:`i > 0`: the sum of a
kernel :math:`K = \\sum_i a_i B_i` is :math:`a_0` alone, and holding :math:`a_0`
constant over the image holds the photometric scale constant (Alard 2000).

Basis widths (``lsst-ip_diffim.md`` §4.1): with :math:`\\sigma = \\mathrm{FWHM}/2.3548`
of the image being convolved (target) and of the image matched to (reference),
:math:`\\sigma_K = \\sqrt{|\\sigma_\\mathrm{ref}^2 - \\sigma_\\mathrm{tgt}^2|}` floored at
``min_sigma`` (0.7; 0.4 when deconvolving), and the sigmas are the geometric series
:math:`[\\max(\\mathrm{floor}, \\sigma_K/\\beta), \\times\\beta, \\times\\beta, \\ldots]`
centred on :math:`\\sigma_K`. Kernel width = ``int(6 σ_max)``, made odd, clamped to
[21, 35].

Delta-function basis: one function per kernel pixel, reparametrised as
:math:`B_0 = \\delta_c`, :math:`B_i = \\delta_i - \\delta_c` so the kernel sum is again
:math:`a_0`; a Laplacian smoothness penalty :math:`\\lambda \\lVert L k \\rVert^2` on the
kernel pixels :math:`k` regularises the fit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import ConfigurationError
from ..psf.models import FWHM_PER_SIGMA

__all__ = ["KernelBasis", "basis_sigmas", "kernel_size_for_sigmas", "make_basis"]


@dataclasses.dataclass(frozen=True, eq=False)
class KernelBasis:
    """A kernel basis with a separable representation of its raw functions.

    Attributes
    ----------
    kind : str
        ``"alard-lupton"`` or ``"delta-function"``.
    stamps : numpy.ndarray
        ``(n, size, size)`` basis functions :math:`B_i` used by the fit.
    x_factors : numpy.ndarray
        ``(n_x, size)`` distinct 1-D x factors of the raw functions.
    raw_x_index : numpy.ndarray
        ``(n_raw,)`` index into ``x_factors`` of each raw function.
    raw_y : numpy.ndarray
        ``(n_raw, size)`` y factor of each raw function; raw function ``r`` is
        ``outer(raw_y[r], x_factors[raw_x_index[r]])``.
    transform : numpy.ndarray
        ``(n, n_raw)`` matrix with ``stamps = transform @ raw`` (flattened).
    penalty : numpy.ndarray or None
        ``(n, n)`` regularisation matrix :math:`H` on the coefficient vector
        (delta-function basis), else ``None``.
    sigmas, degrees : tuple
        Gaussian sigmas and polynomial degrees (Alard–Lupton basis).
    """

    kind: str
    stamps: np.ndarray
    x_factors: np.ndarray
    raw_x_index: np.ndarray
    raw_y: np.ndarray
    transform: np.ndarray
    penalty: np.ndarray | None = None
    sigmas: tuple[float, ...] = ()
    degrees: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Kernel width in pixels (odd)."""
        return int(self.stamps.shape[-1])

    @property
    def half_width(self) -> int:
        """``size // 2``."""
        return self.size // 2

    def __len__(self) -> int:
        return int(self.stamps.shape[0])


def basis_sigmas(target_fwhm: float | None, reference_fwhm: float | None, *,
                 config_sigmas=(0.7, 1.5, 3.0), beta: float = 2.0, min_sigma: float = 0.7,
                 min_sigma_deconvolution: float = 0.4, scale_by_fwhm: bool = True
                 ) -> tuple[tuple[float, ...], str]:
    """Alard–Lupton Gaussian sigmas from the two PSF widths.

    Parameters
    ----------
    target_fwhm, reference_fwhm : float or None
        PSF FWHM (pixels) of the image being convolved and of the image it is
        matched to. ``None`` (unknown) falls back to ``config_sigmas``.
    config_sigmas : tuple of float
        Fallback sigmas; their count sets the number of Gaussians.
    beta : float
        Ratio of successive sigmas.
    min_sigma, min_sigma_deconvolution : float
        Floors for convolution (reference broader) and deconvolution.
    scale_by_fwhm : bool
        If False, always return ``config_sigmas``.

    Returns
    -------
    sigmas : tuple of float
    mode : str
        ``"config"``, ``"convolution"`` or ``"deconvolution"``.
    """
    n_gauss = len(config_sigmas)
    if not scale_by_fwhm or target_fwhm is None or reference_fwhm is None:
        return tuple(float(s) for s in config_sigmas), "config"
    sigma_target = target_fwhm / FWHM_PER_SIGMA
    sigma_reference = reference_fwhm / FWHM_PER_SIGMA
    if sigma_target == sigma_reference:
        return tuple(float(s) for s in config_sigmas), "config"
    if sigma_reference > sigma_target:
        floor, mode = min_sigma, "convolution"
    else:
        floor, mode = min_sigma_deconvolution, "deconvolution"
    sigma_kernel = max(floor, math.sqrt(abs(sigma_reference**2 - sigma_target**2)))
    # Geometric series centred on sigma_kernel (for 3 Gaussians: K/β, K, Kβ), floored smoothly.
    first = max(floor, sigma_kernel / beta ** ((n_gauss - 1) // 2))
    return tuple(first * beta**i for i in range(n_gauss)), mode


def kernel_size_for_sigmas(sigmas, *, fwhm_scaling: float = 6.0, size_min: int = 21,
                           size_max: int = 35) -> int:
    """Kernel width ``int(fwhm_scaling × max σ)``, made odd, clamped to [size_min, size_max]."""
    size = int(fwhm_scaling * max(sigmas))
    if size % 2 == 0:
        size += 1
    return int(min(max(size, size_min), size_max))


def _alard_lupton(size: int, sigmas, degrees) -> KernelBasis:
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    scaled = grid / half
    x_factors, raw_x_index, raw_y = [], [], []
    for sigma, degree in zip(sigmas, degrees):
        gauss = np.exp(-0.5 * (grid / sigma) ** 2)
        first_x = len(x_factors)
        x_factors.extend(gauss * scaled**j for j in range(degree + 1))
        # Order: by Gaussian, then x degree j, then y degree k with j + k <= degree.
        for j in range(degree + 1):
            for k in range(degree + 1 - j):
                raw_x_index.append(first_x + j)
                raw_y.append(gauss * scaled**k)
    x_factors = np.array(x_factors)
    raw_x_index = np.array(raw_x_index, dtype=np.intp)
    raw_y = np.array(raw_y)
    raw = raw_y[:, :, None] * x_factors[raw_x_index][:, None, :]
    n_raw = raw.shape[0]
    sums = raw.sum(axis=(1, 2))
    transform = np.eye(n_raw)
    transform[0] /= sums[0]
    # B_i = R_i - (ΣR_i) B_0, then unit L2 norm.
    for i in range(1, n_raw):
        transform[i] = np.eye(n_raw)[i] - sums[i] * transform[0]
        stamp = np.tensordot(transform[i], raw, axes=1)
        transform[i] /= np.sqrt((stamp**2).sum())
    stamps = np.tensordot(transform, raw, axes=1)
    return KernelBasis("alard-lupton", stamps, x_factors, raw_x_index, raw_y, transform,
                       None, tuple(float(s) for s in sigmas), tuple(int(d) for d in degrees))


def _laplacian_operator(size: int, kind: str, border_penalty: float) -> np.ndarray:
    """Rows of a difference operator L on the flattened ``size x size`` kernel image.

    ``central-difference`` is the 9-point Laplacian stencil
    ``[[1, 4, 1], [4, -20, 4], [1, 4, 1]] / 6`` with pixels outside the kernel
    taken as zero, so the stencil also pulls the border towards zero;
    ``forward-difference`` stacks first and second forward differences along
    both axes. ``border_penalty`` adds rows ``border_penalty · k_p`` for the
    outermost ring of pixels.
    """
    n = size * size
    index = np.arange(n).reshape(size, size)
    rows = []
    if kind == "central-difference":
        stencil = {(-1, -1): 1, (-1, 0): 4, (-1, 1): 1, (0, -1): 4, (0, 0): -20, (0, 1): 4,
                   (1, -1): 1, (1, 0): 4, (1, 1): 1}
        for y in range(size):
            for x in range(size):
                row = np.zeros(n)
                for (dy, dx), w in stencil.items():
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < size and 0 <= xx < size:
                        row[index[yy, xx]] = w / 6.0
                rows.append(row)
    elif kind == "forward-difference":
        for order in (1, 2):
            coeffs = [(-1) ** (order - i) * math.comb(order, i) for i in range(order + 1)]
            for axis in (0, 1):
                for y in range(size):
                    for x in range(size):
                        pos = (y, x)
                        if pos[axis] + order >= size:
                            continue
                        row = np.zeros(n)
                        for i, c in enumerate(coeffs):
                            yy, xx = (y + i, x) if axis == 0 else (y, x + i)
                            row[index[yy, xx]] = c
                        rows.append(row)
    if border_penalty > 0:
        ring = np.zeros((size, size), bool)
        ring[[0, -1], :] = True
        ring[:, [0, -1]] = True
        for p in index[ring]:
            row = np.zeros(n)
            row[p] = border_penalty
            rows.append(row)
    return np.array(rows) if rows else np.zeros((0, n))


def _delta_function(size: int, regularization: str, border_penalty: float) -> KernelBasis:
    half = size // 2
    n = size * size
    centre = half * size + half
    # Raw functions are the pixel deltas, ordered with the centre first.
    order = [centre] + [p for p in range(n) if p != centre]
    eye = np.eye(size)
    x_factors = eye.copy()
    raw_x_index = np.array([p % size for p in order], dtype=np.intp)
    raw_y = np.array([eye[p // size] for p in order])
    transform = np.eye(n)
    transform[1:, 0] = -1.0  # B_i = δ_i − δ_c for i > 0
    raw = raw_y[:, :, None] * x_factors[raw_x_index][:, None, :]
    stamps = np.tensordot(transform, raw, axes=1)
    penalty = None
    if regularization != "none":
        operator = _laplacian_operator(size, regularization, border_penalty)
        # Kernel pixels k = P a with P the (pixels x coefficients) map of the stamps.
        to_pixels = stamps.reshape(n, n).T
        lk = operator @ to_pixels
        penalty = lk.T @ lk
    return KernelBasis("delta-function", stamps, x_factors, raw_x_index, raw_y, transform,
                       penalty)


def make_basis(config, target_fwhm: float | None, reference_fwhm: float | None
               ) -> tuple[KernelBasis, dict]:
    """Build the kernel basis from a :class:`~.config.KernelBasisConfig` and the PSF widths.

    Parameters
    ----------
    config : KernelBasisConfig
    target_fwhm, reference_fwhm : float or None
        PSF FWHM (pixels) of the convolved image and of the image matched to.

    Returns
    -------
    basis : KernelBasis
    info : dict
        ``basis_mode``, ``basis_sigmas``, ``basis_degrees``, ``kernel_size``.
    """
    if config.basis == "delta-function":
        basis = _delta_function(config.kernel_size, config.regularization,
                                config.regularization_border_penalty)
        return basis, {"basis_mode": "delta-function", "basis_sigmas": [], "basis_degrees": [],
                       "kernel_size": basis.size}
    sigmas, mode = basis_sigmas(
        target_fwhm, reference_fwhm, config_sigmas=config.gauss_sigmas, beta=config.gauss_beta,
        min_sigma=config.min_sigma, min_sigma_deconvolution=config.min_sigma_deconvolution,
        scale_by_fwhm=config.scale_by_fwhm)
    if mode == "config" and not config.scale_by_fwhm:
        size = config.kernel_size
    else:
        size = kernel_size_for_sigmas(sigmas, fwhm_scaling=config.kernel_size_fwhm_scaling,
                                      size_min=config.kernel_size_min,
                                      size_max=config.kernel_size_max)
    if size < 3:
        raise ConfigurationError(f"kernel size {size} too small")
    basis = _alard_lupton(size, sigmas, config.gauss_degrees)
    return basis, {"basis_mode": mode, "basis_sigmas": list(basis.sigmas),
                   "basis_degrees": list(basis.degrees), "kernel_size": size}
