"""A Zarr store of exposures: one group per (visit, detector), atomic writes, lazy reads.

Layout
------
::

    <root>/visit=<visit>/detector=<detector>/    one exposure (Zarr v3 group)
        image, variance, mask                    chunked arrays over (y, x)
        x, y                                     parent-frame pixel coordinates
        attrs                                    Exposure.to_xarray() metadata (WCS header,
                                                 PSF / PhotoCalib / VisitInfo JSON, mask
                                                 planes) + the completion marker

Write protocol
--------------
1. Pixels and metadata go to a hidden temporary group
   ``visit=<v>/.detector=<d>.tmp-<id>``.
2. The completion marker attribute ``diffim_dask_complete`` is set *after*
   every chunk is written.
3. The temporary group is renamed to ``detector=<d>``. When overwriting, the
   old group is first renamed to ``.detector=<d>.old-<id>`` and deleted only
   once the new one is in place, so the old version is never modified.

:meth:`ExposureStore.open`, :meth:`~ExposureStore.exists` and
:meth:`~ExposureStore.list` only see groups named ``detector=<int>`` that carry
the marker: an interrupted write (exception or killed process) never reads as
complete. Leftover hidden groups of killed writers are removed by
:meth:`~ExposureStore.purge_incomplete`.

Remote storage
--------------
``root`` may be an fsspec URL (``memory://``, ``s3://``...): xarray and zarr
write through fsspec, and renames use ``fs.mv``. Local renames are atomic
(POSIX ``rename``); on object stores a "rename" is a copy followed by a
delete, so there the marker (copied with the group metadata) is the only
guard — a crash during that copy can leave a group whose metadata is complete
but whose chunks are not. Metadata is never consolidated (zarr-python 3 would
warn, and consolidated metadata would go stale after a rename).
"""

from __future__ import annotations

import logging
import os
import re
import uuid

import fsspec
import xarray as xr
import zarr
from fsspec.implementations.local import LocalFileSystem

from ..errors import BadInputDataError
from ..exposure import Exposure
from ._errors import MissingInputError

__all__ = ["ExposureStore", "COMPLETE_MARKER"]

logger = logging.getLogger("diffim_dask.io")

#: Group attribute written last: the group holds a complete exposure.
COMPLETE_MARKER = "diffim_dask_complete"
_STORE_FORMAT = 1
_VISIT_DIR = re.compile(r"^visit=(-?\d+)$")
_DETECTOR_DIR = re.compile(r"^detector=(-?\d+)$")
_HIDDEN_DETECTOR = re.compile(r"^\.detector=(-?\d+)\.(tmp|old)-[0-9a-f]+$")


class ExposureStore:
    """Exposures in a Zarr hierarchy keyed by visit and detector.

    Parameters
    ----------
    root : str or os.PathLike
        Local directory or fsspec URL of the store (created on first write).
    chunk_size : int
        Side of the stored chunks (pixels); smaller images use one chunk.

    Examples
    --------
    >>> store = ExposureStore(tmp_path / "calexp.zarr")        # doctest: +SKIP
    >>> store.write(exposure)                                   # doctest: +SKIP
    >>> store.list()                                            # doctest: +SKIP
    [(1234, 37)]
    >>> lazy = store.open(1234, 37)                             # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, *, chunk_size: int = 1024):
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self._fs, self._root_path = fsspec.core.url_to_fs(os.fspath(root))
        # Local roots are kept absolute so a later change of working directory is harmless.
        self.root = self._root_path if self._is_local else os.fspath(root)

    @property
    def _is_local(self) -> bool:
        return isinstance(self._fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"ExposureStore({self.root!r})"

    # -- names ---------------------------------------------------------------------------------

    @staticmethod
    def group_name(visit: int, detector: int) -> str:
        """Group path of one exposure inside the store."""
        return f"visit={int(visit)}/detector={int(detector)}"

    def _fs_path(self, group: str) -> str:
        return f"{self._root_path.rstrip('/')}/{group}"

    # -- queries -------------------------------------------------------------------------------

    def _is_complete(self, group: str) -> bool:
        if not self._fs.isdir(self._fs_path(group)):
            return False
        try:
            attrs = zarr.open_group(self.root, path=group, mode="r").attrs
            return bool(attrs.get(COMPLETE_MARKER, False))
        except Exception as exc:  # unreadable metadata = not complete
            logger.debug("%s/%s: not a readable group (%s)", self.root, group, exc)
            return False

    def exists(self, visit: int, detector: int) -> bool:
        """Whether a *complete* exposure is stored for (visit, detector)."""
        return self._is_complete(self.group_name(visit, detector))

    def _child_dirs(self, path: str) -> list[str]:
        if not self._fs.isdir(path):
            return []
        return [entry["name"].rstrip("/").rsplit("/", 1)[-1]
                for entry in self._fs.ls(path, detail=True) if entry["type"] == "directory"]

    def list(self) -> list[tuple[int, int]]:
        """Sorted ``(visit, detector)`` pairs of the complete exposures."""
        found = []
        for visit_dir in self._child_dirs(self._root_path):
            visit_match = _VISIT_DIR.match(visit_dir)
            if not visit_match:
                continue
            for detector_dir in self._child_dirs(self._fs_path(visit_dir)):
                detector_match = _DETECTOR_DIR.match(detector_dir)
                if detector_match and self._is_complete(f"{visit_dir}/{detector_dir}"):
                    found.append((int(visit_match.group(1)), int(detector_match.group(1))))
        return sorted(found)

    # -- reading -------------------------------------------------------------------------------

    def open(self, visit: int, detector: int,
             chunks: int | tuple[int, int] | None = None) -> Exposure:
        """Open one exposure lazily: dask-backed planes, no pixel read until computed.

        Parameters
        ----------
        visit, detector : int
            Identifiers.
        chunks : int or (int, int), optional
            Dask chunks ``(y, x)``; default: the stored chunks. Use multiples of
            the stored chunk size (xarray warns otherwise).

        Raises
        ------
        MissingInputError
            If no complete exposure is stored under these ids.
        BadInputDataError
            If the stored group is not a valid exposure.
        """
        group = self.group_name(visit, detector)
        if not self._is_complete(group):
            raise MissingInputError(f"{self.root}: no complete exposure stored for visit={visit}, "
                                    f"detector={detector}")
        if chunks is None:
            chunk_spec: dict = {}
        else:
            cy, cx = (chunks, chunks) if isinstance(chunks, int) else chunks
            chunk_spec = {"y": cy, "x": cx}
        try:
            dataset = xr.open_zarr(self.root, group=group, consolidated=False, chunks=chunk_spec)
        except Exception as exc:
            raise BadInputDataError(f"{self.root}/{group}: cannot open stored exposure ({exc})") from exc
        return Exposure.from_xarray(dataset)

    # -- writing -------------------------------------------------------------------------------

    def _dataset_for_store(self, exposure: Exposure) -> xr.Dataset:
        dataset = exposure.to_xarray().drop_encoding()
        ny, nx = exposure.shape
        dataset = dataset.chunk({"y": min(self.chunk_size, ny), "x": min(self.chunk_size, nx)})
        dataset.attrs["diffim_dask_store_format"] = _STORE_FORMAT
        return dataset

    def _mark_complete(self, group: str) -> None:
        zarr.open_group(self.root, path=group, mode="r+").attrs[COMPLETE_MARKER] = True

    def _rename(self, source: str, target: str) -> None:
        if self._is_local:
            os.rename(self._fs_path(source), self._fs_path(target))
        else:
            self._fs.mv(self._fs_path(source), self._fs_path(target), recursive=True)

    def _discard(self, group: str) -> None:
        """Remove a group if present (best effort: used on failure paths)."""
        path = self._fs_path(group)
        try:
            if self._fs.exists(path):
                self._fs.rm(path, recursive=True)
        except OSError as exc:
            logger.warning("%s: could not remove %s (%s); purge_incomplete() will", self.root,
                           group, exc)

    def _publish(self, temporary: str, visit: int, detector: int, overwrite: bool) -> None:
        group = self.group_name(visit, detector)
        if not self._fs.exists(self._fs_path(group)):
            self._rename(temporary, group)
            return
        if not overwrite and self._is_complete(group):
            raise FileExistsError(f"{self.root}/{group} already exists (pass overwrite=True)")
        backup = f"visit={int(visit)}/.detector={int(detector)}.old-{uuid.uuid4().hex[:12]}"
        self._rename(group, backup)
        self._rename(temporary, group)
        self._discard(backup)

    def write(self, exposure: Exposure, *, overwrite: bool = False) -> str:
        """Store an exposure under ``exposure.info.visit`` / ``.detector``, atomically.

        Parameters
        ----------
        exposure : Exposure
            numpy- or dask-backed (dask planes are computed chunk by chunk).
        overwrite : bool
            Replace a stored exposure with the same ids.

        Returns
        -------
        str
            The group path inside the store.

        Raises
        ------
        FileExistsError
            If the exposure exists and ``overwrite`` is False.
        """
        visit, detector = int(exposure.info.visit), int(exposure.info.detector)
        group = self.group_name(visit, detector)
        if not overwrite and self.exists(visit, detector):
            raise FileExistsError(f"{self.root}/{group} already exists (pass overwrite=True)")
        temporary = f"visit={visit}/.detector={detector}.tmp-{uuid.uuid4().hex[:12]}"
        dataset = self._dataset_for_store(exposure)
        try:
            dataset.to_zarr(self.root, group=temporary, mode="w", consolidated=False)
            self._mark_complete(temporary)
            self._publish(temporary, visit, detector, overwrite)
        except BaseException:
            self._discard(temporary)
            raise
        logger.debug("%s: wrote %s", self.root, group)
        return group

    # -- removal -------------------------------------------------------------------------------

    def delete(self, visit: int, detector: int, *, missing_ok: bool = False) -> None:
        """Remove one exposure (complete or not).

        Raises
        ------
        MissingInputError
            If nothing is stored under these ids and ``missing_ok`` is False.
        """
        group = self.group_name(visit, detector)
        if not self._fs.exists(self._fs_path(group)):
            if missing_ok:
                return
            raise MissingInputError(f"{self.root}: nothing stored for visit={visit}, "
                                    f"detector={detector}")
        self._fs.rm(self._fs_path(group), recursive=True)

    def purge_incomplete(self) -> list[str]:
        """Remove the hidden temporary/backup groups left by interrupted writers.

        Call it only while no writer is active (their temporary groups would
        be removed too).

        Returns
        -------
        list of str
            The group paths removed.
        """
        removed = []
        for visit_dir in self._child_dirs(self._root_path):
            if not _VISIT_DIR.match(visit_dir):
                continue
            for entry in self._child_dirs(self._fs_path(visit_dir)):
                if _HIDDEN_DETECTOR.match(entry):
                    self._fs.rm(self._fs_path(f"{visit_dir}/{entry}"), recursive=True)
                    removed.append(f"{visit_dir}/{entry}")
        return removed
