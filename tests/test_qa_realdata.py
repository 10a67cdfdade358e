"""Injection tests on the real DECam frames: flux conservation and depth of the default pipeline."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diffim_dask.io import read_exposure
from diffim_dask.psf import estimate_psf
from diffim_dask.qa.campaign import run_injection_test
from diffim_dask.qa.injection import InjectionConfig, inject_sources

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def decam_pair(decam_dir):
    science = read_exposure(decam_dir / "Stack-DEC-OBS04.fits")
    template = read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    return (science.replace(psf=estimate_psf(science).psf),
            template.replace(psf=estimate_psf(template).psf))


def test_injection_into_a_real_frame_conserves_flux(decam_pair):
    science, _ = decam_pair
    table = pd.DataFrame({"x": [60.3, 150.7, 200.2], "y": [40.8, 90.1, 220.6],
                          "flux_counts": [2000.0, 5000.0, 12000.0]})
    result = inject_sources(science, table, seed=4)
    added = result.exposure.arrays()[0].astype(np.float64) - science.arrays()[0]
    gain = science.info.gain
    assert abs(added.sum() - 19000.0) < 4 * math.sqrt(19000.0 / gain)
    # The stacked frame's noise is correlated between pixels: its variance plane understates
    # the noise of a PSF flux, and the expected S/N accounts for it.
    scale = result.metadata["noise_scale"]
    assert scale > 1.5
    np.testing.assert_allclose(result.truth["expected_snr_variance"] / result.truth["expected_snr"],
                               scale)


def _campaign(science, template):
    """200 point sources at S/N 3-30 in 4 batches of 50 (a 256² frame would be crowded otherwise),
    through the default pipeline (workflows/alard-lupton.yaml: its subtraction and detection).
    The data's known variable star (README) is real signal, not a false detection."""
    known = pd.DataFrame({"x": [129.0], "y": [128.0]})
    test = run_injection_test(science, template, n_sources=200, batch_size=50, seed=11,
                              config=InjectionConfig(snr_range=(3.0, 30.0)), pipeline="alard-lupton",
                              known=known, n_bootstrap=30)
    m = test.metrics
    print("\n" + test.summary.format())
    print(f"50% / 90% completeness at S/N {m['snr50']:.2f} {m['snr50_err']} / {m['snr90']:.2f}; "
          f"plateau {m['completeness_plateau']:.1%}; ideal 5σ detector {m['snr50_ideal']:.2f}; "
          f"false {m['n_false']} ({m['false_per_image']:.1f} per frame, "
          f"{m['false_per_deg2']:.0f} per deg²); flux bias {m['flux_bias_median']:+.3f}, "
          f"pull robust σ {m['flux_pull_robust_std']:.2f}")
    return test


@pytest.mark.slow
def test_completeness_of_a_single_exposure_against_the_deep_template(decam_dir):
    # The survey set-up the anchor's figure refers to: one science exposure (OBS04a) against a
    # template coadd several times deeper (the stack of the five reference exposures).
    science = read_exposure(decam_dir / "DEC-OBS04a.mini.fits")
    template = read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    test = _campaign(science, template)
    m = test.metrics
    n_frames = len(test.batches)
    # The campaign runs the pipeline's cosmic-ray step on the single exposure, as a run does.
    assert m["n_cosmic_ray_pixels"] >= 0 and "n_cosmic_rays" in m
    # The anchor reaches 50 % at S/N ≈ 5.8 on simulated survey data; the issue aims at or below.
    assert m["snr50"] <= 5.8
    # The deep template costs little S/N, and the pipeline is near an ideal 5σ detector.
    assert m["snr_loss_factor"] < 1.35
    assert m["snr50"] < 1.05 * m["snr50_ideal"] and m["snr90"] < 9.0
    assert m["completeness_plateau"] > 0.95
    assert 0.8 < m["sky_snr_std"] < 1.3
    assert abs(m["flux_bias_median"]) < 0.03
    assert 0.8 < m["flux_pull_robust_std"] < 1.2
    # The variable star is found in every batch; injections add hardly any false detections.
    assert m["n_known"] == n_frames
    assert m["n_false_new"] <= n_frames
    assert m["false_per_image"] <= 8


@pytest.mark.slow
def test_completeness_of_the_default_pipeline_on_decam(decam_pair):
    science, template = decam_pair
    test = _campaign(science, template)
    m = test.metrics
    n_frames = len(test.batches)
    print(f"50% / 90% completeness at S/N {m['snr50']:.2f} / {m['snr90']:.2f} (anchor: 50% at 5.8; "
          f"an ideal 5σ detector on this pair: {m['snr50_ideal']:.2f}); plateau "
          f"{m['completeness_plateau']:.1%}; in difference-image S/N: 50% at "
          f"{m['difference_snr50']:.2f}")
    print(f"false detections: {m['n_false']} ({m['false_per_image']:.1f} per frame, "
          f"{m['false_per_deg2']:.0f} per deg²), {m['n_false_new']} not in the no-injection "
          f"baseline ({m['n_baseline_sources']} DIA sources); {m['n_known']} of the variable star")
    print(f"flux bias {m['flux_bias_median']:+.3f}, pull median {m['flux_pull_median']:+.2f}, "
          f"pull robust σ {m['flux_pull_robust_std']:.2f}; sky-source S/N scatter "
          f"{m['sky_snr_std']:.2f}")
    print(f"noise-calibrated 5σ: 50% at S/N {m['snr50_calibrated']:.2f}, "
          f"{m['n_false_calibrated']} false detections ({m['false_per_image_calibrated']:.1f} per frame)")
    print(test.batches.to_string())
    assert m["n_injected"] == 200 and n_frames == 4
    # Every figure the issue asks for is measured.
    for key in ("snr50", "snr90", "completeness_plateau", "false_per_image", "false_per_deg2",
                "flux_bias_median", "flux_pull_robust_std", "difference_snr50"):
        assert math.isfinite(m[key]), key
    assert m["snr50_err"][0] <= m["snr50"] <= m["snr50_err"][1]
    # The threshold is 5σ of the difference's real noise on the PSF scale: sky sources scatter
    # as N(0, 1) in S/N, and half the injections are found near a difference-image S/N of 5.
    assert 0.8 < m["sky_snr_std"] < 1.3
    assert 4.0 < m["difference_snr50"] < 6.0
    # The reference stack is about as deep as the science stack: its noise lowers the S/N of an
    # injection in the difference by ~√2, so against the science noise alone even an ideal 5σ
    # detector reaches 50 % only at S/N ~7 (the anchor's 5.8 is for templates much deeper than
    # the science image). The pipeline is within 10 % of that ideal.
    assert 1.2 < m["snr_loss_factor"] < 1.7
    assert m["snr50"] < 1.1 * m["snr50_ideal"] and m["snr90"] < 12.0
    # Bright injections are found (none lost in a neighbour's footprint) ...
    bright = test.summary.matched["expected_snr"] >= 15
    assert test.summary.matched.loc[bright, "found"].mean() > 0.85
    # ... measured without bias and with the right errors.
    assert abs(m["flux_bias_median"]) < 0.05
    assert 0.6 < m["flux_pull_robust_std"] < 1.3
    # False detections: the variable star is found in every batch and is not false; the frame's
    # other DIA sources (residuals of bright stars) are, in every batch; injections add hardly
    # any new ones.
    assert m["n_known"] == n_frames
    assert m["n_false_new"] <= n_frames
    assert m["false_per_image"] <= m["n_baseline_sources"] + 1
    # Calibrating the threshold on sky sources changes little once the noise model is right.
    assert abs(m["snr50_calibrated"] - m["snr50"]) < 1.0
