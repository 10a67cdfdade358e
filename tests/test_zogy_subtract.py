"""subtract_zogy on Exposures: interface, inputs (PSFs, flux ratio, registration), tiles, masks,
errors, dask inputs and the detection stage on its outputs.

Small seeded simulations (768² from ``simulate_pair`` with a varying science
PSF and a sub-pixel misregistration; 384² constant-PSF pairs rendered here).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from diffim_dask import Exposure, GaussianPsf, PhotoCalib, VisitInfo
from diffim_dask.detect import DetectAndMeasureConfig, detect_and_measure
from diffim_dask.errors import AlgorithmError, BadInputDataError, ConfigurationError, NoWorkFound
from diffim_dask.masks import mask_value
from diffim_dask.psf import GridPsf, ImagePsf
from diffim_dask.simulate import simulate_pair
from diffim_dask.simulate.render import render_point_sources
from diffim_dask.subtract import SubtractionResult
from diffim_dask.zogy import BinnedBackground, ZogyConfig, ZogyKernel, subtract_zogy

MISREGISTRATION = (0.37, -0.21)


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((768, 768), misregistration=MISREGISTRATION, n_transients=40,
                         snr_range=(10.0, 80.0), seed=4)


@pytest.fixture(scope="module")
def result(pair):
    return subtract_zogy(pair.science, pair.template)


def sky_pixels(pair, mask):
    sigma = np.sqrt(np.median(pair.science.arrays()[1]))
    return ((np.abs(pair.science_model) < 0.05 * sigma)
            & (np.abs(pair.template_model) < 0.05 * sigma) & (mask == 0))


def constant_psf_pair(shape=(384, 384), seed=0, sigma_science=20.0, sigma_template=5.0,
                      science_fwhm=3.5, template_fwhm=2.5):
    """Stars rendered with constant PSFs, constant variance planes (sky-limited noise)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n_stars = 120
    x = rng.uniform(10, nx - 10, n_stars)
    y = rng.uniform(10, ny - 10, n_stars)
    flux = 10 ** rng.uniform(3.0, 5.0, n_stars)
    science_psf, template_psf = GaussianPsf(science_fwhm), GaussianPsf(template_fwhm)
    exposures = []
    for psf, sigma in ((science_psf, sigma_science), (template_psf, sigma_template)):
        model = np.zeros(shape)
        render_point_sources(model, x, y, flux, psf)
        image = model + sigma * rng.standard_normal(shape)
        exposures.append(Exposure.from_arrays(
            image.astype(np.float32), np.full(shape, sigma**2, np.float32), psf=psf,
            photo_calib=PhotoCalib(27.0), info=VisitInfo(band="r")))
    return exposures[0], exposures[1], (x, y, flux)


# -- the shared interface -------------------------------------------------------------------------


def test_result_has_the_shared_interface(pair, result):
    assert isinstance(result, SubtractionResult)
    assert result.matched_template is result.matched_image
    for exposure in (result.difference, result.score, result.matched_image):
        assert exposure.shape == pair.science.shape and not exposure.is_lazy
        assert exposure.wcs is not None and exposure.photo_calib == pair.science.photo_calib
    assert isinstance(result.difference.psf, GridPsf)  # one P_D per tile, interpolated
    assert result.difference.psf.image(300.0, 400.0).sum() == pytest.approx(1.0)
    _, score_var, mask = result.score.arrays()
    valid = (mask & mask_value("NO_DATA")) == 0
    assert np.all(score_var[valid] == 1.0)
    # The kernels: k_N of unit sum, k_R summing to the flux ratio; evaluable anywhere.
    assert isinstance(result.kernel, ZogyKernel)
    assert result.kernel.image(100.0, 700.0).shape == (result.kernel.size,) * 2
    assert result.kernel.science_image().sum() == pytest.approx(1.0, abs=1e-3)
    assert result.kernel.kernel_sum(200.0, 200.0) == pytest.approx(
        result.metadata["flux_ratio"], rel=1e-3)
    assert result.kernel.to_dict()["type"] == "ZogyKernel"
    assert isinstance(result.background, BinnedBackground)
    assert result.background(np.array([10.0]), np.array([20.0])).shape == (1,)
    assert result.background.image((4, 5), pair.science.origin).shape == (4, 5)
    assert {"x", "y", "flux_science", "flux_template", "dx", "dy", "status", "used_flux_ratio",
            "used_registration"} <= set(result.kernel_sources.columns)
    meta = result.metadata
    for key in ("zero_point", "score_zero_point", "flux_ratio", "flux_ratio_source",
                "sigma_science", "sigma_template", "registration_dx", "registration_noise_x",
                "registration_noise_y", "tile_size", "tile_grid", "tile_fft_shape", "n_tiles",
                "time_tiles", "time_stars", "time_total", "tiles", "flux_image"):
        assert key in meta, key
    assert meta["flux_ratio_source"] == "calibration" and meta["flux_ratio"] == 1.0
    assert meta["zero_point"] == pytest.approx(
        1.0 / np.hypot(meta["sigma_science"], meta["sigma_template"]), rel=0.01)
    assert len(meta["tiles"]) == meta["n_tiles"]


def test_difference_and_score_statistics(pair, result):
    image, variance, mask = result.difference.arrays()
    score = result.score.arrays()[0]
    sky = sky_pixels(pair, mask)
    unit = image * result.metadata["zero_point"]       # the proper difference D
    assert unit[sky].std() == pytest.approx(1.0, abs=0.03)
    assert (image / np.sqrt(variance))[sky].std() == pytest.approx(1.0, abs=0.03)
    both = sky[:, :-1] & sky[:, 1:]
    assert abs(np.corrcoef(unit[:, :-1][both], unit[:, 1:][both])[0, 1]) < 0.03
    assert score[sky].std() == pytest.approx(1.0, abs=0.03)
    # The variance planes are not white-noise placeholders: source noise shows at stars.
    bright = pair.science_model > 50 * np.sqrt(np.median(pair.science.arrays()[1]))
    assert np.median(variance[bright & (mask == 0)]) > 2 * np.median(variance[sky])


def test_registration_is_measured_and_removed(pair, result):
    meta = result.metadata
    assert meta["registration_status"] == "fitted"
    assert meta["registration_dx"] == pytest.approx(MISREGISTRATION[0], abs=0.01)
    assert meta["registration_dy"] == pytest.approx(MISREGISTRATION[1], abs=0.01)
    # The images differ by a pure shift: the estimated registration noise is tiny.
    assert meta["registration_noise_x"] < 0.03 and meta["registration_noise_y"] < 0.03
    assert meta["n_registration_stars"] >= 20
    # The matched image is the template moved onto the science registration.
    stars = result.kernel_sources[result.kernel_sources["used_registration"]]
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()

    def mean_offset(image):
        offsets = []
        for xi, yi in zip(x, y):
            cx, cy = int(round(xi)), int(round(yi))
            box = image[cy - 3:cy + 4, cx - 3:cx + 4].astype(float)
            yy, xx = np.mgrid[-3:4, -3:4]
            offsets.append(((box * xx).sum() / box.sum() + cx - xi,
                            (box * yy).sum() / box.sum() + cy - yi))
        return np.median(np.array(offsets), axis=0)

    registered = mean_offset(result.matched_image.arrays()[0])
    raw = mean_offset(pair.template.arrays()[0])
    assert np.abs(registered).max() < 0.03
    assert raw[0] == pytest.approx(MISREGISTRATION[0], abs=0.05)
    # A linear offset model finds no gradient in a pure shift.
    linear = subtract_zogy(pair.science, pair.template,
                           ZogyConfig(registration="linear", flux_image=False))
    shifts = linear.metadata["tiles"][["shift_x", "shift_y"]].to_numpy()
    assert np.abs(shifts - np.array(MISREGISTRATION)).max() < 0.03


def test_unmodelled_misregistration_and_the_astrometric_term(pair, result):
    """Without the offset fit, bright stars leave dipoles; a registration noise of the size of
    the offset in S_corr's astrometric term suppresses them (eqs. 30–33)."""
    off = subtract_zogy(pair.science, pair.template,
                        ZogyConfig(registration="none", registration_noise=(0.0, 0.0)))
    damped = subtract_zogy(pair.science, pair.template,
                           ZogyConfig(registration="none", registration_noise=(0.4, 0.4)))
    sigma = np.sqrt(np.median(pair.science.arrays()[1]))
    stars = (pair.science_model > 200 * sigma) & (result.score.arrays()[2] == 0)

    def worst(r):
        return float(np.abs(r.score.arrays()[0][stars]).max())

    assert worst(off) > 20.0
    assert worst(result) < 0.3 * worst(off)
    assert worst(damped) < 0.3 * worst(off)
    assert damped.metadata["registration_noise_source"] == "config"


# -- flux ratio -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_pair(pair):
    """The template in other units: 2.5 science counts per template count."""
    ratio = 2.5
    image, variance, mask = pair.template.arrays()
    calib = PhotoCalib(pair.science.photo_calib.zero_point - 2.5 * np.log10(ratio))
    template = pair.template.with_planes(image / ratio, variance / ratio**2, mask) \
        .replace(photo_calib=calib)
    return pair.science, template, ratio


def test_flux_ratio_from_calibrations_and_fitted(scaled_pair):
    science, template, ratio = scaled_pair
    calibrated = subtract_zogy(science, template, ZogyConfig(flux_image=False))
    meta = calibrated.metadata
    assert meta["flux_ratio_source"] == "calibration"
    assert meta["flux_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert meta["flux_ratio_fitted"] == pytest.approx(ratio, abs=3 * meta["flux_ratio_fitted_err"]
                                                      + 0.005 * ratio)
    fitted = subtract_zogy(science, template.replace(photo_calib=None),
                           ZogyConfig(flux_image=False))
    assert fitted.metadata["flux_ratio_source"] == "fit"
    assert fitted.metadata["flux_ratio"] == pytest.approx(ratio, rel=0.01)
    # Either way static stars cancel: the template kernel carries the ratio.
    assert fitted.kernel.kernel_sum() == pytest.approx(fitted.metadata["flux_ratio"], rel=1e-3)
    fixed = subtract_zogy(science, template, ZogyConfig(flux_ratio_source="fixed", flux_ratio=2.0,
                                                        flux_image=False))
    assert fixed.metadata["flux_ratio"] == 2.0
    with pytest.raises(BadInputDataError, match="no PhotoCalib"):
        subtract_zogy(science, template.replace(photo_calib=None),
                      ZogyConfig(flux_ratio_source="calibration"))


def test_flux_ratio_fit_needs_stars():
    rng = np.random.default_rng(1)
    shape = (128, 128)
    blank = [Exposure.from_arrays((s * rng.standard_normal(shape)).astype(np.float32),
                                  np.full(shape, s**2, np.float32), psf=GaussianPsf(3.0))
             for s in (10.0, 3.0)]
    with pytest.raises(AlgorithmError, match="cannot fit the flux ratio") as info:
        subtract_zogy(*blank, ZogyConfig(flux_ratio_source="fit"))
    assert info.value.metadata["n_good_stars"] == 0
    # 'auto' without PhotoCalibs or stars assumes the configured ratio (like the AL
    # 'psf-model' strategy) and says so; registration is then skipped.
    out = subtract_zogy(*blank, ZogyConfig(flux_ratio=1.5))
    assert out.metadata["flux_ratio_source"] == "assumed"
    assert out.metadata["flux_ratio"] == 1.5 and out.metadata["n_flux_ratio_stars"] == 0
    assert out.metadata["registration_status"].startswith("too few stars")
    fixed = subtract_zogy(*blank, ZogyConfig(flux_ratio_source="fixed"))
    assert fixed.metadata["flux_ratio_source"] == "fixed"


# -- PSFs, tiles, precision -----------------------------------------------------------------------


def test_missing_psfs_are_estimated():
    science, template, _ = constant_psf_pair(seed=3)
    out = subtract_zogy(science.replace(psf=None), template.replace(psf=None))
    assert out.metadata["science_psf_source"] == "estimated"
    assert out.metadata["template_psf_source"] == "estimated"
    assert out.metadata["science_psf_fwhm"] == pytest.approx(3.5, rel=0.05)
    assert isinstance(out.difference.psf, ImagePsf)  # constant PSFs: one tile
    image, variance, mask = out.difference.arrays()
    inner = (slice(20, -20), slice(20, -20))
    z = image[inner] / np.sqrt(variance[inner])
    assert 0.9 < 0.7413 * np.subtract(*np.percentile(z, [75, 25])) < 1.1


@pytest.mark.parametrize("border, tolerance", [(48, 1e-6), (0, 2e-5)])
def test_tiled_result_equals_whole_image_result_for_constant_psfs(border, tolerance):
    """Same PSFs and noise everywhere: 16 tiles give the whole-image result in every inner box,
    to float32 output precision with a wide border and to ~1e-6 of the brightest star's flux
    with the automatic one (the kernels' support)."""
    science, template, _ = constant_psf_pair(seed=5)
    common = dict(registration="none", fft_precision="float64", flux_image=False,
                  tile_border=border)
    tiled = subtract_zogy(science, template, ZogyConfig(tile_size=96, **common))
    whole = subtract_zogy(science, template, ZogyConfig(tile_size=384, **common))
    assert tiled.metadata["n_tiles"] == 16 and whole.metadata["n_tiles"] == 1
    sigma = 1.0 / whole.metadata["zero_point"]
    for name in ("difference", "score"):
        a = getattr(tiled, name).arrays()
        b = getattr(whole, name).arrays()
        assert np.abs(a[0] - b[0]).max() < tolerance * (sigma if name == "difference" else 1.0)
        assert np.array_equal(a[2], b[2])
    np.testing.assert_allclose(tiled.difference.arrays()[1], whole.difference.arrays()[1],
                               rtol=1e-5)


def test_tiles_are_stitched_without_seams(pair, result):
    """With a varying PSF each tile uses its own PSFs: moving the tile boundaries changes the
    difference by a small fraction of its noise, and pixel pairs across boundaries behave like
    pairs inside tiles."""
    other = subtract_zogy(pair.science, pair.template, ZogyConfig(tile_size=160, flux_image=False))
    assert result.metadata["tile_size"] == 128 and other.metadata["n_tiles"] == 25
    a, _, mask = result.difference.arrays()
    b = other.difference.arrays()[0]
    sky = sky_pixels(pair, mask)
    sigma = 1.0 / result.metadata["zero_point"]
    assert np.sqrt(np.mean((a - b)[sky] ** 2)) < 0.05 * sigma
    edges = result.metadata["tile_x_edges"][1:-1]
    across = np.concatenate([(a[:, e] - a[:, e - 1])[sky[:, e] & sky[:, e - 1]] for e in edges])
    inside = np.concatenate([(a[:, e + 7] - a[:, e + 6])[sky[:, e + 7] & sky[:, e + 6]]
                             for e in edges])
    assert np.std(across) == pytest.approx(np.std(inside), rel=0.1)
    assert abs(np.mean(across)) < 0.1 * sigma


def test_automatic_tile_size_follows_the_psf_variation(pair, result):
    science, template, _ = constant_psf_pair()
    assert result.metadata["tile_size"] == 128                # ±15 % over 768 px
    constant = subtract_zogy(science, template, ZogyConfig(flux_image=False))
    assert constant.metadata["tile_size"] == 512               # constant PSFs
    relaxed = subtract_zogy(pair.science, pair.template,
                            ZogyConfig(max_psf_change=0.2, flux_image=False))
    assert relaxed.metadata["tile_size"] == 512


# -- masks, errors, dask --------------------------------------------------------------------------


def test_masks_no_data_and_edges():
    science, template, _ = constant_psf_pair(seed=7)
    image, variance, mask = template.arrays()
    mask = mask.copy()
    image = image.copy()
    variance = variance.copy()
    mask[100:140, 200:260] |= np.uint32(mask_value("NO_DATA"))
    image[100:140, 200:260] = 0.0
    variance[100:140, 200:260] = 0.0
    mask[300:303, 50:53] |= np.uint32(mask_value("SAT"))
    template = template.with_planes(image, variance, mask)
    out = subtract_zogy(science, template, ZogyConfig(flux_image=False))
    diff, var, dmask = out.difference.arrays()
    score, score_var, smask = out.score.arrays()
    no_data = (dmask & mask_value("NO_DATA")) != 0
    assert no_data[100:140, 200:260].all()
    reach = out.metadata["kernel_reach"]
    assert no_data[100 - reach, 230] and not no_data[100 - reach - 2, 230]  # grown by the reach
    for plane in (diff, var, score, score_var):
        assert np.all(plane[no_data] == 0)
    assert np.all(np.isfinite(score)) and np.all(score_var[~no_data] == 1)
    sat_template = (dmask & mask_value("SAT_TEMPLATE")) != 0
    assert sat_template[301, 51] and sat_template[301 + reach, 51]
    assert not (dmask & mask_value("SAT")).any()
    edge = (dmask & mask_value("EDGE")) != 0
    width = out.metadata["edge_width"]
    assert edge[:, :width].all() and not edge[200, width:-width].any()
    # Pixels next to the hole are still normalised (the variance planes know the hole).
    ring = ~no_data & (np.abs(np.arange(384) - 120)[:, None] < 40) \
        & (np.abs(np.arange(384) - 230)[None, :] < 50)
    assert np.std(score[ring]) < 1.3


def test_input_errors():
    science, template, _ = constant_psf_pair(shape=(128, 128))
    with pytest.raises(BadInputDataError, match="same pixel grid"):
        subtract_zogy(science, template.cutout(slice(0, 100), slice(0, 128)))
    with pytest.raises(BadInputDataError, match="band"):
        subtract_zogy(science, template.replace(info=VisitInfo(band="g")))
    image, variance, mask = template.arrays()
    mask = mask.copy()
    mask[:, 8:] = mask_value("NO_DATA")   # 6 % coverage
    with pytest.raises(NoWorkFound, match="required"):
        subtract_zogy(science, template.with_planes(image, variance, mask))
    with pytest.raises(BadInputDataError, match="no positive value"):
        subtract_zogy(science, template.with_planes(image, variance * 0, mask * 0))
    with pytest.raises(ConfigurationError, match="unknown key"):
        subtract_zogy(science, template, {"tile_sise": 64})
    with pytest.raises(ConfigurationError, match="registration_noise"):
        ZogyConfig(registration_noise=(0.1,))
    with pytest.raises(ConfigurationError, match="too small"):
        ZogyConfig(tile_size=16)
    with pytest.raises(ConfigurationError):
        subtract_zogy(science, template, config="zogy")


def test_dask_backed_inputs_give_the_same_result():
    science, template, _ = constant_psf_pair(shape=(256, 256), seed=9)
    eager = subtract_zogy(science, template, ZogyConfig(flux_image=False))
    lazy = subtract_zogy(science.chunk(100), template.chunk(100), ZogyConfig(flux_image=False))
    assert not lazy.difference.is_lazy
    np.testing.assert_array_equal(eager.difference.arrays()[0], lazy.difference.arrays()[0])
    np.testing.assert_array_equal(eager.score.arrays()[0], lazy.score.arrays()[0])


def test_config_defaults_and_documentation():
    config = ZogyConfig()
    assert (config.flux_ratio_source, config.registration, config.score_noise,
            config.tile_size, config.fft_precision) == ("auto", "constant", "full", 0, "float32")
    assert ZogyConfig.from_dict(config.to_dict()) == config
    import dataclasses

    for cls in (ZogyConfig, type(config.stars)):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("doc"), f"{cls.__name__}.{field.name} has no doc"


# -- the detection stage on ZOGY outputs ----------------------------------------------------------


def test_detect_and_measure_on_zogy_outputs(pair, result):
    """detect_and_measure treats ZOGY like any method: detection on S_corr, PSF fluxes with P_D
    on the difference in science units, forced photometry on the matched template."""
    config = DetectAndMeasureConfig.from_dict({"background": {"enabled": False}})
    detection = detect_and_measure(result.difference, science=pair.science,
                                   matched_template=result.matched_template, score=result.score,
                                   config=config)
    catalog = detection.catalog
    catalog = catalog[~catalog["isSky"]]
    truth = pair.truth[pair.truth["kind"] == "transient"]
    tree = cKDTree(np.column_stack([catalog["x"], catalog["y"]]))
    distance, index = tree.query(truth[["x", "y"]].to_numpy())
    found = distance < 1.5
    assert found.mean() > 0.9
    flux = catalog["psfFlux"].to_numpy()[index[found]]
    error = catalog["psfFluxErr"].to_numpy()[index[found]]
    true = truth["delta_flux"].to_numpy()[found]
    assert np.median(flux / true) == pytest.approx(1.0, abs=0.03)
    assert np.median(np.abs(flux - true) / error) < 1.0      # errors are right (0.67 expected)
    assert detection.metadata["sky_noise_ratio"] == pytest.approx(1.0, abs=0.1)
    # The flux image S / F_S agrees with the PSF fit.
    flux_image = result.metadata["flux_image"].arrays()[0]
    njy = pair.science.photo_calib.njy_per_count
    x = np.rint(catalog["x"].to_numpy()[index[found]]).astype(int)
    y = np.rint(catalog["y"].to_numpy()[index[found]]).astype(int)
    peak = np.array([flux_image[j - 1:j + 2, i - 1:i + 2].max() for i, j in zip(x, y)])
    assert np.median(peak * njy / flux) == pytest.approx(1.0, abs=0.05)
