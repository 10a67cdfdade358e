"""Classified errors for diffim_dask.

Every failure a pipeline stage can meet falls in one of five classes, and the
workflow layer treats each class differently:

==========================  ===========================  ==================
class                       meaning                      workflow action
==========================  ===========================  ==================
:class:`NoWorkFound`        nothing to do here           skip and record
:class:`BadInputDataError`  the input data are unusable  record, no retry
:class:`AlgorithmError`     an algorithm could not       record with its
                            produce a valid result       ``metadata``
:class:`ConfigurationError` the configuration is wrong   fail fast
:class:`TransientIOError`   I/O that may succeed later   Dask retries
==========================  ===========================  ==================

Dask's ``retries=`` retries on *any* exception, so tasks catch everything but
:class:`TransientIOError` themselves and return a failure record instead.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DiffimError",
    "NoWorkFound",
    "BadInputDataError",
    "AlgorithmError",
    "ConfigurationError",
    "TransientIOError",
    "InsufficientKernelSourcesError",
    "BadSubtractionError",
    "classify_error",
]


class DiffimError(Exception):
    """Base class of every error raised on purpose by diffim_dask."""

    #: Short machine-readable class name used in run summaries.
    category = "error"
    #: Whether a Dask retry could make this error go away.
    retryable = False


class NoWorkFound(DiffimError):
    """There is nothing to do (e.g. no template covers the detector).

    Not a failure: the workflow records the reason and skips the unit.
    """

    category = "skipped"


class BadInputDataError(DiffimError):
    """The input data are unusable (corrupt file, all-NaN image, bad WCS...).

    Recorded and never retried: the same data would fail again.
    """

    category = "bad_data"


class AlgorithmError(DiffimError):
    """An algorithm ran on valid data but could not produce a valid result.

    Parameters
    ----------
    message : str
        What went wrong and, where possible, what to change.
    metadata : dict, optional
        Numbers that explain the failure (counts, thresholds, statistics).
        They are written to the run summary.
    """

    category = "algorithm"

    def __init__(self, message: str, metadata: dict[str, Any] | None = None):
        super().__init__(message)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __reduce__(self):
        # Keep metadata when the error travels between Dask processes.
        return (type(self), (str(self), self.metadata))


class ConfigurationError(DiffimError, ValueError):
    """The configuration is invalid; fail fast before any work starts."""

    category = "config"


class TransientIOError(DiffimError, OSError):
    """An I/O error that may succeed on retry (network, lost worker, busy store)."""

    category = "transient"
    retryable = True


class InsufficientKernelSourcesError(AlgorithmError):
    """Too few usable sources to constrain the PSF-matching kernel."""


class BadSubtractionError(AlgorithmError):
    """The difference image fails the residual quality gate."""


def classify_error(exc: BaseException) -> str:
    """Return the run-summary category of an exception.

    Parameters
    ----------
    exc : BaseException
        Any exception.

    Returns
    -------
    str
        One of ``"skipped"``, ``"bad_data"``, ``"algorithm"``, ``"config"``,
        ``"transient"`` or ``"unexpected"`` (anything not raised on purpose,
        i.e. a bug).
    """
    if isinstance(exc, DiffimError):
        return exc.category
    return "unexpected"
