"""Shared fixtures: the real-data location (overridable) and seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

#: Real test images live beside the repository in ../shared/data; DIFFIM_DASK_DATA overrides.
_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_DIR = Path(os.environ.get("DIFFIM_DASK_DATA", _DEFAULT_DATA))


def _data_subdir(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found (set DIFFIM_DASK_DATA to the shared data "
                    f"directory to run this test)")
    return path


@pytest.fixture(scope="session")
def decam_dir() -> Path:
    """``decam-sfft/``: ten DECam i-band frames (256x256), two stacks, a peer difference."""
    return _data_subdir("decam-sfft")


@pytest.fixture(scope="session")
def ztf_dir() -> Path:
    """``ztf-alert-stamps/``: 13 ZTF alert triplets and ``manifest.csv``."""
    return _data_subdir("ztf-alert-stamps")


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator; tests must be deterministic."""
    return np.random.default_rng(20261124)
