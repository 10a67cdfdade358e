"""PSF models: Gaussian, Moffat, pixelized image, grid and polynomial variation.

Every model answers :meth:`PsfModel.image` — the PSF at detector position
``(x, y)`` rendered on an odd ``size x size`` stamp, normalised to unit sum,
its centroid on the central pixel ``(size // 2, size // 2)`` plus an optional
sub-pixel ``offset = (dx, dy)`` — and :meth:`PsfModel.fwhm` there.

Positions are in the exposure's pixel frame (0-based, ``image[y, x]``).

Analytic profiles are integrated over each pixel (Gaussian exactly with error
functions, others by ``oversample``-fold sub-sampling), so a rendered stamp is
what a detector with square pixels records.

The Moffat profile is :math:`I(r) \\propto (1 + r^2/\\alpha^2)^{-\\beta}` with
:math:`\\mathrm{FWHM} = 2\\alpha\\sqrt{2^{1/\\beta} - 1}`.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
from scipy import special

from ..errors import BadInputDataError, ConfigurationError

__all__ = [
    "PsfModel",
    "GaussianPsf",
    "MoffatPsf",
    "ImagePsf",
    "GridPsf",
    "PolynomialPsf",
    "psf_from_dict",
    "FWHM_PER_SIGMA",
    "fwhm_of_stamp",
]

#: FWHM / sigma of a Gaussian, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

_REGISTRY: dict[str, type["PsfModel"]] = {}


def _register(cls):
    _REGISTRY[cls.__name__] = cls
    return cls


def _odd_size(size: int) -> int:
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ConfigurationError(f"PSF stamp size must be a positive odd integer, got {size}")
    return size


def _odd_at_least(value: float, minimum: int = 11) -> int:
    size = max(minimum, int(math.ceil(value)))
    return size if size % 2 == 1 else size + 1


class PsfModel(abc.ABC):
    """Interface of all PSF models."""

    @abc.abstractmethod
    def image(self, x: float | None = None, y: float | None = None, size: int | None = None,
              *, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """PSF stamp at ``(x, y)``.

        Parameters
        ----------
        x, y : float, optional
            Detector position (defaults to the model's reference position).
        size : int, optional
            Odd stamp side in pixels (defaults to :attr:`default_size`).
        offset : (float, float)
            Sub-pixel shift ``(dx, dy)`` of the PSF centre from the central pixel.

        Returns
        -------
        numpy.ndarray
            ``float64`` array of shape ``(size, size)`` with unit sum.
        """

    @abc.abstractmethod
    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Full width at half maximum at ``(x, y)`` in pixels."""

    def sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Gaussian-equivalent width ``fwhm / 2.3548`` in pixels."""
        return self.fwhm(x, y) / FWHM_PER_SIGMA

    @property
    @abc.abstractmethod
    def default_size(self) -> int:
        """Odd stamp size that holds essentially all of the PSF's flux."""

    @property
    def is_spatially_varying(self) -> bool:
        """Whether :meth:`image` depends on position."""
        return False

    @property
    def reference_position(self) -> tuple[float, float]:
        """Default ``(x, y)`` used when no position is given."""
        return (0.0, 0.0)

    def moments(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Second moments ``(ixx, iyy, ixy)`` of the rendered PSF (pixels²)."""
        stamp = self.image(x, y)
        half = stamp.shape[0] // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
        total = stamp.sum()
        cx, cy = (stamp * xx).sum() / total, (stamp * yy).sum() / total
        ixx = (stamp * (xx - cx) ** 2).sum() / total
        iyy = (stamp * (yy - cy) ** 2).sum() / total
        ixy = (stamp * (xx - cx) * (yy - cy)).sum() / total
        return float(ixx), float(iyy), float(ixy)

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; :func:`psf_from_dict` inverts it."""

    def _resolve(self, x, y):
        rx, ry = self.reference_position
        return (rx if x is None else float(x)), (ry if y is None else float(y))

    def __repr__(self) -> str:
        params = {k: v for k, v in self.to_dict().items() if k != "type" and not isinstance(v, list)}
        inner = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"{type(self).__name__}({inner})"


def psf_from_dict(data: dict[str, Any]) -> PsfModel:
    """Rebuild a PSF model from :meth:`PsfModel.to_dict` output."""
    try:
        cls = _REGISTRY[data["type"]]
    except KeyError:
        raise BadInputDataError(f"unknown or missing PSF model type in {list(data)[:5]}") from None
    return cls._from_dict(data)


# ----------------------------------------------------------------------------------------------
# Analytic models with an optional polynomial variation of the FWHM across the detector.
# ----------------------------------------------------------------------------------------------


class _AnalyticPsf(PsfModel):
    """Common machinery of analytic profiles.

    ``fwhm_variation`` holds coefficients of the terms ``(u, v, u², u v, v²)``
    (any leading subset), with ``u = (x - x_ref) / scale_x`` and
    ``v = (y - y_ref) / scale_y``; the FWHM at ``(x, y)`` is
    ``fwhm * (1 + Σ c_k term_k)``.
    """

    def __init__(self, fwhm: float, *, ellipticity: float = 0.0, position_angle: float = 0.0,
                 fwhm_variation: tuple[float, ...] = (), reference: tuple[float, float] = (0.0, 0.0),
                 scale: tuple[float, float] = (1.0, 1.0), oversample: int = 5):
        if not (np.isfinite(fwhm) and fwhm > 0):
            raise ConfigurationError(f"PSF FWHM must be positive and finite, got {fwhm}")
        if not 0.0 <= ellipticity < 1.0:
            raise ConfigurationError(f"ellipticity must be in [0, 1), got {ellipticity}")
        if len(fwhm_variation) > 5:
            raise ConfigurationError("fwhm_variation takes at most 5 coefficients (u, v, u², uv, v²)")
        self._fwhm = float(fwhm)
        self.ellipticity = float(ellipticity)
        self.position_angle = float(position_angle)
        self.fwhm_variation = tuple(float(c) for c in fwhm_variation)
        self.reference = (float(reference[0]), float(reference[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.oversample = int(oversample)

    @property
    def reference_position(self):
        return self.reference

    @property
    def is_spatially_varying(self) -> bool:
        return any(c != 0 for c in self.fwhm_variation)

    def fwhm(self, x=None, y=None) -> float:
        x, y = self._resolve(x, y)
        if not self.fwhm_variation:
            return self._fwhm
        u = (x - self.reference[0]) / self.scale[0]
        v = (y - self.reference[1]) / self.scale[1]
        terms = (u, v, u * u, u * v, v * v)
        factor = 1.0 + sum(c * t for c, t in zip(self.fwhm_variation, terms))
        return self._fwhm * max(factor, 0.05)

    def _axes(self, fwhm: float) -> tuple[float, float]:
        """Major and minor FWHM for the given mean (geometric) FWHM."""
        ratio = 1.0 - self.ellipticity  # b/a
        major = fwhm / math.sqrt(ratio)
        return major, major * ratio

    def _radius2(self, dx: np.ndarray, dy: np.ndarray, fwhm: float) -> np.ndarray:
        """Squared elliptical radius in units of the per-axis FWHM scale."""
        major, minor = self._axes(fwhm)
        theta = math.radians(self.position_angle)
        c, s = math.cos(theta), math.sin(theta)
        xr = c * dx + s * dy
        yr = -s * dx + c * dy
        return (xr / major) ** 2 + (yr / minor) ** 2

    @abc.abstractmethod
    def _profile(self, r2: np.ndarray, fwhm: float) -> np.ndarray:
        """Profile value at squared normalised radius (unnormalised)."""

    def image(self, x=None, y=None, size=None, *, offset=(0.0, 0.0)):
        x, y = self._resolve(x, y)
        size = self.default_size if size is None else _odd_size(size)
        fwhm = self.fwhm(x, y)
        half = size // 2
        dx0, dy0 = float(offset[0]), float(offset[1])
        if isinstance(self, GaussianPsf) and self.ellipticity == 0.0:
            # Exact pixel integral of a circular Gaussian: product of erf differences.
            sigma = fwhm / FWHM_PER_SIGMA
            edges = np.arange(-half - 0.5, half + 1.5)
            scale = 1.0 / (math.sqrt(2.0) * sigma)
            px = np.diff(special.erf((edges - dx0) * scale))
            py = np.diff(special.erf((edges - dy0) * scale))
            stamp = np.outer(py, px)
        else:
            n = self.oversample
            sub = (np.arange(n) + 0.5) / n - 0.5
            grid = np.arange(-half, half + 1)
            fine = (grid[:, None] + sub[None, :]).ravel()
            yy, xx = np.meshgrid(fine - dy0, fine - dx0, indexing="ij")
            values = self._profile(self._radius2(xx, yy, fwhm), fwhm)
            stamp = values.reshape(size, n, size, n).sum(axis=(1, 3))
        return stamp / stamp.sum()

    def _base_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "fwhm": self._fwhm,
            "ellipticity": self.ellipticity,
            "position_angle": self.position_angle,
            "fwhm_variation": list(self.fwhm_variation),
            "reference": list(self.reference),
            "scale": list(self.scale),
            "oversample": self.oversample,
        }

    @staticmethod
    def _base_kwargs(data):
        return dict(
            ellipticity=data.get("ellipticity", 0.0),
            position_angle=data.get("position_angle", 0.0),
            fwhm_variation=tuple(data.get("fwhm_variation", ())),
            reference=tuple(data.get("reference", (0.0, 0.0))),
            scale=tuple(data.get("scale", (1.0, 1.0))),
            oversample=data.get("oversample", 5),
        )


@_register
class GaussianPsf(_AnalyticPsf):
    """Gaussian PSF (optionally elliptical, optionally varying width).

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels (geometric mean of the axes).
    ellipticity : float
        ``1 - b/a``.
    position_angle : float
        Major-axis angle in degrees, counter-clockwise from +x.
    fwhm_variation, reference, scale
        Polynomial variation of the FWHM across the detector (see class notes).
    """

    def _profile(self, r2, fwhm):
        # r2 is in units of FWHM²; exp(-4 ln2 r²) is half at r = 1/2 FWHM.
        return np.exp(-4.0 * math.log(2.0) * r2)

    @property
    def default_size(self) -> int:
        major, _ = self._axes(self._max_fwhm())
        return _odd_at_least(2 * 3.0 * major / FWHM_PER_SIGMA * 2.0 + 1)

    def _max_fwhm(self) -> float:
        return self._fwhm * (1.0 + sum(abs(c) for c in self.fwhm_variation))

    def to_dict(self):
        return self._base_dict()

    @classmethod
    def _from_dict(cls, data):
        return cls(data["fwhm"], **cls._base_kwargs(data))


@_register
class MoffatPsf(_AnalyticPsf):
    """Moffat PSF, :math:`(1 + r^2/\\alpha^2)^{-\\beta}`.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.
    beta : float
        Wing exponent (> 1; atmospheric seeing is well described by 2.5-4.7).
    """

    def __init__(self, fwhm: float, beta: float = 3.0, **kwargs):
        if not beta > 1.0:
            raise ConfigurationError(f"Moffat beta must exceed 1, got {beta}")
        super().__init__(fwhm, **kwargs)
        self.beta = float(beta)

    def alpha(self, fwhm: float) -> float:
        """Core radius for a given FWHM: α = FWHM / (2 sqrt(2^(1/β) − 1))."""
        return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def _profile(self, r2, fwhm):
        # r2 in FWHM² units -> r²/α² = r2 * FWHM² / α².
        return (1.0 + r2 * (fwhm / self.alpha(fwhm)) ** 2) ** (-self.beta)

    @property
    def default_size(self) -> int:
        # Radius enclosing ~99.5% of the flux: 1 - (1 + R²/α²)^(1-β) = 0.995.
        fwhm = self._fwhm * (1.0 + sum(abs(c) for c in self.fwhm_variation))
        alpha = self.alpha(fwhm) / math.sqrt(1.0 - self.ellipticity)
        radius = alpha * math.sqrt(0.005 ** (1.0 / (1.0 - self.beta)) - 1.0)
        return min(_odd_at_least(2 * radius + 1), 101)

    def to_dict(self):
        return {**self._base_dict(), "beta": self.beta}

    @classmethod
    def _from_dict(cls, data):
        return cls(data["fwhm"], beta=data["beta"], **cls._base_kwargs(data))


# ----------------------------------------------------------------------------------------------
# Pixelized models.
# ----------------------------------------------------------------------------------------------


def _shift_stamp(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift a stamp by a sub-pixel amount with a Fourier phase ramp (band-limited)."""
    if dx == 0.0 and dy == 0.0:
        return stamp
    ny, nx = stamp.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    phase = np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(np.fft.rfft2(stamp) * phase, s=stamp.shape)


def _resize_stamp(stamp: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a centred odd stamp to ``size``."""
    n = stamp.shape[0]
    if size == n:
        return stamp
    if size < n:
        lo = (n - size) // 2
        return stamp[lo:lo + size, lo:lo + size]
    pad = (size - n) // 2
    return np.pad(stamp, pad)


def _centroid(stamp: np.ndarray) -> tuple[float, float]:
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    total = stamp.sum()
    return float((stamp * xx).sum() / total), float((stamp * yy).sum() / total)


def _fwhm_of_stamp(stamp: np.ndarray) -> float:
    """FWHM of a pixelized PSF: the diameter of the area above half maximum.

    Uses the area A of pixels above half the peak after 4x Fourier
    upsampling, FWHM = 2 sqrt(A/π), which is exact for a circular profile and
    the geometric mean of the axes for an elliptical one.
    """
    n = stamp.shape[0]
    up = 4
    spec = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(stamp)))
    pad = (n * up - n) // 2
    fine = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(np.pad(spec, pad)))).real
    fine *= up * up
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / (up * up)
    return 2.0 * math.sqrt(area / math.pi)


def _validate_stamp(stamp: np.ndarray, what: str = "PSF image") -> np.ndarray:
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise BadInputDataError(f"{what} must be a square stamp of odd size, got shape {stamp.shape}")
    if not np.all(np.isfinite(stamp)):
        raise BadInputDataError(f"{what} contains non-finite values")
    total = stamp.sum()
    if not total > 0:
        raise BadInputDataError(f"{what} has non-positive sum {total}")
    return stamp / total


@_register
class ImagePsf(PsfModel):
    """A constant pixelized PSF (e.g. a FITS PSF stamp).

    The stamp is normalised to unit sum and re-centred so that its centroid
    falls on the central pixel; sub-pixel shifts use Fourier interpolation.

    Parameters
    ----------
    stamp : array_like
        Square, odd-sized PSF image.
    recenter : bool
        Shift the stamp so its centroid is exactly on the central pixel.
    """

    def __init__(self, stamp, *, recenter: bool = True):
        stamp = _validate_stamp(stamp)
        if recenter:
            cx, cy = _centroid(stamp)
            stamp = _shift_stamp(stamp, -cx, -cy)
            stamp /= stamp.sum()
        self.stamp = stamp
        self._fwhm = _fwhm_of_stamp(stamp)

    @property
    def default_size(self) -> int:
        return self.stamp.shape[0]

    def fwhm(self, x=None, y=None) -> float:
        return self._fwhm

    def image(self, x=None, y=None, size=None, *, offset=(0.0, 0.0)):
        size = self.default_size if size is None else _odd_size(size)
        n = self.stamp.shape[0]
        work = np.pad(self.stamp, max(0, (size - n) // 2) + 4) if size >= n else self.stamp
        shifted = _shift_stamp(work, float(offset[0]), float(offset[1]))
        out = _resize_stamp(shifted, size)
        return out / out.sum()

    def to_dict(self):
        return {"type": "ImagePsf", "stamp": self.stamp.tolist()}

    @classmethod
    def _from_dict(cls, data):
        return cls(np.array(data["stamp"]), recenter=False)


@_register
class GridPsf(PsfModel):
    """Pixelized PSFs on a rectangular grid, bilinearly interpolated.

    Parameters
    ----------
    x_nodes, y_nodes : sequence of float
        Increasing grid coordinates (pixels).
    stamps : array_like, shape (len(y_nodes), len(x_nodes), n, n)
        PSF stamp at each node (odd ``n``).
    """

    def __init__(self, x_nodes, y_nodes, stamps):
        self.x_nodes = np.asarray(x_nodes, dtype=float)
        self.y_nodes = np.asarray(y_nodes, dtype=float)
        stamps = np.asarray(stamps, dtype=float)
        if stamps.shape[:2] != (self.y_nodes.size, self.x_nodes.size):
            raise BadInputDataError(
                f"GridPsf stamps shape {stamps.shape[:2]} does not match the grid "
                f"({self.y_nodes.size}, {self.x_nodes.size})")
        if np.any(np.diff(self.x_nodes) <= 0) or np.any(np.diff(self.y_nodes) <= 0):
            raise BadInputDataError("GridPsf nodes must be strictly increasing")
        self.nodes = [[ImagePsf(stamps[j, i]) for i in range(self.x_nodes.size)]
                      for j in range(self.y_nodes.size)]

    @property
    def is_spatially_varying(self) -> bool:
        return self.x_nodes.size > 1 or self.y_nodes.size > 1

    @property
    def reference_position(self):
        return float(self.x_nodes.mean()), float(self.y_nodes.mean())

    @property
    def default_size(self) -> int:
        return self.nodes[0][0].default_size

    def _weights(self, x, y):
        def axis(nodes, v):
            if nodes.size == 1:
                return [(0, 1.0)]
            v = min(max(v, nodes[0]), nodes[-1])
            i = int(np.clip(np.searchsorted(nodes, v) - 1, 0, nodes.size - 2))
            t = (v - nodes[i]) / (nodes[i + 1] - nodes[i])
            return [(i, 1.0 - t), (i + 1, t)]
        return [(j, i, wy * wx) for j, wy in axis(self.y_nodes, y) for i, wx in axis(self.x_nodes, x)
                if wy * wx > 0]

    def image(self, x=None, y=None, size=None, *, offset=(0.0, 0.0)):
        x, y = self._resolve(x, y)
        out = sum(w * self.nodes[j][i].image(size=size, offset=offset) for j, i, w in self._weights(x, y))
        return out / out.sum()

    def fwhm(self, x=None, y=None) -> float:
        x, y = self._resolve(x, y)
        return float(sum(w * self.nodes[j][i].fwhm() for j, i, w in self._weights(x, y)))

    def to_dict(self):
        return {
            "type": "GridPsf",
            "x_nodes": self.x_nodes.tolist(),
            "y_nodes": self.y_nodes.tolist(),
            "stamps": [[node.stamp.tolist() for node in row] for row in self.nodes],
        }

    @classmethod
    def _from_dict(cls, data):
        return cls(data["x_nodes"], data["y_nodes"], np.array(data["stamps"]))


@_register
class PolynomialPsf(PsfModel):
    """PSFEx-style model: pixel stamps that vary as a polynomial in (x, y).

    ``image(x, y) = Σ_k T_k(u, v) C_k`` where ``T_k`` are the monomials
    ``u^i v^j`` (i + j ≤ order) in order ``1, u, v, u², uv, v², ...`` with
    ``u = (x - x_ref)/scale_x``, ``v = (y - y_ref)/scale_y``, and ``C_k`` the
    coefficient stamps.

    Parameters
    ----------
    coefficients : array_like, shape (n_terms, n, n)
        Coefficient stamps.
    order : int
        Polynomial order.
    reference, scale : (float, float)
        Normalisation of the coordinates.
    """

    def __init__(self, coefficients, order: int, *, reference=(0.0, 0.0), scale=(1.0, 1.0)):
        coefficients = np.asarray(coefficients, dtype=float)
        n_terms = (order + 1) * (order + 2) // 2
        if coefficients.ndim != 3 or coefficients.shape[0] != n_terms:
            raise BadInputDataError(
                f"PolynomialPsf of order {order} needs {n_terms} coefficient stamps, "
                f"got array of shape {coefficients.shape}")
        _validate_stamp(coefficients[0], "PolynomialPsf constant term")
        self.coefficients = coefficients
        self.order = int(order)
        self.reference = (float(reference[0]), float(reference[1]))
        self.scale = (float(scale[0]), float(scale[1]))

    @staticmethod
    def terms(u: float, v: float, order: int) -> np.ndarray:
        """Monomials ``u^i v^j`` ordered by total degree, then by decreasing i."""
        return np.array([u ** (d - j) * v ** j for d in range(order + 1) for j in range(d + 1)])

    @property
    def is_spatially_varying(self) -> bool:
        return self.order > 0

    @property
    def reference_position(self):
        return self.reference

    @property
    def default_size(self) -> int:
        return self.coefficients.shape[1]

    def _stamp(self, x, y):
        u = (x - self.reference[0]) / self.scale[0]
        v = (y - self.reference[1]) / self.scale[1]
        stamp = np.tensordot(self.terms(u, v, self.order), self.coefficients, axes=1)
        return stamp / stamp.sum()

    def image(self, x=None, y=None, size=None, *, offset=(0.0, 0.0)):
        x, y = self._resolve(x, y)
        return ImagePsf(self._stamp(x, y), recenter=True).image(size=size, offset=offset)

    def fwhm(self, x=None, y=None) -> float:
        x, y = self._resolve(x, y)
        return _fwhm_of_stamp(self._stamp(x, y))

    def to_dict(self):
        return {"type": "PolynomialPsf", "order": self.order, "reference": list(self.reference),
                "scale": list(self.scale), "coefficients": self.coefficients.tolist()}

    @classmethod
    def _from_dict(cls, data):
        return cls(np.array(data["coefficients"]), data["order"],
                   reference=tuple(data["reference"]), scale=tuple(data["scale"]))


def fwhm_of_stamp(stamp: np.ndarray) -> float:
    """FWHM (pixels) of a pixelized PSF stamp; see :class:`ImagePsf`."""
    return _fwhm_of_stamp(np.asarray(stamp, dtype=float))

