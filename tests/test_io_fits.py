"""FITS I/O: MEF round trips, plain images and companions, JWST-like files, headers, errors."""

from __future__ import annotations

import csv
import logging
import math
import os
import re

import dask
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.io import (
    HEADER_SYNONYMS,
    MissingInputError,
    photo_calib_from_header,
    read_exposure,
    read_psf_fits,
    seeing_fwhm_pixels,
    visit_info_from_header,
    write_exposure_fits,
    write_psf_fits,
)
from diffim_dask.io._headers import header_value
from diffim_dask.io._testing import assert_exposures_equal, make_test_exposure
from diffim_dask.masks import MASK_PLANES, mask_value, plane_set
from diffim_dask.psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf, PolynomialPsf

DECAM_FRAMES = [f"DEC-OBS{group}{letter}.mini.fits" for group in ("04", "18") for letter in "abcde"]
DECAM_ALL = DECAM_FRAMES + ["Stack-DEC-OBS04.fits", "Stack-DEC-OBS18.fits",
                            "FinalDifference.DeCorr.fits"]
ZTF_ALERTS = ["ZTF18aaxjdyr_1661382530015060001", "ZTF18aagtxsh_396522680015040002",
              "ZTF18aaxjlwy_472263571115090000"]
NO_DATA = mask_value("NO_DATA")


@pytest.fixture
def io_log(caplog):
    caplog.set_level(logging.INFO, logger="diffim_dask.io")
    return caplog


def _write_plain(path, data, **cards):
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def _lines(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------------
# Multi-extension round trips of simulated data.
# ----------------------------------------------------------------------------------------------


def _grid_psf():
    stamps = np.array([[GaussianPsf(2.0 + 0.3 * i + 0.2 * j).image(size=15) for i in range(2)]
                       for j in range(2)])
    return GridPsf([0.0, 100.0], [-20.0, 80.0], stamps)


@pytest.mark.parametrize("psf", ["gaussian", MoffatPsf(3.3, beta=2.7, ellipticity=0.1), "image",
                                 "grid", None], ids=["gaussian", "moffat", "image", "grid", "none"])
@pytest.mark.parametrize("wcs", ["sip", None], ids=["sip", "nowcs"])
def test_mef_round_trip_is_lossless(tmp_path, rng, psf, wcs):
    if psf == "image":
        psf = ImagePsf(MoffatPsf(2.8).image(size=25))
    elif psf == "grid":
        psf = _grid_psf()
    exposure = make_test_exposure(rng, psf=psf, wcs=wcs)
    path = tmp_path / "exp.fits"
    write_exposure_fits(exposure, path)
    assert_exposures_equal(read_exposure(path), exposure)


def test_mef_round_trip_of_polynomial_psf_and_extreme_metadata(tmp_path, rng):
    coefficients = rng.normal(0, 0.01, (3, 11, 11))
    coefficients[0] += GaussianPsf(2.5).image(size=11)
    psf = PolynomialPsf(coefficients, 1, reference=(50.0, 40.0), scale=(100.0, 80.0))
    exposure = make_test_exposure(rng, psf=psf, origin=(-7, 2048), visit=1661382530015060001,
                                  detector=0)
    exposure = exposure.replace(info=exposure.info.replace(band="it's & odd", mjd=math.nan,
                                                           instrument=""),
                                photo_calib=None)
    path = tmp_path / "exp.fits"
    write_exposure_fits(exposure, path)
    assert_exposures_equal(read_exposure(path), exposure)


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("pixels were computed although only metadata was asked for")


def test_mef_lazy_read_matches_eager_and_computes_nothing_up_front(tmp_path, rng):
    exposure = make_test_exposure(rng, shape=(40, 70))
    path = tmp_path / "exp.fits"
    write_exposure_fits(exposure, path)
    with dask.config.set(scheduler=_refuse_to_compute):
        lazy = read_exposure(path, chunks=(16, 32))
        assert lazy.is_lazy
        assert lazy.image.data.chunks == ((16, 16, 8), (32, 32, 6))
        assert lazy.shape == exposure.shape and lazy.origin == exposure.origin
        assert lazy.info.visit == exposure.info.visit
        assert lazy.psf.fwhm() == exposure.psf.fwhm()
    assert_exposures_equal(lazy, exposure)


def test_plain_file_with_chunks_is_dask_backed(tmp_path, rng):
    path = _write_plain(tmp_path / "plain.fits", rng.normal(100.0, 5.0, (40, 30)), GAIN=2.0)
    eager, chunked = read_exposure(path), read_exposure(path, chunks=16)
    assert chunked.is_lazy and chunked.image.data.chunks == ((16, 16, 8), (16, 14))
    assert_exposures_equal(chunked, eager)


def test_hdu_selects_the_image(tmp_path, rng):
    first, second = rng.normal(0, 1, (10, 12)), rng.normal(5, 1, (10, 12))
    path = tmp_path / "two.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(first, name="A"),
                  fits.ImageHDU(second, name="B")]).writeto(path)
    np.testing.assert_array_equal(read_exposure(path).arrays()[0], first.astype(np.float32))
    for key in ("B", 2):
        np.testing.assert_array_equal(read_exposure(path, hdu=key).arrays()[0],
                                      second.astype(np.float32))


def test_mef_follows_lsst_conventions(tmp_path, rng):
    exposure = make_test_exposure(rng, origin=(37, -12))
    path = tmp_path / "exp.fits"
    write_exposure_fits(exposure, path)
    with fits.open(path, checksum=True) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        for hdu in hdul:
            assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
        image_header = hdul["IMAGE"].header
        assert (image_header["LTV1"], image_header["LTV2"]) == (-37, 12)
        assert (image_header["CRVAL1A"], image_header["CRVAL2A"]) == (37, -12)
        stored_planes = {key[3:]: value for key, value in hdul["MASK"].header.items()
                         if key.startswith("MP_")}
        assert stored_planes == MASK_PLANES
        assert hdul["MASK"].data.dtype.kind == "i"
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")
        assert hdul[0].header["VISIT"] == exposure.info.visit
        assert hdul[0].header["MAGZERO"] == exposure.photo_calib.zero_point
        # Any FITS reader's WCS of the HDU pixel (0, 0) is the parent pixel (x0, y0).
        hdu_sky = WCS(image_header).all_pix2world([0.0], [0.0], 0)
    parent_sky = exposure.pixel_to_sky(37.0, -12.0)
    np.testing.assert_allclose(np.ravel(hdu_sky), np.ravel(parent_sky), rtol=0, atol=1e-10)


def test_mef_with_foreign_mask_table_remaps_bits_by_name(tmp_path, io_log):
    shape = (8, 9)
    image = np.ones(shape, np.float32)
    foreign_mask = np.zeros(shape, np.int32)
    foreign_mask[1, 1] = 1 << 8   # NO_DATA in the foreign table
    foreign_mask[2, 2] = 1 << 7   # SUSPECT
    foreign_mask[3, 3] = 1 << 9   # CROSSTALK: unknown to us
    foreign_mask[4, 4] = 1 << 1   # SAT
    mask_header = fits.Header()
    for name, bit in {"BAD": 0, "SAT": 1, "SUSPECT": 7, "NO_DATA": 8, "CROSSTALK": 9}.items():
        mask_header["HIERARCH MP_" + name] = bit
    path = tmp_path / "lsst.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"),
                  fits.ImageHDU(foreign_mask, header=mask_header, name="MASK"),
                  fits.ImageHDU(image, name="VARIANCE")]).writeto(path)
    _, variance, mask = read_exposure(path).arrays()
    assert mask[1, 1] == NO_DATA and variance[1, 1] == 0
    assert mask[2, 2] == mask_value("SUSPECT")
    assert mask[3, 3] == 0
    assert mask[4, 4] == mask_value("SAT")
    assert "CROSSTALK" in _lines(io_log)


def test_mef_with_corrupted_data_is_rejected(tmp_path, rng):
    path = tmp_path / "exp.fits"
    write_exposure_fits(make_test_exposure(rng), path)
    raw = bytearray(path.read_bytes())
    with fits.open(path) as hdul:
        offset = hdul.fileinfo(1)["datLoc"] + 1000
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BadInputDataError, match=re.escape(str(path)) + ".*DATASUM"):
        read_exposure(path)


# ----------------------------------------------------------------------------------------------
# Atomic writing.
# ----------------------------------------------------------------------------------------------


def _crash_while_writing(monkeypatch):
    def writeto(self, name, *args, **kwargs):
        with open(name, "wb") as handle:
            handle.write(b"SIMPLE  =                    T" + b" " * 500)
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(fits.HDUList, "writeto", writeto)


def test_failed_write_leaves_no_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "exp.fits"
    _crash_while_writing(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_exposure_fits(make_test_exposure(rng), path)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_previous_version(tmp_path, rng, monkeypatch):
    path = tmp_path / "exp.fits"
    previous = make_test_exposure(rng)
    write_exposure_fits(previous, path)
    before = path.read_bytes()
    _crash_while_writing(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_exposure_fits(make_test_exposure(rng), path, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["exp.fits"]
    monkeypatch.undo()
    assert_exposures_equal(read_exposure(path), previous)


def test_overwrite_flag(tmp_path, rng):
    path = tmp_path / "exp.fits"
    first, second = make_test_exposure(rng), make_test_exposure(rng, visit=7)
    write_exposure_fits(first, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_exposure_fits(second, path)
    write_exposure_fits(second, path, overwrite=True)
    assert read_exposure(path).info.visit == 7
    assert os.listdir(tmp_path) == ["exp.fits"]


# ----------------------------------------------------------------------------------------------
# Plain images: flags and the variance model.
# ----------------------------------------------------------------------------------------------


def _star_field(rng, shape, n_stars, peak_max, fwhm=4.0):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    sigma = fwhm / 2.3548
    signal = np.zeros(shape)
    for _ in range(n_stars):
        x, y = rng.uniform(5, nx - 5), rng.uniform(5, ny - 5)
        peak = peak_max * rng.uniform(0.02, 1.0) ** 2
        signal += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return signal


def _observe(rng, signal, sky, gain, read_noise):
    """Counts of a CCD: Poisson electrons plus Gaussian read noise; truth variance in counts²."""
    electrons = rng.poisson((sky + signal) * gain) + rng.normal(0.0, read_noise, signal.shape)
    truth = (sky + signal) / gain + (read_noise / gain) ** 2
    return electrons / gain, truth


def test_sky_subtracted_image_gets_sky_plus_source_variance(tmp_path, rng, io_log):
    shape, gain, read_noise, sky, saturation = (200, 200), 4.0, 10.0, 4000.0, 20000.0
    signal = _star_field(rng, shape, 25, 45000.0)   # ~5% of the pixels hold > 1 sigma of starlight
    counts, truth = _observe(rng, signal, sky, gain, read_noise)
    image = counts - sky                                   # the archive removed the sky
    image[10:15, 20:25] = np.nan
    image[50, 60] = np.inf
    path = _write_plain(tmp_path / "skysub.fits", image.astype(">f8"), GAIN=gain,
                        RDNOISE=read_noise, SATURATE=saturation)
    exposure = read_exposure(path)
    got_image, variance, mask = exposure.arrays()

    assert got_image.dtype == np.float32 and got_image.dtype.isnative
    invalid = ~np.isfinite(image)
    np.testing.assert_array_equal(plane_set(mask, "NO_DATA"), invalid)
    assert np.all(got_image[invalid] == 0) and np.all(variance[invalid] == 0)
    saturated = np.isfinite(image) & (image >= saturation)
    assert saturated.sum() > 20
    np.testing.assert_array_equal(plane_set(mask, "SAT"), saturated)
    np.testing.assert_allclose(got_image[~invalid], image[~invalid].astype(np.float32), rtol=0)

    usable = ~invalid & ~saturated
    ratio = variance[usable] / truth[usable]
    sky_pixels = usable & (signal < 1.0)
    bright = usable & (signal > 50 * math.sqrt(sky / gain))
    assert bright.sum() > 100
    # 40,000 pixels measure the sky variance to ~1.4 %; faint star wings bias it up slightly.
    assert abs(np.median(variance[sky_pixels] / truth[sky_pixels]) - 1) < 0.04
    assert abs(np.median(variance[bright] / truth[bright]) - 1) < 0.05
    pulls = (image[usable] - (signal[usable])) / np.sqrt(variance[usable])
    assert abs(np.std(pulls) - 1) < 0.03
    assert np.all(ratio > 0.5)
    # A Poisson variance from the sky-subtracted image alone would be ~100x too small here.
    naive = np.maximum(image[sky_pixels], 0) / gain + (read_noise / gain) ** 2
    assert np.median(naive) < 0.1 * np.median(truth[sky_pixels])
    assert "no variance given" in _lines(io_log) and "sky-subtracted" in _lines(io_log)


@pytest.mark.parametrize("read_noise_card", [False, True], ids=["no-rdnoise", "rdnoise"])
def test_effective_gain_is_estimated_from_an_unsubtracted_sky(tmp_path, rng, io_log,
                                                              read_noise_card):
    shape, gain, read_noise, sky = (200, 200), 5.0, 8.0, 1000.0
    counts, truth = _observe(rng, _star_field(rng, shape, 20, 5000.0), sky, gain, read_noise)
    cards = {"RDNOISE": read_noise} if read_noise_card else {}
    path = _write_plain(tmp_path / "raw.fits", counts.astype(np.float32), **cards)
    exposure = read_exposure(path)
    tolerance = 0.03 if read_noise_card else 0.05
    assert exposure.info.gain == pytest.approx(gain, rel=tolerance)
    variance = exposure.arrays()[1]
    assert np.median(variance / truth) == pytest.approx(1.0, abs=0.03)
    assert "effective gain" in _lines(io_log)


def test_sky_subtracted_image_without_gain_uses_sky_variance_and_warns(tmp_path, rng, io_log):
    image = rng.normal(0.0, 7.0, (100, 100))
    path = _write_plain(tmp_path / "diff.fits", image)
    variance = read_exposure(path).arrays()[1]
    assert np.ptp(variance) == 0
    assert float(variance[0, 0]) == pytest.approx(49.0, rel=0.05)
    warnings_logged = [r for r in io_log.records if r.levelno == logging.WARNING]
    assert warnings_logged and "sky variance alone" in warnings_logged[0].getMessage()


def test_fill_values_become_no_data(tmp_path, rng):
    image = rng.normal(100.0, 5.0, (30, 30)).astype(">f4")
    image[3, :] = -np.finfo(np.float32).max     # ZTF reference stamps use -FLT_MAX
    path = _write_plain(tmp_path / "ref.fits", image)
    got, variance, mask = read_exposure(path).arrays()
    assert np.all(mask[3] == NO_DATA) and np.all(got[3] == 0) and np.all(variance[3] == 0)
    assert not np.any(plane_set(mask[4:], "NO_DATA"))


# ----------------------------------------------------------------------------------------------
# Companion files.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def plain_with_variance(tmp_path, rng):
    image = rng.normal(0.0, 3.0, (40, 50))
    variance = rng.uniform(5.0, 15.0, image.shape)
    return _write_plain(tmp_path / "image.fits", image.astype(np.float32)), variance


def test_variance_weight_and_noise_companions_agree(tmp_path, plain_with_variance):
    path, variance = plain_with_variance
    variance[7, 9] = 0.0                                  # zero variance / weight: no data
    weight = np.where(variance > 0, 1.0 / np.where(variance > 0, variance, 1), 0.0)
    files = {
        "variance": _write_plain(tmp_path / "var.fits", variance.astype(">f4")),
        "weight": _write_plain(tmp_path / "wht.fits", weight.astype(np.float32)),
        "noise": _write_plain(tmp_path / "sig.fits", np.sqrt(variance)),
    }
    results = {kind: read_exposure(path, **{kind: file}).arrays() for kind, file in files.items()}
    for kind, (image, got_variance, mask) in results.items():
        np.testing.assert_allclose(got_variance, variance.astype(np.float32), rtol=2e-6,
                                   err_msg=kind)
        assert mask[7, 9] == NO_DATA and image[7, 9] == 0, kind
        assert np.count_nonzero(mask) == 1, kind


def test_mask_companions(tmp_path, plain_with_variance):
    path, variance = plain_with_variance
    noise_file = _write_plain(tmp_path / "var.fits", variance.astype(np.float32))
    boolean = np.zeros(variance.shape, np.uint8)
    boolean[2, 3] = 1
    bitmask = np.zeros(variance.shape, np.int16)
    bitmask[4, 5], bitmask[6, 7] = 2, 64 + 4
    ours = np.zeros(variance.shape, np.int32)
    ours[8, 9] = mask_value(["CR", "STREAK"])
    ours_header = fits.Header()
    for name, bit in MASK_PLANES.items():
        ours_header["HIERARCH MP_" + name] = bit
    fits.PrimaryHDU(ours, header=ours_header).writeto(tmp_path / "ours.fits")

    def read_mask(name, data=None):
        if data is not None:
            _write_plain(tmp_path / name, data)
        return read_exposure(path, variance=noise_file, mask=tmp_path / name).arrays()[2]

    mask = read_mask("bool.fits", boolean)
    assert mask[2, 3] == mask_value("BAD") and np.count_nonzero(mask) == 1
    mask = read_mask("bits.fits", bitmask)
    assert mask[4, 5] == mask[6, 7] == mask_value("BAD") and np.count_nonzero(mask) == 2
    mask = read_mask("ours.fits")
    assert mask[8, 9] == mask_value(["CR", "STREAK"]) and np.count_nonzero(mask) == 1
    fractional = np.zeros(variance.shape, np.float32)
    fractional[1, 1], fractional[2, 2] = 0.5, np.nan
    mask = read_mask("float.fits", fractional)
    assert mask[1, 1] == mask[2, 2] == mask_value("BAD") and np.count_nonzero(mask) == 2


def test_psf_companion_stamp_becomes_image_psf(tmp_path, plain_with_variance):
    path, _ = plain_with_variance
    truth = GaussianPsf(3.4)
    odd = _write_plain(tmp_path / "psf_odd.fits", truth.image(size=25).astype(">f4"))
    even = _write_plain(tmp_path / "psf_even.fits", truth.image(size=25, offset=(0.5, 0.5))[:24, :24])
    for stamp_file in (odd, even):
        psf = read_exposure(path, psf=stamp_file).psf
        assert isinstance(psf, ImagePsf)
        assert psf.default_size % 2 == 1
        assert psf.fwhm() == pytest.approx(3.4, rel=0.03)
    model = read_exposure(path, psf=truth).psf
    assert model is truth


@pytest.mark.parametrize("psf", [GaussianPsf(2.7, ellipticity=0.2, fwhm_variation=(0.1,),
                                             scale=(100.0, 100.0)), ImagePsf(MoffatPsf(3.0).image())])
def test_psf_file_round_trip(tmp_path, psf):
    path = tmp_path / "psf.fits"
    write_psf_fits(psf, path, position=(50.0, 60.0))
    restored = read_psf_fits(path)
    assert type(restored) is type(psf)
    for x, y in ((0.0, 0.0), (50.0, 60.0), (99.0, 3.0)):
        np.testing.assert_allclose(restored.image(x, y), psf.image(x, y), rtol=0, atol=1e-14)
    stamp = fits.getdata(path, 0)   # any FITS reader sees the stamp at the requested position
    np.testing.assert_allclose(stamp, psf.image(50.0, 60.0), rtol=0, atol=1e-15)


def test_companion_errors_name_the_files(tmp_path, plain_with_variance):
    path, variance = plain_with_variance
    missing = tmp_path / "nope.fits"
    with pytest.raises(MissingInputError, match=re.escape(str(missing))):
        read_exposure(path, variance=missing)
    wrong = _write_plain(tmp_path / "small.fits", variance[:-1])
    with pytest.raises(BadInputDataError, match=re.escape(str(wrong)) + ".*" + re.escape(str(path))):
        read_exposure(path, noise=wrong)
    with pytest.raises(BadInputDataError, match=re.escape(str(wrong))):
        read_exposure(path, mask=wrong)
    with pytest.raises(ConfigurationError, match="at most one"):
        read_exposure(path, variance=wrong, weight=wrong)
    with pytest.raises(MissingInputError, match=re.escape(str(missing))):
        read_exposure(path, psf=missing)


# ----------------------------------------------------------------------------------------------
# JWST-like files.
# ----------------------------------------------------------------------------------------------


def _jwst_file(path, rng, bunit="MJy/sr"):
    shape = (30, 40)
    primary = fits.Header()
    primary.update({"TELESCOP": "JWST", "INSTRUME": "NIRCAM", "DETECTOR": "NRCA1",
                    "FILTER": "F200W", "PUPIL": "CLEAR", "EXPSTART": 60100.25,
                    "EXPMID": 60100.2571, "EXPEND": 60100.2642, "EFFEXPTM": 1116.6,
                    "XPOSURE": 1245.0, "EXPOSURE": "1", "VISIT_ID": "01234001001"})
    sci_header = WCS(naxis=2).to_header()
    sci_header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 53.16,
                       "CRVAL2": -27.78, "CRPIX1": 20.0, "CRPIX2": 15.0,
                       "CDELT1": -0.031 / 3600, "CDELT2": 0.031 / 3600, "CUNIT1": "deg",
                       "CUNIT2": "deg", "BUNIT": bunit, "PHOTMJSR": 0.45, "PIXAR_SR": 2.29e-14})
    sci = rng.normal(0.3, 0.02, shape).astype(np.float32)
    err = rng.uniform(0.01, 0.03, shape).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    dq[0, :] = (1 << 0) | (1 << 9)            # DO_NOT_USE | NON_SCIENCE
    sci[0, :] = np.nan
    dq[5, 5] = 1 << 1                          # SATURATED
    dq[6, 6] = 1 << 2                          # JUMP_DET: informational only
    dq[7, 7] = (1 << 11) | (1 << 16)           # HOT | NONLINEAR
    dq[8, 8] = 1 << 4                          # OUTLIER
    fits.HDUList([fits.PrimaryHDU(header=primary), fits.ImageHDU(sci, sci_header, name="SCI"),
                  fits.ImageHDU(err, name="ERR"), fits.ImageHDU(dq, name="DQ")]).writeto(path)
    return sci, err


def test_jwst_like_file(tmp_path, rng):
    path = tmp_path / "jw01234001001_01101_00001_nrca1_cal.fits"
    sci, err = _jwst_file(path, rng)
    exposure = read_exposure(path)
    image, variance, mask = exposure.arrays()
    np.testing.assert_array_equal(image[1:], sci[1:])
    np.testing.assert_allclose(variance[1:], (err[1:].astype(np.float64) ** 2).astype(np.float32),
                               rtol=1e-7)
    assert np.all(mask[0] == mask_value(["BAD", "NO_DATA"])) and np.all(image[0] == 0)
    assert mask[5, 5] == mask_value("SAT")
    assert mask[6, 6] == 0
    assert mask[7, 7] == mask_value(["BAD", "SUSPECT"])
    assert mask[8, 8] == mask_value("CR")
    info = exposure.info
    assert info.band == "F200W" and info.instrument == "NIRCAM"
    assert info.mjd == 60100.2571 and info.exposure_time == 1116.6
    assert info.visit == 1234001001 and info.detector == 0
    expected_zp = 8.9 - 2.5 * math.log10(1e6 * 2.29e-14)
    assert exposure.photo_calib.zero_point == pytest.approx(expected_zp, abs=1e-12)
    assert 27.5 < expected_zp < 28.5
    assert exposure.pixel_to_sky(19.0, 14.0)[0] == pytest.approx(53.16, abs=1e-12)


def test_jwst_rate_units_use_photmjsr(tmp_path, rng):
    path = tmp_path / "rate.fits"
    _jwst_file(path, rng, bunit="DN/s")
    calib = read_exposure(path).photo_calib
    assert calib.zero_point == pytest.approx(8.9 - 2.5 * math.log10(0.45e6 * 2.29e-14), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Header synonyms and real headers.
# ----------------------------------------------------------------------------------------------


SYNONYM_CASES = [
    ("gain", "EGAIN", 2.5, 2.5), ("gain", "GAINA", 3.98, 3.98), ("gain", "GAIN", -999.0, None),
    ("read_noise", "READNOI", 4.5, 4.5), ("read_noise", "RDNOISEA", 11.4, 11.4),
    ("saturation", "SATURATN", 60000.0, 60000.0), ("saturation", "SATURATA", 46536.1, 46536.1),
    ("mjd", "OBSMJD", 58000.5, 58000.5), ("mjd", "MJD-MID", 58000.75, 58000.75),
    ("mjd", "EXPMID", 60000.1, 60000.1), ("mjd", "MJD-OBS", 2458151.0226852, 58150.5226852),
    ("exposure_time", "EXPOSURE", 45.0, 45.0), ("exposure_time", "XPOSURE", 1245.0, 1245.0),
    ("exposure_time", "EFFEXPTM", 1116.6, 1116.6),
    ("band", "BAND", "g", "g"), ("band", "FILTNAME", "z", "z"), ("band", "FID", 1, "g"),
    ("band", "FID", 3, "i"), ("band", "FILTER", "ZTF_r", "r"),
    ("band", "FILTER", "i DECam SDSS c0003 7835.0 1470.0", "i"), ("band", "FILTER", "F200W", "F200W"),
    ("airmass", "SECZ", 1.31, 1.31), ("airmass", "AIRMASS", 0.5, None),
    ("parallactic_angle", "PARANG", -45.5, -45.5), ("parallactic_angle", "PA", 12.0, 12.0),
    ("zero_point", "MAGZP", 26.2, 26.2), ("zero_point", "MAGZPT", 25.1, 25.1),
    ("zero_point", "MAGZERO", 31.0, 31.0), ("zero_point", "ZP", 28.0, 28.0),
    ("zero_point", "PHOTZP", 27.5, 27.5), ("zero_point", "MAGZPSCI", 26.16, 26.16),
    ("visit", "EXPNUM", 123456, 123456), ("visit", "VISIT", 99, 99),
    ("visit", "EXP_BN", "c4d_180804_092331_ooi_i_v1", 180804092331),
    ("detector", "CCDNUM", 37, 37), ("detector", "DETECTOR", 7, 7),
    ("detector", "DETECTOR", "NRCA1", None), ("detector", "RCID", 42, 42),
    ("instrument", "INSTRUME", "DECam", "DECam"),
]


@pytest.mark.parametrize(("quantity", "keyword", "value", "expected"), SYNONYM_CASES)
def test_header_synonyms(quantity, keyword, value, expected):
    assert keyword in HEADER_SYNONYMS[quantity]
    header = fits.Header()
    header[keyword] = value
    found = header_value(header, quantity)
    if expected is None:
        assert found is None
    else:
        assert found == (pytest.approx(expected, abs=1e-9) if isinstance(expected, float)
                         else expected, keyword)


def test_mid_exposure_time_and_priorities():
    header = fits.Header({"MJD-OBS": 58000.0, "EXPTIME": 864.0})
    assert visit_info_from_header(header).mjd == pytest.approx(58000.005, abs=1e-12)
    header["EXPMID"] = 58000.1
    assert visit_info_from_header(header).mjd == 58000.1
    extension, primary = fits.Header({"GAIN": 2.0}), fits.Header({"GAIN": 9.0, "RDNOISE": 5.0})
    info = visit_info_from_header([extension, primary])
    assert (info.gain, info.read_noise) == (2.0, 5.0)
    assert photo_calib_from_header(fits.Header({"BUNIT": "nJy"})).zero_point == pytest.approx(31.4)
    assert photo_calib_from_header(fits.Header()) is None


def test_seeing_fwhm_pixels_units():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-0.25 / 3600, 0.25 / 3600]
    assert seeing_fwhm_pixels(fits.Header({"FWHM": 4.2})) == 4.2
    assert seeing_fwhm_pixels(fits.Header({"SEEING": 1.0}), wcs) == pytest.approx(4.0)
    assert seeing_fwhm_pixels(fits.Header({"SEEING": 1.0, "PIXSCALE": 0.5})) == pytest.approx(2.0)
    assert seeing_fwhm_pixels(fits.Header({"SEEING": 1.0})) is None
    in_arcsec = fits.Header()
    in_arcsec["FWHM"] = (1.1, "[arcsec] median seeing")
    assert seeing_fwhm_pixels(in_arcsec, wcs) == pytest.approx(4.4)
    in_pixels = fits.Header()
    in_pixels["SEEING"] = (3.3, "seeing in pixels")
    assert seeing_fwhm_pixels(in_pixels) == 3.3
    assert seeing_fwhm_pixels(fits.Header({"FWHM": -999.0})) is None


@pytest.mark.realdata
def test_decam_headers(decam_dir):
    visits = set()
    for name in DECAM_FRAMES:
        header = fits.getheader(decam_dir / name)
        info = visit_info_from_header(header)
        assert info.band == "i"
        assert info.gain == header["GAIN"] and 3.9 < info.gain < 4.2
        assert info.read_noise == 11.83702
        assert info.saturation == header["ESATUR"] < header["SATURATE"]
        assert info.exposure_time == 330.0
        assert info.mjd == pytest.approx(58334.39133794 + 165.0 / 86400.0, abs=1e-9)
        assert info.airmass == header["AIRMASS"]
        assert info.detector == 37
        visits.add(info.visit)
        assert seeing_fwhm_pixels(header) == header["FWHM"]
        assert 3.5 < seeing_fwhm_pixels(header) < 6.0
    assert len(visits) == len(DECAM_FRAMES)
    assert 180804092331 in visits


def _manifest(ztf_dir):
    with open(ztf_dir / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.realdata
def test_ztf_headers(ztf_dir):
    rows = _manifest(ztf_dir)
    assert len(rows) == 13
    for row in rows:
        for kind in ("sci", "ref", "diff"):
            header = fits.getheader(ztf_dir / f"{row['name']}_{kind}.fits")
            info = visit_info_from_header(header)
            assert info.band == {"1": "g", "2": "r", "3": "i"}[row["fid"]]
            # CANDID names an alert, not an exposure: no visit number is taken from it.
            assert info.visit == 0 and info.detector == int(row["rcid"])
            start = float(row["jd"]) - 2400000.5
            half = float(row["exptime"]) / 2 / 86400 if row["exptime"] else 0.0
            assert info.mjd == pytest.approx(start + half, abs=1e-8)
            if row["exptime"]:
                assert info.exposure_time == float(row["exptime"])
            else:
                assert math.isnan(info.exposure_time)
            assert math.isnan(info.gain) and math.isnan(info.read_noise)
            assert math.isnan(info.saturation)
            calib = photo_calib_from_header(header)
            if row["magzpsci"]:
                assert calib.zero_point == pytest.approx(float(row["magzpsci"]), abs=1e-9)
            else:
                assert calib is None
            assert seeing_fwhm_pixels(header) == pytest.approx(float(row["fwhm"]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# WCS.
# ----------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_decam_tpv_wcs_places_the_known_variable_star(decam_dir):
    path = decam_dir / "DEC-OBS04a.mini.fits"
    exposure = read_exposure(path)
    ra, dec = exposure.pixel_to_sky(129.0, 128.0)
    assert float(ra) == pytest.approx(318.1081, abs=2e-4)
    assert float(dec) == pytest.approx(-66.0158, abs=2e-4)
    header = fits.getheader(path)
    for key in [k for k in header if k.startswith("PV")]:
        del header[key]
    tan_ra, _ = WCS(header).all_pix2world(129.0, 128.0, 0)
    assert abs(float(tan_ra) - float(ra)) > 0.1      # the TPV terms really are applied


def _plain_with_wcs(path, **cards):
    header = WCS(naxis=2).to_header()
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": 20.0,
                   "CRPIX1": 16.0, "CRPIX2": 16.0, "CDELT1": -1e-4, "CDELT2": 1e-4})
    header.update(cards)
    fits.PrimaryHDU(np.random.default_rng(3).normal(0, 1, (32, 32)), header).writeto(path)
    return path


@pytest.mark.parametrize(("cards", "message"), [
    ({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"}, "not celestial"),
    ({"CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "CDELT1": -5.0, "CDELT2": 5.0,
      "CRPIX1": -300.0}, "image centre"),
    ({"CTYPE1": "RA---XYZ", "CTYPE2": "DEC--XYZ"}, "invalid WCS"),
], ids=["linear", "off-sphere", "unknown-projection"])
def test_bad_wcs_is_rejected(tmp_path, cards, message):
    path = _plain_with_wcs(tmp_path / "bad_wcs.fits", **cards)
    with pytest.raises(BadInputDataError, match=re.escape(str(path)) + f".*{message}"):
        read_exposure(path)


def test_wcs_fix_ups_are_logged_not_raised(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="diffim_dask.io")
    # Old-style RADECSYS and a DATE-OBS without MJD-OBS make astropy emit FITSFixedWarning.
    path = _plain_with_wcs(tmp_path / "old_style.fits", RADECSYS="FK5", EQUINOX=2000.0,
                           **{"DATE-OBS": "2018-08-04T09:23:31"})
    assert read_exposure(path).wcs is not None
    assert "WCS fix-up" in _lines(caplog)


def test_missing_wcs_is_allowed(tmp_path):
    path = _write_plain(tmp_path / "nowcs.fits", np.random.default_rng(4).normal(0, 1, (20, 20)))
    assert read_exposure(path).wcs is None


# ----------------------------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.fits"
    with pytest.raises(MissingInputError, match=re.escape(str(path))) as caught:
        read_exposure(path)
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, BadInputDataError)


def test_unreadable_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not a FITS file at all" * 200)
    with pytest.raises(BadInputDataError, match=re.escape(str(garbage)) + ".*not a readable FITS"):
        read_exposure(garbage)
    full = _write_plain(tmp_path / "full.fits", np.ones((100, 100)))
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(full.read_bytes()[: 2880 + 10000])
    with pytest.raises(BadInputDataError, match=re.escape(str(truncated))):
        read_exposure(truncated)
    with pytest.raises(BadInputDataError, match=re.escape(str(tmp_path))):
        read_exposure(tmp_path)


def test_all_nan_image(tmp_path):
    path = _write_plain(tmp_path / "nan.fits", np.full((10, 10), np.nan))
    with pytest.raises(BadInputDataError, match=re.escape(str(path)) + ".*no valid pixel"):
        read_exposure(path)


def test_mef_missing_plane_and_shape_mismatch(tmp_path):
    image = np.ones((8, 8), np.float32)
    missing = tmp_path / "missing_variance.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"),
                  fits.ImageHDU(image.astype(np.int32), name="MASK")]).writeto(missing)
    with pytest.raises(BadInputDataError, match=re.escape(str(missing)) + ".*VARIANCE") as caught:
        read_exposure(missing)
    assert not isinstance(caught.value, FileNotFoundError)    # the file is there, an HDU is not
    mismatch = tmp_path / "mismatch.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"),
                  fits.ImageHDU(image.astype(np.int32), name="MASK"),
                  fits.ImageHDU(image[:7], name="VARIANCE")]).writeto(mismatch)
    with pytest.raises(BadInputDataError, match=re.escape(str(mismatch)) + ".*shapes differ"):
        read_exposure(mismatch)
    with pytest.raises(BadInputDataError, match=re.escape(str(mismatch)) + ".*'NOPE'"):
        read_exposure(mismatch, hdu="NOPE")


# ----------------------------------------------------------------------------------------------
# Real files: read, write MEF, read back.
# ----------------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("name", DECAM_ALL)
def test_decam_files_round_trip(decam_dir, tmp_path, name):
    source = decam_dir / name
    exposure = read_exposure(source)
    original = fits.getdata(source)
    image, variance, mask = exposure.arrays()
    np.testing.assert_array_equal(image, original.astype(np.float32))   # float64 → float32
    assert np.all(variance > 0) and not np.any(plane_set(mask, "NO_DATA"))
    assert exposure.wcs is not None and exposure.info.band == "i"
    if name in DECAM_FRAMES:
        # Resampling smooths pixel noise, so the measured sky sigma sits a little below the
        # header's pre-resampling value.
        sky_sigma = math.sqrt(np.median(variance))
        assert 0.75 < sky_sigma / fits.getheader(source)["AVSIG"] < 1.1
    path = tmp_path / name
    write_exposure_fits(exposure, path)
    assert_exposures_equal(read_exposure(path), exposure)


@pytest.mark.realdata
def test_decam_cutout_keeps_tpv_wcs_and_origin(decam_dir, tmp_path):
    exposure = read_exposure(decam_dir / "DEC-OBS04a.mini.fits")
    cutout = exposure.cutout(slice(100, 170), slice(90, 200))
    assert cutout.origin == (100, 90)
    path = tmp_path / "cutout.fits"
    write_exposure_fits(cutout, path)
    restored = read_exposure(path)
    assert_exposures_equal(restored, cutout)
    ra, dec = restored.pixel_to_sky(129.0, 128.0)           # parent-frame position of the star
    assert (float(ra), float(dec)) == pytest.approx((318.1081, -66.0158), abs=2e-4)


@pytest.mark.realdata
@pytest.mark.parametrize("alert", ZTF_ALERTS)
@pytest.mark.parametrize("kind", ["sci", "ref", "diff"])
def test_ztf_stamps_round_trip(ztf_dir, tmp_path, alert, kind):
    source = ztf_dir / f"{alert}_{kind}.fits"
    exposure = read_exposure(source)
    original = fits.getdata(source)
    image, variance, mask = exposure.arrays()
    assert exposure.wcs is None and exposure.shape == original.shape
    invalid = ~(np.abs(original) < 1e30)
    np.testing.assert_array_equal(plane_set(mask, "NO_DATA"), invalid)
    np.testing.assert_array_equal(image[~invalid], original[~invalid])
    assert np.all(variance[~invalid] > 0)
    if kind != "diff":
        assert math.isfinite(exposure.info.gain) and exposure.info.gain > 0   # effective gain
    path = tmp_path / f"{alert}_{kind}.fits"
    write_exposure_fits(exposure, path)
    assert_exposures_equal(read_exposure(path), exposure)
