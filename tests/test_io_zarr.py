"""Zarr exposure store: round trips, listing, laziness, crash atomicity, fsspec URLs, real data."""

from __future__ import annotations

import re
import uuid

import dask
import numpy as np
import pytest
import xarray as xr

from diffim_dask.errors import BadInputDataError
from diffim_dask.io import ExposureStore, MissingInputError, read_exposure, write_exposure_fits
from diffim_dask.io._testing import assert_exposures_equal, make_test_exposure
from diffim_dask.io.zarr_store import COMPLETE_MARKER
from diffim_dask.psf import GaussianPsf, ImagePsf

DECAM_FRAMES = [f"DEC-OBS{group}{letter}.mini.fits" for group in ("04", "18") for letter in "abcde"]
ZTF_ALERTS = ["ZTF18aaxjdyr_1661382530015060001", "ZTF18aagtxsh_396522680015040002",
              "ZTF18aaxjlwy_472263571115090000"]


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("pixels were computed although only metadata was asked for")


@pytest.fixture
def store(tmp_path):
    return ExposureStore(tmp_path / "exposures.zarr", chunk_size=32)


@pytest.mark.parametrize("psf", ["gaussian", "image", None])
@pytest.mark.parametrize("wcs", ["sip", None])
def test_round_trip_is_lossless(store, rng, psf, wcs):
    if psf == "image":
        psf = ImagePsf(GaussianPsf(2.2, ellipticity=0.2).image(size=17))
    exposure = make_test_exposure(rng, shape=(70, 45), psf=psf, wcs=wcs)
    group = store.write(exposure)
    assert group == "visit=123456/detector=42"
    assert_exposures_equal(store.open(123456, 42), exposure)


def test_dask_backed_exposure_is_written_chunk_by_chunk(store, rng):
    exposure = make_test_exposure(rng, shape=(70, 45)).chunk((25, 20))    # irregular vs stored
    store.write(exposure)
    restored = store.open(123456, 42)
    assert restored.image.data.chunks == ((32, 32, 6), (32, 13))
    assert_exposures_equal(restored, exposure.compute())


def test_open_is_lazy(store, rng):
    exposure = make_test_exposure(rng, shape=(70, 45))
    store.write(exposure)
    with dask.config.set(scheduler=_refuse_to_compute):
        lazy = store.open(123456, 42, chunks=(64, 32))
        assert lazy.is_lazy
        assert lazy.image.data.chunks == ((64, 6), (32, 13))
        assert lazy.shape == exposure.shape and lazy.origin == exposure.origin
        assert lazy.info.visit == 123456 and lazy.psf.fwhm() == exposure.psf.fwhm()
        ra, dec = lazy.pixel_to_sky(40.0, -5.0)
        assert np.allclose([ra, dec], exposure.pixel_to_sky(40.0, -5.0), rtol=0, atol=1e-9)
        with pytest.raises(AssertionError, match="pixels were computed"):
            lazy.image.sum().compute()
    assert_exposures_equal(lazy, exposure)


def test_list_exists_delete_overwrite(store, rng):
    assert store.list() == [] and not store.exists(1, 2)
    for visit, detector in [(30, 2), (4, 17), (30, 1), (100, 0)]:
        store.write(make_test_exposure(rng, visit=visit, detector=detector))
    assert store.list() == [(4, 17), (30, 1), (30, 2), (100, 0)]
    assert store.exists(30, 2) and not store.exists(30, 3)
    replacement = make_test_exposure(rng, visit=30, detector=2, origin=(0, 0))
    with pytest.raises(FileExistsError, match=re.escape("visit=30/detector=2")):
        store.write(replacement)
    store.write(replacement, overwrite=True)
    assert_exposures_equal(store.open(30, 2), replacement)
    store.delete(30, 2)
    assert not store.exists(30, 2) and store.list() == [(4, 17), (30, 1), (100, 0)]
    with pytest.raises(MissingInputError, match="visit=30, detector=2"):
        store.delete(30, 2)
    store.delete(30, 2, missing_ok=True)
    with pytest.raises(MissingInputError, match="visit=30, detector=2") as caught:
        store.open(30, 2)
    assert isinstance(caught.value, FileNotFoundError)


def _crash_after_data(monkeypatch):
    """Let the pixel data reach the store, then fail before the write is complete."""
    original = xr.Dataset.to_zarr

    def to_zarr(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise OSError("connection lost (simulated crash mid-write)")

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr)


def test_failed_write_is_invisible(store, rng, monkeypatch):
    _crash_after_data(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        store.write(make_test_exposure(rng))
    assert store.list() == [] and not store.exists(123456, 42)
    with pytest.raises(MissingInputError):
        store.open(123456, 42)
    assert store.purge_incomplete() == []            # the writer cleaned up after itself


def test_failed_overwrite_keeps_previous_version(store, rng, monkeypatch):
    previous = make_test_exposure(rng)
    store.write(previous)
    _crash_after_data(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        store.write(make_test_exposure(rng), overwrite=True)
    monkeypatch.undo()
    assert store.list() == [(123456, 42)]
    assert_exposures_equal(store.open(123456, 42), previous)


def test_killed_writer_leaves_nothing_readable(store, rng, monkeypatch):
    """A killed process runs no clean-up: its hidden group must still never read as complete."""
    def killed(self, group):
        raise KeyboardInterrupt

    monkeypatch.setattr(ExposureStore, "_discard", lambda self, group: None)
    monkeypatch.setattr(ExposureStore, "_mark_complete", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write(make_test_exposure(rng))
    monkeypatch.undo()
    assert store.list() == [] and not store.exists(123456, 42)
    leftovers = store.purge_incomplete()
    assert len(leftovers) == 1 and re.match(r"visit=123456/\.detector=42\.tmp-", leftovers[0])


def test_incomplete_group_at_final_name_is_ignored_and_replaced(store, rng):
    exposure = make_test_exposure(rng)
    # A group with data but without the completion marker (e.g. a copy interrupted on an
    # object store) sits at the final name.
    exposure.to_xarray().to_zarr(store.root, group="visit=123456/detector=42", mode="w",
                                 consolidated=False)
    assert not store.exists(123456, 42) and store.list() == []
    with pytest.raises(MissingInputError):
        store.open(123456, 42)
    store.write(exposure)                             # not "already exists": it was incomplete
    assert store.list() == [(123456, 42)]
    assert_exposures_equal(store.open(123456, 42), exposure)


def test_not_an_exposure_group(store):
    bogus = xr.Dataset({"image": (("y", "x"), np.zeros((3, 3), np.float32))},
                       attrs={COMPLETE_MARKER: True})
    bogus.to_zarr(store.root, group="visit=1/detector=1", mode="w", consolidated=False)
    with pytest.raises(BadInputDataError, match="lacks plane"):
        store.open(1, 1)


def test_fsspec_memory_url(rng):
    store = ExposureStore(f"memory://diffim-test-{uuid.uuid4().hex}/store.zarr", chunk_size=32)
    exposure = make_test_exposure(rng)
    store.write(exposure)
    store.write(exposure, overwrite=True)
    assert store.list() == [(123456, 42)]
    restored = store.open(123456, 42)
    assert restored.is_lazy
    assert_exposures_equal(restored, exposure)
    store.delete(123456, 42)
    assert store.list() == []


@pytest.mark.realdata
def test_decam_frames_through_store(decam_dir, tmp_path):
    store = ExposureStore(tmp_path / "decam.zarr", chunk_size=128)
    originals = {}
    for name in DECAM_FRAMES:
        exposure = read_exposure(decam_dir / name)
        originals[(exposure.info.visit, exposure.info.detector)] = exposure
        store.write(exposure)
    assert store.list() == sorted(originals)
    for key, original in originals.items():
        restored = store.open(*key)
        assert restored.image.data.chunks == ((128, 128), (128, 128))
        assert_exposures_equal(restored, original)
        # and on through FITS: Zarr → MEF → exposure is still lossless
        path = tmp_path / f"{key[0]}.fits"
        write_exposure_fits(restored, path)
        assert_exposures_equal(read_exposure(path), original)


@pytest.mark.realdata
@pytest.mark.parametrize("alert", ZTF_ALERTS)
def test_ztf_stamps_through_store(ztf_dir, tmp_path, alert):
    # sci, ref and diff share the alert's candid (visit) and rcid: one store per product.
    for kind in ("sci", "ref", "diff"):
        exposure = read_exposure(ztf_dir / f"{alert}_{kind}.fits")
        store = ExposureStore(tmp_path / f"{kind}.zarr")
        store.write(exposure)
        assert store.list() == [(exposure.info.visit, exposure.info.detector)]
        assert_exposures_equal(store.open(exposure.info.visit, exposure.info.detector), exposure)
