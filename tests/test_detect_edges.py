"""The subtraction's invalid border band (EDGE) never yields detections.

Convolution, decorrelation and score filters ring in a band of (kernel
half-width + filter half-width) pixels at the image border; the subtractions
flag it EDGE. Detection zeroes those pixels before the matched filter (so the
ringing does not spread inwards), gives them zero significance and drops
sources centred on EDGE.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from _detect_fixtures import make_difference, mask_with
from diffim_dask.detect import detect_and_measure
from diffim_dask.masks import mask_value
from diffim_dask.psf import GaussianPsf
from diffim_dask.simulate import simulate_pair
from diffim_dask.subtract import subtract_alard_lupton, subtract_alard_lupton_preconvolved
from diffim_dask.zogy import subtract_zogy


def _band_width(subtraction) -> int:
    """Width of the EDGE band the subtraction set (difference or score, the wider)."""
    width = 0
    for exposure in (subtraction.difference, subtraction.score):
        if exposure is None:
            continue
        edge = (exposure.arrays()[2] & mask_value("EDGE")) != 0
        width = max(width, int(edge[edge.shape[0] // 2].argmin()))
    return width


def _border_distance(catalog, exposure) -> np.ndarray:
    ny, nx = exposure.shape
    x = catalog["x"].to_numpy() - exposure.origin[0]
    y = catalog["y"].to_numpy() - exposure.origin[1]
    return np.minimum.reduce([x, y, nx - 1 - x, ny - 1 - y])


def test_ringing_in_the_edge_band_is_not_detected():
    # A ±7σ ringing frame in a 15 px EDGE band: before, the matched filter spread it into
    # 16-21 detections (all later dropped by the peak filters); now only the real source.
    psf = GaussianPsf(3.0)
    shape, width = (100, 100), 15
    mask = mask_with(shape, {"EDGE": [(0, width, 0, 100), (100 - width, 100, 0, 100),
                                      (0, 100, 0, width), (0, 100, 100 - width, 100)]})

    def ringing(yy, xx):
        d = np.minimum.reduce([yy, xx, 99 - yy, 99 - xx])
        return np.where(d < width,
                        -70.0 * np.cos(np.pi * d / 3.0) * np.exp(-(width - 1 - d) / 4.0), 0.0)

    for seed in range(3):
        scene = make_difference(shape, psf, points=[(50.3, 49.6, 3000.0)], mask=mask,
                                background=ringing, seed=seed)
        result = detect_and_measure(scene.difference)
        assert result.metadata["n_detections"] == 1
        catalog = result.catalog[~result.catalog["isSky"]]
        assert len(catalog) == 1
        assert np.hypot(catalog["x"].iloc[0] - 50.3, catalog["y"].iloc[0] - 49.6) < 0.3
        # Nothing is flagged detected inside the band.
        detected = (result.difference.arrays()[2]
                    & np.uint32(mask_value(("DETECTED", "DETECTED_NEGATIVE")))) != 0
        assert not (detected & ((mask & mask_value("EDGE")) != 0)).any()


@pytest.mark.parametrize("method", ["al", "al-score", "zogy"])
def test_small_simulated_pair_has_no_detection_in_the_band(method):
    subtract = {"al": subtract_alard_lupton, "al-score": subtract_alard_lupton_preconvolved,
                "zogy": subtract_zogy}[method]
    for seed in (0, 4, 7):
        pair = simulate_pair((96, 96), seed=seed, n_transients=3, edge_margin=10)
        subtraction = subtract(pair.science, pair.template)
        width = _band_width(subtraction)
        assert width >= subtraction.kernel.half_width
        result = detect_and_measure(subtraction.difference, score=subtraction.score,
                                    science=pair.science,
                                    matched_template=subtraction.matched_image)
        catalog = result.catalog[~result.catalog["isSky"]]
        assert (_border_distance(catalog, subtraction.difference) >= width).all()


def _stamp_pair(ztf_dir, name):
    from diffim_dask.io import read_exposure
    from diffim_dask.psf import PsfEstimationConfig, estimate_psf

    def with_psf(exposure):
        estimate = estimate_psf(exposure, PsfEstimationConfig(min_stars=1))
        return exposure.replace(psf=GaussianPsf(estimate.psf.fwhm(*exposure.center)))

    return (with_psf(read_exposure(ztf_dir / f"{name}_sci.fits")),
            with_psf(read_exposure(ztf_dir / f"{name}_ref.fits")))


@pytest.mark.realdata
@pytest.mark.parametrize("name, method, margin", [
    # Before: 4 negative ~-10σ detections 2-7 px inside the score's 21 px band edge.
    ("ZTF18aagqxtf_396522680015020000", "al-score", 8),
    # (ZOGY: a stamp whose S_corr is unit-variance away from the border; on some stamps,
    # e.g. ZTF18abstqbv, S_corr has a robust sigma ~10 everywhere, a separate problem.)
    ("ZTF17aaacxxf_739260766315010006", "zogy", 2),
    ("ZTF17aaajnnn_472263571115115000", "al", 8),
])
def test_ztf_stamp_border_is_clean(ztf_dir, name, method, margin):
    logging.getLogger("diffim_dask").setLevel(logging.WARNING)
    science, reference = _stamp_pair(ztf_dir, name)
    subtract = {"al": subtract_alard_lupton, "al-score": subtract_alard_lupton_preconvolved,
                "zogy": subtract_zogy}[method]
    subtraction = subtract(science, reference)
    width = _band_width(subtraction)
    result = detect_and_measure(subtraction.difference, score=subtraction.score,
                                science=science, matched_template=subtraction.matched_image)
    catalog = result.catalog[~result.catalog["isSky"]]
    distance = _border_distance(catalog, subtraction.difference)
    assert (distance >= width).all()
    assert (distance < width + margin).sum() <= 1
