"""DCR: refraction physics, simulated refraction, and the DCR template beating the plain one."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.exposure import PhotoCalib
from diffim_dask.psf import GaussianPsf
from diffim_dask.simulate import Survey, SurveyConfig
from diffim_dask.simulate.dcr import band_fractions, refraction_arcsec, simulate_dcr_visit
from diffim_dask.simulate.geometry import tangent_wcs
from diffim_dask.template import (CoaddStore, DcrConfig, RingsSkyMap, SkyMapConfig,
                                  dcr_pixel_offsets, differential_refraction, get_dcr_template,
                                  get_template, refractive_index_minus_one)
from diffim_dask.template._testing import fill_store, isolated_star_metrics

SKYMAP = RingsSkyMap(SkyMapConfig(n_rings=3600, patch_inner_size=400, patch_border=50,
                                  tract_overlap=20.0 / 3600.0))
PSF = GaussianPsf(2.5)


def test_refraction_formula_matches_references():
    # Edlén's standard air (15 C, 1013.25 hPa, dry) at the sodium D line: n - 1 = 2.7713e-4.
    assert refractive_index_minus_one(589.3, 1013.25, 15.0, 0.0) == pytest.approx(2.7713e-4,
                                                                                  rel=2e-4)
    # Lower pressure, humidity and a redder wavelength all reduce n - 1.
    base = refractive_index_minus_one(500.0, 750.0, 10.0, 0.0)
    assert refractive_index_minus_one(500.0, 700.0, 10.0, 0.0) < base
    assert refractive_index_minus_one(500.0, 750.0, 10.0, 1.0) < base
    assert refractive_index_minus_one(800.0, 750.0, 10.0, 0.0) < base
    # The differential refraction agrees with ERFA's independent model to 2 %.
    config = DcrConfig()
    for band in ("g", "r", "i"):
        wavelengths = config.subfilter_wavelengths(band)
        effective = config.band_wavelengths(band)[2]
        ours = differential_refraction(wavelengths, effective, 1.6, config)
        erfa = refraction_arcsec(wavelengths, 1.6) - refraction_arcsec(effective, 1.6)
        np.testing.assert_allclose(ours, erfa, rtol=0.02, atol=2e-3)
    assert differential_refraction(400.0, 482.5, 1.0) == 0.0
    with pytest.raises(BadInputDataError, match="airmass"):
        differential_refraction(400.0, 482.5, 0.9)
    with pytest.raises(ConfigurationError, match="wavelength_min"):
        DcrConfig().band_wavelengths("Ha")


def test_pixel_offsets_point_to_the_zenith():
    wcs = tangent_wcs(150.0, 2.0, 0.2, (100.0, 100.0))  # north +y, east -x
    north = dcr_pixel_offsets(wcs, (100.0, 100.0), [1.0], 0.0)[0]
    east = dcr_pixel_offsets(wcs, (100.0, 100.0), [1.0], 90.0)[0]
    np.testing.assert_allclose(north, [0.0, 5.0], atol=1e-3)
    np.testing.assert_allclose(east, [-5.0, 0.0], atol=1e-3)
    rotated = tangent_wcs(150.0, 2.0, 0.2, (100.0, 100.0), rotation=30.0)
    offset = dcr_pixel_offsets(rotated, (100.0, 100.0), [1.0], 0.0)[0]
    assert math.hypot(*offset) == pytest.approx(5.0, rel=1e-3)


@pytest.fixture(scope="module")
def survey():
    return Survey(SurveyConfig(seed=31, band="g", n_visits=1, detector_shape=(384, 384),
                               star_density=5e5, galaxy_density=0.0, n_transients=0,
                               rotation_range=20.0, pointing_offset=5.0))


def test_simulated_refraction_moves_blue_and_red_stars_apart(survey):
    angle = 35.0
    image = simulate_dcr_visit(survey, 0, 0, airmass=1.6, parallactic_angle=angle, psf=PSF,
                               noise=False)
    assert image.exposure.info.airmass == 1.6 and image.exposure.info.parallactic_angle == angle
    stars = image.truth[image.truth["kind"] == "star"]
    zenith = dcr_pixel_offsets(image.exposure.wcs, image.exposure.center, [1.0], angle)[0]
    zenith /= np.hypot(*zenith)
    along = stars["dcr_dx"].to_numpy() * zenith[0] + stars["dcr_dy"].to_numpy() * zenith[1]
    across = stars["dcr_dx"].to_numpy() * zenith[1] - stars["dcr_dy"].to_numpy() * zenith[0]
    colour = stars["color"].to_numpy()
    assert np.abs(across).max() < 1e-3
    # Blue stars sit towards the zenith, red ones away; g-band spread of ~0.3 px at airmass 1.6.
    assert np.corrcoef(colour, along)[0, 1] < -0.99
    assert along[colour < 0.5].mean() > 0.05 and along[colour > 2.5].mean() < -0.15
    # The drawn light is where the truth says: centroids of isolated bright stars.
    model = image.model
    measured = []
    for star in stars.itertuples():
        ix, iy = int(round(star.x)), int(round(star.y))
        if not (12 <= ix < 372 and 12 <= iy < 372) or star.flux < 500.0:
            continue
        near = np.hypot(stars["x"] - star.x, stars["y"] - star.y)
        if ((near > 0) & (near < 16) & (stars["flux"] > 1e-3 * star.flux)).any():
            continue
        stamp = model[iy - 8:iy + 9, ix - 8:ix + 9].astype(float)
        yy, xx = np.mgrid[-8:9, -8:9]
        cx = (stamp * xx).sum() / stamp.sum() + ix - star.x
        cy = (stamp * yy).sum() / stamp.sum() + iy - star.y
        measured.append((cx - star.dcr_dx, cy - star.dcr_dy))
    assert len(measured) >= 5 and np.abs(measured).max() < 0.02
    fractions = band_fractions([0.2, 3.0], "g", [400.0, 476.0, 552.0])
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
    assert fractions[0, 0] > fractions[1, 0]  # the blue star has more light in the blue half


def test_dcr_template_beats_the_plain_template_at_high_airmass(survey, tmp_path):
    angle = 35.0
    science = simulate_dcr_visit(survey, 0, 0, airmass=1.6, parallactic_angle=angle, psf=PSF,
                                 noise=False)
    exposure = science.exposure
    calib = PhotoCalib(32.0)
    config = DcrConfig()
    edges = np.linspace(*config.band_wavelengths("g")[:2], config.n_subfilters + 1)
    patches = SKYMAP.patches_overlapping(exposure.wcs, exposure.shape, border=20)
    store = CoaddStore(tmp_path / "dcr.zarr", SKYMAP)
    fill_store(store, survey.sky, patches, PSF, calib, "g")
    for k in range(config.n_subfilters):
        fill_store(store, survey.sky, patches, PSF, calib, "g", subfilter=k,
                   wavelength_range=(edges[k], edges[k + 1]))
    plain = get_template(exposure, store)
    dcr = get_dcr_template(exposure, store, config)
    offsets = np.array([entry["offset_pixels"] for entry in dcr.metadata["dcr"]])
    assert np.hypot(*offsets[0]) > 1.5  # the bluest sub-band moves by ~2 px in g at airmass 1.6
    # Flux scale: the science image is in the visit's calibration, the templates in the coadd's.
    scale = calib.njy_per_count / exposure.photo_calib.njy_per_count
    stars = science.truth[science.truth["kind"] == "star"]
    table = pd.DataFrame({"x": stars["x"], "y": stars["y"],
                          "counts": stars["flux"] / exposure.photo_calib.njy_per_count})
    reference = science.model
    results = {}
    for name, result in (("plain", plain), ("dcr", dcr)):
        metrics = isolated_star_metrics(reference, result.template.arrays()[0] * scale, table)
        results[name] = metrics
    plain_metrics, dcr_metrics = results["plain"], results["dcr"]
    assert len(plain_metrics) >= 20
    colour = stars.set_index(["x"])["color"].reindex(plain_metrics["x"]).to_numpy()
    extreme = (colour < 0.8) | (colour > 2.4)
    # Measured: plain mean dipole 0.18 px (0.35 px for the bluest), DCR 0.015 px; core
    # residuals 19 % vs 0.9 % of the peak.
    assert plain_metrics["dipole"][extreme].mean() > 0.08
    assert dcr_metrics["dipole"].mean() < 0.25 * plain_metrics["dipole"].mean()
    assert dcr_metrics["dipole"][extreme].mean() < 0.2 * plain_metrics["dipole"][extreme].mean()
    assert dcr_metrics["core_residual"].mean() < 0.5 * plain_metrics["core_residual"].mean()
    assert dcr.valid_fraction == 1.0 and dcr.template.psf is not None


def test_dcr_template_needs_the_model_and_the_visit_geometry(survey, tmp_path):
    exposure = survey.simulate_visit(0, 0).exposure
    store = CoaddStore(tmp_path / "plain.zarr", SKYMAP)
    with pytest.raises(ConfigurationError, match=r"DCR sub-bands \[\] of band 'g'"):
        get_dcr_template(exposure, store)
    patches = SKYMAP.patches_overlapping(exposure.wcs, exposure.shape, border=20)[:1]
    fill_store(store, survey.sky, patches, PSF, PhotoCalib(32.0), "g", subfilter=0,
               wavelength_range=(400.0, 450.0))
    with pytest.raises(ConfigurationError, match=r"needs \[0, 1, 2\]"):
        get_dcr_template(exposure, store)
    no_airmass = exposure.replace(info=exposure.info.replace(airmass=math.nan))
    with pytest.raises(BadInputDataError, match="airmass"):
        get_dcr_template(no_airmass, store, DcrConfig(n_subfilters=1))
