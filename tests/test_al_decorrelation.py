"""Decorrelation with measured (correlated) input noise, and the PSF attached to the difference.

Correlated noise is made the way resampling makes it: white noise convolved
with a small separable interpolation-like kernel (lag-1 correlation ≈ 0.39,
noise power at zero frequency 3.5× the white value), scaled to the stated
per-pixel σ. The variance planes are right per pixel, as variance scaling
makes them; only the pixel-to-pixel correlation is left to the filter.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from _al_fixtures import gaussian_kernel, psf_flux, rendered_pair, sky_pixels
from diffim_dask import GridPsf
from diffim_dask.subtract import (NOISE_POWER_FLOOR, AlardLuptonConfig, decorrelation_kernel,
                                  noise_correlation_factor, noise_power_spectrum, psf_flux_bias,
                                  subtract_alard_lupton, subtract_alard_lupton_preconvolved)
from diffim_dask.noise_correlation import measure_noise_correlation

#: 1-D taps of the correlating kernel; its lag-1 correlation is 2·0.15·0.7 / Σ taps² ≈ 0.39.
_TAPS = np.array([0.15, 0.7, 0.15])


def correlated_noise(shape, sigma, rng):
    """Noise of per-pixel standard deviation ``sigma`` correlated like a resampled image."""
    kernel = np.outer(_TAPS, _TAPS)
    kernel /= np.sqrt((kernel**2).sum())
    return sigma * fftconvolve(rng.standard_normal(shape), kernel, mode="same")


def robust_sigma(values):
    return 0.741301109 * np.subtract(*np.percentile(values, [75, 25]))


def lag1(z, good):
    z = np.where(good, z - z[good].mean(), 0.0)
    pairs = good[:, :-1] & good[:, 1:]
    return float((z[:, :-1] * z[:, 1:])[pairs].mean() / (z[good] ** 2).mean())


def matched_filter_snr(image, variance, psf_stamp):
    """(D ⊗ P̄) / sqrt(V ⊗ P̄²): the detection statistic, which assumes white noise."""
    flipped = psf_stamp[::-1, ::-1]
    num = fftconvolve(image, flipped, mode="same")
    den = fftconvolve(variance, flipped**2, mode="same")
    return num / np.sqrt(np.where(den > 0, den, np.inf))


# -- the filter ------------------------------------------------------------------------------


def test_white_autocorrelation_gives_the_published_filter():
    kappa = gaussian_kernel(21, 1.5, total=0.8)
    delta = np.zeros((7, 7))
    delta[3, 3] = 1.0
    white = decorrelation_kernel(kappa, 2.0, 5.0, 25)
    with_delta = decorrelation_kernel(kappa, 2.0, 5.0, 25, correlation_unconvolved=delta,
                                      correlation_convolved=delta)
    np.testing.assert_allclose(with_delta, white, atol=1e-12)
    assert noise_correlation_factor(white, delta) == pytest.approx(1.0, abs=1e-12)
    assert noise_correlation_factor(white, None) == 1.0
    assert noise_power_spectrum(None, 64) == 1.0
    # R(k) has unit mean (ρ(0) = 1) and R(0) = Σ ρ.
    acf = measure_noise_correlation(correlated_noise((400, 400), 1.0, np.random.default_rng(1)),
                                    np.ones((400, 400), bool), radius=3).acf
    power = noise_power_spectrum(acf, 64)
    assert power.mean() == pytest.approx(1.0, abs=0.02)
    assert power[0, 0] == pytest.approx(acf.sum(), rel=1e-9)


def test_measured_filter_whitens_correlated_difference_noise():
    rng = np.random.default_rng(60)
    shape = (700, 700)
    kappa = gaussian_kernel(21, 1.5, total=1.1)
    sigma_u, sigma_c = 1.0, 1.5  # a noisy convolved image, as the DECam template
    noise_u = correlated_noise(shape, sigma_u, rng)
    noise_c = correlated_noise(shape, sigma_c, rng)
    everywhere = np.ones(shape, bool)
    acf_u = measure_noise_correlation(noise_u, everywhere, radius=3).acf
    acf_c = measure_noise_correlation(noise_c, everywhere, radius=3).acf
    raw = noise_u - fftconvolve(noise_c, kappa, mode="same")
    core = (slice(50, -50), slice(50, -50))
    psf = gaussian_kernel(25, 2.0)

    def whiten(floor):
        phi = decorrelation_kernel(kappa, sigma_u**2, sigma_c**2, 31, correlation_unconvolved=acf_u,
                                   correlation_convolved=acf_c, power_floor=floor)
        effective = fftconvolve(kappa, phi)
        predicted = (noise_correlation_factor(phi, acf_u, floor) * sigma_u**2 * (phi**2).sum()
                     + noise_correlation_factor(effective, acf_c, floor) * sigma_c**2
                     * (effective**2).sum())
        out = fftconvolve(raw, phi, mode="same")[core]
        snr = matched_filter_snr(out, np.full(out.shape, predicted), psf)[20:-20, 20:-20]
        return phi, out, predicted, float(np.std(snr))

    # A floor below the true spectrum's minimum (0.09 at the corner): exact whitening.
    phi, out, predicted, psf_scale = whiten(0.01)
    assert phi.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(phi, phi[::-1, ::-1], atol=1e-12)
    good = np.ones(out.shape, bool)
    assert abs(lag1(out, good)) < 0.02
    # Per-pixel variance: the correlation-corrected propagation, which is N(0) = the noise power
    # at zero frequency (so the PSF-scale noise is what a white variance plane predicts).
    n_zero = sigma_u**2 * acf_u.sum() + sigma_c**2 * acf_c.sum() * kappa.sum() ** 2
    assert predicted == pytest.approx(n_zero, rel=0.03)
    assert out.var() == pytest.approx(predicted, rel=0.03)
    assert psf_scale == pytest.approx(1.0, abs=0.04)
    # The default floor (0.2) gives up whitening the highest frequencies: the output is nearly
    # white, its variance plane errs slightly high per pixel, the PSF-scale noise is unchanged.
    phi, out, predicted, psf_scale = whiten(NOISE_POWER_FLOOR)
    assert abs(lag1(out, good)) < 0.06
    assert 0.9 < out.var() / predicted <= 1.0
    assert psf_scale == pytest.approx(1.0, abs=0.04)
    # The white-noise filter leaves the matched-filter noise far above the variance prediction.
    phi_white = decorrelation_kernel(kappa, sigma_u**2, sigma_c**2, 31)
    out_white = fftconvolve(raw, phi_white, mode="same")[core]
    var_white = sigma_u**2 * (phi_white**2).sum() + sigma_c**2 * (
        fftconvolve(kappa, phi_white) ** 2).sum()
    assert out_white.var() == pytest.approx(var_white, rel=0.03)  # right per pixel only
    snr_white = matched_filter_snr(out_white, np.full(out.shape, var_white), psf)[20:-20, 20:-20]
    assert np.std(snr_white) > 1.4


def test_psf_flux_bias_measure():
    psf = gaussian_kernel(25, 2.0)
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    assert psf_flux_bias(psf, delta) == pytest.approx(0.0, abs=1e-12)
    sharpening = decorrelation_kernel(gaussian_kernel(21, 1.5), 1.0, 4.0, 21)
    smoothing = gaussian_kernel(9, 1.0)
    assert psf_flux_bias(psf, sharpening) > 0.05
    assert psf_flux_bias(psf, smoothing) < -0.05


# -- the pipeline ------------------------------------------------------------------------------


def _correlated_pair(seed, template_sigma, shape=(320, 320), science_variation=()):
    """rendered_pair's noise-free scenes with correlated noise (variance planes right per pixel)."""
    pair = rendered_pair(shape, science_variation=science_variation, n_stars=150, seed=seed,
                         poisson=False, flux_range=(5e3, 2e5), transients=6,
                         transient_flux=6000.0)
    rng = np.random.default_rng(seed)
    science = pair.science_model + correlated_noise(shape, 10.0, rng)
    template = pair.template_model + correlated_noise(shape, template_sigma, rng)
    pair.science = pair.science.with_planes(image=science.astype(np.float32),
                                            variance=np.full(shape, 100.0, np.float32))
    pair.template = pair.template.with_planes(
        image=template.astype(np.float32),
        variance=np.full(shape, template_sigma**2, np.float32))
    return pair


def _psf_scale_sigma(result, pair):
    img, var, mask = result.difference.arrays()
    sky = sky_pixels(pair, mask, threshold=0.02)
    z = img / np.sqrt(np.where(var > 0, var, np.inf))
    snr = matched_filter_snr(np.where(mask == 0, img, 0), np.where(mask == 0, var, 0),
                             result.difference.psf.image(159.5, 159.5))
    return robust_sigma(z[sky]), robust_sigma(snr[sky]), lag1(np.where(sky, z, 0), sky)


@pytest.mark.parametrize("options", [{}, {"decorrelation": {"grid": 3},
                                          "variance_propagation": "convolve"}])
def test_measured_noise_model_calibrates_the_psf_scale_noise(options):
    pair = _correlated_pair(61, template_sigma=15.0)
    measured = subtract_alard_lupton(pair.science, pair.template,
                                     AlardLuptonConfig.from_dict(options))
    white = subtract_alard_lupton(pair.science, pair.template, AlardLuptonConfig.from_dict(
        {**options, "decorrelation": {**options.get("decorrelation", {}), "noise_model": "white"}}))
    meta = measured.metadata
    assert meta["decorrelation_noise_model"] == "measured"
    assert meta["noise_correlated_unconvolved"] and meta["noise_correlated_convolved"]
    assert min(meta["noise_lag1_unconvolved"]) > 0.3
    pixel, psf_scale, corr = _psf_scale_sigma(measured, pair)
    assert pixel == pytest.approx(1.0, abs=0.05)
    assert psf_scale == pytest.approx(1.0, abs=0.06)
    assert abs(corr) < 0.05
    pixel_w, psf_scale_w, corr_w = _psf_scale_sigma(white, pair)
    assert pixel_w == pytest.approx(1.0, abs=0.05)     # the white model is right per pixel ...
    assert psf_scale_w > 1.3                           # ... but not on the PSF scale
    assert corr_w > 0.2
    # Transients keep their flux with the PSF attached to the difference.
    img, var, _ = measured.difference.arrays()
    ratios = [psf_flux(img, var, x, y, measured.difference.psf, size=21)[0] / f
              for x, y, f in zip(pair.transients["x"], pair.transients["y"],
                                 pair.transients["flux"])]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.04)


def test_noise_models_agree_on_white_inputs():
    pair = rendered_pair((256, 256), template_sigma=12.0, n_stars=150, seed=62)
    white = subtract_alard_lupton(pair.science, pair.template, AlardLuptonConfig.from_dict(
        {"decorrelation": {"noise_model": "white"}}))
    default = subtract_alard_lupton(pair.science, pair.template)
    # Measured lag-1 correlations of white inputs are far below the threshold: identical outputs.
    meta = default.metadata
    assert not meta["noise_correlated_unconvolved"] and not meta["noise_correlated_convolved"]
    assert max(abs(v) for v in meta["noise_lag1_unconvolved"] + meta["noise_lag1_convolved"]) < 0.03
    np.testing.assert_array_equal(default.difference.arrays()[0], white.difference.arrays()[0])
    # Forcing the measured model (threshold 0) uses the measured, almost-δ autocorrelations:
    # the difference and its variance change by a small fraction of the noise.
    forced = subtract_alard_lupton(pair.science, pair.template, AlardLuptonConfig.from_dict(
        {"decorrelation": {"noise_correlation_threshold": 0.0}}))
    img_w, var_w, mask = white.difference.arrays()
    img_f, var_f, _ = forced.difference.arrays()
    good = mask == 0
    assert np.std((img_f - img_w)[good] / np.sqrt(var_w[good])) < 0.05
    assert np.median(var_f[good] / var_w[good]) == pytest.approx(1.0, abs=0.03)
    sky = sky_pixels(pair, mask)
    assert robust_sigma(img_f[sky] / np.sqrt(var_f[sky])) == pytest.approx(
        robust_sigma(img_w[sky] / np.sqrt(var_w[sky])), abs=0.02)


def test_auto_difference_psf_follows_the_psf_flux_bias():
    # Deep template: the filter is nearly a delta function, the science PSF is kept.
    deep = rendered_pair((256, 256), template_sigma=3.0, transients=4, seed=63)
    result = subtract_alard_lupton(deep.science, deep.template)
    assert abs(result.metadata["decorrelation_psf_flux_bias"]) < 0.02
    assert result.metadata["difference_psf"] == "unconvolved"
    assert result.difference.psf is deep.science.psf
    # Noisy, spatially varying science PSF and a template as noisy as the science image: the
    # filter sharpens the PSF; 'auto' attaches the science PSF convolved with it (a GridPsf,
    # which keeps the variation), and PSF fluxes are unbiased, unlike with 'unconvolved'.
    pair = _correlated_pair(64, template_sigma=15.0, science_variation=(0.1, 0.05))
    auto = subtract_alard_lupton(pair.science, pair.template)
    plain = subtract_alard_lupton(pair.science, pair.template, AlardLuptonConfig.from_dict(
        {"decorrelation": {"difference_psf": "unconvolved"}}))
    assert auto.metadata["decorrelation_psf_flux_bias"] > 0.05
    assert auto.metadata["difference_psf"] == "decorrelated"
    assert isinstance(auto.difference.psf, GridPsf)
    corner, centre = (40.0, 40.0), (159.5, 159.5)
    assert (auto.difference.psf.fwhm(*corner) / auto.difference.psf.fwhm(*centre)
            == pytest.approx(pair.science.psf.fwhm(*corner) / pair.science.psf.fwhm(*centre),
                             rel=0.05))
    assert plain.difference.psf is pair.science.psf

    def mean_ratio(result):
        img, var, _ = result.difference.arrays()
        return np.mean([psf_flux(img, var, x, y, result.difference.psf, size=21)[0] / f
                        for x, y, f in zip(pair.transients["x"], pair.transients["y"],
                                           pair.transients["flux"])])

    assert mean_ratio(auto) == pytest.approx(1.0, abs=0.04)
    assert mean_ratio(plain) > 1.05


def test_score_is_normalised_for_correlated_inputs():
    # The preconvolution variant: the score filter and its variance use the measured noise.
    pair = _correlated_pair(65, template_sigma=15.0)
    scores = {}
    for model in ("measured", "white"):
        result = subtract_alard_lupton_preconvolved(pair.science, pair.template,
                                                    AlardLuptonConfig.from_dict(
                                                        {"decorrelation": {"noise_model": model}}))
        score, _, mask = result.score.arrays()
        scores[model] = robust_sigma(score[sky_pixels(pair, mask, threshold=0.02)])
    assert scores["measured"] == pytest.approx(1.0, abs=0.05)
    assert scores["white"] > 1.4
