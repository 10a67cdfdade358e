"""Coadd store: round trips, listing per band and sub-band, laziness, sky-map and geometry checks."""

from __future__ import annotations

import copy
import uuid

import dask
import numpy as np
import pytest

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.exposure import Exposure, PhotoCalib, VisitInfo
from diffim_dask.io import MissingInputError
from diffim_dask.psf import GaussianPsf
from diffim_dask.template import CoaddStore, RingsSkyMap, SkyMapConfig

SKYMAP = RingsSkyMap(SkyMapConfig(n_rings=3600, patch_inner_size=64, patch_border=8,
                                  tract_overlap=20.0 / 3600.0))
TRACT = SKYMAP.find_tract(150.0, 2.0)


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("pixels were computed although only metadata was asked for")


def _patch_exposure(rng, patch_id=0, band="r", wcs=None, origin=None, shape=None, zero_point=32.0):
    patch = SKYMAP.tract(TRACT).patch(patch_id)
    shape = patch.shape if shape is None else shape
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    variance = np.full(shape, 1.0, dtype=np.float32)
    mask = (rng.random(shape) < 0.01).astype(np.uint32)
    return Exposure.from_arrays(image, variance, mask, wcs=patch.wcs if wcs is None else wcs,
                                psf=GaussianPsf(2.5), photo_calib=PhotoCalib(zero_point),
                                info=VisitInfo(band=band, instrument="SimCam-coadd"),
                                origin=patch.origin if origin is None else origin)


@pytest.fixture
def store(tmp_path):
    return CoaddStore(tmp_path / "templates.zarr", SKYMAP, chunk_size=32)


def test_round_trip_listing_and_laziness(store, rng):
    written = {}
    for band, patch_id in (("r", 0), ("r", 4), ("g", 4)):
        exposure = _patch_exposure(rng, patch_id, band)
        store.write(exposure, band, TRACT, patch_id)
        written[band, patch_id] = exposure
    assert store.bands() == ["g", "r"]
    assert store.patches("r") == [(TRACT, 0), (TRACT, 4)] and store.patches("g") == [(TRACT, 4)]
    assert store.exists("r", TRACT, 4) and not store.exists("g", TRACT, 0)
    with dask.config.set(scheduler=_refuse_to_compute):
        lazy = store.open("r", TRACT, 4)
        assert lazy.is_lazy and lazy.image.data.chunks == ((32, 32, 16), (32, 32, 16))
        assert lazy.origin == SKYMAP.tract(TRACT).patch(4).origin
        assert lazy.info.band == "r" and lazy.info.visit == -1 and lazy.psf.fwhm() == 2.5
    for (band, patch_id), exposure in written.items():
        image, variance, mask = store.open(band, TRACT, patch_id).arrays()
        expected = exposure.arrays()
        for got, want in zip((image, variance, mask), expected):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(FileExistsError):
        store.write(written["r", 0], "r", TRACT, 0)
    store.delete("r", TRACT, 0)
    assert store.patches("r") == [(TRACT, 4)]
    with pytest.raises(MissingInputError, match="no complete exposure"):
        store.open("r", TRACT, 0)


def test_dcr_subfilters_are_listed_separately(store, rng):
    for k in range(3):
        store.write(_patch_exposure(rng, 4, "g"), "g", TRACT, 4, subfilter=k)
    assert store.bands() == [] and store.dcr_bands() == ["g"]
    assert store.subfilters("g") == [0, 1, 2] and store.patches("g", subfilter=1) == [(TRACT, 4)]
    assert store.open("g", TRACT, 4, subfilter=2).info.band == "g"


def test_store_carries_its_skymap(store, tmp_path, rng):
    store.write(_patch_exposure(rng), "r", TRACT, 0)
    reopened = CoaddStore(store.root)
    assert reopened.skymap == SKYMAP and reopened.patches("r") == [(TRACT, 0)]
    with pytest.raises(ConfigurationError, match="was built with sky map"):
        CoaddStore(store.root, RingsSkyMap())
    with pytest.raises(MissingInputError, match="skymap.yaml"):
        CoaddStore(tmp_path / "empty.zarr")
    url = f"memory://templates-{uuid.uuid4().hex}.zarr"
    remote = CoaddStore(url, SKYMAP)
    remote.write(_patch_exposure(rng), "r", TRACT, 0)
    assert CoaddStore(url).patches("r") == [(TRACT, 0)]


def test_write_refuses_patches_off_the_skymap_grid(store, rng):
    patch = SKYMAP.tract(TRACT).patch(0)
    shifted = copy.deepcopy(patch.wcs)
    shifted.wcs.crpix = shifted.wcs.crpix + np.array([0.5, 0.0])
    shifted.wcs.set()
    cases = [
        (dict(wcs=shifted), "inconsistent with the sky map"),
        (dict(origin=(patch.origin[0] + 1, patch.origin[1])), "origin"),
        (dict(shape=(patch.shape[0] - 1, patch.shape[1])), "shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInputDataError, match=rf"tract {TRACT}, patch 0\).*{message}"):
            store.write(_patch_exposure(rng, **kwargs), "r", TRACT, 0)
    with pytest.raises(BadInputDataError, match="'g'-band coadd under band 'r'"):
        store.write(_patch_exposure(rng, band="g"), "r", TRACT, 0)
    with pytest.raises(ConfigurationError, match="band must be"):
        store.write(_patch_exposure(rng, band=""), "r/x", TRACT, 0)
    # Deliberately inconsistent patches can still be written (e.g. to test readers).
    store.write(_patch_exposure(rng, wcs=shifted), "r", TRACT, 0, check_geometry=False)
    assert store.patches("r") == [(TRACT, 0)]
