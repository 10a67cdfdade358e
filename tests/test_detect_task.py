"""End-to-end behaviour of detect_and_measure: planes, footprints, streaks, sky sources,
filters, pixel flags, the score variant, calibration, ids, metadata and errors."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from _detect_fixtures import add_point, add_trail, make_difference, mask_with, match, simple_wcs
from diffim_dask.detect import DetectAndMeasureConfig, detect_and_measure, make_smoothing_kernel
from diffim_dask.detect.detection import significance
from diffim_dask.errors import AlgorithmError, BadInputDataError, ConfigurationError
from diffim_dask.exposure import Exposure, PhotoCalib, VisitInfo
from diffim_dask.masks import mask_value, plane_set
from diffim_dask.psf import GaussianPsf
from diffim_dask.schema import column_names, unpack_dia_source_id, validate_catalog

PSF = GaussianPsf(3.0)


def _config(**sections) -> DetectAndMeasureConfig:
    data = {"sky_sources": {"n_sources": 0}}
    data.update(sections)
    return DetectAndMeasureConfig.from_dict(data)


@pytest.fixture(scope="module")
def mixed_scene():
    points = [(40.3, 40.6, 6000.0), (120.7, 50.2, -5000.0), (200.1, 60.9, 3000.0),
              (60.5, 150.4, -8000.0), (150.2, 160.8, 4000.0), (210.6, 200.3, -2500.0)]
    scene = make_difference((256, 256), PSF, points=points, seed=21, noise_sigma=8.0)
    return scene, points


def test_both_polarities_and_detection_planes(mixed_scene):
    scene, points = mixed_scene
    result = detect_and_measure(scene.difference, config=_config())
    catalog = result.catalog
    assert len(catalog) == len(points)
    _, _, mask = result.difference.arrays()
    detected = plane_set(mask, "DETECTED")
    negative = plane_set(mask, "DETECTED_NEGATIVE")
    for x, y, flux in points:
        row = catalog.loc[match(catalog, [x], [y], radius=0.5)[0]]
        assert row["isNegative"] == (flux < 0)
        assert np.sign(row["psfFlux"]) == np.sign(flux)
        iy, ix = int(round(y)), int(round(x))
        assert detected[iy, ix] == (flux > 0) and negative[iy, ix] == (flux < 0)
    assert result.metadata["n_positive"] == 3 and result.metadata["n_negative"] == 3
    assert result.metadata["n_pixels_detected_positive"] == int(detected.sum())
    # Far from sources nothing is detected.
    assert not detected[230:250, 20:60].any() and not negative[230:250, 20:60].any()
    # Footprint labels point at catalog rows.
    labels = result.footprints
    assert labels.max() == len(catalog)
    for k in range(1, len(catalog) + 1):
        ys, xs = np.nonzero(labels == k)
        row = catalog.iloc[k - 1]
        assert abs(xs.mean() - row["x"]) < 2 and abs(ys.mean() - row["y"]) < 2
    assert ((labels > 0) == (detected | negative)).all()


@pytest.mark.parametrize("grow_sigma", [0.0, 2.4, 4.0])
def test_footprints_grow_by_the_psf_scaled_radius(mixed_scene, grow_sigma):
    scene, _ = mixed_scene
    config = _config(detection={"grow_sigma": grow_sigma}, background={"enabled": False},
                     streaks={"enabled": False})
    result = detect_and_measure(scene.difference, config=config)
    radius = int(grow_sigma * PSF.sigma() + 0.5)
    assert result.metadata["grow_radius"] == radius
    image, variance, _ = scene.difference.arrays()
    _, _, nu = significance(image, variance, make_smoothing_kernel(PSF, 127.5, 127.5))
    above = nu >= 5.0
    _, _, mask = result.difference.arrays()
    detected = plane_set(mask, "DETECTED")
    # Independent check with a Euclidean distance transform.
    distance = ndimage.distance_transform_edt(~above)
    np.testing.assert_array_equal(detected, distance <= radius + 1e-9)


def test_streak_is_masked_and_short_trails_are_not():
    shape = (512, 512)
    scene = make_difference(shape, PSF, seed=23, noise_sigma=8.0,
                            points=[(400.4, 100.3, 5000.0), (100.2, 420.8, -4000.0)],
                            trails=[(380.0, 380.0, 395.0, 392.0, 20000.0)])
    image = scene.difference.arrays()[0].astype(float)
    # A satellite crossing the whole image: 600 px long, ~3 sigma per pixel on its ridge.
    x0, y0, x1, y1 = -20.0, 30.0, 540.0, 330.0
    add_trail(image, PSF, x0, y0, x1, y1, 130.0 * math.hypot(x1 - x0, y1 - y0), step=0.25)
    add_point(image, PSF, 250.0 + 0.3, 30.0 + 300.0 * (250.0 - x0) / (x1 - x0), 6000.0)
    exposure = scene.difference.with_planes(image=image.astype(np.float32))
    result = detect_and_measure(exposure, config=_config())
    assert result.metadata["n_streaks"] == 1
    streak = result.streaks[0]
    assert streak.angle == pytest.approx(math.degrees(math.atan2(y1 - y0, x1 - x0)), abs=1.0)
    assert streak.length > 400
    _, _, mask = result.difference.arrays()
    streak_plane = plane_set(mask, "STREAK")
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ux, uy = (x1 - x0), (y1 - y0)
    dist = np.abs((xx - x0) * uy - (yy - y0) * ux) / math.hypot(ux, uy)
    assert streak_plane[dist <= 2.0].mean() > 0.99, "the streak's core is masked"
    assert not streak_plane[dist > 20].any(), "nothing far from it is"
    catalog = result.catalog
    on_streak = catalog[np.abs((catalog["x"] - x0) * uy - (catalog["y"] - y0) * ux)
                        / math.hypot(ux, uy) < 3]
    assert len(on_streak) >= 1 and on_streak["pixelFlags_streakCenter"].all()
    off = catalog.loc[match(catalog, [400.4, 100.2], [100.3, 420.8], radius=1.0)]
    assert not off["pixelFlags_streak"].any()
    trail_row = catalog[np.hypot(catalog["x"] - 387.5, catalog["y"] - 386.0) < 12]
    assert len(trail_row) == 1 and not trail_row["pixelFlags_streak"].iloc[0]


def test_no_streak_in_pure_noise_or_compact_sources(mixed_scene):
    scene, _ = mixed_scene
    result = detect_and_measure(scene.difference, config=_config())
    assert result.metadata["n_streaks"] == 0
    _, _, mask = result.difference.arrays()
    assert not plane_set(mask, "STREAK").any()


def test_sky_sources_calibrate_the_noise():
    shape = (1024, 1024)
    rng = np.random.default_rng(24)
    points = [(x, y, f) for x, y, f in zip(rng.uniform(30, 990, 40), rng.uniform(30, 990, 40),
                                           rng.uniform(3000, 9000, 40) * rng.choice([-1, 1], 40))]
    scene = make_difference(shape, PSF, points=points, seed=25, noise_sigma=10.0)
    config = DetectAndMeasureConfig.from_dict({"sky_sources": {"n_sources": 400, "seed": 3}})
    result = detect_and_measure(scene.difference, config=config)
    catalog = result.catalog
    sky = catalog[catalog["isSky"]]
    assert len(sky) == 400 and result.metadata["n_sky_sources"] == 400
    ratio = sky["psfFlux"].std() / sky["psfFluxErr"].mean()
    assert 0.9 <= ratio <= 1.1
    assert result.metadata["sky_noise_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert 0.9 <= result.metadata["sky_snr_std"] <= 1.1
    # Sky footprints avoid detections and do not overlap each other.
    _, _, mask = result.difference.arrays()
    avoid = plane_set(mask, ["DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE"])
    labels = result.footprints
    sky_labels = np.flatnonzero(catalog["isSky"].to_numpy()) + 1
    in_sky = np.isin(labels, sky_labels)
    assert not (in_sky & avoid).any()
    assert np.bincount(labels[in_sky]).max() == np.bincount(labels[in_sky])[sky_labels[0]]
    assert not sky["pixelFlags_edge"].any() and not sky["isNegative"].any()
    # Placement is reproducible and changes with the seed.
    again = detect_and_measure(scene.difference, config=config).catalog
    pd.testing.assert_frame_equal(catalog, again)
    other = detect_and_measure(scene.difference, config=config.replace(
        sky_sources=config.sky_sources.replace(seed=4))).catalog
    assert not np.array_equal(other[other["isSky"]]["x"].to_numpy(), sky["x"].to_numpy())


def _flag_scene():
    shape = (200, 200)
    planes = {
        "BAD": [(0, 200, 50, 51)],              # a bad column through source 0
        "SAT": [(98, 103, 98, 103)],            # saturated core of source 1
        "NO_DATA": [(150, 200, 150, 200)],      # a no-data corner holding source 2
        "SAT_TEMPLATE": [(29, 32, 149, 152)],   # saturated in the template: source 3
        "INTRP": [(159, 162, 29, 32)],          # interpolated 3x3 centre: source 4
        "CR": [(72, 73, 158, 159)],             # a cosmic ray in the footprint of source 5
        "SUSPECT": [(130, 131, 100, 101)],      # suspect centre pixel: source 6
    }
    mask = mask_with(shape, planes)
    points = [(50.2, 120.4, 6000.0), (100.3, 100.1, 6000.0), (170.4, 175.6, 6000.0),
              (150.1, 30.3, -6000.0), (30.2, 160.0, 6000.0), (155.6, 70.2, 6000.0),
              (100.4, 130.2, 6000.0), (120.6, 40.3, 6000.0),
              (145.8, 170.3, 6000.0)]                # footprint reaches the no-data corner
    scene = make_difference(shape, PSF, points=points, seed=26, noise_sigma=8.0, mask=mask)
    image, variance, mask = scene.difference.arrays()
    nodata = plane_set(mask, "NO_DATA")
    image, variance = image.copy(), variance.copy()
    image[nodata], variance[nodata] = 0.0, 0.0
    # The no-data corner still holds the core of source 2 in an unmasked sliver.
    exposure = scene.difference.with_planes(image=image, variance=variance)
    return exposure, points


def test_filters_remove_bad_sources_and_count_them():
    exposure, points = _flag_scene()
    keep_all = _config(filters={"reject_peak_planes": [], "drop_flags": []})
    everything = detect_and_measure(exposure, config=keep_all)
    full = everything.catalog

    def row_at(catalog, k):
        idx = match(catalog, [points[k][0]], [points[k][1]], radius=1.5)[0]
        return None if idx < 0 else catalog.loc[idx]

    assert row_at(full, 0)["pixelFlags_badCenter"] and row_at(full, 0)["pixelFlags_bad"]
    assert row_at(full, 1)["pixelFlags_saturatedCenter"]
    assert row_at(full, 3)["pixelFlags_sat_templateCenter"]
    assert row_at(full, 4)["pixelFlags_interpolatedCenterAll"]
    assert row_at(full, 7) is not None and not row_at(full, 7)[
        [c for c in full.columns if c.startswith("pixelFlags")]].any()

    default = detect_and_measure(exposure, config=_config())
    catalog = default.catalog
    meta = default.metadata
    for k in (0, 1, 3, 4):
        assert row_at(catalog, k) is None, f"source {k} is removed"
    for k in (5, 6, 7):
        assert row_at(catalog, k) is not None, f"source {k} is kept"
    removed = meta["n_rejected_bad_mask_planes"] + meta["n_removed_flagged"]
    assert removed == len(full) - len(catalog)
    assert meta["dropped_pixelFlags_sat_templateCenter"] >= 1
    assert meta["dropped_pixelFlags_interpolatedCenterAll"] >= 1
    assert meta["n_rejected_bad_mask_planes"] >= 2       # peaks on BAD and SAT
    # Only the post-measurement flags: the same sources go, all counted there.
    late = detect_and_measure(exposure, config=_config(filters={"reject_peak_planes": []}))
    assert late.metadata["n_rejected_bad_mask_planes"] == 0
    assert late.metadata["dropped_pixelFlags_badCenter"] >= 1
    assert late.metadata["dropped_pixelFlags_saturatedCenter"] >= 1
    assert len(late.catalog) == len(catalog)


def test_pixel_flags_center_versus_footprint():
    exposure, points = _flag_scene()
    catalog = detect_and_measure(exposure, config=_config()).catalog
    cr_source = catalog.loc[match(catalog, [points[5][0]], [points[5][1]])[0]]
    assert cr_source["pixelFlags_cr"] and not cr_source["pixelFlags_crCenter"]
    suspect = catalog.loc[match(catalog, [points[6][0]], [points[6][1]])[0]]
    assert suspect["pixelFlags_suspectCenter"] and suspect["pixelFlags_suspect"]
    assert not suspect["pixelFlags_crCenter"]
    near_gap = catalog.loc[match(catalog, [points[8][0]], [points[8][1]])[0]]
    assert near_gap["pixelFlags_nodata"] and not near_gap["pixelFlags_nodataCenter"]
    clean = catalog.loc[match(catalog, [points[7][0]], [points[7][1]])[0]]
    assert not clean[[c for c in catalog.columns if c.startswith("pixelFlags")]].any()


def test_edge_and_no_data_handling():
    shape = (160, 160)
    points = [(3.2, 80.4, 8000.0), (80.3, 80.7, 8000.0)]
    mask = mask_with(shape, {"NO_DATA": [(0, 160, 120, 160)]})
    scene = make_difference(shape, PSF, points=points, seed=27, noise_sigma=8.0, mask=mask)
    image, variance, mask = scene.difference.arrays()
    image, variance = image.copy(), variance.copy()
    image[:, 130] = np.nan                                 # non-finite pixels become NO_DATA
    exposure = scene.difference.with_planes(image=image, variance=variance)
    result = detect_and_measure(exposure, config=_config())
    _, _, out_mask = result.difference.arrays()
    half = make_smoothing_kernel(PSF, 80, 80).half_width
    assert plane_set(out_mask, "EDGE")[:, :half].all() and not plane_set(out_mask, "EDGE")[80, 60]
    assert plane_set(out_mask, "NO_DATA")[:, 130].all()
    catalog = result.catalog
    assert len(catalog) == 1 and abs(catalog["x"].iloc[0] - 80.3) < 0.3
    out_image, _, _ = result.difference.arrays()
    assert (out_image[:, 120:] == 0).all()


def test_score_image_is_not_smoothed_again():
    rng = np.random.default_rng(28)
    shape = (128, 128)
    difference = make_difference(shape, PSF, seed=29, noise_sigma=5.0).difference
    score = rng.normal(size=shape)
    spikes = [(30, 40, 7.5), (90, 100, -8.0), (64, 20, 9.0)]
    for y, x, value in spikes:
        score[y, x] = value
    score_exposure = Exposure.from_arrays(score.astype(np.float32), np.ones(shape, np.float32),
                                          psf=PSF)
    config = _config(background={"enabled": False}, streaks={"enabled": False})
    result = detect_and_measure(difference, score=score_exposure, config=config)
    catalog = result.catalog
    assert len(catalog) == 3
    assert result.metadata["smoothing"].startswith("none")
    for y, x, value in spikes:
        # Measurement is on the (source-free) difference, so the centroid wanders a little.
        row = catalog.loc[match(catalog, [x], [y], radius=2.5)[0]]
        assert row["snr"] == pytest.approx(abs(value), rel=1e-5)    # the score pixel itself
        assert row["isNegative"] == (value < 0)
    # Detection planes are copied to the score exposure.
    _, _, score_mask = result.score.arrays()
    assert plane_set(score_mask, "DETECTED")[30, 40]
    assert plane_set(score_mask, "DETECTED_NEGATIVE")[90, 100]
    # The same image as a difference (smoothed) would not find these single-pixel spikes.
    plain = detect_and_measure(score_exposure, config=config)
    assert len(plain.catalog) == 0


def test_score_variant_matches_difference_detection(mixed_scene):
    scene, points = mixed_scene
    image, variance, _ = scene.difference.arrays()
    kernel = make_smoothing_kernel(PSF, 127.5, 127.5)
    filtered, sigma, _ = significance(image, variance, kernel)
    score = Exposure.from_arrays(filtered, sigma**2, psf=PSF)
    config = _config()
    with_score = detect_and_measure(scene.difference, score=score, config=config).catalog
    plain = detect_and_measure(scene.difference, config=config).catalog
    assert len(with_score) == len(plain) == len(points)
    rows = match(with_score, plain["x"], plain["y"], radius=0.3)
    assert (rows >= 0).all()
    np.testing.assert_allclose(with_score.loc[rows, "snr"], plain["snr"], rtol=0.02)
    np.testing.assert_allclose(with_score.loc[rows, "psfFlux"], plain["psfFlux"], rtol=0.01)


def test_background_is_removed_before_detection():
    shape = (512, 512)
    points = [(x, y, 4000.0) for x in (100.3, 250.7, 400.2) for y in (120.6, 300.1, 450.4)]

    def background(yy, xx):
        return 40.0 + 0.05 * xx - 0.03 * yy + 15.0 * np.sin(xx / 90.0) * np.cos(yy / 120.0)

    scene = make_difference(shape, PSF, points=points, seed=30, noise_sigma=8.0,
                            background=background)
    result = detect_and_measure(scene.difference, config=_config())
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    residual = (result.background.image - background(yy, xx))[20:-20, 20:-20]
    assert np.sqrt(np.mean(residual**2)) < 0.1 * 8.0
    assert result.background.bin_size == 40
    catalog = result.catalog
    assert len(catalog) == len(points)
    rows = match(catalog, [p[0] for p in points], [p[1] for p in points])
    ratio = catalog.loc[rows, "psfFlux"].to_numpy() / 4000.0
    assert abs(ratio.mean() - 1) < 0.03
    # Without background removal the same image is one flooded footprint (and still finishes).
    flooded = detect_and_measure(scene.difference, config=_config(background={"enabled": False}))
    assert flooded.metadata["DETECTED_mask_fraction"] > 0.9
    assert flooded.metadata["n_merged_footprints"] <= 3


def test_calibration_wcs_ids_and_catalog_schema(mixed_scene):
    scene, _ = mixed_scene
    calib = PhotoCalib(zero_point=27.0)
    wcs = simple_wcs((256, 256))
    info = VisitInfo(visit=2025061, detector=17, band="i", mjd=60830.123)
    diff = scene.difference.replace(photo_calib=calib, wcs=wcs, info=info)
    plain = detect_and_measure(scene.difference, config=_config())
    result = detect_and_measure(diff, config=_config(), id_offset=100)
    catalog = result.catalog
    assert result.metadata["flux_unit"] == "nJy" and plain.metadata["flux_unit"] == "count"
    np.testing.assert_allclose(catalog["psfFlux"], plain.catalog["psfFlux"] * calib.njy_per_count,
                               rtol=1e-5)
    ra, dec = wcs.all_pix2world(catalog["x"], catalog["y"], 0)
    np.testing.assert_allclose(catalog["ra"], ra)
    np.testing.assert_allclose(catalog["dec"], dec)
    scale = 0.2 / 3600.0
    np.testing.assert_allclose(catalog["decErr"], catalog["yErr"] * scale, rtol=1e-3)
    assert plain.catalog["ra"].isna().all() and plain.catalog["dec"].isna().all()
    assert (catalog["visit"] == 2025061).all() and (catalog["detector"] == 17).all()
    assert (catalog["band"] == "i").all() and (catalog["midpointMjdTai"] == 60830.123).all()
    visit, detector, counter = unpack_dia_source_id(catalog["diaSourceId"])
    assert (visit == 2025061).all() and (detector == 17).all()
    np.testing.assert_array_equal(counter, 100 + np.arange(len(catalog)))
    assert list(catalog.columns) == column_names()
    table = result.to_arrow()
    assert table.num_rows == len(catalog)
    validate_catalog(catalog)


def test_dask_backed_input_gives_the_same_catalog(mixed_scene):
    scene, _ = mixed_scene
    lazy = scene.difference.chunk(64)
    assert lazy.is_lazy and isinstance(lazy.image.data, da.Array)
    eager = detect_and_measure(scene.difference, config=_config()).catalog
    chunked = detect_and_measure(lazy, config=_config()).catalog
    pd.testing.assert_frame_equal(eager, chunked)


def test_threads_do_not_change_the_result(mixed_scene):
    scene, _ = mixed_scene
    background = {"initial_bin_size": 16, "final_bin_size": 48}     # several bands per thread
    results = [detect_and_measure(scene.difference, config=DetectAndMeasureConfig.from_dict(
        {"workers": workers, "background": background})) for workers in (1, 2, 3)]
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0].catalog, other.catalog)
        np.testing.assert_array_equal(results[0].difference.arrays()[0],
                                      other.difference.arrays()[0])
        np.testing.assert_array_equal(results[0].background.grid, other.background.grid)


def test_input_is_not_modified(mixed_scene):
    scene, _ = mixed_scene
    before = [a.copy() for a in scene.difference.arrays()]
    detect_and_measure(scene.difference)
    for a, b in zip(before, scene.difference.arrays()):
        np.testing.assert_array_equal(a, b)


def test_metadata_reports_counts_and_timings(mixed_scene):
    scene, _ = mixed_scene
    result = detect_and_measure(scene.difference)
    meta = result.metadata
    for key in ("n_positive_footprints", "n_negative_footprints", "n_merged_footprints",
                "n_dia_sources", "n_positive", "n_negative", "n_dipoles", "n_sky_sources",
                "sky_psf_flux_std", "n_rejected_bad_mask_planes", "n_removed_flagged",
                "DETECTED_mask_fraction", "timing"):
        assert key in meta, key
    assert meta["n_positive_footprints"] == 3 and meta["n_negative_footprints"] == 3
    assert meta["n_sky_sources"] == 100
    assert meta["n_dia_sources"] + meta["n_sky_sources"] == len(result.catalog)
    assert meta["timing"]["total"] > 0


def test_errors_are_actionable(mixed_scene):
    scene, _ = mixed_scene
    with pytest.raises(BadInputDataError, match="no PSF"):
        detect_and_measure(scene.difference.replace(psf=None))
    small = scene.difference.cutout(slice(0, 100), slice(0, 100))
    with pytest.raises(BadInputDataError, match="same pixel grid"):
        detect_and_measure(scene.difference, science=small)
    nothing = scene.difference.with_planes(
        mask=np.full((256, 256), mask_value("NO_DATA"), dtype=np.uint32))
    with pytest.raises(BadInputDataError, match="no usable pixel"):
        detect_and_measure(nothing)
    noise = make_difference((128, 128), PSF, seed=31).difference
    config = _config(raise_on_no_sources=True)
    with pytest.raises(AlgorithmError, match="no DIA source") as info:
        detect_and_measure(noise, config=config)
    assert info.value.metadata["n_dia_sources"] == 0
    assert len(detect_and_measure(noise, config=_config()).catalog) == 0


def test_config_validation_names_the_field():
    with pytest.raises(ConfigurationError, match="polarity"):
        DetectAndMeasureConfig.from_dict({"detection": {"polarity": "up"}})
    with pytest.raises(ConfigurationError, match="drop_flags"):
        DetectAndMeasureConfig.from_dict({"filters": {"drop_flags": ["pixelFlags_nope"]}})
    with pytest.raises(ConfigurationError, match="final_bin_size"):
        DetectAndMeasureConfig.from_dict({"background": {"final_bin_size": 4}})
    with pytest.raises(ConfigurationError, match="unknown key"):
        DetectAndMeasureConfig.from_dict({"detection": {"thresh": 3}})
    config = DetectAndMeasureConfig.from_dict({"detection": {"threshold": 4}})
    assert config.detection.threshold == 4.0
    assert DetectAndMeasureConfig.from_dict(config.to_dict()) == config


def test_positive_only_polarity(mixed_scene):
    scene, _ = mixed_scene
    config = _config(detection={"polarity": "positive"})
    result = detect_and_measure(scene.difference, config=config)
    assert len(result.catalog) == 3 and not result.catalog["isNegative"].any()
    _, _, mask = result.difference.arrays()
    assert not plane_set(mask, "DETECTED_NEGATIVE").any()
