"""ZOGY on small, crowded stamps: the noise model and the score's normalisation.

A 63-pixel ZTF stamp in a crowded Galactic field has a "sky" made of
unresolved stars. Its autocorrelation (lag-1 0.8, a plateau of 0.7 at lag 3)
is structure, not noise correlation; whitening with it amplified the real
white noise and gave S_corr a robust sigma of ~10. Such measurements are now
rejected (the image is modelled white), and S_corr is divided by its robust
sigma when the variance planes do not describe the noise. These seeded
simulations reproduce both situations without the real data.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffim_dask import Exposure, GaussianPsf, PhotoCalib
from diffim_dask.masks import mask_value
from diffim_dask.simulate.render import render_point_sources
from diffim_dask.zogy import ZogyConfig, measure_noise_correlation, subtract_zogy


def robust_sigma(values):
    return 0.741301109 * np.subtract(*np.percentile(values, [75, 25]))


def interior_score(result):
    score, _, mask = result.score.arrays()
    return score[(mask & mask_value("EDGE")) == 0]


def test_far_correlation_separates_resampling_from_sky_structure():
    rng = np.random.default_rng(3)
    shape = (200, 200)
    # Bilinear resampling by half a pixel in x and y: lag-1 correlation 0.5, nothing at lag 3.
    resampled = ndimage.convolve(rng.standard_normal(shape), np.full((2, 2), 0.25))
    measured = measure_noise_correlation(resampled, np.ones(shape, bool))
    assert measured.lag1 == pytest.approx((0.5, 0.5), abs=0.05)
    assert abs(measured.far_correlation) < 0.02
    # Smooth structure (nebulosity, confusion) on top of white noise: a plateau far out.
    structure = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0)
    structured = rng.standard_normal(shape) + 3.0 * structure / structure.std()
    measured = measure_noise_correlation(structured, np.ones(shape, bool))
    assert measured.far_correlation > 0.5 * max(measured.lag1)
    assert measure_noise_correlation(rng.standard_normal(shape),
                                     np.ones(shape, bool)).far_correlation == 0.0


def crowded_pair(seed, shape=(96, 96), n_faint=1500, transient_flux=3000.0):
    """Both images share a confusion-limited sky of faint stars; one science-only transient.

    Like the ZTF stamps' variance planes, each variance is the image's robust
    sky variance, which the unresolved stars dominate (~20× the pixel noise).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = np.r_[rng.uniform(-5, nx + 5, n_faint), rng.uniform(15, nx - 15, 6)]
    y = np.r_[rng.uniform(-5, ny + 5, n_faint), rng.uniform(15, ny - 15, 6)]
    flux = np.r_[rng.exponential(400.0, n_faint), np.full(6, 2e4)]
    transient = (nx / 2 + 0.3, ny / 2 - 0.2)
    exposures = []
    for sigma, fwhm, is_science in ((10.0, 3.0, True), (4.0, 2.2, False)):
        psf = GaussianPsf(fwhm)
        model = np.zeros(shape)
        render_point_sources(model, x, y, flux, psf)
        if is_science:
            render_point_sources(model, np.array([transient[0]]), np.array([transient[1]]),
                                 np.array([transient_flux]), psf)
        image = model + sigma * rng.standard_normal(shape)
        variance = np.full(shape, robust_sigma(image) ** 2, np.float32)
        exposures.append(Exposure.from_arrays(image.astype(np.float32), variance, psf=psf,
                                              photo_calib=PhotoCalib(25.0)))
    return exposures[0], exposures[1], transient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crowded_sky_is_not_mistaken_for_correlated_noise(seed):
    science, template, (tx, ty) = crowded_pair(seed)
    result = subtract_zogy(science, template)
    meta = result.metadata
    assert meta["science_noise_status"] == meta["template_noise_status"] == "structured"
    assert not (meta["science_noise_correlated"] or meta["template_noise_correlated"])
    # The confusion-dominated variance planes make the model score ~0.27σ; it is rescaled.
    assert 0.2 < meta["score_robust_sigma"] < 0.35
    assert robust_sigma(interior_score(result)) == pytest.approx(1.0, abs=0.05)
    # The transient (S/N ~60 in the science image alone) keeps its significance. With the
    # sky structure taken for noise correlation it came out at 8-12σ with a -4 to -7σ ring.
    score = result.score.arrays()[0]
    peak = score[int(round(ty)) - 2:int(round(ty)) + 3, int(round(tx)) - 2:int(round(tx)) + 3]
    assert 40.0 < peak.max() < 70.0
    assert peak.min() > 0.0


def test_score_normalization_modes():
    rng = np.random.default_rng(8)
    shape = (128, 128)
    psfs = (GaussianPsf(3.0), GaussianPsf(2.2))
    x, y, flux = rng.uniform(10, 118, 30), rng.uniform(10, 118, 30), 10 ** rng.uniform(3, 4.5, 30)
    exposures = []
    for psf, sigma in zip(psfs, (10.0, 4.0)):
        model = np.zeros(shape)
        render_point_sources(model, x, y, flux, psf)
        image = (model + sigma * rng.standard_normal(shape)).astype(np.float32)
        # Variance planes twice the true sigma, and variance scaling off: S_corr is ~0.5σ.
        exposures.append(Exposure.from_arrays(image, np.full(shape, 4 * sigma**2, np.float32),
                                              psf=psf, photo_calib=PhotoCalib(25.0)))
    base = {"scale_variance": False}
    model = subtract_zogy(*exposures, ZogyConfig.from_dict({**base,
                                                            "score_normalization": "model"}))
    auto = subtract_zogy(*exposures, ZogyConfig.from_dict(base))
    sigma = model.metadata["score_robust_sigma"]
    assert sigma == pytest.approx(0.5, abs=0.07)
    assert model.metadata["score_scale"] == 1.0
    assert robust_sigma(interior_score(model)) == pytest.approx(sigma, rel=1e-6)
    assert auto.metadata["score_robust_sigma"] == pytest.approx(sigma, rel=1e-6)
    assert auto.metadata["score_scale"] == pytest.approx(1.0 / sigma, rel=1e-6)
    np.testing.assert_allclose(auto.score.arrays()[0], model.score.arrays()[0] / sigma,
                               rtol=1e-5, atol=1e-6)
    # The flux image's S/N stays the score.
    flux, flux_var, _ = auto.metadata["flux_image"].arrays()
    inside = flux_var > 0
    np.testing.assert_allclose(flux[inside] / np.sqrt(flux_var[inside]),
                               auto.score.arrays()[0][inside], rtol=1e-3, atol=1e-3)
    # With honest variance planes 'auto' leaves the score alone; 'empirical' always rescales.
    honest = [e.with_planes(e.arrays()[0], e.arrays()[1] / 4, e.arrays()[2]) for e in exposures]
    left = subtract_zogy(*honest, ZogyConfig.from_dict(base))
    assert abs(left.metadata["score_robust_sigma"] - 1.0) < 0.2
    assert left.metadata["score_scale"] == 1.0
    forced = subtract_zogy(*honest, ZogyConfig.from_dict({**base,
                                                          "score_normalization": "empirical"}))
    assert robust_sigma(interior_score(forced)) == pytest.approx(1.0, abs=1e-3)
