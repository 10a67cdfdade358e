"""Visit manifests: which science exposures a survey run processes.

A manifest is a YAML file (or CSV with the same columns) listing one entry per
(visit, detector)::

    science:
      - {visit: 1, detector: 0, path: science.zarr}          # a Zarr ExposureStore
      - {visit: 2, detector: 5, path: raw/v2_d5.fits,        # any FITS the readers accept
         psf: raw/v2_d5_psf.fits}                            # optional PSF stamp

Relative paths are relative to the manifest's folder; absolute paths and
fsspec URLs (``s3://...``, ``memory://...``) are used as they are. A path
ending in ``.zarr`` (or a directory) is an :class:`~diffim_dask.io.ExposureStore`
opened at the entry's (visit, detector); anything else is read with
:func:`~diffim_dask.io.read_exposure`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import yaml

from ..errors import ConfigurationError

__all__ = ["ManifestEntry", "load_manifest", "resolve_path"]


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One science exposure to process."""

    visit: int
    detector: int
    path: str
    psf: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        """``(visit, detector)``."""
        return (self.visit, self.detector)

    @property
    def is_store(self) -> bool:
        """Whether ``path`` is a Zarr exposure store."""
        return self.path.rstrip("/").endswith(".zarr") or (
            "://" not in self.path and os.path.isdir(self.path))


def resolve_path(value: str, base: Path) -> str:
    """Make ``value`` absolute relative to ``base`` unless it is absolute or a URL."""
    if "://" in value or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def _entries_from_rows(rows, base: Path, source: str) -> list[ManifestEntry]:
    entries = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ConfigurationError(f"{source}: entry {number} is not a mapping")
        missing = [k for k in ("visit", "detector", "path") if row.get(k) in (None, "")]
        if missing:
            raise ConfigurationError(f"{source}: entry {number} lacks {', '.join(missing)}")
        unknown = set(row) - {"visit", "detector", "path", "psf", "band"}
        if unknown:
            raise ConfigurationError(f"{source}: entry {number} has unknown key(s) {sorted(unknown)}")
        try:
            visit, detector = int(row["visit"]), int(row["detector"])
        except (TypeError, ValueError):
            raise ConfigurationError(f"{source}: entry {number}: visit and detector must be integers") from None
        psf = row.get("psf") or None
        entries.append(ManifestEntry(visit, detector, resolve_path(str(row["path"]), base),
                                     resolve_path(str(psf), base) if psf else None))
    keys = [e.key for e in entries]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigurationError(f"{source}: duplicate (visit, detector) entries {duplicates}")
    if not entries:
        raise ConfigurationError(f"{source}: the manifest lists no science exposures")
    return entries


def load_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a YAML or CSV manifest.

    Raises
    ------
    ConfigurationError
        If the file is missing or malformed (message names the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"manifest {path} does not exist")
    base = path.resolve().parent
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: invalid YAML: {exc}") from None
        rows = data.get("science") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ConfigurationError(f"{path}: expected a 'science:' list of entries")
    return _entries_from_rows(rows, base, str(path))
