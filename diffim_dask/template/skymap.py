"""A "rings" sky map: declination bands split into tracts, tracts tiled by overlapping patches.

Geometry
--------
The sphere is cut into ``n_rings`` declination bands of height
:math:`h = 180° / (n_\\mathrm{rings} + 1)` plus two polar caps of radius
:math:`h/2`. Ring ``r`` (``1 ≤ r ≤ n_rings``) spans
:math:`\\delta \\in [-90° + h/2 + (r - 1) h,\\; -90° + h/2 + r h)` and is split
into :math:`n_r = \\lceil 360° \\cos\\delta_\\mathrm{eq} / h \\rceil` tracts of
equal right-ascension width (:math:`\\delta_\\mathrm{eq}` is the ring edge
nearest the equator, so tracts are at most ``h`` wide); tract ``k`` of ring
``r`` starts at :math:`\\alpha = \\alpha_0 + k \\cdot 360° / n_r`. Ring 0 is the
south cap, ring ``n_rings + 1`` the north cap, each a single tract. Tract ids
count from the south cap through the rings (increasing RA in each ring) to the
north cap.

Each tract has its own gnomonic (TAN) WCS centred on its region, north up and
east left, with the configured pixel scale. Its pixel box holds the region
grown by ``tract_overlap`` on every side, rounded up to whole patches, with
the tangent point at the centre. Patch ``(ix, iy)`` (id ``iy * n_x + ix``)
has the *inner* box ``[ix S, (ix + 1) S) × [iy S, (iy + 1) S)`` in tract
pixels (``S = patch_inner_size``); its *outer* box adds ``patch_border``
pixels on every side. Inner boxes tile the tract; outer boxes overlap their
neighbours by ``2 × patch_border``. Pixel positions are 0-based
(``image[y, x]``); pixel ``i`` covers ``[i - 0.5, i + 0.5)``.

Look-ups
--------
:meth:`RingsSkyMap.patches_overlapping` samples the boundary of an image's
pixel box (grown by ``border``), projects it to the sky and selects candidate
tracts by declination band and right-ascension interval, using per-ring
envelopes of the *pixel boxes* of the tracts (not just their nominal regions),
with the RA = 0/360 wrap handled by signed angle differences and polar caps
by testing whether the pole lies inside the image. In each candidate tract the
projected boundary's convex hull is tested against the outer box of every
patch in its bounding range (separating-axis test). Nothing is enumerated
over the whole sky, so a look-up takes about a millisecond even for maps
with millions of tracts.

Serialisation
-------------
:meth:`RingsSkyMap.to_dict` / :func:`skymap_from_dict` (and the YAML/JSON
helpers) round-trip the configuration, which fully defines the geometry; a
template store keeps it beside its patches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from astropy.wcs import WCS, Sip

from ..config import ConfigBase, config_field
from ..errors import BadInputDataError, ConfigurationError

__all__ = [
    "SkyMapConfig",
    "RingsSkyMap",
    "TractInfo",
    "PatchInfo",
    "skymap_from_dict",
    "tangent_wcs",
]

_SKYMAP_TYPE = "rings"
_SKYMAP_VERSION = 1
#: Points sampled per edge of an image box when projecting its footprint.
_EDGE_SAMPLES = 9
#: Largest angle (deg) between a tract centre and a point still projected into it.
_MAX_PROJECTION_ANGLE = 60.0


@dataclass(frozen=True)
class SkyMapConfig(ConfigBase):
    """Parameters of a :class:`RingsSkyMap`; they define its geometry completely.

    Examples
    --------
    >>> SkyMapConfig(n_rings=120).ring_height  # doctest: +ELLIPSIS
    1.487...
    """

    n_rings: int = config_field(
        120, "Number of declination bands between the two polar caps; ring height is "
        "180 / (n_rings + 1) degrees.", minimum=1)
    pixel_scale: float = config_field(
        0.2, "Pixel scale of every tract at its tangent point (arcsec/pixel).", minimum=0.0,
        exclusive_minimum=True)
    patch_inner_size: int = config_field(
        4000, "Side of a patch's inner (non-overlapping) box (pixels).", minimum=16)
    patch_border: int = config_field(
        100, "Overlap border added on every side of a patch's inner box (pixels).", minimum=0)
    tract_overlap: float = config_field(
        1.0 / 60.0, "Overlap of neighbouring tracts: each tract's pixel box holds its nominal "
        "region grown by this angle on every side (degrees).", minimum=0.0)
    ra_start: float = config_field(
        0.0, "Right ascension of the first tract edge of every ring (degrees).", minimum=0.0,
        maximum=360.0)

    @property
    def ring_height(self) -> float:
        """Declination height of a ring (degrees)."""
        return 180.0 / (self.n_rings + 1)

    def validate(self) -> None:
        if self.tract_overlap >= self.ring_height:
            raise ConfigurationError(
                f"SkyMapConfig.tract_overlap = {self.tract_overlap} deg must be smaller than the "
                f"ring height {self.ring_height:.6g} deg")


@dataclass(frozen=True, eq=False)
class PatchInfo:
    """One patch of a tract.

    Attributes
    ----------
    tract : int
        Id of the tract.
    id : int
        ``index_y * n_patches_x + index_x``.
    index : (int, int)
        ``(index_x, index_y)`` on the tract's patch grid.
    inner_bbox, outer_bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)`` in tract pixels; the outer box adds the border.
    wcs : astropy.wcs.WCS
        The tract WCS (patch pixel positions are tract pixels).
    """

    tract: int
    id: int
    index: tuple[int, int]
    inner_bbox: tuple[int, int, int, int]
    outer_bbox: tuple[int, int, int, int]
    wcs: WCS = dataclasses.field(repr=False)

    @property
    def origin(self) -> tuple[int, int]:
        """Tract-frame position ``(x0, y0)`` of a patch image's first pixel."""
        return self.outer_bbox[0], self.outer_bbox[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of a patch image (outer box)."""
        return self.outer_bbox[3], self.outer_bbox[2]

    @property
    def key(self) -> tuple[int, int]:
        """``(tract, patch)``."""
        return self.tract, self.id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatchInfo):
            return NotImplemented
        return (self.tract, self.id, self.outer_bbox) == (other.tract, other.id, other.outer_bbox)

    def __hash__(self) -> int:
        return hash((self.tract, self.id))


@dataclass(frozen=True, eq=False)
class TractInfo:
    """One tract: its region on the sky, its WCS and its patch grid.

    Attributes
    ----------
    id : int
        Tract id.
    ring : int
        0 (south cap), 1..n_rings, or n_rings + 1 (north cap).
    ra_center, dec_center : float
        Tangent point (degrees).
    ra_range : (float, float) or None
        Nominal RA interval ``[start, start + width)`` (degrees; ``None`` for caps).
    dec_range : (float, float)
        Nominal declination interval (degrees).
    wcs : astropy.wcs.WCS
        TAN WCS of the tract pixel frame.
    shape : (int, int)
        ``(ny, nx)`` of the tract pixel box.
    n_patches : (int, int)
        ``(n_x, n_y)``.
    patch_inner_size, patch_border : int
    """

    id: int
    ring: int
    ra_center: float
    dec_center: float
    ra_range: tuple[float, float] | None
    dec_range: tuple[float, float]
    wcs: WCS = dataclasses.field(repr=False)
    shape: tuple[int, int]
    n_patches: tuple[int, int]
    patch_inner_size: int
    patch_border: int

    @property
    def n_patch_total(self) -> int:
        """Number of patches."""
        return self.n_patches[0] * self.n_patches[1]

    def patch(self, patch: int | tuple[int, int]) -> PatchInfo:
        """The patch with this id or ``(index_x, index_y)``.

        Raises
        ------
        ConfigurationError
            If the patch is not on the tract's grid.
        """
        n_x, n_y = self.n_patches
        if isinstance(patch, tuple):
            ix, iy = int(patch[0]), int(patch[1])
        else:
            if not 0 <= int(patch) < n_x * n_y:
                raise ConfigurationError(
                    f"tract {self.id} has patches 0..{n_x * n_y - 1}, not {patch}")
            iy, ix = divmod(int(patch), n_x)
        if not (0 <= ix < n_x and 0 <= iy < n_y):
            raise ConfigurationError(
                f"patch index ({ix}, {iy}) is outside tract {self.id}'s {n_x}x{n_y} patch grid")
        size, border = self.patch_inner_size, self.patch_border
        inner = (ix * size, iy * size, size, size)
        outer = (inner[0] - border, inner[1] - border, size + 2 * border, size + 2 * border)
        return PatchInfo(tract=self.id, id=iy * n_x + ix, index=(ix, iy), inner_bbox=inner,
                         outer_bbox=outer, wcs=self.wcs)

    def patches(self) -> list[PatchInfo]:
        """Every patch of the tract, by id."""
        return [self.patch(i) for i in range(self.n_patch_total)]

    def sky_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """Tract pixel positions of sky positions (degrees)."""
        x, y = copy.deepcopy(self.wcs).wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return np.asarray(x), np.asarray(y)

    def pixel_to_sky(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions (degrees) of tract pixel positions."""
        ra, dec = copy.deepcopy(self.wcs).wcs_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return np.asarray(ra), np.asarray(dec)

    def contains(self, ra, dec) -> np.ndarray:
        """Whether sky positions fall in the tract's nominal region (no overlap)."""
        ra = np.asarray(ra, dtype=float)
        dec = np.asarray(dec, dtype=float)
        lo, hi = self.dec_range
        inside = (dec >= lo) & (dec < hi) if hi < 90.0 else dec >= lo
        if self.ra_range is not None:
            start, stop = self.ra_range
            inside &= np.mod(ra - start, 360.0) < (stop - start)
        return inside


# ----------------------------------------------------------------------------------------------
# Geometry helpers.
# ----------------------------------------------------------------------------------------------


def _wrap180(angle):
    """Angle(s) wrapped to [-180, 180)."""
    return np.mod(np.asarray(angle, dtype=float) + 180.0, 360.0) - 180.0


def _unit_vectors(ra, dec) -> np.ndarray:
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _angular_distance(ra, dec, ra0, dec0) -> np.ndarray:
    """Great-circle distance (degrees)."""
    dot = _unit_vectors(ra, dec) @ _unit_vectors(ra0, dec0)
    return np.degrees(np.arccos(np.clip(dot, -1.0, 1.0)))


def tangent_wcs(ra: float, dec: float, pixel_scale: float, reference_pixel: tuple[float, float], *,
                rotation: float = 0.0, distortion: float = 0.0) -> WCS:
    """A gnomonic (TAN) WCS, optionally with a radial cubic SIP distortion.

    Parameters
    ----------
    ra, dec : float
        Sky position (deg) of the reference pixel.
    pixel_scale : float
        arcsec per pixel.
    reference_pixel : (float, float)
        0-based ``(x, y)`` of the tangent point.
    rotation : float
        Rotation of the pixel grid (deg); 0 puts north along +y and east along −x.
    distortion : float
        SIP coefficient ``k`` of the radial cubic distortion: intermediate
        pixel offsets are ``(u, v) (1 + k (u² + v²))`` with ``(u, v)`` the offsets
        from the reference pixel.

    Returns
    -------
    astropy.wcs.WCS
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if distortion else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [reference_pixel[0] + 1.0, reference_pixel[1] + 1.0]
    theta = math.radians(rotation)
    scale = pixel_scale / 3600.0
    wcs.wcs.cd = scale * np.array([[-math.cos(theta), math.sin(theta)],
                                   [math.sin(theta), math.cos(theta)]])
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    if distortion:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[3, 0] = a[1, 2] = distortion
        b[2, 1] = b[0, 3] = distortion
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def box_boundary(x0: float, y0: float, nx: float, ny: float,
                 samples: int = _EDGE_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Points along the boundary of the pixel box ``[x0, x0 + nx] × [y0, y0 + ny]`` (corners included)."""
    t = np.linspace(0.0, 1.0, samples)
    xs = np.concatenate([x0 + t * nx, np.full(samples, x0 + nx), x0 + t[::-1] * nx,
                         np.full(samples, x0)])
    ys = np.concatenate([np.full(samples, y0), y0 + t * ny, np.full(samples, y0 + ny),
                         y0 + t[::-1] * ny])
    return xs, ys


def _convex_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull of 2-D points (Andrew's monotone chain), shape (m, 2)."""
    points = sorted(set(zip(np.round(x, 9).tolist(), np.round(y, 9).tolist())))
    if len(points) <= 2:
        return np.array(points, dtype=float)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=float)


def convex_polygon_intersects_box(hull: np.ndarray, xmin: float, xmax: float, ymin: float,
                                  ymax: float) -> bool:
    """Separating-axis test of a convex polygon against an axis-aligned box (touching = no)."""
    if hull.shape[0] == 0:
        return False
    if (hull[:, 0].max() <= xmin or hull[:, 0].min() >= xmax or hull[:, 1].max() <= ymin
            or hull[:, 1].min() >= ymax):
        return False
    corners = np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]])
    edges = np.roll(hull, -1, axis=0) - hull
    for edge in edges:
        normal = np.array([-edge[1], edge[0]])
        if not normal.any():
            continue
        poly = hull @ normal
        box = corners @ normal
        if poly.max() <= box.min() or poly.min() >= box.max():
            return False
    return True


# ----------------------------------------------------------------------------------------------
# The sky map.
# ----------------------------------------------------------------------------------------------


class RingsSkyMap:
    """Tracts as RA segments of declination rings plus polar caps; patches inside tracts.

    Parameters
    ----------
    config : SkyMapConfig, optional
        Geometry (defaults: 120 rings, 0.2″ pixels, 4000-pixel patches with a
        100-pixel border, 1′ tract overlap).

    Examples
    --------
    >>> skymap = RingsSkyMap(SkyMapConfig(n_rings=120))
    >>> tract = skymap.tract(skymap.find_tract(150.0, 2.0))
    >>> bool(tract.contains(150.0, 2.0))
    True
    """

    def __init__(self, config: SkyMapConfig | None = None):
        self.config = SkyMapConfig() if config is None else config
        c = self.config
        self._h = c.ring_height
        rings = np.arange(1, c.n_rings + 1)
        self._ring_dec_lo = -90.0 + self._h / 2.0 + (rings - 1) * self._h
        self._ring_dec_hi = self._ring_dec_lo + self._h
        equatorward = np.where(self._ring_dec_lo * self._ring_dec_hi <= 0.0, 0.0,
                               np.minimum(np.abs(self._ring_dec_lo), np.abs(self._ring_dec_hi)))
        counts = np.ceil(360.0 * np.cos(np.radians(equatorward)) / self._h - 1e-9).astype(np.int64)
        # Index 0: south cap; 1..n_rings: rings; n_rings + 1: north cap.
        self._ring_counts = np.concatenate([[1], np.maximum(counts, 1), [1]])
        self._ring_offsets = np.concatenate([[0], np.cumsum(self._ring_counts)])
        self._tract = functools.lru_cache(maxsize=4096)(self._make_tract)
        self._envelope = functools.lru_cache(maxsize=4096)(self._ring_envelope)

    # -- identity and serialisation ------------------------------------------------------------

    def __repr__(self) -> str:
        c = self.config
        return (f"RingsSkyMap(n_rings={c.n_rings}, pixel_scale={c.pixel_scale}, "
                f"patch_inner_size={c.patch_inner_size}, patch_border={c.patch_border}, "
                f"n_tracts={self.n_tracts})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RingsSkyMap):
            return NotImplemented
        return self.config == other.config

    def __hash__(self) -> int:
        return hash(self.config)

    def __reduce__(self):
        # Caches hold WCS objects; rebuild them on the other side instead of pickling.
        return (type(self), (self.config,))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data description (type, version, configuration)."""
        return {"type": _SKYMAP_TYPE, "version": _SKYMAP_VERSION, "config": self.config.to_dict()}

    def to_yaml(self) -> str:
        """YAML text of :meth:`to_dict`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str) -> "RingsSkyMap":
        """Inverse of :meth:`to_yaml`."""
        return skymap_from_dict(yaml.safe_load(text))

    @classmethod
    def from_json(cls, text: str) -> "RingsSkyMap":
        """Inverse of :meth:`to_json`."""
        return skymap_from_dict(json.loads(text))

    # -- tracts --------------------------------------------------------------------------------

    @property
    def n_tracts(self) -> int:
        """Total number of tracts."""
        return int(self._ring_offsets[-1])

    def _ring_of(self, tract_id: int) -> tuple[int, int]:
        if not 0 <= tract_id < self.n_tracts:
            raise ConfigurationError(f"tract id {tract_id} is outside 0..{self.n_tracts - 1}")
        ring = int(np.searchsorted(self._ring_offsets, tract_id, side="right") - 1)
        return ring, tract_id - int(self._ring_offsets[ring])

    def tract(self, tract_id: int) -> TractInfo:
        """The tract with this id (built on first use and cached)."""
        return self._tract(int(tract_id))

    def _make_tract(self, tract_id: int) -> TractInfo:
        c = self.config
        ring, index = self._ring_of(tract_id)
        h = self._h
        if ring == 0 or ring == c.n_rings + 1:
            sign = -1.0 if ring == 0 else 1.0
            ra_c, dec_c = 0.0, sign * 90.0
            ra_range = None
            dec_range = (-90.0, -90.0 + h / 2.0) if ring == 0 else (90.0 - h / 2.0, 90.0)
            radius = math.radians(h / 2.0 + c.tract_overlap)
            half_x = half_y = math.tan(radius) / math.radians(c.pixel_scale / 3600.0)
        else:
            n = int(self._ring_counts[ring])
            width = 360.0 / n
            start = (c.ra_start + index * width) % 360.0
            ra_c = (start + width / 2.0) % 360.0
            dec_lo, dec_hi = float(self._ring_dec_lo[ring - 1]), float(self._ring_dec_hi[ring - 1])
            dec_c = 0.5 * (dec_lo + dec_hi)
            ra_range = (start, start + width)
            dec_range = (dec_lo, dec_hi)
            probe = tangent_wcs(ra_c, dec_c, c.pixel_scale, (0.0, 0.0))
            t = np.linspace(0.0, 1.0, 33)
            ras = np.concatenate([start + t * width, start + t * width, np.full(33, start),
                                  np.full(33, start + width)])
            decs = np.concatenate([np.full(33, dec_lo), np.full(33, dec_hi), dec_lo + t * h,
                                   dec_lo + t * h])
            px, py = probe.wcs_world2pix(ras, decs, 0)
            overlap_px = c.tract_overlap * 3600.0 / c.pixel_scale
            half_x = float(np.abs(px).max()) + overlap_px
            half_y = float(np.abs(py).max()) + overlap_px
        size = c.patch_inner_size
        n_x = max(1, int(math.ceil(2.0 * half_x / size)))
        n_y = max(1, int(math.ceil(2.0 * half_y / size)))
        nx, ny = n_x * size, n_y * size
        wcs = tangent_wcs(ra_c, dec_c, c.pixel_scale, ((nx - 1) / 2.0, (ny - 1) / 2.0))
        return TractInfo(id=tract_id, ring=ring, ra_center=float(ra_c), dec_center=float(dec_c),
                         ra_range=ra_range, dec_range=dec_range, wcs=wcs, shape=(ny, nx),
                         n_patches=(n_x, n_y), patch_inner_size=size, patch_border=c.patch_border)

    def find_tract(self, ra, dec):
        """Id(s) of the tract whose nominal region holds each sky position (its "home" tract).

        Parameters
        ----------
        ra, dec : float or array_like
            Degrees.

        Returns
        -------
        int or numpy.ndarray
        """
        scalar = np.ndim(ra) == 0 and np.ndim(dec) == 0
        ra = np.atleast_1d(np.asarray(ra, dtype=float))
        dec = np.atleast_1d(np.asarray(dec, dtype=float))
        if np.any(np.abs(dec) > 90.0):
            raise ConfigurationError("declination must be within [-90, 90] degrees")
        n_rings = self.config.n_rings
        ring = np.floor((dec + 90.0 - self._h / 2.0) / self._h).astype(np.int64) + 1
        ring = np.clip(ring, 0, n_rings + 1)
        counts = self._ring_counts[ring]
        index = np.floor(np.mod(ra - self.config.ra_start, 360.0) / (360.0 / counts)).astype(np.int64)
        index = np.where((ring == 0) | (ring == n_rings + 1), 0, np.minimum(index, counts - 1))
        out = self._ring_offsets[ring] + index
        return int(out[0]) if scalar else out

    def _ring_envelope(self, ring: int) -> tuple[float, float, float]:
        """Declination range and RA half-width (about the tract centre) of a ring's tract boxes."""
        tract = self.tract(int(self._ring_offsets[ring]))
        ny, nx = tract.shape
        xs, ys = box_boundary(-0.5, -0.5, nx, ny, samples=33)
        ras, decs = tract.pixel_to_sky(xs, ys)
        dec_lo, dec_hi = float(decs.min()), float(decs.max())
        half_width = float(np.abs(_wrap180(ras - tract.ra_center)).max())
        for pole in (-90.0, 90.0):
            if _angular_distance(tract.ra_center, tract.dec_center, 0.0, pole) < 89.0:
                px, py = tract.sky_to_pixel(0.0, pole)
                if -0.5 <= px < nx - 0.5 and -0.5 <= py < ny - 0.5:
                    dec_lo, dec_hi = min(dec_lo, pole), max(dec_hi, pole)
                    half_width = 180.0
        if ring == 0 or ring == self.config.n_rings + 1:
            half_width = 180.0
        return dec_lo, dec_hi, half_width

    def tracts_overlapping_sky(self, ra, dec, *, contains_north_pole: bool = False,
                               contains_south_pole: bool = False) -> list[int]:
        """Ids of the tracts whose pixel box may overlap the region bounded by sky points.

        Parameters
        ----------
        ra, dec : array_like
            Points sampling the boundary of a small (< 90°) region, degrees.
        contains_north_pole, contains_south_pole : bool
            Whether the region holds a pole (its RA span is then the full circle).

        Returns
        -------
        list of int
            Candidate tracts (a superset of those that truly overlap).
        """
        ra = np.asarray(ra, dtype=float)
        dec = np.asarray(dec, dtype=float)
        dec_min = -90.0 if contains_south_pole else float(dec.min())
        dec_max = 90.0 if contains_north_pole else float(dec.max())
        full_circle = contains_north_pole or contains_south_pole
        ra_mid = float(ra[0])
        offsets = _wrap180(ra - ra_mid)
        ra_lo, ra_hi = ra_mid + float(offsets.min()), ra_mid + float(offsets.max())
        centre, half_span = 0.5 * (ra_lo + ra_hi), 0.5 * (ra_hi - ra_lo)
        # Only rings near the declination range can reach it: a tract box extends past its
        # nominal band by the overlap plus at most one patch (rounding) and some curvature.
        c = self.config
        margin = self._h + c.tract_overlap + c.patch_inner_size * c.pixel_scale / 3600.0
        first = int(np.clip(math.floor((dec_min - margin + 90.0 - self._h / 2.0) / self._h) + 1,
                            0, c.n_rings + 1))
        last = int(np.clip(math.floor((dec_max + margin + 90.0 - self._h / 2.0) / self._h) + 1,
                           0, c.n_rings + 1))
        out = []
        for ring in range(first, last + 1):
            env_lo, env_hi, half_width = self._envelope(ring)
            if env_hi < dec_min or env_lo > dec_max:
                continue
            n = int(self._ring_counts[ring])
            if full_circle or n == 1 or half_width + half_span >= 180.0:
                indices = range(n)
            else:
                width = 360.0 / n
                centre_index = (centre - self.config.ra_start) / width - 0.5
                reach = (half_width + half_span) / width + 1.0
                candidates = np.arange(math.floor(centre_index - reach),
                                       math.ceil(centre_index + reach) + 1)
                ra_centres = self.config.ra_start + (candidates + 0.5) * width
                keep = np.abs(_wrap180(ra_centres - centre)) <= half_width + half_span
                indices = sorted({int(k) % n for k in candidates[keep]})
            out.extend(int(self._ring_offsets[ring]) + k for k in indices)
        return out

    # -- patches -------------------------------------------------------------------------------

    def patches_overlapping(self, wcs: WCS, shape: tuple[int, int], border: float = 0.0,
                            origin: tuple[int, int] = (0, 0)) -> list[PatchInfo]:
        """Patches (of every tract) whose outer box overlaps an image's footprint.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            The image's WCS (parent pixel frame).
        shape : (int, int)
            ``(ny, nx)`` of the image.
        border : float
            Grow the image box by this many of its pixels on every side.
        origin : (int, int)
            Parent-frame position ``(x0, y0)`` of the image's first pixel.

        Returns
        -------
        list of PatchInfo
            Sorted by (tract, patch).

        Raises
        ------
        BadInputDataError
            If the WCS does not map the image box to finite sky positions.
        """
        if wcs is None:
            raise BadInputDataError("cannot find overlapping patches of an image without a WCS")
        ny, nx = shape
        x0, y0 = origin
        bx, by = box_boundary(x0 - 0.5 - border, y0 - 0.5 - border, nx + 2 * border,
                              ny + 2 * border)
        wcs = copy.deepcopy(wcs)
        cx, cy = x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0
        ra, dec = wcs.all_pix2world(np.append(bx, cx), np.append(by, cy), 0)
        ra, dec = np.asarray(ra), np.asarray(dec)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise BadInputDataError("the image WCS maps part of its box to non-finite sky positions")
        radius = float(_angular_distance(ra[:-1], dec[:-1], ra[-1], dec[-1]).max())
        poles = {}
        for name, pole in (("north", 90.0), ("south", -90.0)):
            poles[name] = False
            if _angular_distance(ra[-1], dec[-1], 0.0, pole) <= radius:
                px, py = wcs.all_world2pix(0.0, pole, 0, quiet=True)
                poles[name] = bool(x0 - 0.5 - border <= px <= x0 + nx - 0.5 + border
                                   and y0 - 0.5 - border <= py <= y0 + ny - 0.5 + border)
        candidates = self.tracts_overlapping_sky(
            ra[:-1], dec[:-1], contains_north_pole=poles["north"],
            contains_south_pole=poles["south"])
        found: list[PatchInfo] = []
        for tract_id in candidates:
            tract = self.tract(tract_id)
            if _angular_distance(ra[-1], dec[-1], tract.ra_center,
                                 tract.dec_center) > _MAX_PROJECTION_ANGLE:
                continue
            tx, ty = tract.sky_to_pixel(ra[:-1], dec[:-1])
            hull = _convex_hull(tx, ty)
            size, pb = tract.patch_inner_size, tract.patch_border
            n_x, n_y = tract.n_patches
            # Outer box of patch i spans [i S - B - 0.5, (i + 1) S + B - 0.5).
            ix_lo = max(0, math.floor((tx.min() - pb + 0.5) / size) - 1)
            ix_hi = min(n_x - 1, math.floor((tx.max() + pb + 0.5) / size))
            iy_lo = max(0, math.floor((ty.min() - pb + 0.5) / size) - 1)
            iy_hi = min(n_y - 1, math.floor((ty.max() + pb + 0.5) / size))
            for iy in range(iy_lo, iy_hi + 1):
                for ix in range(ix_lo, ix_hi + 1):
                    patch = tract.patch((ix, iy))
                    px0, py0, pnx, pny = patch.outer_bbox
                    if convex_polygon_intersects_box(hull, px0 - 0.5, px0 + pnx - 0.5,
                                                     py0 - 0.5, py0 + pny - 0.5):
                        found.append(patch)
        return sorted(found, key=lambda p: (p.tract, p.id))


def skymap_from_dict(data: dict[str, Any]) -> RingsSkyMap:
    """Rebuild a sky map from :meth:`RingsSkyMap.to_dict` output.

    Raises
    ------
    ConfigurationError
        If the type or version is unknown or the configuration is invalid.
    """
    if not isinstance(data, dict) or data.get("type") != _SKYMAP_TYPE:
        kind = data.get("type") if isinstance(data, dict) else data
        raise ConfigurationError(f"unknown sky map type {kind!r}; expected {_SKYMAP_TYPE!r}")
    if data.get("version") != _SKYMAP_VERSION:
        raise ConfigurationError(
            f"sky map description version {data.get('version')!r} is not supported "
            f"(this version reads {_SKYMAP_VERSION})")
    return RingsSkyMap(SkyMapConfig.from_dict(data.get("config", {})))
