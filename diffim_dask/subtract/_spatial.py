"""2-D Chebyshev polynomials of detector position, for kernel coefficients and background."""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.polynomial import chebyshev

__all__ = ["ChebyshevBasis2D"]


@dataclasses.dataclass(frozen=True)
class ChebyshevBasis2D:
    """Products :math:`T_i(\\tilde x) T_j(\\tilde y)` with :math:`i + j \\le` ``order``.

    Positions are mapped to :math:`[-1, 1]` over the bounding box:
    :math:`\\tilde x = (2x - x_\\min - x_\\max)/(x_\\max - x_\\min)`.
    Terms are ordered by total degree, then by decreasing x degree:
    ``1, x, y, x², xy, y², ...``.

    Parameters
    ----------
    order : int
        Total degree.
    bbox : (x_min, x_max, y_min, y_max)
        Parent-frame pixel range mapped to [-1, 1].
    """

    order: int
    bbox: tuple[float, float, float, float]

    @property
    def terms(self) -> list[tuple[int, int]]:
        """``(i, j)`` x and y degrees of each term."""
        return [(d - j, j) for d in range(self.order + 1) for j in range(d + 1)]

    def __len__(self) -> int:
        return (self.order + 1) * (self.order + 2) // 2

    def _scaled(self, x, y):
        x_min, x_max, y_min, y_max = self.bbox
        sx = (2.0 * np.asarray(x, float) - x_min - x_max) / max(x_max - x_min, 1.0)
        sy = (2.0 * np.asarray(y, float) - y_min - y_max) / max(y_max - y_min, 1.0)
        return sx, sy

    def _axis_values(self, scaled):
        eye = np.eye(self.order + 1)
        return np.array([chebyshev.chebval(scaled, eye[i]) for i in range(self.order + 1)])

    def evaluate(self, x, y) -> np.ndarray:
        """Term values at positions: shape ``(n_terms,) + broadcast(x, y).shape``."""
        sx, sy = np.broadcast_arrays(*self._scaled(x, y))
        tx = self._axis_values(sx)
        ty = self._axis_values(sy)
        return np.array([tx[i] * ty[j] for i, j in self.terms])

    def evaluate_grid(self, x, y, dtype=np.float64) -> np.ndarray:
        """Term values on the grid ``x`` (columns) × ``y`` (rows): ``(n_terms, ny, nx)``."""
        sx, sy = self._scaled(x, y)
        tx = self._axis_values(np.atleast_1d(sx)).astype(dtype)
        ty = self._axis_values(np.atleast_1d(sy)).astype(dtype)
        return np.array([np.outer(ty[j], tx[i]) for i, j in self.terms], dtype=dtype)

    def to_dict(self) -> dict:
        """Plain-data form."""
        return {"order": self.order, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, data: dict) -> "ChebyshevBasis2D":
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["order"]), tuple(float(v) for v in data["bbox"]))
