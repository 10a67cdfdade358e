"""The Fourier-space mathematics of ZOGY (diffim_dask.zogy.core): fast, exact checks.

Every test builds small seeded images from Gaussian PSFs and checks a property
the equations guarantee: unit white noise of D, its zero point and PSF, the
score as the matched filter of D, unbiased flux, the variance terms against
Monte-Carlo realisations, regularisation, PSF centring for odd and even
stamps, registration shifts and correlated input noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft
from scipy import ndimage

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.psf import GaussianPsf
from diffim_dask.zogy import (apply_zogy, proper_image_subtraction, psf_spectrum, shift_phase,
                              zogy_kernels)
from diffim_dask.noise_correlation import measure_noise_correlation

SCIENCE_FWHM, TEMPLATE_FWHM = 3.5, 2.5
SIGMA_N, SIGMA_R = 10.0, 3.0


def gaussian_stamp(fwhm, size, center=None):
    """Point-sampled unit-sum Gaussian on a ``size`` grid centred at ``center`` (x, y)."""
    sigma = fwhm / 2.3548200450309493
    cx, cy = ((size - 1) / 2.0, (size - 1) / 2.0) if center is None else center
    y, x = np.mgrid[0:size, 0:size]
    stamp = np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / sigma**2)
    return stamp / stamp.sum()


def add_source(image, flux, x, y, fwhm, size=31):
    """Add a point-sampled Gaussian source at sub-pixel ``(x, y)``."""
    cx, cy = int(round(x)), int(round(y))
    half = size // 2
    image[cy - half:cy + half + 1, cx - half:cx + half + 1] += flux * gaussian_stamp(
        fwhm, size, (half + x - cx, half + y - cy))


@pytest.fixture(scope="module")
def psfs():
    return GaussianPsf(SCIENCE_FWHM).image(size=25), GaussianPsf(TEMPLATE_FWHM).image(size=25)


def noise_pair(seed, shape=(256, 256)):
    rng = np.random.default_rng(seed)
    return SIGMA_N * rng.standard_normal(shape), SIGMA_R * rng.standard_normal(shape)


def lag1(image):
    return (np.corrcoef(image[:, :-1].ravel(), image[:, 1:].ravel())[0, 1],
            np.corrcoef(image[:-1].ravel(), image[1:].ravel())[0, 1])


# -- PSF spectra and centring ---------------------------------------------------------------------


def test_psf_spectrum_is_one_at_zero_frequency_and_real_for_centred_stamps(psfs):
    spectrum = psf_spectrum(psfs[0], (64, 64))
    assert spectrum[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert np.abs(spectrum.imag).max() < 1e-12  # symmetric about the origin


@pytest.mark.parametrize("size", [22, 23, 24])
def test_even_and_odd_stamps_of_one_psf_give_one_spectrum(size):
    # The same Gaussian: on an odd stamp centred on its central pixel, and on an
    # even (or other odd) stamp centred on its geometric centre (a pixel corner when even).
    # FWHM 4 px: well sampled, so sub-pixel placement of the samples is band-limited.
    reference = psf_spectrum(gaussian_stamp(4.0, 31), (64, 64))
    other = psf_spectrum(gaussian_stamp(4.0, size), (64, 64))
    ky = np.abs(sfft.fftfreq(64))[:, None]
    kx = sfft.rfftfreq(64)[None, :]
    below = (ky < 0.45) & (kx < 0.45)
    assert np.abs(other - reference)[below].max() < 1e-6
    # On the Nyquist lines a half-pixel shift is ambiguous for sampled data; the real
    # (cos) convention keeps the spectrum Hermitian at the cost of that tiny term.
    assert np.abs(other - reference).max() < 1e-3


def test_explicit_centre_of_an_offset_stamp():
    offset_stamp = gaussian_stamp(4.0, 31, center=(14.3, 16.6))
    reference = psf_spectrum(gaussian_stamp(4.0, 31), (64, 64))
    centred = psf_spectrum(offset_stamp, (64, 64), center=(14.3, 16.6))
    assert np.abs(centred - reference).max() < 1e-5
    # Without the centre the spectrum carries the offset as a phase ramp.
    assert np.abs(psf_spectrum(offset_stamp, (64, 64)) - reference).max() > 0.1


def test_shift_phase_moves_content_and_keeps_real_images_real():
    image = gaussian_stamp(4.0, 64, center=(20.0, 30.0))
    moved = sfft.irfft2(sfft.rfft2(image) * shift_phase(image.shape, 2.4, -1.3), s=image.shape)
    expected = gaussian_stamp(4.0, 64, center=(22.4, 28.7))
    assert np.abs(moved - expected).max() < 1e-5 * image.max()


def test_even_psf_stamp_gives_centred_difference():
    # An even stamp of the template PSF (centre at the pixel corner) describes the same PSF:
    # D of a source must be identical to the one computed with the odd stamp.
    science, template = noise_pair(1, (128, 128))
    add_source(science, 5e3, 60.0, 70.0, 5.0)
    science_psf = gaussian_stamp(5.0, 31)
    odd, _ = proper_image_subtraction(science, template, science_psf, gaussian_stamp(4.0, 31),
                                      SIGMA_N, SIGMA_R)
    even, _ = proper_image_subtraction(science, template, science_psf, gaussian_stamp(4.0, 30),
                                       SIGMA_N, SIGMA_R)
    # Where the PSFs carry signal the two agree; where both spectra are at the 1e-6 level
    # (and a stamp symmetric about a pixel corner has no Nyquist term at all) only the
    # weighting of pure noise can differ. The score, weighted by |P|², agrees everywhere.
    assert np.abs(odd.score - even.score).max() < 1e-5 * np.abs(odd.score).max()
    ky = sfft.fftfreq(128)[:, None]
    kx = sfft.rfftfreq(128)[None, :]
    signal = np.hypot(kx, ky) < 0.2
    diff = sfft.irfft2(sfft.rfft2(odd.difference - even.difference) * signal, s=(128, 128))
    assert np.abs(diff).max() < 1e-3 * np.abs(odd.difference).max()
    peak = np.unravel_index(np.argmax(even.score), even.score.shape)
    assert peak == (70, 60)


# -- the proper difference ------------------------------------------------------------------------


def test_difference_is_white_with_unit_variance(psfs):
    science, template = noise_pair(2, (512, 512))
    images, kernels = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R, 1.3)
    unit = images.difference * kernels.zero_point
    core = unit[40:-40, 40:-40]
    assert core.std() == pytest.approx(1.0, abs=0.01)
    assert max(abs(v) for v in lag1(core)) < 0.01
    # Whiteness is exact at every frequency: |c_N|² σ_N² + |c_R|² σ_R² = 1.
    noise_power = (np.abs(kernels.difference_science) ** 2 * SIGMA_N**2
                   + np.abs(kernels.difference_template) ** 2 * SIGMA_R**2)
    assert np.abs(noise_power - 1.0).max() < 1e-9


def test_zero_point_psf_and_kernels(psfs):
    ratio = 1.7
    kernels = zogy_kernels(*psfs, (128, 128), SIGMA_N, SIGMA_R, ratio, dtype=np.float64)
    # F_D with F_N = 1, F_R = 1/r (eq. 15).
    expected = (1 / ratio) / np.sqrt(SIGMA_N**2 / ratio**2 + SIGMA_R**2)
    assert kernels.zero_point == pytest.approx(expected, rel=1e-12)
    assert kernels.difference_psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert kernels.science_kernel.sum() == pytest.approx(1.0, abs=1e-4)
    assert kernels.template_kernel.sum() == pytest.approx(ratio, rel=1e-4)
    # P_D is centred: its first moments vanish.
    half = kernels.difference_psf.shape[0] // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    assert abs((kernels.difference_psf * x).sum()) < 1e-9
    assert abs((kernels.difference_psf * y).sum()) < 1e-9


def test_point_source_in_difference_is_flux_times_difference_psf(psfs):
    # Noise-free transient of science flux f: D / F_D = f P_D around it.
    science = np.zeros((128, 128))
    add_source(science, 1000.0, 64.0, 64.0, SCIENCE_FWHM)
    images, kernels = proper_image_subtraction(science, np.zeros_like(science),
                                               gaussian_stamp(SCIENCE_FWHM, 31),
                                               gaussian_stamp(TEMPLATE_FWHM, 31),
                                               SIGMA_N, SIGMA_R)
    half = kernels.difference_psf.shape[0] // 2
    cut = images.difference[64 - half:64 + half + 1, 64 - half:64 + half + 1]
    expected = 1000.0 * kernels.difference_psf
    assert np.abs(cut - expected).max() < 1e-3 * expected.max()


def test_score_is_the_matched_filter_of_the_difference(psfs):
    science, template = noise_pair(3, (128, 128))
    add_source(science, 3e3, 50.3, 70.8, SCIENCE_FWHM)
    images, kernels = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R,
                                               pad=20)
    unit = images.difference * kernels.zero_point
    # S = F_D (D ⋆ P_D) (correlation with P_D), computed independently in real space.
    expected = kernels.zero_point * ndimage.correlate(unit, kernels.difference_psf,
                                                       mode="constant")
    inner = (slice(30, -30), slice(30, -30))
    assert np.abs(images.score[inner] - expected[inner]).max() < 1e-5 * np.abs(expected).max()
    # F_S = F_D² Σ P_D² (Parseval) and its variance in uniform noise.
    assert kernels.score_zero_point == pytest.approx(
        kernels.zero_point**2 * (kernels.difference_psf**2).sum(), rel=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 2.5])
def test_flux_estimate_is_exact_without_noise(ratio):
    science = np.zeros((128, 128))
    template = np.zeros((128, 128))
    add_source(science, 2000.0, 64.0, 60.0, SCIENCE_FWHM)         # a transient
    add_source(science, ratio * 5e4, 30.0, 90.0, SCIENCE_FWHM)    # a static star ...
    add_source(template, 5e4, 30.0, 90.0, TEMPLATE_FWHM)          # ... r times fainter in R
    images, _ = proper_image_subtraction(science, template, gaussian_stamp(SCIENCE_FWHM, 31),
                                         gaussian_stamp(TEMPLATE_FWHM, 31), SIGMA_N, SIGMA_R,
                                         ratio, floor=0.0)
    assert images.flux[60, 64] == pytest.approx(2000.0, rel=1e-6)
    assert abs(images.flux[90, 30]) < 1e-6 * 5e4
    assert np.abs(images.difference[75:105, 15:45]).max() < 1e-6 * 5e4


def test_proper_difference_is_symmetric_in_the_two_images(psfs):
    # Swapping N and R (with the inverse flux ratio) negates D up to the zero-point scale.
    science, template = noise_pair(4, (128, 128))
    ratio = 1.6
    forward, kf = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R, ratio)
    backward, kb = proper_image_subtraction(template, science, psfs[1], psfs[0], SIGMA_R,
                                            SIGMA_N, 1 / ratio)
    np.testing.assert_allclose(forward.difference * kf.zero_point,
                               -backward.difference * kb.zero_point, atol=1e-9)


# -- variance terms -------------------------------------------------------------------------------


def test_source_noise_term_matches_monte_carlo(psfs):
    """V(S_N) + V(S_R) from Poisson variance planes equals the scatter of S at a bright star."""
    rng = np.random.default_rng(5)
    shape = (64, 64)
    star_n = np.zeros(shape)
    star_r = np.zeros(shape)
    add_source(star_n, 2e5, 32.0, 32.0, SCIENCE_FWHM)
    add_source(star_r, 2e5, 32.0, 32.0, TEMPLATE_FWHM)
    var_n = SIGMA_N**2 + star_n          # Poisson noise of the star (gain 1)
    var_r = SIGMA_R**2 + 0.1 * star_r
    kernels = zogy_kernels(*psfs, (96, 96), SIGMA_N, SIGMA_R, dtype=np.float64)
    pad = ((16, 16), (16, 16))
    scores = []
    for _ in range(300):
        n = star_n + np.sqrt(var_n) * rng.standard_normal(shape)
        r = star_r + np.sqrt(var_r) * rng.standard_normal(shape)
        images = apply_zogy(np.pad(n, pad), np.pad(r, pad), np.pad(var_n, pad),
                            np.pad(var_r, pad), kernels, score_noise="source", flux=False,
                            difference_variance=False, registered_template=False)
        scores.append(images.score[48, 46:51])
        predicted = images.score_variance[48, 46:51]
    empirical = np.var(np.array(scores), axis=0)
    background_only = kernels.score_zero_point
    assert np.all(predicted > 3 * background_only)   # the source noise dominates here
    np.testing.assert_allclose(empirical / predicted, 1.0, atol=0.2)


def test_astrometric_noise_term_matches_monte_carlo(psfs):
    """Random registration errors of σ = 0.05 px: V_ast predicts the extra scatter of S."""
    rng = np.random.default_rng(6)
    shape = (64, 64)
    sigma_ast = 0.05
    kernels = zogy_kernels(*psfs, (96, 96), SIGMA_N, SIGMA_R, dtype=np.float64)
    pad = ((16, 16), (16, 16))
    var_n = np.full(shape, SIGMA_N**2)
    var_r = np.full(shape, SIGMA_R**2)
    truth_n = np.zeros(shape)
    truth_r = np.zeros(shape)
    add_source(truth_n, 1e5, 32.0, 32.0, SCIENCE_FWHM)
    add_source(truth_r, 1e5, 32.0, 32.0, TEMPLATE_FWHM)
    predicted = apply_zogy(np.pad(truth_n, pad), np.pad(truth_r, pad), np.pad(var_n, pad),
                           np.pad(var_r, pad), kernels, registration_noise=(sigma_ast, sigma_ast),
                           flux=False, registered_template=False).score_variance
    scores = []
    for _ in range(300):
        n = np.zeros(shape)
        r = np.zeros(shape)
        dx, dy = sigma_ast * rng.standard_normal(2)
        ex, ey = sigma_ast * rng.standard_normal(2)
        add_source(n, 1e5, 32.0 + dx, 32.0 + dy, SCIENCE_FWHM)
        add_source(r, 1e5, 32.0 + ex, 32.0 + ey, TEMPLATE_FWHM)
        n += SIGMA_N * rng.standard_normal(shape)
        r += SIGMA_R * rng.standard_normal(shape)
        images = apply_zogy(np.pad(n, pad), np.pad(r, pad), None, None, kernels,
                            score_noise="background", flux=False, difference_variance=False,
                            registered_template=False)
        scores.append(images.score[48, 49:53])   # the flank of the star, where ∂S/∂x is large
    empirical = np.var(np.array(scores), axis=0)
    assert np.all(predicted[48, 49:53] > 5 * kernels.score_zero_point)
    np.testing.assert_allclose(empirical / predicted[48, 49:53], 1.0, atol=0.25)


# -- numerics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [0.0, 1e-6])
def test_vanishing_denominator_is_regularised(floor):
    # 2×2 box PSFs (even stamps) have exact zeros of their spectra at the Nyquist frequency:
    # Δ = 0 there. The difference stays finite and white.
    box = np.full((2, 2), 0.25)
    science, template = noise_pair(7, (256, 256))
    kernels = zogy_kernels(box, box, (256, 256), SIGMA_N, SIGMA_R, floor=floor,
                           dtype=np.float64)
    if floor == 0.0:
        assert kernels.n_degenerate > 0
    images = apply_zogy(science, template, np.full((256, 256), SIGMA_N**2),
                        np.full((256, 256), SIGMA_R**2), kernels)
    for plane in (images.difference, images.score, images.score_corrected,
                  images.difference_variance):
        assert np.all(np.isfinite(plane))
    assert (images.difference * kernels.zero_point).std() == pytest.approx(1.0, abs=0.02)


def test_broad_psfs_keep_a_white_finite_difference():
    # Both PSFs broad: their spectra underflow far below the Nyquist frequency.
    science, template = noise_pair(8, (256, 256))
    images, kernels = proper_image_subtraction(science, template, gaussian_stamp(9.0, 61),
                                               gaussian_stamp(8.0, 61), SIGMA_N, SIGMA_R)
    unit = images.difference * kernels.zero_point
    assert np.all(np.isfinite(unit))
    assert unit.std() == pytest.approx(1.0, abs=0.02)
    assert max(abs(v) for v in lag1(unit)) < 0.02


def test_float32_agrees_with_float64(psfs):
    science, template = noise_pair(9, (128, 128))
    add_source(science, 1e6, 40.0, 40.0, SCIENCE_FWHM)
    add_source(template, 1e6, 40.0, 40.0, TEMPLATE_FWHM)
    single, k = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R,
                                         dtype=np.float32)
    double, _ = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R,
                                         dtype=np.float64)
    sky_sigma = 1.0 / k.zero_point
    assert np.abs(single.difference - double.difference).max() < 1e-3 * sky_sigma
    assert np.abs(single.score_corrected - double.score_corrected).max() < 1e-2


def test_invalid_inputs_are_refused(psfs):
    with pytest.raises(ConfigurationError, match="flux ratio"):
        zogy_kernels(*psfs, (64, 64), SIGMA_N, SIGMA_R, flux_ratio=0.0)
    with pytest.raises(ConfigurationError, match="not both zero"):
        zogy_kernels(*psfs, (64, 64), 0.0, 0.0)
    with pytest.raises(BadInputDataError, match="larger than the transform"):
        psf_spectrum(np.ones((70, 70)), (64, 64))
    with pytest.raises(BadInputDataError, match="non-positive sum"):
        psf_spectrum(np.zeros((5, 5)), (64, 64))


def test_noiseless_template_reduces_to_psf_matching(psfs):
    # σ_R = 0: D / F_D = N − K ⊗ R with K the exact matching kernel (the Alard–Lupton limit).
    science = np.zeros((128, 128))
    template = np.zeros((128, 128))
    add_source(science, 4e4, 64.0, 64.0, SCIENCE_FWHM)
    add_source(template, 4e4, 64.0, 64.0, TEMPLATE_FWHM)
    images, kernels = proper_image_subtraction(science, template, *psfs, SIGMA_N, 0.0)
    assert kernels.zero_point == pytest.approx(1.0 / SIGMA_N)
    assert np.abs(images.difference).max() < 1e-5 * 4e4


# -- registration shift and correlated noise ------------------------------------------------------


def test_template_shift_registers_the_template(psfs):
    shift = (0.37, -0.21)
    science, template = noise_pair(10, (128, 128))
    add_source(science, 3e5, 60.0, 64.0, SCIENCE_FWHM)
    add_source(template, 3e5, 60.0 + shift[0], 64.0 + shift[1], TEMPLATE_FWHM)
    fixed, k = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R,
                                        template_shift=shift)
    unshifted, _ = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R)
    star = (slice(50, 79), slice(46, 75))
    assert np.abs(fixed.difference[star] * k.zero_point).max() < 5.0      # noise only
    assert np.abs(unshifted.difference[star] * k.zero_point).max() > 50.0  # a dipole
    assert np.abs(fixed.registered_template[star]).max() > 0
    # The registered template has the star at the science position.
    peak = np.unravel_index(np.argmax(fixed.registered_template), (128, 128))
    assert peak == (64, 60)


def test_correlated_noise_model_keeps_the_difference_white(psfs):
    """Resampled-like inputs (neighbour-correlated noise): with the measured correlation
    D is white and S_corr has unit variance; under the white-noise assumption it is not."""
    rng = np.random.default_rng(11)
    smooth = np.array([[0.05, 0.2, 0.05], [0.2, 1.0, 0.2], [0.05, 0.2, 0.05]])
    shape = (384, 384)
    science = ndimage.convolve(rng.standard_normal(shape), smooth, mode="wrap")
    template = ndimage.convolve(rng.standard_normal(shape), smooth, mode="wrap")
    science *= SIGMA_N / science.std()
    template *= SIGMA_R / template.std()
    acf_n = measure_noise_correlation(science, np.ones(shape, bool)).acf
    acf_r = measure_noise_correlation(template, np.ones(shape, bool)).acf
    assert acf_n[3, 4] == pytest.approx(0.37, abs=0.03)
    modelled, k = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R,
                                           science_correlation=acf_n, template_correlation=acf_r)
    white, _ = proper_image_subtraction(science, template, *psfs, SIGMA_N, SIGMA_R)
    inner = (slice(40, -40), slice(40, -40))
    assert max(abs(v) for v in lag1(modelled.difference[inner])) < 0.03
    assert modelled.score_corrected[inner].std() == pytest.approx(1.0, abs=0.05)
    assert white.score_corrected[inner].std() > 1.3
    # A white image measures as white (no spurious lags).
    white_acf = measure_noise_correlation(rng.standard_normal(shape), np.ones(shape, bool))
    assert white_acf.is_white
