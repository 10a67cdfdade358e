"""Removal of unusable DIA sources, with counts of what each rule removed.

Two stages, as the anchor (§8.2 steps 7 and 9):

* before measurement, detections whose peak pixel lies in one of
  ``reject_peak_planes`` (NO_DATA, BAD, SAT, EDGE) are dropped;
* after measurement, sources with any flag in ``drop_flags`` (centroid off
  the image, interpolated in all 3x3 central pixels, bad / edge / no-data /
  saturated / saturated-in-template within the 3x3 central pixels) are
  removed. Sky sources are never removed.

A source can carry several flags; ``counts[flag]`` is the number of
(non-sky) sources carrying each flag, ``n_removed`` the number removed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..masks import mask_value

__all__ = ["reject_peaks", "drop_flagged"]


def reject_peaks(mask: np.ndarray, peak_y: np.ndarray, peak_x: np.ndarray, planes) -> np.ndarray:
    """Boolean array: True for the detections to keep (peak pixel not in ``planes``)."""
    if not planes or peak_y.size == 0:
        return np.ones(peak_y.size, dtype=bool)
    return (mask[peak_y, peak_x] & np.uint32(mask_value(planes))) == 0


def drop_flagged(catalog: pd.DataFrame, drop_flags) -> tuple[np.ndarray, dict[str, int], int]:
    """Rows to keep, per-flag counts and the number removed.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Measured sources with the flag columns and ``isSky``.
    drop_flags : sequence of str
        Flag columns that remove a source.

    Returns
    -------
    keep : numpy.ndarray of bool
    counts : dict
        Flag -> number of non-sky sources with that flag.
    n_removed : int
    """
    n = len(catalog)
    sky = catalog["isSky"].to_numpy(dtype=bool) if n else np.zeros(0, bool)
    remove = np.zeros(n, dtype=bool)
    counts = {}
    for flag in drop_flags:
        flagged = catalog[flag].to_numpy(dtype=bool) & ~sky
        counts[flag] = int(flagged.sum())
        remove |= flagged
    return ~remove, counts, int(remove.sum())
