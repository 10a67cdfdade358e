"""Assertions shared by the workflow tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def assert_same_catalog(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Two DIA-source catalogs hold the same rows in the same order (floats to 1e-5)."""
    assert list(a["diaSourceId"]) == list(b["diaSourceId"])
    for column in a.columns:
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True, err_msg=column)
        else:
            assert (a[column].to_numpy() == b[column].to_numpy()).all(), column
