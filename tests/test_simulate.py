"""Tests of the survey simulator: determinism, truth vs pixels, noise, PSF, defects, templates."""

from __future__ import annotations

import math
import pickle
import time

import numpy as np
import pandas as pd
import pytest

from diffim_dask.errors import ConfigurationError
from diffim_dask.exposure import Exposure
from diffim_dask.masks import plane_set
from diffim_dask.psf import FWHM_PER_SIGMA, GaussianPsf, MoffatPsf
from diffim_dask.simulate import (
    TRUTH_COLUMNS,
    Survey,
    SurveyConfig,
    make_sky,
    sersic_mixture,
    simulate_pair,
    variable_flux,
)
from diffim_dask.simulate import render
from diffim_dask.simulate.profiles import shape_matrix

#: A small but complete survey: 2 visits x 2 detectors of 512², mild distortion, dense bright stars
#: (slope 0.5 so that a few saturate), trails, cosmic rays and bad columns.
SMALL = SurveyConfig(
    seed=11, n_visits=2, n_detectors=2, detector_shape=(512, 512), detector_gap=40,
    pointing_offset=20.0, rotation_range=1.0, distortion=2.0, patch_size=400, patch_border=50,
    star_density=3.0e5, star_flux_slope=0.5, variable_fraction=0.1, n_transients=40, n_moving=1,
    n_bad_columns=3, cosmic_ray_rate=20.0,
)


@pytest.fixture(scope="module")
def survey() -> Survey:
    return Survey(SMALL)


@pytest.fixture(scope="module")
def visit_image(survey):
    return survey.simulate_visit(1, 1)


@pytest.fixture(scope="module")
def all_visit_images(survey):
    return {key: survey.simulate_visit(*key) for key in survey.visits}


def _psf_fit(image, variance, psf, x, y, *, weighted=True, size=None, origin=(0, 0)):
    """Flux and error of a PSF fit at a known position (stamp centred on the nearest pixel)."""
    size = psf.default_size if size is None else size
    half = size // 2
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    stamp = psf.image(x, y, size, offset=(x - ix, y - iy))
    rows = slice(iy - half - origin[1], iy + half + 1 - origin[1])
    cols = slice(ix - half - origin[0], ix + half + 1 - origin[0])
    data, var = image[rows, cols], variance[rows, cols]
    if weighted:
        info = np.sum(stamp * stamp / var)
        flux = np.sum(stamp * data / var) / info
        error = 1.0 / math.sqrt(info)
    else:
        norm2 = np.sum(stamp * stamp)
        flux = np.sum(stamp * data) / norm2
        error = math.sqrt(np.sum(stamp * stamp * var)) / norm2
    return flux, error, stamp, data, var


def _isolated(truth, row, radius):
    others = truth[truth["id"] != row.id]
    distance = np.hypot(others["x"] - row.x, others["y"] - row.y)
    galaxies = others["kind"] == "galaxy"
    # Galaxies reach further than point sources: keep clear of ~5 half-light radii.
    reach = np.where(galaxies, 5.0 * others["r_eff"].fillna(0.0) / SMALL.pixel_scale, 0.0)
    return not np.any(distance < radius + reach)


def _stamp_clean(mask, x, y, half, shape):
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    if not (half <= ix < shape[1] - half and half <= iy < shape[0] - half):
        return False
    return not mask[iy - half:iy + half + 1, ix - half:ix + half + 1].any()


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ConfigurationError, match="star_flux_range"):
        SurveyConfig(star_flux_range=(10.0, 1.0))
    with pytest.raises(ConfigurationError, match="n_visit"):
        SurveyConfig.from_dict({"n_visit": 2})
    with pytest.raises(ConfigurationError, match="psf_profile"):
        SurveyConfig(psf_profile="airy")
    with pytest.raises(ConfigurationError, match="edge_margin"):
        SurveyConfig(detector_shape=(40, 40), edge_margin=20)
    survey = Survey(SurveyConfig(n_visits=1, detector_shape=(64, 64)))
    with pytest.raises(ConfigurationError, match="visit 3 does not exist"):
        survey.simulate_visit(3, 0)
    with pytest.raises(ConfigurationError, match="detector 1 does not exist"):
        survey.wcs(0, 1)
    with pytest.raises(ConfigurationError, match="patch 99 does not exist"):
        survey.simulate_template_patch(99)


def test_config_round_trips_through_dict():
    assert SurveyConfig.from_dict(SMALL.to_dict()) == SMALL


def test_make_sky_follows_the_configured_distributions():
    sky = make_sky(SMALL)
    x0, y0, nx, ny = sky.bbox
    area = nx * ny * (SMALL.pixel_scale / 3600.0) ** 2
    for table, density in ((sky.stars, SMALL.star_density), (sky.galaxies, SMALL.galaxy_density)):
        expected = density * area
        assert abs(len(table) - expected) < 5 * math.sqrt(expected)
        assert table["id"].is_unique
    lo, hi = SMALL.star_flux_range
    flux = sky.stars["flux"].to_numpy()
    assert flux.min() >= lo and flux.max() <= hi
    # Cumulative counts N(>F) ∝ F^-a: the fraction above 100 F_min is 100^-a (truncated at F_max).
    a = SMALL.star_flux_slope
    fraction = (100.0 ** -a - (hi / lo) ** -a) / (1 - (hi / lo) ** -a)
    tolerance = 4 * math.sqrt(fraction / flux.size)
    assert np.mean(flux > 100 * lo) == pytest.approx(fraction, abs=tolerance)
    assert np.mean(sky.stars["variable"]) == pytest.approx(SMALL.variable_fraction, abs=0.02)
    assert sky.variables["period"].notna().all()
    assert sky.galaxies["r_eff"].between(*SMALL.galaxy_size_range).all()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_order_independent(visit_image):
    fresh = Survey(SMALL)
    fresh.simulate_visit(0, 0)  # simulating another image first must not matter
    # A survey shipped to a worker (pickled before its sky exists) gives the same pixels.
    shipped = pickle.loads(pickle.dumps(Survey(SMALL)))
    for again in (fresh.simulate_visit(1, 1), shipped.simulate_visit(1, 1)):
        for a, b in zip(visit_image.exposure.arrays(), again.exposure.arrays()):
            assert np.array_equal(a, b)
        pd.testing.assert_frame_equal(visit_image.truth, again.truth)
        assert np.array_equal(visit_image.model, again.model)


def test_different_visit_or_seed_differs(survey, visit_image):
    other_visit = survey.simulate_visit(0, 1)
    assert not np.array_equal(other_visit.exposure.arrays()[0], visit_image.exposure.arrays()[0])
    t1 = visit_image.truth.query("kind == 'transient'")
    t0 = other_visit.truth.query("kind == 'transient'")
    assert not np.allclose(t1["x"].to_numpy(), t0["x"].to_numpy())
    other_seed = Survey(SMALL.replace(seed=12)).simulate_visit(1, 1)
    assert not np.array_equal(other_seed.exposure.arrays()[0], visit_image.exposure.arrays()[0])
    # The static sky is shared by every visit: a star keeps its id and position on the sky.
    stars1 = visit_image.truth.query("kind == 'star'").set_index("id")
    stars0 = survey.simulate_visit(0, 1).truth.query("kind == 'star'").set_index("id")
    common = stars1.index.intersection(stars0.index)
    assert len(common) > 50
    assert np.allclose(stars1.loc[common, "ra"], stars0.loc[common, "ra"], rtol=0, atol=1e-12)
    assert not np.allclose(stars1.loc[common, "x"], stars0.loc[common, "x"])


# ---------------------------------------------------------------------------------------------
# Truth vs pixels
# ---------------------------------------------------------------------------------------------


def test_truth_table_columns_and_kinds(all_visit_images):
    kinds = set()
    for image in all_visit_images.values():
        truth = image.truth
        assert tuple(truth.columns[:len(TRUTH_COLUMNS)]) == TRUTH_COLUMNS
        assert truth["id"].is_unique
        kinds |= set(truth["kind"])
        transients = truth[truth["kind"] == "transient"]
        assert len(transients) == SMALL.n_transients
        lo, hi = SMALL.transient_snr_range
        assert transients["snr"].between(lo, hi).all()
        assert (transients["template_flux"] == 0).all()
        assert np.allclose(transients["delta_flux"], transients["flux"])
    assert kinds == {"star", "variable", "galaxy", "transient", "moving", "cosmic_ray"}


def test_truth_positions_follow_the_wcs(all_visit_images):
    for image in all_visit_images.values():
        truth = image.truth
        x, y = image.exposure.sky_to_pixel(truth["ra"], truth["dec"])
        assert np.max(np.hypot(x - truth["x"], y - truth["y"])) < 1e-3
        # Everything listed has its centre on the detector.
        assert truth["x"].between(-0.5, 511.5).all() and truth["y"].between(-0.5, 511.5).all()


def test_isolated_transients_have_their_truth_flux(all_visit_images):
    pulls = []
    for image in all_visit_images.values():
        img, var, mask = image.exposure.arrays()
        psf = image.exposure.psf
        counts_per_njy = 1.0 / image.exposure.photo_calib.njy_per_count
        truth = image.truth
        for row in truth[(truth["kind"] == "transient") & ~truth["on_galaxy"]].itertuples():
            if not _isolated(truth, row, 15.0):
                continue
            if not _stamp_clean(mask, row.x, row.y, psf.default_size // 2, img.shape):
                continue
            flux, error, *_ = _psf_fit(img, var, psf, row.x, row.y)
            pulls.append((flux - row.delta_flux * counts_per_njy) / error)
    pulls = np.array(pulls)
    assert pulls.size >= 30
    assert np.all(np.abs(pulls) < 5.0)
    assert abs(pulls.mean()) < 0.5
    assert 0.7 < pulls.std() < 1.3


def test_snr_definition_holds_empirically():
    """std of the PSF-fit flux of faint sources on empty sky equals flux / snr."""
    z = []
    for seed in (1, 2, 3):
        # Faint sources (S/N 3-6): their own Poisson noise adds < 1 % to the sky noise.
        pair = simulate_pair((768, 768), n_transients=250, snr_range=(3.0, 6.0), seed=seed,
                             star_density=0.0, galaxy_density=0.0, host_fraction=0.0,
                             template_noise_factor=0.0)
        img, var, _ = pair.science.arrays()
        counts_per_njy = 1.0 / pair.science.photo_calib.njy_per_count
        truth = pair.truth[pair.truth["kind"] == "transient"]
        xy = truth[["x", "y"]].to_numpy()
        distance = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(distance, np.inf)
        for row, nearest in zip(truth.itertuples(), distance.min(axis=1)):
            if nearest < 16:
                continue
            # Uniform weights: the S/N definition uses the sky noise only.
            flux, *_ = _psf_fit(img, var, pair.science_psf, row.x, row.y, weighted=False)
            true = row.flux * counts_per_njy
            z.append((flux - true) / (true / row.snr))
    z = np.array(z)
    print(f"\nS/N pull test: n={z.size} mean={z.mean():.3f} std={z.std():.3f}")
    assert z.size > 450
    assert abs(z.mean()) < 0.15
    assert 0.9 < z.std() < 1.1


def test_empty_sky_noise_matches_variance(all_visit_images):
    for image in all_visit_images.values():
        img, var, mask = image.exposure.arrays()
        sigma = np.sqrt(var)
        quiet = (image.model < 0.01 * sigma) & (mask == 0)
        for ray in image.truth[image.truth["kind"] == "cosmic_ray"].itertuples():
            ix, iy = int(ray.x), int(ray.y)
            quiet[max(iy - 6, 0):iy + 7, max(ix - 6, 0):ix + 7] = False
        normalised = img[quiet] / sigma[quiet]
        assert normalised.size > 50_000
        assert 0.97 < normalised.std() < 1.03
        assert abs(normalised.mean()) < 0.02


def test_sky_gradient_and_unsubtracted_images():
    config = SurveyConfig(seed=5, n_visits=1, detector_shape=(256, 256), sky_gradient=0.2,
                          n_bad_columns=0, cosmic_ray_rate=0.0)
    subtracted = Survey(config).simulate_visit(0, 0)
    raw = Survey(config.replace(sky_subtracted=False)).simulate_visit(0, 0)
    background = subtracted.background
    assert background.max() / background.min() > 1.3  # ±20 % tilt
    img_sub = subtracted.exposure.arrays()[0]
    img_raw = raw.exposure.arrays()[0]
    assert np.allclose(img_raw - background, img_sub, atol=0.05)
    var = subtracted.exposure.arrays()[1]
    quiet = subtracted.model < 0.01 * np.sqrt(var)
    assert 0.97 < np.std(img_sub[quiet] / np.sqrt(var[quiet])) < 1.03


# ---------------------------------------------------------------------------------------------
# PSF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["gaussian", "moffat"])
def test_psf_attribute_reproduces_isolated_stars(profile):
    config = SMALL.replace(psf_profile=profile, n_visits=1, n_detectors=1,
                           detector_shape=(640, 640), cosmic_ray_rate=0.0, n_bad_columns=0,
                           n_transients=0, n_moving=0)
    image = Survey(config).simulate_visit(0, 0)
    img, var, mask = image.exposure.arrays()
    psf = image.exposure.psf
    assert isinstance(psf, GaussianPsf if profile == "gaussian" else MoffatPsf)
    counts_per_njy = 1.0 / image.exposure.photo_calib.njy_per_count
    truth = image.truth
    bright = truth[truth["kind"].isin(["star", "variable"]) & ~truth["saturated"]
                   & (truth["flux"] * counts_per_njy > 2.0e4)]
    checked = 0
    for row in bright.itertuples():
        if not _isolated(truth, row, 20.0):
            continue
        if not _stamp_clean(mask, row.x, row.y, psf.default_size // 2, img.shape):
            continue
        flux, error, stamp, data, v = _psf_fit(img, var, psf, row.x, row.y)
        chi2 = np.sum((data - flux * stamp) ** 2 / v) / (stamp.size - 1)
        assert 0.8 < chi2 < 1.25, (row.id, chi2)
        assert abs(flux - row.flux * counts_per_njy) < 5 * error
        # Control: a 10 % wider PSF does not fit.
        wrong = type(psf)(psf.fwhm(row.x, row.y) * 1.1) if profile == "gaussian" else \
            MoffatPsf(psf.fwhm(row.x, row.y) * 1.1, beta=psf.beta)
        wflux, _, wstamp, *_ = _psf_fit(img, var, wrong, row.x, row.y, size=psf.default_size)
        if flux / error > 300:
            assert np.sum((data - wflux * wstamp) ** 2 / v) / (stamp.size - 1) > 2.0
        checked += 1
    assert checked >= 3


def test_science_psf_varies_across_detector_and_between_visits(survey):
    ny, nx = SMALL.detector_shape
    centres = []
    for visit, detector in survey.visits:
        psf = survey.psf(visit, detector)
        centre = psf.fwhm((nx - 1) / 2, (ny - 1) / 2)
        assert centre == pytest.approx(survey.visit_spec(visit).psf_fwhm)
        assert SMALL.science_fwhm_range[0] <= centre <= SMALL.science_fwhm_range[1]
        grid = np.linspace(0, nx - 1, 21)
        change = np.array([[psf.fwhm(x, y) / centre - 1 for x in grid] for y in grid])
        assert 0.10 < np.abs(change).max() <= SMALL.psf_variation + 1e-9
        centres.append(centre)
    assert len(set(np.round(centres, 6))) == SMALL.n_visits
    assert survey.template_psf().fwhm() == SMALL.template_fwhm < min(centres)


# ---------------------------------------------------------------------------------------------
# Defects
# ---------------------------------------------------------------------------------------------


def test_saturated_stars_are_clipped_and_flagged(all_visit_images):
    n_saturated = 0
    for image in all_visit_images.values():
        img, _, mask = image.exposure.arrays()
        sat = plane_set(mask, "SAT")
        bad = plane_set(mask, "BAD")
        ceiling = SMALL.saturation - image.background
        assert np.allclose(img[sat & ~bad], ceiling[sat & ~bad], rtol=0, atol=0.02)
        assert np.all(img[~sat & ~bad] < ceiling[~sat & ~bad])
        saturated = image.truth[image.truth["saturated"]]
        for row in saturated.itertuples():
            assert sat[int(math.floor(row.y + 0.5)), int(math.floor(row.x + 0.5))]
        n_saturated += int(saturated["kind"].isin(["star", "variable"]).sum())
    assert n_saturated >= 2


def test_bad_columns_are_flagged_and_fixed_per_detector(survey, all_visit_images):
    for detector in range(SMALL.n_detectors):
        columns = survey.bad_columns(detector)
        assert len(columns) == SMALL.n_bad_columns
        expected = np.zeros(SMALL.detector_shape, dtype=bool)
        for col in columns.itertuples():
            expected[col.y_start:col.y_stop, col.column] = True
        for visit in range(SMALL.n_visits):
            image = all_visit_images[(visit, detector)]
            img, _, mask = image.exposure.arrays()
            assert np.array_equal(plane_set(mask, "BAD"), expected)
            for col in columns.itertuples():
                values = img[col.y_start:col.y_stop, col.column]
                if col.hot:
                    neighbour = img[col.y_start:col.y_stop, (col.column + 3) % img.shape[1]]
                    assert np.median(values) - np.median(neighbour) > 1000
                else:
                    assert np.all(values == 0)


def test_cosmic_rays_are_in_truth_but_not_flagged(all_visit_images):
    for image in all_visit_images.values():
        img, var, mask = image.exposure.arrays()
        assert not plane_set(mask, "CR").any()
        rays = image.truth[image.truth["kind"] == "cosmic_ray"]
        assert len(rays) > 0
        counts_per_njy = 1.0 / image.exposure.photo_calib.njy_per_count
        checked = 0
        for ray in rays.itertuples():
            others = rays[rays["id"] != ray.id]
            gap = np.hypot(others["x"] - ray.x, others["y"] - ray.y) - others["trail_length"] / 2
            if np.any(gap < ray.trail_length / 2 + 6):
                continue  # another hit shares the box
            ix, iy = int(math.floor(ray.x + 0.5)), int(math.floor(ray.y + 0.5))
            half = int(math.ceil(ray.trail_length / 2)) + 1
            rows = slice(max(iy - half, 0), iy + half + 1)
            cols = slice(max(ix - half, 0), ix + half + 1)
            excess = img[rows, cols] - image.model[rows, cols]
            if plane_set(mask[rows, cols], ["SAT", "BAD"]).any():
                continue
            # The deposited charge is all there (within the noise of the box).
            noise = math.sqrt(var[rows, cols].sum())
            assert abs(excess.sum() - ray.flux * counts_per_njy) < 5 * noise
            assert excess.max() > 5 * math.sqrt(var[rows, cols].max())  # sharp, not smeared
            checked += 1
        assert checked > 0


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def test_template_patches_tile_the_visits_and_overlap(survey):
    patches = survey.template_patches()
    assert [p.id for p in patches] == list(range(len(patches)))
    header = patches[0].wcs.to_header().tostring()
    assert all(p.wcs.to_header().tostring() == header for p in patches)
    by_index = {p.index: p for p in patches}
    for (ix, iy), patch in by_index.items():
        right = by_index.get((ix + 1, iy))
        if right is not None:
            overlap = patch.outer_bbox[0] + patch.outer_bbox[2] - right.outer_bbox[0]
            assert overlap == 2 * SMALL.patch_border
    # Every detector corner lies in some patch's inner box.
    for visit, detector in survey.visits:
        wcs = survey.wcs(visit, detector)
        ra, dec = wcs.all_pix2world([-0.5, 511.5, -0.5, 511.5], [-0.5, -0.5, 511.5, 511.5], 0)
        tx, ty = survey.tract.wcs.all_world2pix(ra, dec, 0)
        for x, y in zip(tx, ty):
            assert any(p.inner_bbox[0] - 0.5 <= x < p.inner_bbox[0] + p.inner_bbox[2] - 0.5
                       and p.inner_bbox[1] - 0.5 <= y < p.inner_bbox[1] + p.inner_bbox[3] - 0.5
                       for p in patches)
        assert survey.patches_overlapping(visit, detector)


def test_template_patches_share_the_sky_with_each_other_and_visits(survey, all_visit_images):
    patches = {p.index: p for p in survey.template_patches()}
    left, right = patches[(0, 0)], patches[(1, 0)]
    image_left = survey.simulate_template_patch(left.id)
    image_right = survey.simulate_template_patch(right.id)
    # The noise-free models agree pixel by pixel where the patches overlap.
    x0 = right.outer_bbox[0]
    x1 = left.outer_bbox[0] + left.outer_bbox[2]
    y0, y1 = left.outer_bbox[1], left.outer_bbox[1] + left.outer_bbox[3]
    strip_left = image_left.model[:, x0 - left.outer_bbox[0]:x1 - left.outer_bbox[0]]
    strip_right = image_right.model[y0 - right.outer_bbox[1]:y1 - right.outer_bbox[1],
                                    :x1 - x0]
    assert np.allclose(strip_left, strip_right, rtol=1e-5, atol=1e-3)
    assert np.abs(strip_left).max() > 100

    # A bright star in the overlap has the same measured flux in both patches and in the visits.
    psf = survey.template_psf()
    counts_per_njy = 1.0 / image_left.exposure.photo_calib.njy_per_count
    truth = image_left.truth.set_index("id")
    right_ids = set(image_right.truth["id"])
    checked = 0
    for row in image_left.truth.itertuples():
        if row.kind != "star" or row.saturated or row.id not in right_ids:
            continue
        if row.template_flux * counts_per_njy < 5.0e3 or not _isolated(image_left.truth, row, 15.0):
            continue
        if not (x0 + 15 < row.x < x1 - 15):
            continue
        fluxes, errors = [], []
        for image in (image_left, image_right):
            img, var, _ = image.exposure.arrays()
            f, e, *_ = _psf_fit(img, var, image.exposure.psf, row.x, row.y,
                                origin=image.exposure.origin)
            fluxes.append(f / counts_per_njy)
            errors.append(e / counts_per_njy)
        assert abs(fluxes[0] - fluxes[1]) < 5 * math.hypot(*errors)
        assert abs(fluxes[0] - truth.loc[row.id, "template_flux"]) < 5 * errors[0]
        for image in all_visit_images.values():
            visit_truth = image.truth.set_index("id")
            if row.id not in visit_truth.index:
                continue
            vt = visit_truth.loc[row.id]
            img, var, mask = image.exposure.arrays()
            vpsf = image.exposure.psf
            if not _stamp_clean(mask, vt["x"], vt["y"], vpsf.default_size // 2, img.shape):
                continue
            f, e, *_ = _psf_fit(img, var, vpsf, vt["x"], vt["y"])
            njy = image.exposure.photo_calib.njy_per_count
            assert abs(f * njy - fluxes[0]) < 5 * math.hypot(e * njy, errors[0])
        checked += 1
    assert checked >= 3
    assert psf.fwhm() == SMALL.template_fwhm

    # Template noise is the coadd noise recorded in the variance plane.
    img, var, mask = image_left.exposure.arrays()
    quiet = (image_left.model < 0.01 * np.sqrt(var)) & (mask == 0)
    assert 0.97 < np.std(img[quiet] / np.sqrt(var[quiet])) < 1.03
    single_visit = SMALL.sky_level / SMALL.gain + (SMALL.read_noise / SMALL.gain) ** 2
    assert np.median(var[quiet]) == pytest.approx(single_visit / SMALL.template_depth, rel=1e-3)


def test_variables_change_between_template_and_visit(survey, all_visit_images):
    stars = survey.sky.stars.set_index("id")
    n_checked = 0
    for (visit, _), image in all_visit_images.items():
        mjd = survey.visit_spec(visit).mjd
        variables = image.truth[image.truth["kind"] == "variable"]
        assert len(variables) > 0
        expected = variable_flux(stars.loc[variables["id"]], mjd)
        assert np.allclose(variables["flux"], expected)
        assert np.allclose(variables["template_flux"], stars.loc[variables["id"], "flux"])
        assert np.allclose(variables["delta_flux"], variables["flux"] - variables["template_flux"])
        assert np.all(np.sign(variables["snr"]) == np.sign(variables["delta_flux"]))
        n_checked += len(variables)
    assert n_checked > 10


def test_transients_on_galaxies_sit_on_their_host(all_visit_images):
    n_hosted = 0
    for image in all_visit_images.values():
        truth = image.truth
        galaxies = truth[truth["kind"] == "galaxy"].set_index("id")
        hosted = truth[(truth["kind"] == "transient") & truth["on_galaxy"]]
        for row in hosted.itertuples():
            host = galaxies.loc[row.host_id]
            major = host["r_eff"] / math.sqrt(host["axis_ratio"]) / SMALL.pixel_scale
            assert math.hypot(row.x - host["x"], row.y - host["y"]) < 2.5 * major + 1.0
        n_hosted += len(hosted)
    assert n_hosted >= 0.15 * SMALL.n_transients * len(all_visit_images)


# ---------------------------------------------------------------------------------------------
# Exposure metadata
# ---------------------------------------------------------------------------------------------


def test_exposure_metadata_and_round_trip(survey, visit_image):
    exposure = visit_image.exposure
    spec = survey.visit_spec(1)
    info = exposure.info
    assert (info.visit, info.detector, info.band) == (1, 1, SMALL.band)
    assert info.mjd == spec.mjd and info.airmass == spec.airmass
    assert (info.gain, info.read_noise, info.saturation) == (SMALL.gain, SMALL.read_noise,
                                                            SMALL.saturation)
    assert exposure.photo_calib.zero_point == spec.zero_point
    assert exposure.psf.is_spatially_varying
    back = Exposure.from_xarray(exposure.to_xarray())
    x = np.array([0.0, 250.0, 511.0])
    ra, dec = exposure.pixel_to_sky(x, x)
    ra2, dec2 = back.pixel_to_sky(x, x)
    assert np.allclose(ra, ra2, rtol=0, atol=1e-10) and np.allclose(dec, dec2, rtol=0, atol=1e-10)
    assert back.psf.to_dict() == exposure.psf.to_dict()
    assert "SIP" in exposure.wcs.wcs.ctype[0]


# ---------------------------------------------------------------------------------------------
# Profiles, galaxies and trails
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0.5, 1.0, 2.0])
def test_sersic_mixture_half_light_radius(n):
    weights, variances = sersic_mixture(n)
    assert weights.sum() == pytest.approx(1.0)
    radius = np.linspace(0, 30, 300_001)
    enclosed = sum(w * (1 - np.exp(-radius ** 2 / (2 * s))) for w, s in zip(weights, variances))
    assert np.interp(0.5, enclosed, radius) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("n", [1.0, 2.5])
def test_galaxy_rendering_matches_analytic_convolution(n):
    """Fourier rendering == pixel-integrated analytic Gaussian-mixture ⊗ Gaussian PSF."""
    psf = GaussianPsf(2.5)
    weights, variances = sersic_mixture(n)
    shape = shape_matrix(2.0, 0.6, 30.0)[0]
    model = np.zeros((101, 101))
    x0, y0, counts = 50.3, 49.8, 1000.0
    render.render_galaxies(model, [x0], [y0], [counts], shape[None], [weights], [variances], psf)
    sub = (np.arange(10) + 0.5) / 10 - 0.5
    fine = (np.arange(101)[:, None] + sub[None, :]).ravel()
    xx, yy = np.meshgrid(fine - x0, fine - y0)
    psf_var = (2.5 / FWHM_PER_SIGMA) ** 2
    reference = np.zeros_like(xx)
    for w, s in zip(weights, variances):
        cov = s * shape + psf_var * np.eye(2)
        inv = np.linalg.inv(cov)
        quad = inv[0, 0] * xx * xx + 2 * inv[0, 1] * xx * yy + inv[1, 1] * yy * yy
        reference += w * np.exp(-0.5 * quad) / (2 * np.pi * math.sqrt(np.linalg.det(cov)))
    reference = counts * reference.reshape(101, 10, 101, 10).mean(axis=(1, 3))
    assert model.sum() == pytest.approx(counts, rel=1e-6)
    assert np.abs(model - reference).max() < 2e-3 * reference.max()


def test_moving_object_trail_length_and_direction():
    pair = simulate_pair((256, 256), n_transients=0, n_moving=1, moving_snr_range=(3000.0, 3000.0),
                         trail_length_range=(20.0, 20.0), star_density=0.0, galaxy_density=0.0,
                         science_fwhm_variation=0.0, seed=4)
    row = pair.truth[pair.truth["kind"] == "moving"].iloc[0]
    model = pair.science_model.astype(float)
    counts = row["flux"] / pair.science.photo_calib.njy_per_count
    assert model.sum() == pytest.approx(counts, rel=1e-4)
    yy, xx = np.mgrid[:256, :256]
    cx, cy = (model * xx).sum() / model.sum(), (model * yy).sum() / model.sum()
    assert math.hypot(cx - row["x"], cy - row["y"]) < 0.02
    cov = np.cov(np.vstack([xx.ravel(), yy.ravel()]), aweights=model.ravel())
    evals, evecs = np.linalg.eigh(cov)
    # A segment of length L convolved with a round PSF: variance L²/12 + σ² along, σ² across.
    length = math.sqrt(12 * (evals[1] - evals[0]))
    assert length == pytest.approx(row["trail_length"], abs=0.2)
    angle = math.degrees(math.atan2(evecs[1, 1], evecs[0, 1])) % 180
    difference = abs(angle - row["trail_angle"] % 180)
    assert min(difference, 180 - difference) < 0.5
    # The truth S/N is the matched-filter S/N of the trail profile.
    trail = model / counts
    sigma = math.sqrt(SurveyConfig().sky_level / SurveyConfig().gain
                      + (SurveyConfig().read_noise / SurveyConfig().gain) ** 2)
    assert counts * math.sqrt(np.sum(trail ** 2)) / sigma == pytest.approx(row["snr"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# simulate_pair
# ---------------------------------------------------------------------------------------------


def test_pair_template_is_oracle_consistent_with_science():
    """template ⊗ Gaussian(σ_s² − σ_t²) reproduces the science star (noise-free models)."""
    pair = simulate_pair((256, 256), template_fwhm=2.5, science_fwhm=3.5, n_transients=0,
                         star_density=0.0, galaxy_density=0.0, seed=3,
                         point_sources=pd.DataFrame({"x": [80.2, 170.6], "y": [90.7, 160.1],
                                                     "flux": [2.0e5, 2.0e5]}))
    assert pair.science.shape == pair.template.shape == (256, 256)
    assert pair.science.wcs.to_header().tostring() == pair.template.wcs.to_header().tostring()
    assert pair.template.psf is pair.template_psf and pair.science.psf is pair.science_psf
    counts = 2.0e5 / pair.science.photo_calib.njy_per_count
    for x, y in [(80.2, 90.7), (170.6, 160.1)]:
        ix, iy = int(round(x)), int(round(y))
        cut = (slice(iy - 20, iy + 21), slice(ix - 20, ix + 21))
        template = pair.template_model[cut].astype(float)
        science = pair.science_model[cut].astype(float)
        sigma2 = (pair.science_psf.sigma(x, y) ** 2 - pair.template_psf.sigma(x, y) ** 2)
        k = np.fft.fftfreq(41)
        kernel_ft = np.exp(-2 * np.pi ** 2 * sigma2 * (k[:, None] ** 2 + k[None, :] ** 2))
        matched = np.fft.ifft2(np.fft.fft2(template) * kernel_ft).real
        assert science.sum() == pytest.approx(counts, rel=1e-3)
        assert np.abs(matched - science).max() < 3e-3 * science.max()


def test_pair_misregistration_and_displaced_star():
    shift = (0.3, -0.2)
    sources = pd.DataFrame({"x": [60.0, 190.0], "y": [60.0, 190.0], "flux": [1.0e5, 1.0e5],
                            "template_x": [60.5, np.nan], "template_y": [60.0, np.nan]})
    sources["template_x"] = sources["template_x"].fillna(sources["x"] + shift[0])
    sources["template_y"] = sources["template_y"].fillna(sources["y"] + shift[1])
    pair = simulate_pair((256, 256), n_transients=0, star_density=0.0, galaxy_density=0.0,
                         misregistration=shift, point_sources=sources, seed=5)
    user = pair.truth[pair.truth["id"] >= 5 * 10 ** 15]
    assert np.allclose(user["template_x"], [60.5, 190.3])
    assert np.allclose(user["delta_flux"], 0.0)
    for (sx, sy), (tx, ty) in [((60.0, 60.0), (60.5, 60.0)), ((190.0, 190.0), (190.3, 189.8))]:
        for model, (ex, ey) in ((pair.science_model, (sx, sy)), (pair.template_model, (tx, ty))):
            cut = model[int(sy) - 15:int(sy) + 16, int(sx) - 15:int(sx) + 16].astype(float)
            yy, xx = np.mgrid[int(sy) - 15:int(sy) + 16, int(sx) - 15:int(sx) + 16]
            assert (cut * xx).sum() / cut.sum() == pytest.approx(ex, abs=0.01)
            assert (cut * yy).sum() / cut.sum() == pytest.approx(ey, abs=0.01)
    # Sky sources follow the misregistration too.
    pair = simulate_pair((256, 256), n_transients=0, misregistration=shift, seed=6)
    stars = pair.truth[pair.truth["kind"] == "star"]
    assert np.allclose(stars["template_x"] - stars["x"], shift[0])


def test_pair_noise_levels_and_determinism():
    kwargs = dict(n_transients=10, template_noise_factor=0.5, seed=8, n_bad_columns=1,
                  cosmic_ray_rate=10.0)
    pair = simulate_pair((384, 384), **kwargs)
    again = simulate_pair((384, 384), **kwargs)
    for a, b in zip(pair.template.arrays() + pair.science.arrays(),
                    again.template.arrays() + again.science.arrays()):
        assert np.array_equal(a, b)
    s_var = pair.science.arrays()[1]
    t_img, t_var, _ = pair.template.arrays()
    quiet = pair.template_model < 0.01 * np.sqrt(t_var)
    assert np.median(t_var[quiet]) == pytest.approx(0.25 * np.median(s_var[quiet]), rel=1e-3)
    assert 0.97 < np.std(t_img[quiet] / np.sqrt(t_var[quiet])) < 1.03
    assert not (pair.truth.query("kind == 'transient'")[["template_x"]].notna().any().any())


# ---------------------------------------------------------------------------------------------
# Speed (printed, not asserted)
# ---------------------------------------------------------------------------------------------


def test_speed_of_a_2048_visit():
    survey = Survey(SurveyConfig(n_visits=1))
    start = time.perf_counter()
    sky = survey.sky
    sky_time = time.perf_counter() - start
    start = time.perf_counter()
    image = survey.simulate_visit(0, 0)
    visit_time = time.perf_counter() - start
    counts = image.truth["kind"].value_counts()
    n_stars = counts.get("star", 0) + counts.get("variable", 0)
    print(f"\n2048x2048 visit: {visit_time:.2f} s ({n_stars} stars, "
          f"{counts.get('galaxy', 0)} galaxies, {counts.get('transient', 0)} transients); "
          f"sky of {len(sky.stars)} stars + {len(sky.galaxies)} galaxies in {sky_time:.3f} s")
    assert image.exposure.shape == (2048, 2048)
