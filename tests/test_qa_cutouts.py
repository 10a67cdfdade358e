"""Cutout triplets: extraction, edges, WCS, alert-style FITS stamps, catalog columns, PNG."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from diffim_dask.errors import ConfigurationError
from diffim_dask.exposure import Exposure
from diffim_dask.masks import mask_value, plane_set
from diffim_dask.qa.cutouts import (
    CUTOUT_COLUMNS,
    add_cutout_columns,
    cutout_from_fits,
    cutout_to_fits,
    cutout_triplet,
    extract_cutout,
    select_gallery,
    triplet_stretch,
    write_cutout_pngs,
    write_triplet_png,
)
from diffim_dask.schema import empty_catalog


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [10.0, -30.0]
    wcs.wcs.crpix = [60.0, 50.0]
    wcs.wcs.cd = [[-5e-5, 1e-6], [2e-6, 5e-5]]
    from astropy.wcs import Sip

    a = np.zeros((3, 3))
    a[2, 0] = 2e-6
    b = np.zeros((3, 3))
    b[0, 2] = -1e-6
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def _exposure(value_offset=0.0, origin=(100, 200)):
    ny, nx = 90, 120
    yy, xx = np.indices((ny, nx))
    image = (xx * 1000 + yy + value_offset).astype(np.float32)  # encodes its own position
    variance = np.full((ny, nx), 4.0, np.float32)
    mask = np.zeros((ny, nx), np.uint32)
    mask[10, 20] = mask_value("CR")
    return Exposure.from_arrays(image, variance, mask, wcs=_wcs(), origin=origin)


def test_extract_cutout_positions_padding_and_wcs():
    exposure = _exposure()
    x0, y0 = exposure.origin
    cut = extract_cutout(exposure, x0 + 40.4, y0 + 30.6, size=11)
    assert cut.image.shape == (11, 11) and cut.x0 == x0 + 35 and cut.y0 == y0 + 26
    assert cut.image[5, 5] == 40 * 1000 + 31  # nearest pixel (40, 31) at the centre
    # Near the corner: padded with NaN and NO_DATA.
    corner = extract_cutout(exposure, x0 + 1, y0 + 2, size=9)
    assert np.isnan(corner.image[0, 0]) and plane_set(corner.mask[0, 0], "NO_DATA")
    assert corner.image[4 - 2, 4 - 1] == 0  # parent pixel (0, 0)
    assert not plane_set(corner.mask[2:, 3:], "NO_DATA").any()
    # Entirely off the image: all padding.
    assert np.isnan(extract_cutout(exposure, -500, -500, 5).image).all()
    # The stamp's WCS maps stamp pixels to the same sky as the parent pixels (SIP included).
    parent = exposure.wcs.all_pix2world(np.array([[cut.x0 + 3, cut.y0 + 7]], float), 0)
    stamp = cut.wcs.all_pix2world(np.array([[3.0, 7.0]]), 0)
    np.testing.assert_allclose(stamp, parent, atol=1e-10)
    # Lazy (dask) exposures give the same stamp.
    lazy = extract_cutout(exposure.chunk(32), x0 + 40.4, y0 + 30.6, size=11)
    np.testing.assert_array_equal(lazy.image, cut.image)
    with pytest.raises(ConfigurationError, match="odd"):
        extract_cutout(exposure, 0, 0, size=10)


def test_fits_stamps_round_trip_and_catalog_columns(tmp_path):
    science, template, difference = _exposure(), _exposure(0.5), _exposure(-0.5)
    x0, y0 = science.origin
    cut = extract_cutout(science, x0 + 60, y0 + 40, 15)
    data = cutout_to_fits(cut, name="science")
    assert data[:2] == b"\x1f\x8b"  # gzip, as alert packets carry them
    back = cutout_from_fits(data)
    np.testing.assert_array_equal(back.image, cut.image)
    np.testing.assert_array_equal(back.variance, cut.variance)
    np.testing.assert_array_equal(back.mask, cut.mask)
    assert (back.x0, back.y0, back.x, back.y) == (cut.x0, cut.y0, cut.x, cut.y)
    np.testing.assert_allclose(back.wcs.all_pix2world([[2.0, 3.0]], 0),
                               cut.wcs.all_pix2world([[2.0, 3.0]], 0), atol=1e-9)
    catalog = empty_catalog("pandas").reindex(range(4))
    catalog["x"] = [x0 + 30.0, x0 + 60.0, x0 + 90.0, x0 + 5.0]
    catalog["y"] = [y0 + 20.0, y0 + 40.0, y0 + 60.0, y0 + 80.0]
    catalog["snr"] = [6.0, 50.0, 9.0, 7.0]
    catalog["isSky"] = [False, False, False, True]
    catalog["isNegative"] = False
    catalog["isDipole"] = False
    catalog["diaSourceId"] = [1, 2, 3, 4]
    with_cutouts = add_cutout_columns(catalog, science, template, difference, size=15, top_n=2)
    assert with_cutouts.loc[1, "cutoutScience"] is not None  # highest S/N
    assert with_cutouts.loc[2, "cutoutDifference"] is not None
    assert with_cutouts.loc[0, "cutoutScience"] is None and with_cutouts.loc[3, "cutoutScience"] is None
    stamp = cutout_from_fits(with_cutouts.loc[2, "cutoutTemplate"])
    assert stamp.image[7, 7] == pytest.approx(90 * 1000 + 60 + 0.5)
    path = tmp_path / "alerts.parquet"
    with_cutouts[["diaSourceId", *CUTOUT_COLUMNS]].to_parquet(path)
    read = pd.read_parquet(path)
    assert cutout_from_fits(read.loc[1, "cutoutDifference"]).image[7, 7] == pytest.approx(
        60 * 1000 + 40 - 0.5)


def test_common_stretch_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    shape = (64, 64)
    yy, xx = np.indices(shape)
    star = 500.0 * np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / 8.0)

    def noise():
        return rng.normal(0, 3.0, shape)

    science = Exposure.from_arrays((100 + star + noise()).astype(np.float32),
                                   np.full(shape, 9.0, np.float32))
    template = Exposure.from_arrays((20 + 0.8 * star + noise()).astype(np.float32),
                                    np.full(shape, 9.0, np.float32))
    difference = Exposure.from_arrays((0.2 * star + noise()).astype(np.float32),
                                      np.full(shape, 18.0, np.float32))
    triplet = cutout_triplet(science, template, difference, 32, 32, size=21, kind="positive",
                             snr=12.3, diaSourceId=7)
    stretch = triplet_stretch(triplet)
    # One scale for all three panels (set by the brightest), each with its own sky removed.
    assert stretch["sigma"] == pytest.approx(3.0)
    assert stretch["vmax"] > 400 and stretch["vmin"] == pytest.approx(-9.0)
    assert stretch["sky_science"] == pytest.approx(100, abs=3)
    assert stretch["sky_template"] == pytest.approx(20, abs=3)
    path = write_triplet_png([triplet, triplet], tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    catalog = empty_catalog("pandas").reindex(range(3))
    catalog["x"], catalog["y"] = [32.0, 20.0, 44.0], [32.0, 20.0, 44.0]
    catalog["snr"] = [12.0, 6.0, 8.0]
    catalog["isSky"] = False
    catalog["isNegative"] = [False, True, False]
    catalog["isDipole"] = [False, False, True]
    catalog["diaSourceId"] = [10, 11, 12]
    gallery = select_gallery(catalog, 2)
    assert [len(gallery[k]) for k in ("positive", "negative", "dipole")] == [1, 1, 1]
    assert gallery["negative"]["diaSourceId"].tolist() == [11]
    paths = write_cutout_pngs(catalog, science, template, difference, tmp_path / "pngs", top_n=2)
    assert sorted(p.name for p in paths) == ["diaSource_10.png", "diaSource_12.png"]
