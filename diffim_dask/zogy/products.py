"""Model objects returned by :func:`~diffim_dask.zogy.subtract_zogy`: effective kernels per tile."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ZogyKernel"]


@dataclasses.dataclass(frozen=True, eq=False)
class ZogyKernel:
    """The effective ZOGY kernels, one pair per tile.

    In the difference image (science flux units) every tile applies

    .. math:: D / F_D = k_N ⊗ N - k_R ⊗ R_{reg}

    where ``R_reg`` is the template moved onto the science registration,
    ``k_N`` has unit sum and ``k_R`` sums to the flux ratio. ``k_R`` plays the
    role of the Alard–Lupton matching kernel followed by decorrelation, ``k_N``
    that of the decorrelation filter; neither deconvolves. :meth:`image`
    returns ``k_R`` of the tile that contains ``(x, y)`` — exactly what was
    applied there.

    Attributes
    ----------
    x_edges, y_edges : numpy.ndarray
        Tile (inner box) boundaries, parent-frame pixel coordinates.
    science_kernels, template_kernels : numpy.ndarray
        ``(n_y, n_x, size, size)`` odd, centred stamps ``k_N`` and ``k_R``.
    """

    x_edges: np.ndarray
    y_edges: np.ndarray
    science_kernels: np.ndarray
    template_kernels: np.ndarray

    @property
    def size(self) -> int:
        """Kernel stamp side (odd, pixels)."""
        return int(self.template_kernels.shape[-1])

    @property
    def half_width(self) -> int:
        """``size // 2``."""
        return self.size // 2

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the tiled area (parent frame)."""
        return (0.5 * (self.x_edges[0] + self.x_edges[-1] - 1),
                0.5 * (self.y_edges[0] + self.y_edges[-1] - 1))

    def _tile(self, x, y) -> tuple[int, int]:
        if x is None or y is None:
            x, y = self.center
        i = int(np.clip(np.searchsorted(self.x_edges, float(x), side="right") - 1, 0,
                        self.x_edges.size - 2))
        j = int(np.clip(np.searchsorted(self.y_edges, float(y), side="right") - 1, 0,
                        self.y_edges.size - 2))
        return j, i

    def image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Template kernel ``k_R`` applied at ``(x, y)`` (default: the centre)."""
        j, i = self._tile(x, y)
        return self.template_kernels[j, i].copy()

    __call__ = image

    def science_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Science kernel ``k_N`` applied at ``(x, y)``."""
        j, i = self._tile(x, y)
        return self.science_kernels[j, i].copy()

    def kernel_sum(self, x=None, y=None):
        """Sum of ``k_R`` at ``(x, y)`` (the flux ratio; arrays accepted)."""
        if x is None or y is None:
            return float(self.image().sum())
        xs, ys = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        sums = self.template_kernels.sum(axis=(2, 3))
        out = np.array([sums[self._tile(a, b)] for a, b in zip(xs.ravel(), ys.ravel())])
        return out.reshape(xs.shape)

    def to_dict(self) -> dict:
        """Plain-data form (lists), for persistence."""
        return {"type": "ZogyKernel", "x_edges": self.x_edges.tolist(),
                "y_edges": self.y_edges.tolist(),
                "science_kernels": self.science_kernels.tolist(),
                "template_kernels": self.template_kernels.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "ZogyKernel":
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["x_edges"], float), np.asarray(data["y_edges"], float),
                   np.asarray(data["science_kernels"], float),
                   np.asarray(data["template_kernels"], float))
