"""Visit manifests: which science exposures a survey run processes.

A manifest is a YAML file (or CSV with the same columns) listing one entry per
(visit, detector)::

    science:
      - {visit: 1, detector: 0, path: science.zarr}          # a Zarr ExposureStore
      - {visit: 2, detector: 5, path: raw/v2_d5.fits,        # any FITS the readers accept
         psf: raw/v2_d5_psf.fits}                            # optional PSF stamp

The manifest itself may be a local file or an fsspec URL. Relative paths are
relative to the manifest's folder (or URL "folder"); absolute paths and
fsspec URLs (``s3://...``, ``gs://...``, ``file://...``, ``memory://...``) are
used as they are. A path ending in ``.zarr`` (or a local directory) is an
:class:`~diffim_dask.io.ExposureStore` opened at the entry's (visit, detector),
through fsspec for URLs; anything else is a FITS file read with
:func:`~diffim_dask.io.read_exposure` (a URL is first copied to a local
temporary file, since the FITS readers need a seekable local file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

import yaml

from ..errors import ConfigurationError

__all__ = ["ManifestEntry", "load_manifest", "resolve_path", "is_url"]


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``protocol://...``) rather than a local path."""
    return "://" in str(path)


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
            not is_url(self.path) and os.path.isdir(self.path))


def resolve_path(value: str, base: Path | str) -> str:
    """Make ``value`` absolute relative to ``base`` unless it is absolute or a URL.

    ``base`` is a local folder or a URL prefix (``s3://bucket/survey``).
    """
    if is_url(value) or os.path.isabs(value):
        return value
    if is_url(str(base)):
        import posixpath

        protocol, rest = str(base).split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, value))}"
    return str((Path(base) / value).resolve())


def _entries_from_rows(rows, base: Path | str, source: str) -> list[ManifestEntry]:
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


def _read_manifest_text(path: str | Path) -> tuple[str, Path | str]:
    """The manifest's text and the base for its relative paths."""
    if is_url(str(path)):
        import fsspec

        url = str(path)
        try:
            fs, fs_path = fsspec.core.url_to_fs(url)
            text = fs.cat_file(fs_path).decode()
        except FileNotFoundError:
            raise ConfigurationError(f"manifest {url} does not exist") from None
        except (ImportError, ValueError, OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"manifest {url}: cannot read it ({type(exc).__name__}: {exc})") from None
        return text, url.rsplit("/", 1)[0]
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"manifest {path} does not exist")
    return path.read_text(), path.resolve().parent


def load_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a YAML or CSV manifest (a local file or an fsspec URL).

    Raises
    ------
    ConfigurationError
        If the file is missing or malformed (message names the entry).
    """
    text, base = _read_manifest_text(path)
    if str(path).lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: invalid YAML: {exc}") from None
        rows = data.get("science") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ConfigurationError(f"{path}: expected a 'science:' list of entries")
    return _entries_from_rows(rows, base, str(path))
