"""Where a survey run writes: a local directory or an fsspec URL, written atomically either way.

Every output of a run (catalog parts, unit records, run summary, provenance,
injection truth, difference and score images) goes through :class:`OutputTree`,
which gives the same guarantee on both kinds of storage: a reader never sees a
partially written file under its final name.

* **Local directory** (or ``file://``): a temporary file beside the target,
  then POSIX ``rename`` (:func:`diffim_dask.io.atomic_output_path`).
* **Object store** (``s3://``, ``gs://``, ``memory://`` ...): there is no
  rename, but one PUT of a whole object is atomic. Each file is therefore
  serialised completely in memory (or, for a Zarr group, into a local
  temporary directory) and uploaded with one put under its deterministic name.

Zarr exposure groups (``difference.zarr``, ``score.zarr``) are many objects.
Their completeness marker lives in the group's own ``zarr.json``
(:data:`diffim_dask.io.zarr_store.COMPLETE_MARKER`), which
:class:`~diffim_dask.io.ExposureStore` consults before it reads anything. On an
object store the group is written locally first, the stale marker of a
previous version is removed, every chunk and array metadata object is
uploaded, and the group's ``zarr.json`` goes up last: until that final put the
group reads as incomplete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["OutputTree", "json_default"]


def json_default(value):
    """``json.dumps`` fallback for numpy scalars and arrays (anything else: ``str``)."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class OutputTree:
    """The output location of a run: a local directory or an fsspec URL.

    Parameters
    ----------
    out : str or os.PathLike
        Local path, ``file://`` URL or any fsspec URL (``s3://bucket/run``,
        ``memory://run``...). Remote protocols need their fsspec backend
        installed (``s3fs`` for ``s3://``: the ``[s3]`` extra).

    Notes
    -----
    Relative names (``rel``) always use ``/`` and never leave the root: every
    write of a run stays under ``out``.
    """

    def __init__(self, out: str | os.PathLike):
        text = os.fspath(out)
        try:
            self.fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as exc:
            from ..errors import ConfigurationError

            raise ConfigurationError(f"output location {text}: {exc} (for s3:// install the "
                                     f"[s3] extra: pip install 'diffim-dask[s3]')") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).resolve()) if self.is_local else root.rstrip("/")
        #: What to show users and to pass on to workers: a plain path when local, else the URL.
        self.location = self.root if self.is_local else text.rstrip("/")

    def __repr__(self) -> str:
        return f"OutputTree({self.location!r})"

    def __reduce__(self):
        # Workers rebuild the file system from the location instead of unpickling a client.
        return (OutputTree, (self.location,))

    # -- names -----------------------------------------------------------------------------

    @staticmethod
    def _check(rel: str) -> str:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"output name {rel!r} must be a relative path without '.' or '..'")
        return rel

    def path(self, rel: str) -> str:
        """File-system path of ``rel`` (for the tree's ``fs``)."""
        return f"{self.root}/{self._check(rel)}"

    def local_path(self, rel: str = "") -> Path:
        """``pathlib.Path`` of ``rel`` on a local tree (``ValueError`` on a remote one)."""
        if not self.is_local:
            raise ValueError(f"{self.location} is not a local directory")
        return Path(self.root) / rel if rel else Path(self.root)

    def url(self, rel: str) -> str:
        """Path (local) or URL (remote) of ``rel``, e.g. to open it with other libraries."""
        return f"{self.location}/{self._check(rel)}"

    # -- reading ---------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` exists."""
        return self.fs.isfile(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        """Content of ``rel``, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any:
        """Parsed JSON of ``rel``; None when missing or unreadable (e.g. truncated by a crash)."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None

    # -- writing ---------------------------------------------------------------------------

    def makedirs(self) -> None:
        """Create the root (a no-op on object stores, which have no directories)."""
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Publish ``data`` under ``rel`` atomically (rename locally, one PUT remotely).

        Returns the written path or URL.
        """
        if self.is_local:
            from ..io import atomic_output_path

            target = self.local_path(self._check(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output_path(target, overwrite=True) as temporary:
                Path(temporary).write_bytes(data)
        else:
            self.fs.pipe_file(self.path(rel), data)
        return self.url(rel)

    def write_json(self, rel: str, data: dict[str, Any]) -> str:
        """Publish ``data`` as indented JSON under ``rel`` (see :meth:`write_bytes`)."""
        return self.write_bytes(rel, json.dumps(data, indent=1, default=json_default).encode())

    def upload_file(self, local: str | os.PathLike, rel: str) -> str:
        """Publish a complete local file under ``rel`` (one put; a rename on local trees)."""
        if self.is_local:
            from ..io import atomic_output_path

            target = self.local_path(self._check(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output_path(target, overwrite=True) as temporary:
                with open(local, "rb") as source, open(temporary, "wb") as sink:
                    while chunk := source.read(1 << 22):
                        sink.write(chunk)
        else:
            self.fs.put_file(os.fspath(local), self.path(rel))
        return self.url(rel)

    def write_exposure(self, store: str, exposure, *, chunk_size: int) -> str:
        """Write an exposure into the Zarr :class:`~diffim_dask.io.ExposureStore` ``store``.

        Locally the store's own atomic protocol applies (temporary group, then
        rename). Remotely the group is written to a local temporary store and
        uploaded with its ``zarr.json`` (completeness marker) last; see the
        module notes.

        Returns
        -------
        str
            The group's path inside the store (``visit=V/detector=D``).
        """
        from ..io import ExposureStore

        if self.is_local:
            return ExposureStore(self.local_path(self._check(store)), chunk_size=chunk_size).write(
                exposure, overwrite=True)
        with tempfile.TemporaryDirectory(prefix="diffim-dask-stage-") as staging:
            local = ExposureStore(Path(staging) / "store.zarr", chunk_size=chunk_size)
            group = local.write(exposure, overwrite=True)
            self._upload_group(Path(staging) / "store.zarr", store, group)
        return group

    def _upload_group(self, local_root: Path, store: str, group: str) -> None:
        marker = f"{group}/zarr.json"
        target = f"{store}/{group}"
        # A previous version's marker goes first, so a reader never takes a half-replaced
        # group (old marker, some new chunks) for a complete one.
        if self.fs.isfile(self.path(f"{target}/zarr.json")):
            self.fs.rm_file(self.path(f"{target}/zarr.json"))
        files = sorted(p.relative_to(local_root).as_posix() for p in local_root.rglob("*") if p.is_file())
        # Parent group metadata (identical for every unit) and the arrays first; the marker last.
        for rel in [f for f in files if f != marker] + [marker]:
            self.fs.put_file(str(local_root / rel), self.path(f"{store}/{rel}"))
