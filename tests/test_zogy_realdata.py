"""ZOGY on the real DECam stacks (science OBS04, reference OBS18, one pixel grid).

The stacks are sums of resampled frames: their noise is correlated between
neighbouring pixels (lag-1 ≈ 0.4), no PhotoCalib is attached (the flux ratio
is fitted on matched stars) and the PSFs are estimated from the images. Known
signal: a variable star at (129, 128), brighter in the science stack (~13σ).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from diffim_dask.detect import DetectAndMeasureConfig, detect_and_measure
from diffim_dask.psf import estimate_psf
from diffim_dask.zogy import subtract_zogy

pytestmark = pytest.mark.realdata

VARIABLE = (129, 128)


def robust_sigma(values):
    return 0.741301109 * np.subtract(*np.percentile(values, [75, 25]))


@pytest.fixture(scope="module")
def stacks(decam_dir):
    io = pytest.importorskip("diffim_dask.io")
    science = io.read_exposure(decam_dir / "Stack-DEC-OBS04.fits")
    template = io.read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    return science, template, subtract_zogy(science, template)


def test_decam_variable_found_and_score_normalised(stacks):
    science, template, result = stacks
    meta = result.metadata
    assert meta["flux_ratio_source"] == "fit"              # no PhotoCalibs on these stacks
    assert 0.8 < meta["flux_ratio"] < 1.3 and meta["n_flux_ratio_stars"] >= 3
    assert meta["science_noise_correlated"] and meta["template_noise_correlated"]
    score, _, mask = result.score.arrays()
    interior = score[30:-30, 30:-30]
    assert robust_sigma(interior) == pytest.approx(1.0, abs=0.2)
    x, y = VARIABLE
    assert score[y - 2:y + 3, x - 2:x + 3].max() > 8.0
    # The flux estimate S / F_S at the variable is significant and positive.
    flux, flux_var, _ = meta["flux_image"].arrays()
    assert flux[y, x] / np.sqrt(flux_var[y, x]) > 8.0
    # The bright stars that leave dipoles in the peer difference are quiet in S_corr.
    for bx, by in ((58, 180), (101, 73)):
        assert np.abs(score[by - 6:by + 7, bx - 6:bx + 7]).max() < 5.0


def test_decam_detection_on_score(stacks):
    science, template, result = stacks
    config = DetectAndMeasureConfig.from_dict({"background": {"enabled": False}})
    detection = detect_and_measure(result.difference, science=science,
                                   matched_template=result.matched_template,
                                   score=result.score, config=config)
    catalog = detection.catalog
    catalog = catalog[~catalog["isSky"]]
    distance, index = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(VARIABLE)
    assert distance < 2.0
    source = catalog.iloc[index]
    assert source["psfFlux"] > 0 and source["psfFlux"] / source["psfFluxErr"] > 8.0
    # A handful of detections on a 256² stack, not a field of artefacts.
    assert len(catalog) <= 10
