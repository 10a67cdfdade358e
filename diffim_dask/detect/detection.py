"""Matched-filter significance images and thresholding.

For a correlation kernel ``K`` (the PSF, or a Gaussian of the PSF's width) and
uncorrelated pixel noise of variance ``V``, the filtered image and its variance are

.. math::

    F = D \\star K, \\qquad \\operatorname{Var}(F) = V \\star K^2,

so the per-pixel significance :math:`\\nu = F / \\sqrt{V \\star K^2}` has unit
variance wherever ``V`` is right: a 5σ threshold on :math:`\\nu` means 5σ.
For a point source with ``K`` equal to the PSF, :math:`\\nu` at the source is
the S/N of the optimal PSF-fit flux, and its maximum is the maximum-likelihood
position.

``K`` is applied as a sum of separable terms taken from its singular value
decomposition, :math:`K \\approx \\sum_i s_i u_i v_i^T` (one term for a
Gaussian, a few for a Moffat or a pixelized PSF), each a correlation along y
(as a sparse banded matrix product, which is cache friendly) followed by one
along x. ``K²`` gets its own decomposition, so the variance filter is as exact
as the image filter.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage, sparse

from ..errors import BadInputDataError
from ..psf.models import PsfModel

__all__ = [
    "SmoothingKernel",
    "make_smoothing_kernel",
    "banded_matrix",
    "correlate_separable",
    "significance",
]


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothingKernel:
    """A matched-filter kernel with separable decompositions of ``K`` and ``K²``.

    Attributes
    ----------
    kernel : numpy.ndarray
        The 2-D correlation kernel (odd square, unit sum).
    terms : list of (numpy.ndarray, numpy.ndarray)
        ``(u_i, v_i)`` with ``K ≈ Σ u_i v_iᵀ`` (u along y, v along x).
    squared_terms : list of (numpy.ndarray, numpy.ndarray)
        The same for ``K²``.
    kind : str
        ``"psf"`` or ``"gaussian"``.
    """

    kernel: np.ndarray
    terms: list
    squared_terms: list
    kind: str

    @property
    def half_width(self) -> int:
        """Half the kernel side: how far the filter reaches."""
        return self.kernel.shape[0] // 2


def _separable_terms(kernel: np.ndarray, max_rank: int, tolerance: float) -> list:
    u, s, vt = np.linalg.svd(kernel)
    keep = [i for i in range(min(max_rank, s.size)) if s[i] > tolerance * s[0]]
    return [(u[:, i] * math.sqrt(s[i]), vt[i] * math.sqrt(s[i])) for i in keep]


def make_smoothing_kernel(psf: PsfModel, x: float, y: float, *, kind: str = "psf",
                          width_sigma: float = 7.0, max_rank: int = 3,
                          tolerance: float = 5e-3) -> SmoothingKernel:
    """Build the matched-filter kernel from the PSF at ``(x, y)``.

    Parameters
    ----------
    psf : PsfModel
        The difference image's PSF.
    x, y : float
        Position where the PSF is evaluated (usually the image centre).
    kind : {"psf", "gaussian"}
        The PSF itself, or a circular Gaussian of the PSF's sigma.
    width_sigma : float
        Kernel side in PSF sigmas (rounded up to odd, at least 3).
    max_rank, tolerance : int, float
        Limits of the separable decomposition.
    """
    sigma = psf.sigma(x, y)
    if not (np.isfinite(sigma) and sigma > 0):
        raise BadInputDataError(f"difference PSF has an invalid width (sigma={sigma}) at "
                                f"({x:.1f}, {y:.1f})")
    size = max(3, int(math.ceil(width_sigma * sigma)))
    size += 1 - size % 2
    if kind == "psf":
        kernel = np.asarray(psf.image(x, y, size=size), dtype=float)
    elif kind == "gaussian":
        half = size // 2
        g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
        kernel = np.outer(g, g)
    else:
        raise BadInputDataError(f"unknown smoothing kind {kind!r}")
    kernel = kernel / kernel.sum()
    return SmoothingKernel(kernel=kernel, terms=_separable_terms(kernel, max_rank, tolerance),
                           squared_terms=_separable_terms(kernel**2, max_rank, tolerance),
                           kind=kind)


def banded_matrix(n: int, weights: np.ndarray) -> sparse.csr_matrix:
    """(n, n) matrix T with (T a)[i] = Σ_j w_j a[i + j - h] (zero beyond the ends)."""
    half = weights.size // 2
    diagonals, offsets = [], []
    for j, w in enumerate(weights):
        d = j - half
        if abs(d) < n:
            diagonals.append(np.full(n - abs(d), w, dtype=np.float32))
            offsets.append(d)
    return sparse.diags(diagonals, offsets, shape=(n, n), format="csr", dtype=np.float32)


def correlate_separable(image: np.ndarray, terms: list) -> np.ndarray:
    """Correlate ``image`` with ``Σ u_i v_iᵀ`` (zero padding), returning float32."""
    image = np.asarray(image, dtype=np.float32)
    out = None
    for u, v in terms:
        along_y = np.asarray(banded_matrix(image.shape[0], u) @ image)
        term = ndimage.correlate1d(along_y, v.astype(np.float32), axis=1, mode="constant")
        out = term if out is None else out + term
    return out


def significance(image: np.ndarray, variance: np.ndarray, kernel: SmoothingKernel | None):
    """Matched-filter image, its standard deviation and the significance image.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Pixels with unusable ones already set to zero in both planes.
    kernel : SmoothingKernel or None
        ``None`` means the image is already matched-filtered (a score image):
        ν = image / sqrt(variance).

    Returns
    -------
    filtered, sigma, nu : numpy.ndarray (float32)
        ν is 0 where the filtered variance is not positive.
    """
    if kernel is None:
        filtered = np.asarray(image, dtype=np.float32)
        filtered_var = np.asarray(variance, dtype=np.float32)
    else:
        filtered = correlate_separable(image, kernel.terms)
        filtered_var = correlate_separable(variance, kernel.squared_terms)
    sigma = np.sqrt(np.clip(filtered_var, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = np.where(sigma > 0, filtered / sigma, np.float32(0.0)).astype(np.float32)
    return filtered, sigma, nu
