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


@pytest.mark.slow
def test_completeness_of_the_default_pipeline_on_decam(decam_pair):
    science, template = decam_pair
    # 200 point sources at S/N 3-30 in 4 batches of 50 (a 256² frame would be crowded otherwise).
    test = run_injection_test(science, template, n_sources=200, batch_size=50, seed=11,
                              config=InjectionConfig(snr_range=(3.0, 30.0)), n_bootstrap=30)
    m = test.metrics
    print("\n" + test.summary.format())
    print(f"noise-calibrated 5σ: 50% at S/N {m['snr50_calibrated']:.2f}, "
          f"{m['n_false_calibrated']} false detections ({m['false_per_image_calibrated']:.1f} per image)")
    print(test.batches.to_string())
    assert m["n_injected"] == 200 and len(test.batches) == 4
    # The anchor reaches 50 % at S/N 5.8 on simulated survey data.
    assert m["snr50"] <= 5.8
    assert m["snr50_err"][0] <= m["snr50"] <= m["snr50_err"][1]
    bright = test.summary.matched["expected_snr"] >= 15
    assert test.summary.matched.loc[bright, "found"].mean() > 0.6
    # False detections outside the injected positions are counted and rated per area.
    assert m["n_false"] >= 0 and math.isfinite(m["false_per_deg2"])
    # At a threshold of 5σ of the real (PSF-scale) noise there are fewer false detections and
    # the depth moves to higher S/N.
    assert m["sky_snr_std"] > 1.2
    assert m["n_false_calibrated"] < m["n_false"]
    assert m["snr50_calibrated"] > m["snr50"]
    assert abs(m["flux_bias_median"]) < 0.3
