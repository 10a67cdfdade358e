"""Real images end to end: subtraction plus detection on the DECam stacks and the ZTF alerts."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from diffim_dask.io import read_exposure
from diffim_dask.psf import GaussianPsf, PsfEstimationConfig, estimate_psf
from diffim_dask.workflow.pair import subtract_pair
from diffim_dask.workflow.pipeline import recommended_pipeline

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def decam_result(decam_dir):
    logging.getLogger("diffim_dask").setLevel(logging.WARNING)
    science = read_exposure(decam_dir / "Stack-DEC-OBS04.fits")
    template = read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    subtraction, detection, how = subtract_pair(science, template, recommended_pipeline())
    assert how == "same grid"
    return detection.catalog[~detection.catalog["isSky"]]


def _near(catalog, x, y, radius):
    return catalog[np.hypot(catalog["x"] - x, catalog["y"] - y) <= radius]


def test_decam_variable_is_one_positive_source(decam_result):
    found = _near(decam_result, 129, 128, 3.0)
    assert len(found) == 1
    source = found.iloc[0]
    assert np.hypot(source["x"] - 129, source["y"] - 128) <= 1.0
    assert source["snr"] >= 8 and not source["isNegative"] and not source["isDipole"]
    assert source["psfFlux"] > 0


@pytest.mark.parametrize("x, y", [(58, 180), (5, 125), (101, 73)])
def test_decam_bright_star_residuals_are_single_dipoles(decam_result, x, y):
    found = _near(decam_result, x, y, 6.0)
    # Any residual left at a bright star is one source flagged as a dipole, never two.
    assert len(found) <= 1
    if len(found):
        assert bool(found.iloc[0]["isDipole"])


def _ztf_alerts(ztf_dir):
    manifest = pd.read_csv(ztf_dir / "manifest.csv")
    real = (manifest["rb"] > 0.8) | (manifest["drb"].fillna(0) > 0.8)
    return manifest[real]


def _stamp_psf(exposure):
    """Gaussian of the FWHM measured on the stamp's own point sources.

    The alert's ``fwhm`` and ``seeratio`` describe the candidate on the difference
    image (SExtractor FWHM and difference FWHM / FWHM), not the two PSFs: they
    overestimate the widths measured on these stamps by up to 75%. A 63 px stamp holds one
    to three point sources, enough for the PSF width but not for a pixel PSF model.
    """
    estimate = estimate_psf(exposure, PsfEstimationConfig(min_stars=1))
    return GaussianPsf(estimate.psf.fwhm(*exposure.center))


@pytest.mark.parametrize("name", ["ZTF17aaajnnn_472263571115115000", "ZTF17aaajnnn_472263571115095000",
                                  "ZTF18abstqbv_1660293514215020000", "ZTF18aaxjdyr_1661382530015060001"])
def test_ztf_real_alerts_recovered_with_their_sign(ztf_dir, name):
    alerts = _ztf_alerts(ztf_dir).set_index("name")
    assert name in alerts.index  # the parametrisation lists every rb/drb > 0.8 alert
    alert = alerts.loc[name]
    science = read_exposure(ztf_dir / f"{name}_sci.fits")
    reference = read_exposure(ztf_dir / f"{name}_ref.fits")
    science = science.replace(psf=_stamp_psf(science))
    reference = reference.replace(psf=_stamp_psf(reference))
    subtraction, detection, _ = subtract_pair(science, reference, recommended_pipeline())
    # No stamp holds a usable kernel star: the kernel matches the PSF models, so the
    # alert's own flux change cannot be absorbed into a fitted kernel sum.
    assert subtraction.metadata["strategy"] == "psf-model"
    catalog = detection.catalog[~detection.catalog["isSky"]]
    found = _near(catalog, 31, 31, 1.5)
    found = found[found["snr"].abs() >= 5]
    assert len(found) >= 1
    brighter = alert["isdiffpos"] == "t"
    assert bool((found["psfFlux"] > 0).iloc[0]) == brighter


def test_ztf_alert_list_is_complete(ztf_dir):
    assert len(_ztf_alerts(ztf_dir)) == 4
