"""Error types of the I/O layer."""

from __future__ import annotations

from ..errors import BadInputDataError

__all__ = ["MissingInputError"]


class MissingInputError(BadInputDataError, FileNotFoundError):
    """A required input (file, companion file or store entry) does not exist.

    It is a :class:`~diffim_dask.errors.BadInputDataError` — the workflow
    records the unit as bad data and never retries it — and also a
    :class:`FileNotFoundError`, so ordinary ``except FileNotFoundError`` code
    catches it too. The message names the missing path.
    """
