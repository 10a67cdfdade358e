"""Source injection: flux conservation, consistent noise and variance, masks, placement, S/N."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS
from scipy import ndimage

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.exposure import Exposure, PhotoCalib, VisitInfo
from diffim_dask.masks import mask_value, plane_set
from diffim_dask.psf import GaussianPsf
from diffim_dask.qa.injection import (
    INJECTION_TRUTH_COLUMNS,
    InjectionConfig,
    find_extended_regions,
    inject_sources,
    injection_seed,
    measure_psf_noise_scale,
    read_injection_truth,
    write_injection_truth,
)

GAIN = 2.0
PSF = GaussianPsf(3.0)


def _wcs(shape) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return wcs


def _noise_exposure(shape=(160, 160), sigma=10.0, seed=0, mask=None, psf=PSF, calib=True,
                    correlate=0.0) -> Exposure:
    """Pure sky noise (white, or smoothed by a Gaussian of width ``correlate`` px and rescaled
    to unit per-pixel variance) with a constant, truthful per-pixel variance plane."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.0, shape)
    if correlate > 0:
        noise = ndimage.gaussian_filter(noise, correlate, mode="wrap")
        noise /= noise.std()
    image = (sigma * noise).astype(np.float32)
    variance = np.full(shape, sigma ** 2, np.float32)
    return Exposure.from_arrays(image, variance, mask, wcs=_wcs(shape), psf=psf,
                                photo_calib=PhotoCalib(27.0) if calib else None,
                                info=VisitInfo(visit=7, detector=3, gain=GAIN, band="r"))


@pytest.fixture(scope="module")
def injected():
    exposure = _noise_exposure(seed=1)
    config = InjectionConfig(n_sources=25, snr_range=(20.0, 60.0), edge_margin=16)
    return exposure, inject_sources(exposure, config, seed=3)


def test_injection_conserves_flux(injected):
    exposure, result = injected
    truth = result.truth
    assert len(truth) == 25 and list(truth.columns) == list(INJECTION_TRUTH_COLUMNS)
    before = exposure.arrays()[0].astype(np.float64)
    after = result.exposure.arrays()[0].astype(np.float64)
    added = after - before
    # Noise-free model: exactly the injected counts (unit-sum PSF stamps fully on the image).
    assert result.model.sum() == pytest.approx(truth["flux_counts"].sum(), rel=1e-9)
    # With photon noise: the injected-minus-original image sums to the flux within sqrt(F / g).
    total = truth["flux_counts"].sum()
    assert abs(added.sum() - total) < 4 * math.sqrt(total / GAIN)
    half = PSF.default_size // 2
    pulls = []
    for row in truth.itertuples():
        ix, iy = int(round(row.x)), int(round(row.y))
        box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        # Neighbours' wings may overlap the box: compare with the noise-free model there.
        expected = result.model[box].sum()
        pulls.append((added[box].sum() - expected) / math.sqrt(expected / GAIN))
    pulls = np.asarray(pulls)
    assert np.abs(pulls).max() < 4.5
    assert 0.5 < pulls.std() < 1.6  # photon noise was really added (not zero, not doubled)
    # Away from the sources nothing changed.
    far = ndimage.binary_dilation(result.model > 0, iterations=2)
    assert np.all(added[~far] == 0)


def test_variance_plane_gains_the_photon_noise(injected):
    exposure, result = injected
    var_before = exposure.arrays()[1].astype(np.float64)
    var_after = result.exposure.arrays()[1].astype(np.float64)
    np.testing.assert_allclose(var_after - var_before, np.clip(result.model, 0, None) / GAIN,
                               atol=2e-3)
    # The photon noise actually drawn matches that variance: chi2 of the residual per pixel.
    residual = result.exposure.arrays()[0] - exposure.arrays()[0] - result.model
    bright = result.model > 50
    chi2 = np.mean(residual[bright] ** 2 / (result.model[bright] / GAIN))
    assert 0.85 < chi2 < 1.15


def test_injected_cores_are_flagged_and_truth_is_consistent(injected):
    exposure, result = injected
    truth = result.truth
    mask = result.exposure.arrays()[2]
    flagged = plane_set(mask, "INJECTED")
    yy, xx = np.indices(mask.shape)
    radius = PSF.fwhm()  # core_radius_fwhm = 1
    near = np.zeros(mask.shape, bool)
    for row in truth.itertuples():
        near |= np.hypot(xx - np.round(row.x), yy - np.round(row.y)) <= radius + 1e-6
        assert flagged[int(round(row.y)), int(round(row.x))]
    assert np.array_equal(flagged, near)
    # Sky coordinates, magnitudes and nJy follow the exposure's WCS and calibration.
    ra, dec = exposure.pixel_to_sky(truth["x"], truth["y"])
    np.testing.assert_allclose(truth["ra"], ra)
    np.testing.assert_allclose(truth["dec"], dec)
    np.testing.assert_allclose(truth["flux_njy"], exposure.photo_calib.counts_to_njy(truth["flux_counts"]))
    np.testing.assert_allclose(truth["mag"], 27.0 - 2.5 * np.log10(truth["flux_counts"]))
    assert (truth["visit"] == 7).all() and (truth["detector"] == 3).all()
    assert truth["injection_id"].tolist() == list(range(25))


def test_positions_respect_masks_edges_and_separation():
    shape = (200, 200)
    mask = np.zeros(shape, np.uint32)
    mask[:, 60] |= mask_value("BAD")
    mask[120:140, 120:140] |= mask_value("SAT")
    mask[:, 170:] |= mask_value("NO_DATA")
    exposure = _noise_exposure(shape, mask=mask, seed=2)
    image0, variance0, _ = exposure.arrays()
    exposure = exposure.with_planes(image=np.where(plane_set(mask, "NO_DATA"), 0, image0),
                                    variance=np.where(plane_set(mask, "NO_DATA"), 0, variance0))
    config = InjectionConfig(n_sources=40, edge_margin=12, min_separation_fwhm=3.0)
    result = inject_sources(exposure, config, seed=5)
    truth = result.truth
    assert len(truth) >= 30
    fwhm = PSF.fwhm()
    x, y = truth["x"].to_numpy(), truth["y"].to_numpy()
    assert (x >= 12 - 0.5).all() and (x <= 199 - 12 + 0.5).all()
    assert (y >= 12 - 0.5).all() and (y <= 199 - 12 + 0.5).all()
    assert np.min(np.abs(x - 60)) > 1.5 * fwhm - 1
    inside_sat = (x > 120 - 1.5 * fwhm + 1) & (x < 139 + 1.5 * fwhm - 1) & \
                 (y > 120 - 1.5 * fwhm + 1) & (y < 139 + 1.5 * fwhm - 1)
    assert not inside_sat.any()
    assert (x < 170 - fwhm).all()
    distance = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(distance, np.inf)
    assert distance.min() >= 3.0 * fwhm
    # NO_DATA pixels keep image 0 and variance 0.
    image, variance, _ = result.exposure.arrays()
    nodata = plane_set(mask, "NO_DATA")
    assert np.all(image[nodata] == 0) and np.all(variance[nodata] == 0)


def test_grid_placement_is_regular():
    exposure = _noise_exposure((200, 200), seed=3)
    result = inject_sources(exposure, InjectionConfig(n_sources=16, placement="grid", edge_margin=20),
                            seed=1)
    truth = result.truth
    assert len(truth) == 16
    xs = np.unique(np.round(truth["x"], 6))
    ys = np.unique(np.round(truth["y"], 6))
    assert xs.size <= 5 and ys.size <= 5
    assert np.allclose(np.diff(xs), np.diff(xs)[0]) and np.allclose(np.diff(ys), np.diff(ys)[0])


def test_on_and_off_galaxy_placement():
    shape = (200, 200)
    exposure = _noise_exposure(shape, seed=4)
    image = exposure.arrays()[0].astype(np.float64)
    yy, xx = np.indices(shape)
    # Two extended galaxies (exponential discs, scale 6 px) and two stars of similar brightness.
    for gx, gy in ((60, 60), (140, 130)):
        image += 60.0 * np.exp(-np.hypot(xx - gx, yy - gy) / 6.0)
    for sx, sy in ((150, 50), (50, 150)):
        stamp = 40000.0 * PSF.image(size=31)
        image[sy - 15:sy + 16, sx - 15:sx + 16] += stamp
    exposure = exposure.with_planes(image=image.astype(np.float32))
    galaxy, surface = find_extended_regions(exposure)
    assert galaxy[60, 60] and galaxy[130, 140]
    assert not galaxy[50, 150] and not galaxy[150, 50]  # stars are not galaxies
    assert surface[60, 60] > 20
    on = inject_sources(exposure, InjectionConfig(n_sources=6, host="on", min_separation_fwhm=1.0),
                        seed=2).truth
    assert len(on) == 6 and on["on_galaxy"].all()
    assert (np.minimum(np.hypot(on.x - 60, on.y - 60), np.hypot(on.x - 140, on.y - 130)) < 30).all()
    off = inject_sources(exposure, InjectionConfig(n_sources=10, host="off"), seed=2).truth
    assert not off["on_galaxy"].any()
    mixed = inject_sources(exposure, InjectionConfig(n_sources=8, host="mixed",
                                                     on_galaxy_fraction=0.5, min_separation_fwhm=1.0),
                           seed=2).truth
    assert mixed["on_galaxy"].sum() == 4


def _psf_fit_snr(image, variance, psf, x, y):
    """Linear PSF-amplitude fit at a known position: flux / error."""
    size = psf.default_size
    half = size // 2
    ix, iy = int(round(x)), int(round(y))
    stamp = psf.image(x, y, size, offset=(x - ix, y - iy))
    box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
    weight = stamp / variance[box]
    flux = float(np.sum(weight * image[box]) / np.sum(weight * stamp))
    error = float(1.0 / math.sqrt(np.sum(stamp ** 2 / variance[box])))
    return flux / error


def test_expected_snr_matches_measured_snr():
    exposure = _noise_exposure((240, 240), seed=6, calib=False)
    snrs = []
    expected = []
    for seed in range(4):
        # snr_noise="variance": the white-noise scale factor is tested on its own below.
        config = InjectionConfig(n_sources=20, snr_range=(8.0, 8.0), edge_margin=16,
                                 min_separation_fwhm=6.0, snr_noise="variance")
        result = inject_sources(exposure, config, seed=seed)
        image, _, _ = result.exposure.arrays()
        _, variance, _ = exposure.arrays()
        for row in result.truth.itertuples():
            snrs.append(_psf_fit_snr(image, variance, PSF, row.x, row.y))
            expected.append(row.expected_snr)
        # Without a photo_calib there are no nJy or magnitudes.
        assert result.truth["flux_njy"].isna().all() and result.truth["mag"].isna().all()
    snrs, expected = np.asarray(snrs), np.asarray(expected)
    np.testing.assert_allclose(expected, 8.0, rtol=1e-9)
    assert abs(np.mean(snrs) - 8.0) < 4 * np.std(snrs) / math.sqrt(snrs.size)
    # Unit scatter (plus ~5% in variance from the source's own photon noise): a real S/N.
    assert 0.85 < np.std(snrs) < 1.2


def test_noise_scale_measures_correlated_noise():
    white = _noise_exposure((256, 256), seed=8, calib=False)
    assert measure_psf_noise_scale(white)["noise_scale"] == pytest.approx(1.0, abs=0.1)
    correlated = _noise_exposure((256, 256), seed=8, calib=False, correlate=1.2)
    # Prediction: var(PSF flux) = Σ P_i P_j C(i - j) / (Σ P²)² with C the noise autocorrelation
    # (a Gaussian of width sqrt(2) * 1.2 px, unit at zero lag).
    stamp = PSF.image(size=PSF.default_size)
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-2 * half:2 * half + 1, -2 * half:2 * half + 1]
    acf = np.exp(-(xx ** 2 + yy ** 2) / (4 * 1.2 ** 2))
    from scipy.signal import correlate

    auto = correlate(stamp, stamp, mode="full")
    predicted = math.sqrt(np.sum(auto * acf) / np.sum(stamp ** 2))
    measured = measure_psf_noise_scale(correlated)
    assert predicted > 2
    assert measured["noise_scale"] == pytest.approx(predicted, rel=0.12)
    assert measured["pixel_noise_scale"] == pytest.approx(1.0, abs=0.1)
    # Injection takes it into account: the same counts give a lower expected S/N.
    table = pd.DataFrame({"x": [80.0, 170.0], "y": [90.0, 150.0], "flux_counts": [3000.0, 3000.0]})
    snr_white = inject_sources(white, table, seed=1).truth["expected_snr"]
    snr_corr = inject_sources(correlated, table, seed=1).truth["expected_snr"]
    np.testing.assert_allclose(snr_white / snr_corr, measured["noise_scale"], rtol=0.15)


def test_explicit_table_and_reinjection_reproduce_pixels(injected, tmp_path):
    exposure, result = injected
    again = inject_sources(exposure, result.truth[["injection_id", "x", "y", "flux_counts"]], seed=3)
    np.testing.assert_array_equal(again.exposure.arrays()[0], result.exposure.arrays()[0])
    np.testing.assert_array_equal(again.truth["injection_id"], result.truth["injection_id"])
    # Magnitudes and nJy are accepted too.
    by_mag = inject_sources(exposure, pd.DataFrame({"x": [50.0], "y": [60.0], "mag": [20.0]}), seed=0)
    assert by_mag.truth["mag"].iloc[0] == pytest.approx(20.0)
    # Truth tables round-trip through a run directory with their seed and config.
    write_injection_truth(result, tmp_path, 7, 3)
    table, meta = read_injection_truth(tmp_path)
    assert len(table) == 25 and meta[(7, 3)]["seed"] == 3
    assert InjectionConfig.from_dict(meta[(7, 3)]["config"]) == InjectionConfig(
        n_sources=25, snr_range=(20.0, 60.0), edge_margin=16)
    empty, _ = read_injection_truth(tmp_path / "nothing")
    assert len(empty) == 0 and list(empty.columns) == list(INJECTION_TRUTH_COLUMNS)


def test_seeds_and_errors():
    assert injection_seed(1, 10, 2) == injection_seed(1, 10, 2)
    assert len({injection_seed(1, v, d) for v in range(5) for d in range(5)}) == 25
    exposure = _noise_exposure((96, 96), seed=9)
    with pytest.raises(BadInputDataError, match="no PSF"):
        inject_sources(exposure.replace(psf=None), InjectionConfig(n_sources=2))
    no_gain = exposure.replace(info=exposure.info.replace(gain=math.nan))
    with pytest.raises(BadInputDataError, match="gain"):
        inject_sources(no_gain, InjectionConfig(n_sources=2, edge_margin=10))
    quiet = inject_sources(no_gain, InjectionConfig(n_sources=2, edge_margin=10, add_noise=False))
    assert quiet.exposure.arrays()[0].sum() - exposure.arrays()[0].sum() == pytest.approx(
        quiet.truth["flux_counts"].sum(), rel=1e-4)
    with pytest.raises(ConfigurationError, match="photo_calib"):
        inject_sources(exposure.replace(photo_calib=None),
                       InjectionConfig(n_sources=2, magnitude_range=(20.0, 22.0)))
    with pytest.raises(ConfigurationError, match="brightness"):
        inject_sources(exposure, pd.DataFrame({"x": [10.0], "y": [10.0]}))
    with pytest.raises(ConfigurationError, match="snr_range"):
        InjectionConfig(snr_range=(10.0, 3.0))
    with pytest.raises(ConfigurationError, match="unknown key"):
        InjectionConfig.from_dict({"n_source": 3})
