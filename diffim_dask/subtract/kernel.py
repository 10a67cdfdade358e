"""The fitted PSF-matching kernel and differential background as spatial models."""

from __future__ import annotations

import dataclasses

import numpy as np

from ._convolve import convolve_spatial
from ._spatial import ChebyshevBasis2D

__all__ = ["SpatialKernel", "SpatialBackground"]


@dataclasses.dataclass(frozen=True, eq=False)
class SpatialKernel:
    """A spatially varying convolution kernel :math:`K(u, v; x, y) = \\sum_i a_i(x, y) B_i(u, v)`.

    The coefficients are Chebyshev polynomials of the detector position,
    :math:`a_i(x, y) = \\sum_s c_{is} P_s(x, y)`.

    Parameters
    ----------
    basis_stamps : numpy.ndarray
        ``(n_basis, size, size)`` basis functions :math:`B_i`.
    coefficients : numpy.ndarray
        ``(n_basis, n_terms)`` coefficients :math:`c_{is}`.
    spatial : ChebyshevBasis2D
        Spatial terms :math:`P_s` (order and bounding box, parent-frame pixels).
    """

    basis_stamps: np.ndarray
    coefficients: np.ndarray
    spatial: ChebyshevBasis2D

    @property
    def size(self) -> int:
        """Kernel width (odd, pixels)."""
        return int(self.basis_stamps.shape[-1])

    @property
    def half_width(self) -> int:
        """``size // 2``."""
        return self.size // 2

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the bounding box (parent frame)."""
        x_min, x_max, y_min, y_max = self.spatial.bbox
        return 0.5 * (x_min + x_max), 0.5 * (y_min + y_max)

    def coefficients_at(self, x, y) -> np.ndarray:
        """Basis coefficients :math:`a_i(x, y)`: shape ``(n_basis,) + shape(x)``."""
        terms = self.spatial.evaluate(x, y)
        return np.tensordot(self.coefficients, terms, axes=(1, 0))

    def image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Kernel stamp ``(size, size)`` at ``(x, y)`` (default: the bounding-box centre)."""
        if x is None or y is None:
            x, y = self.center
        return np.tensordot(self.coefficients_at(float(x), float(y)), self.basis_stamps, axes=1)

    __call__ = image

    def kernel_sum(self, x=None, y=None):
        """Kernel sum (photometric scale) at ``(x, y)``; arrays accepted."""
        if x is None or y is None:
            x, y = self.center
        sums = self.basis_stamps.sum(axis=(1, 2))
        return np.tensordot(sums, self.coefficients_at(x, y), axes=1)

    def term_kernels(self) -> np.ndarray:
        """``(n_terms, size, size)`` kernels :math:`K_s = \\sum_i c_{is} B_i`."""
        return np.tensordot(self.coefficients.T, self.basis_stamps, axes=1)

    def norm_gram(self, filter_kernel: np.ndarray | None = None) -> np.ndarray:
        """Gram matrix :math:`G_{st} = \\langle K_s \\otimes f, K_t \\otimes f \\rangle`.

        :math:`\\lVert K(x, y) \\otimes f \\rVert^2 = \\sum_{st} P_s P_t G_{st}`
        (``f`` = delta when ``filter_kernel`` is None).
        """
        terms = self.term_kernels()
        if filter_kernel is not None:
            from scipy.signal import fftconvolve

            terms = np.array([fftconvolve(t, filter_kernel, mode="full") for t in terms])
        flat = terms.reshape(terms.shape[0], -1)
        return flat @ flat.T

    def convolve(self, image: np.ndarray, *, origin=(0, 0), workers: int = 1) -> np.ndarray:
        """Convolve a whole image (numpy) with the spatially varying kernel.

        ``origin`` is the parent-frame ``(x0, y0)`` of ``image[0, 0]``; pixels
        beyond the edges count as zero.
        """
        return convolve_spatial(np.asarray(image, np.float32), self.term_kernels(), self.spatial,
                                origin=origin, workers=workers)

    def to_dict(self) -> dict:
        """Plain-data form (lists), for persistence."""
        return {"type": "SpatialKernel", "basis_stamps": self.basis_stamps.tolist(),
                "coefficients": self.coefficients.tolist(), "spatial": self.spatial.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SpatialKernel":
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["basis_stamps"], float), np.asarray(data["coefficients"], float),
                   ChebyshevBasis2D.from_dict(data["spatial"]))


@dataclasses.dataclass(frozen=True, eq=False)
class SpatialBackground:
    """Smooth differential background :math:`B(x, y) = \\sum_t b_t Q_t(x, y)` (Chebyshev).

    Expressed in the difference image's units: the background that the
    difference ``science − matched template`` carries (for ``convolveScience``
    the fitted template-side background with its sign flipped and divided by
    the kernel sum).
    """

    coefficients: np.ndarray
    spatial: ChebyshevBasis2D

    def __call__(self, x, y):
        """Background at positions ``(x, y)`` (arrays accepted)."""
        return np.tensordot(self.coefficients, self.spatial.evaluate(x, y), axes=1)

    def image(self, shape, origin=(0, 0), *, offset=(0, 0)) -> np.ndarray:
        """Background on a ``shape`` block whose first pixel is ``origin + offset``."""
        y0 = origin[1] + offset[0]
        x0 = origin[0] + offset[1]
        x = np.arange(x0, x0 + shape[1])
        y = np.arange(y0, y0 + shape[0])
        grid = self.spatial.evaluate_grid(x, y)
        return np.tensordot(self.coefficients, grid, axes=1).astype(np.float32)

    def to_dict(self) -> dict:
        """Plain-data form."""
        return {"type": "SpatialBackground", "coefficients": self.coefficients.tolist(),
                "spatial": self.spatial.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SpatialBackground":
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["coefficients"], float),
                   ChebyshevBasis2D.from_dict(data["spatial"]))
