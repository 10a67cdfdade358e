"""A Zarr store of template coadd patches keyed by band, tract and patch, carrying its sky map.

Layout
------
::

    <root>/skymap.yaml                                   the sky map (RingsSkyMap.to_yaml)
    <root>/band=<band>/visit=<tract>/detector=<patch>/   one coadd patch
    <root>/dcr/band=<band>/subfilter=<k>/visit=<tract>/detector=<patch>/
                                                         sub-band k of a DCR model

Each band (and each DCR sub-band) is an :class:`~diffim_dask.io.ExposureStore`
whose ``visit`` key holds the tract id and whose ``detector`` key holds the
patch id, so patches get the io module's atomic-write protocol (hidden
temporary group, completion marker written last, rename) and lazy, chunked
reads without a second implementation. A patch is an
:class:`~diffim_dask.exposure.Exposure` on the patch's outer box of the
tract pixel frame: image, variance, mask, the tract WCS, the coadd PSF (in
tract pixels), the PhotoCalib and a VisitInfo whose ``band`` is the store
band; :meth:`CoaddStore.open` returns it with ``visit = detector = -1``.

The sky map is written once, atomically, when the store is created; opening
an existing store with a different sky map is a configuration error.
"""

from __future__ import annotations

import copy
import os
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

import numpy as np

from ..errors import BadInputDataError, ConfigurationError
from ..exposure import Exposure
from ..io import ExposureStore, MissingInputError
from ..io._atomic import atomic_output_path
from .skymap import PatchInfo, RingsSkyMap

__all__ = ["CoaddStore", "check_patch_geometry", "SKYMAP_FILE"]

#: Name of the sky-map file at the store root.
SKYMAP_FILE = "skymap.yaml"
_BAND_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_BAND_DIR = re.compile(r"^band=([A-Za-z0-9_.-]+)$")
_SUBFILTER_DIR = re.compile(r"^subfilter=(\d+)$")


def check_patch_geometry(exposure: Exposure, patch: PatchInfo, *, band: str = "",
                         tolerance: float = 0.01) -> None:
    """Check that a coadd patch lies on its sky-map patch grid.

    The exposure must start at the patch's outer-box origin, have its shape,
    and carry a WCS that agrees with the tract WCS to ``tolerance`` pixels at
    the corners and centre of the patch.

    Raises
    ------
    BadInputDataError
        Naming the tract, patch and band, and the quantity that disagrees.
    """
    name = f"coadd patch (band {band!r}, tract {patch.tract}, patch {patch.id})"
    if exposure.shape != patch.shape or exposure.origin != patch.origin:
        raise BadInputDataError(
            f"{name} has shape {exposure.shape} at origin {exposure.origin}, but the sky map's "
            f"patch box is shape {patch.shape} at origin {patch.origin}")
    if exposure.wcs is None:
        raise BadInputDataError(f"{name} has no WCS")
    x0, y0 = patch.origin
    ny, nx = patch.shape
    xs = np.array([x0, x0 + nx - 1, x0, x0 + nx - 1, x0 + (nx - 1) / 2.0], dtype=float)
    ys = np.array([y0, y0, y0 + ny - 1, y0 + ny - 1, y0 + (ny - 1) / 2.0], dtype=float)
    try:
        ra, dec = exposure.pixel_to_sky(xs, ys)
        tx, ty = copy.deepcopy(patch.wcs).wcs_world2pix(ra, dec, 0)  # WCS is not thread-safe
    except Exception as exc:  # an unusable WCS is bad data, whatever astropy raised
        raise BadInputDataError(f"{name}: its WCS cannot be evaluated ({exc})") from exc
    offset = float(np.nanmax(np.hypot(tx - xs, ty - ys))) if np.all(np.isfinite(tx)) else np.inf
    if not offset <= tolerance:
        raise BadInputDataError(
            f"{name} has a WCS inconsistent with the sky map: positions differ by {offset:.3g} "
            f"tract pixels (tolerance {tolerance})")


class CoaddStore:
    """Template coadd patches (per band, tract, patch) in Zarr, with the sky map they use.

    Parameters
    ----------
    root : str or os.PathLike
        Local directory or fsspec URL.
    skymap : RingsSkyMap, optional
        Required when creating a store; when opening one it must equal the stored sky map.
    chunk_size : int
        Side of the stored chunks (pixels).

    Raises
    ------
    MissingInputError
        If the store has no sky map and none is given.
    ConfigurationError
        If ``skymap`` differs from the stored one.

    Examples
    --------
    >>> store = CoaddStore(tmp_path / "templates.zarr", skymap)   # doctest: +SKIP
    >>> store.write(coadd, band="r", tract=9810, patch=12)        # doctest: +SKIP
    >>> store.patches("r")                                        # doctest: +SKIP
    [(9810, 12)]
    """

    def __init__(self, root: str | os.PathLike, skymap: RingsSkyMap | None = None, *,
                 chunk_size: int = 1024):
        self.chunk_size = int(chunk_size)
        self._fs, self._root_path = fsspec.core.url_to_fs(os.fspath(root))
        self.root = self._root_path if self._is_local else os.fspath(root).rstrip("/")
        stored = self._read_skymap()
        if stored is None:
            if skymap is None:
                raise MissingInputError(
                    f"{self.root}: no {SKYMAP_FILE} found; pass skymap= to create a template store")
            self._write_skymap(skymap)
            stored = skymap
        elif skymap is not None and skymap != stored:
            raise ConfigurationError(
                f"{self.root} was built with sky map {stored!r}, not {skymap!r}")
        self.skymap: RingsSkyMap = stored
        self._stores: dict[tuple[str, int | None], ExposureStore] = {}

    @property
    def _is_local(self) -> bool:
        return isinstance(self._fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"CoaddStore({self.root!r}, bands={self.bands()})"

    # -- sky map -------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts])

    def _read_skymap(self) -> RingsSkyMap | None:
        path = self._path(SKYMAP_FILE)
        if not self._fs.exists(path):
            return None
        with self._fs.open(path, "r") as handle:
            text = handle.read()
        try:
            return RingsSkyMap.from_yaml(text)
        except ConfigurationError as exc:
            raise BadInputDataError(f"{path}: unreadable sky map ({exc})") from exc

    def _write_skymap(self, skymap: RingsSkyMap) -> None:
        text = skymap.to_yaml()
        if self._is_local:
            os.makedirs(self._root_path, exist_ok=True)
            with atomic_output_path(self._path(SKYMAP_FILE)) as temporary:
                with open(temporary, "w") as handle:
                    handle.write(text)
        else:
            temporary = self._path(f".{SKYMAP_FILE}.{uuid.uuid4().hex[:12]}.tmp")
            self._fs.pipe(temporary, text.encode())
            self._fs.mv(temporary, self._path(SKYMAP_FILE))

    # -- per-band exposure stores --------------------------------------------------------------

    @staticmethod
    def _check_band(band: str) -> str:
        if not isinstance(band, str) or not _BAND_NAME.match(band):
            raise ConfigurationError(f"band must be a non-empty name of letters, digits, '_', '-' "
                                     f"or '.', got {band!r}")
        return band

    def _band_root(self, band: str, subfilter: int | None) -> str:
        self._check_band(band)
        parts = [f"band={band}"] if subfilter is None else ["dcr", f"band={band}",
                                                           f"subfilter={int(subfilter)}"]
        if self._is_local:
            return os.path.join(self._root_path, *parts)
        return "/".join([self.root, *parts])

    def _store(self, band: str, subfilter: int | None = None) -> ExposureStore:
        key = (band, None if subfilter is None else int(subfilter))
        if key not in self._stores:
            self._stores[key] = ExposureStore(self._band_root(band, subfilter),
                                              chunk_size=self.chunk_size)
        return self._stores[key]

    # -- queries -------------------------------------------------------------------------------

    def _child_dirs(self, path: str) -> list[str]:
        if not self._fs.isdir(path):
            return []
        return [entry["name"].rstrip("/").rsplit("/", 1)[-1]
                for entry in self._fs.ls(path, detail=True) if entry["type"] == "directory"]

    def bands(self) -> list[str]:
        """Bands with a directory in the store (plain coadds), sorted."""
        return sorted(m.group(1) for d in self._child_dirs(self._root_path)
                      if (m := _BAND_DIR.match(d)))

    def dcr_bands(self) -> list[str]:
        """Bands holding DCR sub-band coadds, sorted."""
        return sorted(m.group(1) for d in self._child_dirs(self._path("dcr"))
                      if (m := _BAND_DIR.match(d)))

    def subfilters(self, band: str) -> list[int]:
        """Sub-band indices stored for a band's DCR model, sorted."""
        self._check_band(band)
        return sorted(int(m.group(1)) for d in self._child_dirs(self._path("dcr", f"band={band}"))
                      if (m := _SUBFILTER_DIR.match(d)))

    def patches(self, band: str, subfilter: int | None = None) -> list[tuple[int, int]]:
        """Sorted ``(tract, patch)`` of the complete patches of a band (or DCR sub-band)."""
        return self._store(band, subfilter).list()

    def exists(self, band: str, tract: int, patch: int, subfilter: int | None = None) -> bool:
        """Whether a complete patch is stored."""
        return self._store(band, subfilter).exists(int(tract), int(patch))

    # -- reading and writing -------------------------------------------------------------------

    def patch_info(self, tract: int, patch: int) -> PatchInfo:
        """Sky-map geometry of a patch."""
        return self.skymap.tract(int(tract)).patch(int(patch))

    def open(self, band: str, tract: int, patch: int, *, subfilter: int | None = None,
             chunks: int | tuple[int, int] | None = None) -> Exposure:
        """Open one patch lazily (dask-backed planes; nothing is read until computed).

        Raises
        ------
        MissingInputError
            If the patch is not stored.
        BadInputDataError
            If the stored group is not a valid exposure or its band disagrees.
        """
        exposure = self._store(band, subfilter).open(int(tract), int(patch), chunks=chunks)
        stored_band = exposure.info.band
        if stored_band and stored_band != band:
            raise BadInputDataError(
                f"{self.root}: coadd patch (tract {tract}, patch {patch}) stored under band "
                f"{band!r} says its band is {stored_band!r}")
        return exposure.replace(info=exposure.info.replace(visit=-1, detector=-1, band=band))

    def write(self, exposure: Exposure, band: str, tract: int, patch: int, *,
              subfilter: int | None = None, overwrite: bool = False,
              check_geometry: bool = True) -> str:
        """Store one coadd patch atomically.

        Parameters
        ----------
        exposure : Exposure
            The patch on its outer box of the tract frame (numpy or dask).
        band : str
            Band name.
        tract, patch : int
            Sky-map ids.
        subfilter : int, optional
            Sub-band index of a DCR model.
        overwrite : bool
            Replace an existing patch.
        check_geometry : bool
            Refuse a patch whose box or WCS disagrees with the sky map.

        Returns
        -------
        str
            Path of the written group.

        Raises
        ------
        BadInputDataError
            If the geometry check fails or the exposure's band differs from ``band``.
        FileExistsError
            If the patch exists and ``overwrite`` is False.
        """
        self._check_band(band)
        if exposure.info.band and exposure.info.band != band:
            raise BadInputDataError(
                f"cannot store a {exposure.info.band!r}-band coadd under band {band!r}")
        if check_geometry:
            check_patch_geometry(exposure, self.patch_info(tract, patch), band=band)
        keyed = exposure.replace(info=exposure.info.replace(visit=int(tract), detector=int(patch),
                                                            band=band))
        group = self._store(band, subfilter).write(keyed, overwrite=overwrite)
        return f"{self._band_root(band, subfilter)}/{group}"

    def delete(self, band: str, tract: int, patch: int, *, subfilter: int | None = None,
               missing_ok: bool = False) -> None:
        """Remove one patch."""
        self._store(band, subfilter).delete(int(tract), int(patch), missing_ok=missing_ok)
