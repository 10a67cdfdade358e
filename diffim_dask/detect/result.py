"""The result of :func:`~diffim_dask.detect.detect_and_measure`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..exposure import Exposure
from ..schema import validate_catalog
from .background import BackgroundModel
from .streaks import Streak

__all__ = ["DetectionResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionResult:
    """DIA sources and the products of their detection.

    Attributes
    ----------
    catalog : pandas.DataFrame
        One row per DIA source (sky sources included, ``isSky`` True), with
        exactly the columns of :data:`diffim_dask.schema.DIA_SOURCE_SCHEMA`.
    difference : Exposure
        The difference image, background subtracted, with DETECTED,
        DETECTED_NEGATIVE, STREAK and EDGE set (numpy-backed).
    background : BackgroundModel or None
        The subtracted background (None when background removal is disabled).
    score : Exposure or None
        The background-subtracted score image with the detection planes, for
        the score variant.
    footprints : numpy.ndarray of int32
        Label image: pixel value ``k > 0`` belongs to the footprint of
        ``catalog.iloc[k - 1]``; 0 is no source (removed sources included).
    streaks : list of Streak
        Streaks masked in the STREAK plane.
    metadata : dict
        Counts and metrics (see :func:`~diffim_dask.detect.detect_and_measure`).
    """

    catalog: pd.DataFrame
    difference: Exposure
    background: BackgroundModel | None
    score: Exposure | None
    footprints: np.ndarray
    streaks: list[Streak]
    metadata: dict[str, Any]

    def to_arrow(self) -> pa.Table:
        """The catalog as a schema-validated :class:`pyarrow.Table`."""
        return validate_catalog(self.catalog)

    def __len__(self) -> int:
        return len(self.catalog)
