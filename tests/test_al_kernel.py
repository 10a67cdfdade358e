"""Kernel fit: recovery of known kernels, spatial variation, background, sources, strategies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.signal import fftconvolve

from _al_fixtures import convolved_pair, gaussian_kernel, rendered_pair, sky_pixels
from diffim_dask.errors import InsufficientKernelSourcesError
from diffim_dask.masks import mask_value
from diffim_dask.psf import fwhm_of_stamp
from diffim_dask.subtract import AlardLuptonConfig, subtract_alard_lupton

NO_DECORRELATION = {"decorrelation": {"enabled": False}}


def _config(**sections):
    data = {**NO_DECORRELATION}
    for key, value in sections.items():
        data[key] = value
    return AlardLuptonConfig.from_dict(data)


def _moments(kernel):
    half = kernel.shape[0] // 2
    g = np.arange(-half, half + 1)
    total = kernel.sum()
    cx = (kernel.sum(axis=0) * g).sum() / total
    cy = (kernel.sum(axis=1) * g).sum() / total
    var_x = (kernel.sum(axis=0) * (g - cx) ** 2).sum() / total
    var_y = (kernel.sum(axis=1) * (g - cy) ** 2).sum() / total
    return total, cx, cy, 0.5 * (var_x + var_y)


@pytest.mark.parametrize("strategy", ["stars", "all-pixels"])
def test_recovers_a_known_gaussian_kernel_on_noiseless_data(strategy):
    truth = gaussian_kernel(21, 1.3)
    pair = convolved_pair(kernel=truth)
    config = _config(fit={"spatial_kernel_order": 0},
                     sources={"strategy": strategy, "max_snr": 1e6})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    assert result.metadata["strategy"] == strategy
    kernel = result.kernel.image()
    assert kernel.shape == truth.shape  # σ_K = 1.3 -> sigmas 0.7, 1.4, 2.8 -> 21 px
    assert np.abs(kernel - truth).max() < 0.01 * truth.max()
    assert result.kernel.kernel_sum() == pytest.approx(1.0, abs=1e-4)


def test_recovers_a_shifted_kernel_centroid_and_width():
    truth = gaussian_kernel(21, 1.3, shift=(0.4, -0.3), total=1.0)
    pair = convolved_pair(kernel=truth, seed=4)
    config = _config(fit={"spatial_kernel_order": 0}, sources={"max_snr": 1e6})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    total, cx, cy, var = _moments(result.kernel.image())
    _, tx, ty, tvar = _moments(truth)
    assert total == pytest.approx(1.0, abs=3e-4)
    assert cx == pytest.approx(tx, abs=0.01) and cy == pytest.approx(ty, abs=0.01)
    assert var == pytest.approx(tvar, rel=0.01)


def test_recovers_spatial_variation_of_the_kernel():
    # Science FWHM 3.2 -> 4.4 px from left to right; template 2.5 px; kernel varies.
    pair = rendered_pair((384, 384), science_fwhm=3.8, science_variation=(0.16,), n_stars=260,
                         sky_sigma=5.0, template_sigma=1.0, seed=11)
    config = _config(fit={"spatial_kernel_order": 2})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    template_psf = pair.template.psf.image(size=41)
    for x in (60.0, 192.0, 320.0):
        kernel = result.kernel.image(x, 192.0)
        # The kernel maps the template PSF onto the local science PSF ...
        predicted = fftconvolve(template_psf, kernel, mode="same")
        science_psf = pair.science.psf.image(x, 192.0, size=41)
        assert np.abs(predicted - science_psf).max() < 0.04 * science_psf.max(), x
        # ... so the matched template has the local science FWHM (3.2 to 4.4 px here).
        assert fwhm_of_stamp(predicted) == pytest.approx(pair.science.psf.fwhm(x, 192.0), rel=0.02)
        assert kernel.sum() == pytest.approx(1.0, abs=0.01)
    left = _moments(result.kernel.image(60.0, 192.0))[3]
    right = _moments(result.kernel.image(320.0, 192.0))[3]
    assert right > 1.5 * left
    img, var, mask = result.difference.arrays()
    sky = sky_pixels(pair, mask)
    assert np.std(img[sky] / np.sqrt(var[sky])) == pytest.approx(1.0, abs=0.05)


def test_photometric_scale_and_background_are_fitted():
    pair = rendered_pair((256, 256), template_scale=2.0, background=40.0, n_stars=160, seed=5)
    config = _config(fit={"spatial_background_order": 1})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    assert result.kernel.kernel_sum() == pytest.approx(0.5, rel=0.01)
    assert result.metadata["kernel_sum_std"] < 1e-12  # constant over the image
    # background = 40 (x - 128) / 256 in the science image (template has none)
    for x in (20.0, 128.0, 236.0):
        assert result.background(x, 128.0) == pytest.approx(40.0 * (x - 128.0) / 256.0, abs=1.5)
    # Subtracting the fitted background leaves a flat difference.
    flat = subtract_alard_lupton(pair.science, pair.template,
                                 _config(fit={"spatial_background_order": 1}).replace(
                                     subtract_background=True))
    img, _, mask = flat.difference.arrays()
    good = mask == 0
    left = np.median(img[:, 20:60][good[:, 20:60]])
    right = np.median(img[:, 196:236][good[:, 196:236]])
    assert abs(left - right) < 1.5


def test_transients_and_variables_do_not_bias_the_kernel():
    # 25 bright transients among 150 stars: all are detected as candidate "stars".
    pair = rendered_pair((320, 320), n_stars=150, transients=25, transient_flux=40000.0, seed=9)
    result = subtract_alard_lupton(pair.science, pair.template, _config())
    meta = result.metadata
    assert result.kernel.kernel_sum() == pytest.approx(1.0, abs=0.005)
    assert meta["selection"]["rejected_flux_ratio"] + meta["rejected_kernel_sum"] \
        + meta["rejected_residual_flux"] >= 15
    used = result.kernel_sources[result.kernel_sources["used"]]
    tx, ty = pair.transients["x"], pair.transients["y"]
    distance = np.hypot(used["x"].to_numpy()[:, None] - tx[None], used["y"].to_numpy()[:, None] - ty[None])
    assert distance.min() > 3.0  # no transient was used as a kernel star


def test_kernel_stars_avoid_masked_pixels_and_honour_supplied_lists():
    pair = rendered_pair((256, 256), n_stars=160, seed=12)
    image, variance, mask = pair.template.arrays()
    mask = mask.copy()
    stars = pd.DataFrame(pair.stars)
    bright = stars.sort_values("flux").iloc[-40:]
    flagged = bright.iloc[:10]
    for x, y in zip(flagged["x"], flagged["y"]):
        mask[int(round(y)), int(round(x)) + 3] |= mask_value("BAD")
    template = pair.template.with_planes(mask=mask)
    config = _config(sources={"max_snr": 1e5})
    result = subtract_alard_lupton(pair.science, template, config)
    used = result.kernel_sources[result.kernel_sources["used"]]
    d = np.hypot(used["x"].to_numpy()[:, None] - flagged["x"].to_numpy()[None],
                 used["y"].to_numpy()[:, None] - flagged["y"].to_numpy()[None])
    assert d.min() > 2.0
    assert result.metadata["selection"]["rejected_mask"] >= 10
    # A supplied list restricts the candidates.
    supplied = bright.iloc[10:][["x", "y"]]
    config = _config(sources={"max_snr": 1e5, "strategy": "stars"})
    result = subtract_alard_lupton(pair.science, template, config, sources=supplied)
    assert result.metadata["strategy"] == "stars"
    used = result.kernel_sources[result.kernel_sources["used"]]
    d = np.hypot(used["x"].to_numpy()[:, None] - supplied["x"].to_numpy()[None],
                 used["y"].to_numpy()[:, None] - supplied["y"].to_numpy()[None])
    assert (d.min(axis=1) < 1.5).all()
    assert result.metadata["selection"]["n_input"] == len(supplied)


def test_sparse_field_falls_back_to_all_pixels_with_clipping():
    # Five stars and three bright transients: too few stars; all-pixels must clip the transients.
    pair = rendered_pair((192, 192), n_stars=5, transients=3, transient_flux=30000.0, seed=21,
                         flux_range=(2e4, 1e5))
    result = subtract_alard_lupton(pair.science, pair.template, _config())
    meta = result.metadata
    assert meta["strategy"] == "all-pixels"
    assert "stars: only" in meta["fallback_reason"]
    assert meta["clipped_fraction"] > 0
    assert result.kernel.kernel_sum() == pytest.approx(1.0, abs=0.02)
    img, var, mask = result.difference.arrays()
    sky = sky_pixels(pair, mask)
    assert np.std(img[sky] / np.sqrt(var[sky])) == pytest.approx(1.0, abs=0.05)


def test_all_pixels_spatial_order_is_capped_by_the_number_of_stars():
    # A shape that bends with position is constrained by point sources only: with ~20 stars
    # (5 per spatial term) an all-pixels fit asked for order 2 (6 terms) keeps order 0; the
    # rule is off with auto_stars_per_term = 0, and a star-rich field keeps order 2.
    sparse = rendered_pair((256, 256), n_stars=14, shift=(0.3, -0.2), seed=1)
    dense = rendered_pair((256, 256), n_stars=150, shift=(0.3, -0.2), seed=1)

    def order_used(pair, per_term):
        config = _config(fit={"spatial_kernel_order": 2},
                         sources={"strategy": "all-pixels", "auto_stars_per_term": per_term})
        meta = subtract_alard_lupton(pair.science, pair.template, config).metadata
        assert meta["strategy"] == "all-pixels" and meta["spatial_kernel_order"] == 2
        return meta["spatial_kernel_order_used"], meta["selection"]["n_selected"]

    order, n_stars = order_used(sparse, 5)
    assert n_stars < 15 and order == 0
    assert order_used(sparse, 0)[0] == 2
    order, n_stars = order_used(dense, 5)
    assert n_stars >= 30 and order == 2


def test_injected_neighbours_do_not_veto_kernel_stars():
    # Dense injections (QA runs): a star is rejected only when an injected source sits on its
    # core; elsewhere in its stamp the injected pixels get zero weight, and the quality gate
    # does not count them as residual. Without that, 60 injections on 256² vetoed nearly every
    # star and the kernel fell back to the PSF models.
    from diffim_dask.qa import InjectionConfig, inject_sources

    pair = rendered_pair((256, 256), n_stars=60, shift=(0.2, 0.1), seed=4)
    config = _config(fit={"spatial_kernel_order": 1})
    plain = subtract_alard_lupton(pair.science, pair.template, config).metadata
    injected = inject_sources(pair.science, InjectionConfig(n_sources=60, snr_range=(10, 30), add_noise=False),
                              seed=3)
    result = subtract_alard_lupton(injected.exposure, pair.template, config)
    meta = result.metadata
    selection = meta["selection"]
    assert selection["rejected_injected_neighbour"] > 0
    assert selection["n_selected"] >= 0.5 * plain["selection"]["n_selected"]
    assert meta["strategy"] == plain["strategy"]
    assert meta["spatial_kernel_order_used"] == plain["spatial_kernel_order_used"]
    assert meta["quality_gate"] == "passed"
    assert result.kernel.kernel_sum() == pytest.approx(1.0, abs=0.02)


def test_insufficient_sources_errors_say_why():
    pair = rendered_pair((192, 192), n_stars=4, seed=22)
    with pytest.raises(InsufficientKernelSourcesError, match="usable kernel stars") as info:
        subtract_alard_lupton(pair.science, pair.template,
                              _config(sources={"strategy": "stars", "min_kernel_sources": 8}))
    assert info.value.metadata["n_required"] == 8
    assert "n_peaks" in info.value.metadata
    # Neither strategy can work when almost every pixel is masked.
    image, variance, mask = pair.template.arrays()
    mask = np.full(mask.shape, mask_value("HIGH_VARIANCE"), np.uint32)
    mask[:40, :40] = 0
    template = pair.template.with_planes(mask=mask)
    with pytest.raises(InsufficientKernelSourcesError, match="all-pixels") as info:
        subtract_alard_lupton(pair.science, template, _config())
    assert "stars:" in str(info.value)


@pytest.mark.parametrize("zero_points", [(27.0, 27.0), (27.0, 26.5)])
def test_stamp_without_kernel_stars_matches_the_psf_models(zero_points):
    # A 63 px cut-out whose only bright source is the variable itself (an alert stamp):
    # no kernel star fits, and an all-pixels fit would absorb the fading into the
    # kernel sum. The PSF-model kernel keeps the flux scale of the calibrations.
    from _al_fixtures import psf_flux, render
    from diffim_dask import Exposure, GaussianPsf, PhotoCalib, VisitInfo

    shape, x, y = (63, 63), 31.3, 30.8
    science_psf, template_psf = GaussianPsf(3.0), GaussianPsf(2.2)
    science_zp, template_zp = zero_points
    # Template counts scaled so both images hold the same sky flux (in nJy) for the star.
    template_flux = 2e5 * 10 ** (0.4 * (template_zp - science_zp))
    rng = np.random.default_rng(71)

    def exposure(flux, psf, sigma, zero_point):
        model = render(shape, [x, 12.0], [y, 50.0], [flux, 0.02 * flux], psf)
        variance = sigma**2 + np.clip(model, 0, None) * 0.1
        image = model + 100.0 + np.sqrt(variance) * rng.standard_normal(shape)
        return Exposure.from_arrays(image.astype(np.float32), variance.astype(np.float32),
                                    psf=psf, photo_calib=PhotoCalib(zero_point),
                                    info=VisitInfo(band="r"))

    science = exposure(0.7 * 2e5, science_psf, 10.0, science_zp)  # faded by 30%
    template = exposure(template_flux, template_psf, 4.0, template_zp)
    result = subtract_alard_lupton(science, template, _config())
    meta = result.metadata
    assert meta["strategy"] == "psf-model" and "stars: only 0" in meta["fallback_reason"]
    expected_sum = 10 ** (0.4 * (science_zp - template_zp))
    assert result.kernel.kernel_sum() == pytest.approx(expected_sum, rel=1e-9)
    # K ⊗ P_T matches P_S: the matched template PSF has the science FWHM.
    matched = fftconvolve(template_psf.image(size=41), result.kernel.image(), mode="same")
    assert fwhm_of_stamp(matched) == pytest.approx(3.0, rel=0.03)
    img, var, _ = result.difference.arrays()
    flux, err = psf_flux(img, var, x, y, science_psf)
    assert flux == pytest.approx(-0.3 * 2e5, rel=0.05)
    assert abs(flux / err) > 50
    # The all-pixels fit on the same stamp hides most of the change in the kernel.
    fitted = subtract_alard_lupton(science, template,
                                   _config(sources={"auto_psf_model_below": 0}))
    assert fitted.metadata["strategy"] == "all-pixels"
    absorbed, _ = psf_flux(*fitted.difference.arrays()[:2], x, y, science_psf)
    assert abs(absorbed) < 0.5 * abs(flux)
