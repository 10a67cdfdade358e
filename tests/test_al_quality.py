"""Quality on a simulated 2048×2048 survey pair, compared with the oracle (true-kernel) difference.

Scenario (from the issue): template FWHM 2.5 px; science FWHM 3.5 px varying by
±15 % across the detector (the simulator's pattern is quadratic); sub-pixel
misregistration; 100 point transients with S/N 8–40. Targets: D/√V in star-free
sky has σ in [0.95, 1.05]; ≥ 95 % of transients detected at 5σ; at most 5 false
5σ detections per 4 Mpix away from saturated stars; score σ in [0.95, 1.05].

The oracle difference is built from the truth: the exact science and template
noise realisations, the true matching kernel (Gaussian, σ_K² = σ_S² − σ_T²,
shifted by the misregistration) and the rendered transient/variable signal, then
decorrelated the same way. It is what a perfect kernel fit would give.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree

from _al_fixtures import exclusion_zone, gaussian_kernel, matched_filter_detections, render
from diffim_dask.masks import mask_value
from diffim_dask.psf import FWHM_PER_SIGMA
from diffim_dask.simulate import simulate_pair
from diffim_dask.subtract import (AlardLuptonConfig, decorrelation_kernel, subtract_alard_lupton,
                                  subtract_alard_lupton_preconvolved)

pytestmark = pytest.mark.slow

MISREGISTRATION = (0.37, -0.21)
SATURATED = mask_value(["SAT", "SAT_TEMPLATE"])
UNUSABLE = mask_value(["EDGE", "NO_DATA", "BAD"])
EXCLUDE = SATURATED | UNUSABLE


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((2048, 2048), template_fwhm=2.5, science_fwhm=3.5,
                         science_fwhm_variation=0.15, misregistration=MISREGISTRATION,
                         n_transients=100, snr_range=(8.0, 40.0), seed=11)


def _true_kernel(pair, x, y, size=31):
    sigma_s = pair.science_psf.fwhm(x, y) / FWHM_PER_SIGMA
    sigma_t = pair.template_psf.fwhm(x, y) / FWHM_PER_SIGMA
    dx, dy = MISREGISTRATION
    return gaussian_kernel(size, np.sqrt(sigma_s**2 - sigma_t**2), shift=(-dx, -dy))


def _sky(pair, mask):
    sigma = np.sqrt(np.median(pair.science.arrays()[1]))
    return ((pair.science_model < 0.05 * sigma) & (pair.template_model < 0.05 * sigma)
            & (mask == 0))


def _oracle(pair):
    """Difference with the true kernel at the centre, the exact noise and the true signal."""
    sci, sci_var, sci_mask = pair.science.arrays()
    tmpl, tmpl_var, tmpl_mask = pair.template.arrays()
    centre = (1023.5, 1023.5)
    kernel = _true_kernel(pair, *centre)
    truth = pair.truth
    changed = truth[truth["kind"].isin(["transient", "variable"])]
    njy = pair.science.photo_calib.njy_per_count
    signal = render(sci.shape, changed["x"].to_numpy(), changed["y"].to_numpy(),
                    changed["delta_flux"].to_numpy() / njy, pair.science_psf, size=25)
    raw = signal + (sci - pair.science_model) - fftconvolve(tmpl - pair.template_model, kernel,
                                                          mode="same")
    good = (sci_mask == 0) & (tmpl_mask == 0)
    phi = decorrelation_kernel(kernel, float(np.mean(sci_var[good])),
                               float(np.mean(tmpl_var[good])), 31)
    diff = fftconvolve(raw, phi, mode="same")
    var = sci_var * (phi**2).sum() + tmpl_var * (fftconvolve(kernel, phi) ** 2).sum()
    return diff, var


def _detection_summary(pair, diff, var, excluded):
    """Efficiency on S/N >= 8 transients outside ``excluded``; false detections elsewhere."""
    psf = pair.science_psf.image(1023.5, 1023.5)
    x, y, snr = matched_filter_detections(diff, var, psf, excluded)
    truth = pair.truth
    real = truth[truth["kind"].isin(["transient", "variable"])]
    near_real = cKDTree(real[["x", "y"]].to_numpy()).query(np.column_stack([x, y]))[0] <= 3.0
    transients = truth[(truth["kind"] == "transient") & (truth["snr"] >= 8.0)]
    ix = np.rint(transients["x"].to_numpy()).astype(int)
    iy = np.rint(transients["y"].to_numpy()).astype(int)
    transients = transients[~excluded[iy, ix]]
    positive = snr > 0
    found = cKDTree(np.column_stack([x[positive], y[positive]])).query(
        transients[["x", "y"]].to_numpy())[0] <= 2.0
    return {"efficiency": float(found.mean()), "false": int((~near_real).sum()),
            "n_transients": len(transients)}


def test_quality_on_simulated_survey_pair(pair, record_property):
    oracle_diff, oracle_var = _oracle(pair)
    # Order 2: the simulated PSF variation is quadratic; the default (order 1) is reported too.
    config = AlardLuptonConfig.from_dict({"fit": {"spatial_kernel_order": 2}})
    results = {name: subtract_alard_lupton(pair.science, pair.template, cfg)
               for name, cfg in (("order2", config), ("default", AlardLuptonConfig()))}
    # One exclusion zone for all: 25 px around saturated pixels (science or template), and the
    # EDGE / NO_DATA / BAD pixels of the difference.
    excluded = exclusion_zone(results["order2"].difference.arrays()[2], SATURATED, 25, UNUSABLE)
    oracle = _detection_summary(pair, oracle_diff, oracle_var, excluded)
    report = {"oracle": oracle}
    for name, result in results.items():
        img, var, mask = result.difference.arrays()
        sky = _sky(pair, mask)
        z = img[sky] / np.sqrt(var[sky])
        summary = _detection_summary(pair, img, var, excluded)
        summary["sky_std"] = float(np.std(z))
        summary["kernel_sum"] = result.metadata["kernel_sum"]
        summary["time_total"] = result.metadata["time_total"]
        # PSF matching error (max |P_T ⊗ K − P_S| / max P_S) at the centre and corners, for the
        # fitted kernel and for the true (sampled Gaussian) kernel.
        fitted, true = [], []
        template_psf = pair.template_psf.image(size=41)
        for x, y in ((1023.5, 1023.5), (200.0, 200.0), (1850.0, 1850.0), (200.0, 1850.0)):
            target = pair.science_psf.image(x, y, size=41, offset=(-MISREGISTRATION[0],
                                                                   -MISREGISTRATION[1]))
            for kernel, out in ((result.kernel.image(x, y), fitted), (_true_kernel(pair, x, y), true)):
                matched = fftconvolve(template_psf, kernel, mode="same")
                out.append(round(float(np.abs(matched - target).max() / target.max()), 4))
        summary["psf_match_error"] = fitted
        summary["psf_match_error_true_kernel"] = true
        # Excess residual at unsaturated stars relative to the oracle (in units of σ).
        both = (mask & EXCLUDE) == 0
        stars = (pair.science_model > 3 * np.sqrt(np.median(var))) & both
        summary["star_residual_rms"] = float(np.std((img - oracle_diff)[stars] / np.sqrt(var[stars])))
        report[name] = summary
        assert 0.95 <= summary["sky_std"] <= 1.05, report
        assert summary["efficiency"] >= 0.95, report
        assert summary["efficiency"] >= oracle["efficiency"] - 0.03, report
    record_property("al_quality", report)
    print(report)
    assert report["order2"]["false"] <= 5, report
    assert report["order2"]["kernel_sum"] == pytest.approx(1.0, abs=0.003), report
    assert max(report["order2"]["psf_match_error"]) < 0.02, report


def test_score_quality_on_simulated_survey_pair(pair):
    config = AlardLuptonConfig.from_dict({"fit": {"spatial_kernel_order": 2}})
    result = subtract_alard_lupton_preconvolved(pair.science, pair.template, config)
    score, _, mask = result.score.arrays()
    sky = _sky(pair, mask)
    assert 0.95 <= np.std(score[sky]) <= 1.05
    transients = pair.truth[(pair.truth["kind"] == "transient") & (pair.truth["snr"] >= 8.0)]
    ix = np.rint(transients["x"].to_numpy()).astype(int)
    iy = np.rint(transients["y"].to_numpy()).astype(int)
    peaks = np.array([score[y - 1:y + 2, x - 1:x + 2].max() for x, y in zip(ix, iy)])
    assert np.mean(peaks >= 5.0) >= 0.95
