"""Variance-plane scaling and the decorrelation afterburner."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from _al_fixtures import gaussian_kernel, rendered_pair, render, sky_pixels
from diffim_dask.errors import BadInputDataError
from diffim_dask.psf import GaussianPsf
from diffim_dask.subtract import (AlardLuptonConfig, decorrelation_kernel, measure_variance_scale,
                                  subtract_alard_lupton)


def _lag1(z, good):
    """Lag-1 autocorrelation along x and y of a normalised image over ``good`` pixels."""
    z = np.where(good, z - z[good].mean(), 0.0)
    out = []
    for a, b, pair_good in ((z[:, :-1], z[:, 1:], good[:, :-1] & good[:, 1:]),
                            (z[:-1], z[1:], good[:-1] & good[1:])):
        out.append((a * b)[pair_good].mean() / (z[good] ** 2).mean())
    return out


# -- variance scaling ------------------------------------------------------------------------


def test_variance_factor_matches_the_noise_with_sources_masked():
    rng = np.random.default_rng(50)
    shape = (300, 300)
    x = rng.uniform(10, 290, 200)
    y = rng.uniform(10, 290, 200)
    stars = render(shape, x, y, np.full(200, 5e4), GaussianPsf(3.0))
    image = stars + 2.0 * rng.standard_normal(shape)
    variance = np.ones(shape)  # the plane underestimates the noise by 4x
    mask = np.zeros(shape, np.uint32)
    sources = stars > 0.2
    result = measure_variance_scale(image, variance, mask, source_mask=sources)
    assert result.factor == pytest.approx(4.0, rel=0.03)
    assert result.method == "pixel" and result.n_pixels > 50_000
    # Without the source mask the sources bias the factor upwards.
    assert measure_variance_scale(image, variance, mask).factor > result.factor


def test_variance_factor_beyond_the_limit_is_refused():
    rng = np.random.default_rng(51)
    image = rng.standard_normal((200, 200))
    mask = np.zeros((200, 200), np.uint32)
    with pytest.raises(BadInputDataError, match="outside") as info:
        measure_variance_scale(image, np.full((200, 200), 0.05), mask, what="template")
    assert "template" in str(info.value) and "limit" in str(info.value)
    with pytest.raises(BadInputDataError, match="outside"):
        measure_variance_scale(image, np.full((200, 200), 50.0), mask)
    # Within the limit: factor 1/4.
    assert measure_variance_scale(image, np.full((200, 200), 4.0), mask).factor == \
        pytest.approx(0.25, rel=0.03)
    with pytest.raises(BadInputDataError, match="usable"):
        measure_variance_scale(image, np.zeros((200, 200)), mask)


def test_pipeline_rescales_a_wrong_variance_plane():
    pair = rendered_pair((256, 256), seed=52)
    image, variance, mask = pair.science.arrays()
    science = pair.science.with_planes(variance=variance * 0.5)
    result = subtract_alard_lupton(science, pair.template)
    assert result.metadata["science_variance_scale"] == pytest.approx(2.0, rel=0.03)
    assert result.metadata["template_variance_scale"] == pytest.approx(1.0, rel=0.03)
    img, var, out_mask = result.difference.arrays()
    sky = sky_pixels(pair, out_mask)
    assert np.std(img[sky] / np.sqrt(var[sky])) == pytest.approx(1.0, abs=0.03)
    unscaled = subtract_alard_lupton(science, pair.template,
                                     AlardLuptonConfig.from_dict({"variance": {"enabled": False}}))
    img, var, out_mask = unscaled.difference.arrays()
    assert np.std(img[sky] / np.sqrt(var[sky])) > 1.3
    with pytest.raises(BadInputDataError, match="science"):
        subtract_alard_lupton(pair.science.with_planes(variance=variance * 0.02), pair.template)


# -- decorrelation -------------------------------------------------------------------------


def test_decorrelation_kernel_whitens_difference_noise():
    rng = np.random.default_rng(53)
    kappa = gaussian_kernel(21, 1.5, total=1.2)
    sigma_s, sigma_t = 0.3, 1.2  # template noise dominates: strongly correlated difference
    phi = decorrelation_kernel(kappa, sigma_s**2, sigma_t**2, 31)
    assert phi.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(phi, phi[::-1, ::-1], atol=1e-12)
    shape = (600, 600)
    diff = sigma_s * rng.standard_normal(shape) - fftconvolve(
        sigma_t * rng.standard_normal(shape), kappa, mode="same")
    core = (slice(40, -40), slice(40, -40))
    good = np.ones(diff[core].shape, bool)
    before = _lag1(diff[core], good)
    assert min(before) > 0.3
    white = fftconvolve(diff, phi, mode="same")[core]
    assert max(abs(v) for v in _lag1(white, good)) < 0.01
    expected = sigma_s**2 + sigma_t**2 * kappa.sum() ** 2
    assert white.var() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("grid", [1, 3])
def test_pipeline_difference_is_white_with_unit_variance(grid):
    # A template noisier than the science image makes the raw difference strongly correlated.
    pair = rendered_pair((320, 320), science_variation=(0.1, 0.05), template_sigma=20.0,
                         sky_sigma=10.0, n_stars=180, seed=54, flux_range=(2e4, 4e5))
    config = AlardLuptonConfig.from_dict({"decorrelation": {"grid": grid}})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    img, var, mask = result.difference.arrays()
    sky = sky_pixels(pair, mask)
    z = img / np.sqrt(np.where(var > 0, var, 1))
    assert np.std(z[sky]) == pytest.approx(1.0, abs=0.03)
    assert max(abs(v) for v in _lag1(z, sky)) < 0.03
    assert result.metadata["decorrelation_grid"] == grid
    if grid == 1:
        raw = subtract_alard_lupton(pair.science, pair.template,
                                    AlardLuptonConfig.from_dict({"decorrelation": {"enabled": False}}))
        img, var, mask = raw.difference.arrays()
        sky_raw = sky_pixels(pair, mask)
        z = img / np.sqrt(np.where(var > 0, var, 1))
        assert min(_lag1(z, sky_raw)) > 0.1  # correlated before the afterburner
        assert np.std(z[sky_raw]) == pytest.approx(1.0, abs=0.03)  # variance still right
        # The noisy template makes the filter sharpen the PSF measurably (PSF-flux bias
        # above DecorrelationConfig.psf_bias_tolerance): the difference carries the
        # science PSF convolved with the filter, not the science PSF itself.
        assert result.metadata["decorrelation_psf_flux_bias"] > 0.02
        assert result.metadata["difference_psf"] == "decorrelated"
        assert result.difference.psf.fwhm() < pair.science.psf.fwhm(159.5, 159.5)
