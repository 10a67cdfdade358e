"""Preconvolution (score) variant: unit-variance matched-filter S/N image."""

from __future__ import annotations

import numpy as np
import pytest

from _al_fixtures import psf_flux, rendered_pair, sky_pixels
from diffim_dask.subtract import subtract_alard_lupton, subtract_alard_lupton_preconvolved


def test_score_is_unit_variance_and_measures_point_source_snr():
    pair = rendered_pair((320, 320), shift=(0.25, -0.15), science_variation=(0.08,), transients=8,
                         transient_flux=2500.0, template_sigma=4.0, seed=60)
    result = subtract_alard_lupton_preconvolved(pair.science, pair.template)
    meta = result.metadata
    assert meta["preconvolved"] and meta["mode"] == "convolveTemplate"
    # Effective science FWHM √2 larger: σ_K from sqrt(2 σ_S² − σ_T²).
    assert meta["basis_sigmas"][0] > 0.7
    score, ones, mask = result.score.arrays()
    sky = sky_pixels(pair, mask)
    assert np.std(score[sky]) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(score[sky])) < 0.05
    assert np.all(ones[mask == 0] == 1.0)
    # The score peak at a transient is its PSF-fit S/N on the plain (decorrelated) difference.
    plain = subtract_alard_lupton(pair.science, pair.template)
    img, var, _ = plain.difference.arrays()
    ratios = []
    for x, y in zip(pair.transients["x"], pair.transients["y"]):
        ix, iy = int(round(x)), int(round(y))
        peak = score[iy - 1:iy + 2, ix - 1:ix + 2].max()
        flux, err = psf_flux(img, var, x, y, pair.science.psf)
        ratios.append(peak / (flux / err))
        assert peak > 5.0
    assert np.median(ratios) == pytest.approx(1.0, abs=0.1)
    # The preconvolved difference carries its own (broader) PSF and a matched template.
    assert result.difference.psf.fwhm() > 1.3 * pair.science.psf.fwhm()
    assert result.matched_image.psf is pair.science.psf


def test_score_edges_are_masked_and_finite():
    pair = rendered_pair((200, 200), seed=61)
    result = subtract_alard_lupton_preconvolved(pair.science, pair.template)
    score, ones, mask = result.score.arrays()
    assert np.isfinite(score).all()
    from diffim_dask.masks import mask_value

    edge = (mask & mask_value("EDGE")) != 0
    width = result.kernel.half_width + result.metadata["score_kernel_size"] // 2
    assert edge[:, :width].all() and edge[-width:].all()
