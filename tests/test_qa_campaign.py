"""End to end on a simulated pair: inject in batches, subtract, detect, match, fit the depth."""

from __future__ import annotations

import numpy as np
import pytest

from diffim_dask.qa import InjectionConfig, inject_unit, injection_seed, kernel_sum_grid, run_injection_test
from diffim_dask.simulate import simulate_pair


@pytest.fixture(scope="module")
def simulated_test():
    # Five subtractions and detections of a 256² pair: ~10 s on two cores.
    pair = simulate_pair((256, 256), n_transients=0, seed=4)
    return pair, run_injection_test(pair.science, pair.template, n_sources=160, batch_size=40, seed=3,
                                    config=InjectionConfig(snr_range=(3.0, 30.0)), n_bootstrap=20)


@pytest.mark.slow
def test_depth_and_photometry_on_white_noise(simulated_test):
    _, test = simulated_test
    m = test.metrics
    assert m["n_injected"] == 160 and len(test.batches) == 4
    # White noise, a 5σ threshold, a template with 1/4 of the science noise: the difference
    # S/N is 0.97 of the injected one, so 50 % completeness sits near S/N 5.2.
    assert 4.3 < m["snr50"] < 6.0
    assert m["completeness_plateau"] > 0.9
    # PSF fluxes of the found sources are unbiased and their errors right.
    assert abs(m["flux_bias_median"]) < 0.05
    assert 0.7 < m["flux_pull_robust_std"] < 1.3
    # The variance plane describes the noise: calibration changes little.
    assert 0.85 < m["sky_snr_std"] < 1.2 and 0.85 < m["noise_scale"] < 1.15
    assert abs(m["snr50_calibrated"] - m["snr50"]) < 0.6
    assert m["false_per_image"] < 3
    # Batches have their own seeds and positions.
    truths = test.summary.matched
    assert truths["injection_id"].is_unique
    assert truths.groupby("visit")["x"].mean().nunique() == 4


def test_kernel_sum_grid_matches_the_subtraction_metadata(simulated_test):
    pair, test = simulated_test
    subtraction = test.last["subtraction"]
    grid = kernel_sum_grid(subtraction.kernel, pair.science.shape, pair.science.origin)
    sums = np.asarray(grid["sum"])
    assert sums.shape == (9, 9) and len(grid["x"]) == 9
    assert sums.min() == pytest.approx(subtraction.metadata["kernel_sum_min"], rel=1e-5)
    assert sums.max() == pytest.approx(subtraction.metadata["kernel_sum_max"], rel=1e-5)


def test_inject_unit_is_reproducible_per_unit(simulated_test):
    pair, _ = simulated_test
    config = InjectionConfig(n_sources=5, seed=7)
    a = inject_unit(pair.science, config, visit=12, detector=3)
    b = inject_unit(pair.science, config, visit=12, detector=3)
    c = inject_unit(pair.science, config, visit=13, detector=3)
    np.testing.assert_array_equal(a.exposure.arrays()[0], b.exposure.arrays()[0])
    assert not np.allclose(a.truth["x"], c.truth["x"])
    assert (a.truth["visit"] == 12).all() and (a.truth["detector"] == 3).all()
    assert a.metadata["seed"] == injection_seed(7, 12, 3)


def test_pipeline_and_subtraction_config_are_exclusive(simulated_test):
    from diffim_dask.errors import ConfigurationError
    from diffim_dask.subtract import AlardLuptonConfig

    pair, _ = simulated_test
    with pytest.raises(ConfigurationError, match="either pipeline"):
        run_injection_test(pair.science, pair.template, pipeline="alard-lupton",
                           subtraction_config=AlardLuptonConfig())
