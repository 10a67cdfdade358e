"""Atomic file output: write a temporary file beside the target, then rename it into place.

A reader (or a crash) never sees a half-written file at the target path: the
data go to ``.<name>.<random>.tmp`` in the same directory (same file system, so
the final rename is atomic), are flushed to disk, and only then take the
target's name. Without ``overwrite`` the final step is a hard link, which fails
atomically if the target appeared meanwhile; file systems without hard links
fall back to check-then-rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator

__all__ = ["atomic_output_path"]


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_without_overwrite(temporary: str, path: str) -> None:
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
        os.replace(temporary, path)
        return
    os.unlink(temporary)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path to write to; publish it at ``path`` on success.

    Parameters
    ----------
    path : str or os.PathLike
        Final location.
    overwrite : bool
        Replace an existing file (atomically). Otherwise an existing target
        raises :class:`FileExistsError`, before and after writing.

    Yields
    ------
    str
        A path in the target's directory that does not exist yet.

    Notes
    -----
    If the body raises, the temporary file is removed and ``path`` is left as
    it was (absent, or the previous complete version).
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
        _fsync_file(temporary)
        if overwrite:
            os.replace(temporary, path)
        else:
            _publish_without_overwrite(temporary, path)
        _fsync_directory(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
