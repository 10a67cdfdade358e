"""Tests of the core modules: errors, mask planes, config base, Exposure, chunking."""

from __future__ import annotations

import dataclasses
import pickle

import dask.array as da
import numpy as np
import pytest
from astropy.wcs import WCS
from scipy import ndimage

import diffim_dask as dd
from diffim_dask.chunking import halo_for_kernels, map_overlap_2d, normalize_chunks
from diffim_dask.config import ConfigBase, config_field, describe_config
from diffim_dask.errors import classify_error
from diffim_dask.masks import MASK_DESCRIPTIONS, MASK_PLANES, describe_mask, mask_bit

# --------------------------------------------------------------------------- errors


def test_error_categories():
    assert classify_error(dd.NoWorkFound("no template")) == "skipped"
    assert classify_error(dd.BadInputDataError("all NaN")) == "bad_data"
    assert classify_error(dd.AlgorithmError("failed", {"n": 2})) == "algorithm"
    assert classify_error(dd.ConfigurationError("bad key")) == "config"
    assert classify_error(dd.TransientIOError("timeout")) == "transient"
    assert classify_error(KeyError("x")) == "unexpected"
    assert dd.TransientIOError.retryable and not dd.BadInputDataError.retryable
    assert isinstance(dd.InsufficientKernelSourcesError("few", {}), dd.AlgorithmError)


def test_algorithm_error_metadata_survives_pickle():
    err = dd.InsufficientKernelSourcesError("only 2 stars", {"n_sources": 2, "n_required": 3})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is dd.InsufficientKernelSourcesError
    assert back.metadata == {"n_sources": 2, "n_required": 3}
    assert str(back) == "only 2 stars"


# --------------------------------------------------------------------------- masks


def test_mask_table_has_required_planes_in_one_place():
    required = ["BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA",
                "SUSPECT", "HIGH_VARIANCE", "STREAK", "SAT_TEMPLATE"]
    for name in required:
        assert name in MASK_PLANES and MASK_DESCRIPTIONS[name]
    bits = list(MASK_PLANES.values())
    assert len(set(bits)) == len(bits) and max(bits) < 32


def test_mask_value_and_plane_set():
    assert dd.mask_value("BAD") == 1
    assert dd.mask_value(["BAD", "SAT"]) == 3
    mask = np.array([[0, 1], [2, 1 << mask_bit("NO_DATA")]], dtype=np.uint32)
    np.testing.assert_array_equal(dd.plane_set(mask, ["BAD", "NO_DATA"]), [[False, True], [False, True]])
    assert describe_mask(3) == ["BAD", "SAT"]
    with pytest.raises(dd.ConfigurationError, match="unknown mask plane 'NOPE'"):
        dd.mask_value("NOPE")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _InnerConfig(ConfigBase):
    order: int = config_field(1, "Polynomial order.", minimum=0, maximum=3)


@dataclasses.dataclass(frozen=True)
class _ExampleConfig(ConfigBase):
    mode: str = config_field("a", "How to run.", choices=("a", "b"))
    sigmas: tuple[float, ...] = config_field((0.7, 1.5), "Widths in pixels.", minimum=0.0,
                                             exclusive_minimum=True)
    threshold: float = config_field(5.0, "Detection threshold in sigma.", minimum=0.0)
    inner: _InnerConfig = config_field(doc="Nested settings.", default_factory=_InnerConfig)


def test_config_validation_and_from_dict():
    cfg = _ExampleConfig.from_dict({"mode": "b", "sigmas": [1, 2], "threshold": 3,
                                    "inner": {"order": 2}})
    assert cfg.mode == "b" and cfg.sigmas == (1.0, 2.0) and cfg.threshold == 3.0
    assert cfg.inner.order == 2
    assert _ExampleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dd.ConfigurationError, match="'c' is not one of"):
        _ExampleConfig(mode="c")
    with pytest.raises(dd.ConfigurationError, match="must be > 0"):
        _ExampleConfig(sigmas=(0.0,))
    with pytest.raises(dd.ConfigurationError, match="unknown key.*inner.ordr"):
        _ExampleConfig.from_dict({"inner": {"ordr": 2}})
    with pytest.raises(dd.ConfigurationError, match="unknown key.*thresh"):
        _ExampleConfig.from_dict({"thresh": 2})
    with pytest.raises(dd.ConfigurationError, match="inner.*must be <= 3"):
        _ExampleConfig.from_dict({"inner": {"order": 4}})
    with pytest.raises(dd.ConfigurationError, match="not of type"):
        _ExampleConfig(threshold="high")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "a"
    assert cfg.replace(mode="a").mode == "a"
    text = describe_config(_ExampleConfig)
    assert "Detection threshold in sigma." in text and "choices=['a', 'b']" in text


def test_config_field_requires_doc():
    with pytest.raises(TypeError, match="doc"):
        config_field(1)


# --------------------------------------------------------------------------- exposure


def _wcs(shape=(60, 80)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return wcs


def _exposure(rng, chunks=None):
    image = rng.normal(size=(60, 80))
    variance = np.full((60, 80), 1.5)
    mask = np.zeros((60, 80), dtype=np.uint32)
    mask[5, 7] = dd.mask_value("SAT")
    info = dd.VisitInfo(visit=12, detector=3, band="r", mjd=60000.5, exposure_time=30.0, gain=1.7)
    return dd.Exposure.from_arrays(image, variance, mask, wcs=_wcs(), psf=dd.GaussianPsf(3.0),
                                   photo_calib=dd.PhotoCalib(28.0), info=info, chunks=chunks)


def test_exposure_planes_and_dtypes(rng):
    exp = _exposure(rng)
    assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32
    assert exp.mask.dtype == np.uint32 and exp.image.dims == ("y", "x")
    assert exp.shape == (60, 80) and exp.origin == (0, 0) and not exp.is_lazy
    big_endian = np.ones((4, 5), dtype=">f8")
    assert dd.Exposure.from_arrays(big_endian).image.dtype.byteorder in ("=", "<", "|")


def test_exposure_rejects_mismatched_planes():
    with pytest.raises(dd.BadInputDataError, match="variance plane has shape"):
        dd.Exposure.from_arrays(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(dd.BadInputDataError, match="must be 2-D"):
        dd.Exposure.from_arrays(np.zeros(5))


def test_exposure_stays_lazy(rng):
    exp = _exposure(rng, chunks=32)
    assert exp.is_lazy and isinstance(exp.image.data, da.Array)
    cut = exp.cutout(slice(10, 50), slice(20, 40))
    assert cut.is_lazy and cut.origin == (10, 20) and cut.shape == (20, 40)
    ds = exp.to_xarray()
    assert isinstance(ds["image"].data, da.Array)
    back = dd.Exposure.from_xarray(ds)
    assert back.is_lazy
    np.testing.assert_array_equal(back.arrays()[0], exp.arrays()[0])


def test_exposure_cutout_keeps_parent_frame(rng):
    exp = _exposure(rng)
    cut = exp.cutout(slice(10, 50), slice(20, 40))
    ra, dec = exp.pixel_to_sky(15.0, 25.0)
    ra_c, dec_c = cut.pixel_to_sky(15.0, 25.0)
    assert ra == ra_c and dec == dec_c
    np.testing.assert_array_equal(cut.arrays()[0], exp.arrays()[0][20:40, 10:50])
    x, y = exp.sky_to_pixel(ra, dec)
    assert abs(x - 15.0) < 1e-8 and abs(y - 25.0) < 1e-8


def test_exposure_xarray_round_trip(rng):
    exp = _exposure(rng)
    back = dd.Exposure.from_xarray(exp.to_xarray())
    for a, b in zip(exp.arrays(), back.arrays()):
        np.testing.assert_array_equal(a, b)
    assert back.info == exp.info and back.photo_calib == exp.photo_calib
    np.testing.assert_allclose(back.psf.image(10, 10), exp.psf.image(10, 10))
    np.testing.assert_allclose(back.wcs.all_pix2world(3.0, 4.0, 0), exp.wcs.all_pix2world(3.0, 4.0, 0))


def test_exposure_nddata_round_trip(rng):
    from astropy.nddata import CCDData, NDData

    exp = _exposure(rng)
    for cls in (CCDData, NDData):
        nd = exp.to_nddata(cls)
        assert isinstance(nd, cls)
        back = dd.Exposure.from_nddata(nd)
        for a, b in zip(exp.arrays(), back.arrays()):
            np.testing.assert_array_equal(a, b)
        assert back.info == exp.info and back.photo_calib == exp.photo_calib
        assert back.psf.fwhm() == pytest.approx(3.0)


def test_exposure_from_plain_nddata_with_inverse_variance():
    from astropy.nddata import InverseVariance, NDData

    data = np.ones((5, 6))
    nd = NDData(data, uncertainty=InverseVariance(np.full((5, 6), 4.0)),
                mask=np.eye(5, 6, dtype=bool), psf=dd.GaussianPsf(2.0).image(size=11))
    exp = dd.Exposure.from_nddata(nd)
    image, variance, mask = exp.arrays()
    np.testing.assert_allclose(variance, 0.25)
    assert (mask[np.eye(5, 6, dtype=bool)] == dd.mask_value("BAD")).all()
    stamp = dd.GaussianPsf(2.0).image(size=11)
    assert exp.psf.fwhm() == pytest.approx(dd.ImagePsf(stamp).fwhm(), rel=1e-6)
    np.testing.assert_allclose(exp.psf.image(), stamp, atol=1e-6)


def test_photo_calib_units():
    calib = dd.PhotoCalib(31.4)
    assert calib.njy_per_count == pytest.approx(1.0)
    calib = dd.PhotoCalib(26.4)
    assert calib.counts_to_njy(1.0) == pytest.approx(100.0)
    assert calib.njy_to_counts(100.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- chunking


def _varying_convolution(block, offset, kernel):
    yy, xx = np.mgrid[0:block.shape[0], 0:block.shape[1]]
    weight = 1.0 + 0.01 * (yy + offset[0]) + 0.02 * (xx + offset[1])
    return ndimage.convolve(block * weight, kernel, mode="constant")


@pytest.mark.parametrize("chunks", [(50, 37), (3, 200), (100, 100), (203, 177), (7, 9)])
def test_map_overlap_chunked_equals_whole(rng, chunks):
    image = rng.normal(size=(203, 177)).astype(np.float32)
    kernel = rng.normal(size=(11, 11))
    depth = halo_for_kernels(11)
    whole = map_overlap_2d(_varying_convolution, image, depth=depth, kernel=kernel)
    chunked = map_overlap_2d(_varying_convolution, da.from_array(image, chunks=chunks),
                             depth=depth, kernel=kernel)
    assert isinstance(chunked, da.Array)
    np.testing.assert_allclose(chunked.compute(), whole, rtol=1e-6, atol=1e-6)


def test_halo_and_chunk_rules():
    assert halo_for_kernels(21) == 10
    assert halo_for_kernels(21, 11, margin=2) == 17
    assert normalize_chunks((4096, 4096), None, depth=10) == (1024, 1024)
    assert normalize_chunks((100, 4096), 8, depth=10) == (20, 20)
    with pytest.raises(dd.ConfigurationError):
        halo_for_kernels(0)


def test_version_and_public_api():
    assert dd.__version__
    for name in dd.__all__:
        assert hasattr(dd, name), name
