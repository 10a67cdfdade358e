"""Alard–Lupton on the real DECam stacks (science OBS04, template OBS18) against the peer's.

The science stack is broader (FWHM ≈ 5 px) and shallower per pixel than the
template stack; the two were resampled onto one grid, so their noise is
correlated between pixels (lag-1 ≈ 0.3–0.45): the decorrelation models the
measured noise (``DecorrelationConfig.noise_model = 'measured'``). Known signal:
a variable star at (129, 128), brighter in the science stack. The peer's (sfft)
decorrelated difference leaves strong residuals at the bright star near (58, 180).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from _al_fixtures import psf_flux
from diffim_dask.detect import detect_and_measure
from diffim_dask.psf import estimate_psf
from diffim_dask.subtract import AlardLuptonConfig, subtract_alard_lupton

pytestmark = pytest.mark.realdata

VARIABLE = (129.0, 128.0)


def _box_max(z, x, y, half=6):
    return float(np.abs(z[y - half:y + half + 1, x - half:x + half + 1]).max())


def robust_sigma(values):
    return 0.741301109 * np.subtract(*np.percentile(values, [75, 25]))


@pytest.fixture(scope="module")
def stacks(decam_dir):
    io = pytest.importorskip("diffim_dask.io")
    science = io.read_exposure(decam_dir / "Stack-DEC-OBS04.fits")
    template = io.read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    return science, template, subtract_alard_lupton(science, template)


def _real_sources(detection):
    catalog = detection.catalog
    return catalog[~catalog["isSky"]].reset_index(drop=True)


def _split_variable(catalog):
    """(the detection of the known variable or None, the false detections)."""
    distance = np.hypot(catalog["x"] - VARIABLE[0], catalog["y"] - VARIABLE[1]).to_numpy()
    near = distance < 3.0
    variable = catalog[near].iloc[int(np.argmin(distance[near]))] if near.any() else None
    return variable, catalog[~near]


def test_decam_stacks(stacks, decam_dir, record_property):
    science, template, result = stacks
    meta = result.metadata
    assert meta["mode"] == "convolveTemplate"  # the template is the sharper image
    assert meta["quality_gate"] == "passed"
    # A 256² cut-out with few stars: the kernel is fitted on all pixels.
    assert meta["strategy"] == "all-pixels"
    # Both resampled stacks are found correlated and modelled as such.
    assert meta["decorrelation_noise_model"] == "measured"
    assert meta["noise_correlated_unconvolved"] and meta["noise_correlated_convolved"]
    assert min(meta["noise_lag1_unconvolved"] + meta["noise_lag1_convolved"]) > 0.2
    img, var, mask = result.difference.arrays()
    z = img / np.sqrt(np.where(var > 0, var, np.inf))
    interior = z[30:-30, 30:-30]
    robust = robust_sigma(interior)
    record_property("decam_robust_sigma", round(float(robust), 4))
    assert 0.9 < robust < 1.1  # the issue asks for within 20 % of 1
    # The variable star is a strong positive source in the difference.
    flux, err = psf_flux(img, var, *VARIABLE, result.difference.psf, size=21)
    record_property("decam_variable_psf_snr", round(flux / err, 2))
    assert flux / err > 8
    # The bright star near (58, 180) subtracts far better than in the peer difference.
    peer = fits.getdata(decam_dir / "FinalDifference.DeCorr.fits").astype(float)
    ours = _box_max(z, 58, 180)
    theirs = _box_max(peer / robust_sigma(peer), 58, 180)
    assert ours < 10 and ours < theirs / 3, (ours, theirs)


def test_decam_fewer_false_detections_than_peer(stacks, decam_dir, record_property):
    """Same detection on both differences; false = any 5σ detection other than the variable.

    Detection is ``detect_and_measure`` with its default config (matched filter
    with the difference's PSF, 5σ, both signs). Our difference carries its
    propagated variance plane and the PSF the pipeline attaches. The peer file
    has neither: it gets a constant variance equal to its robust sky σ²
    (0.7413 × IQR of the pixels more than 30 px from the border — the estimator
    of the robust-σ check on ours) and, as PSF, the one our pipeline attaches to
    our difference; it is also run with the science PSF (the choice most
    favourable to it: it is the PSF sfft's difference nominally has), and ours
    must beat both.
    """
    science, template, result = stacks
    detection = detect_and_measure(result.difference)
    # D / sqrt(var) has unit scatter on the PSF scale too: PSF fluxes on empty sky scatter as
    # their errors predict (the white-noise model under-predicts them by ~1.6x on these stacks).
    noise_ratio = detection.metadata["sky_noise_ratio"]
    record_property("decam_sky_psf_noise_ratio", round(float(noise_ratio), 3))
    assert 0.85 < noise_ratio < 1.15
    variable, false = _split_variable(_real_sources(detection))
    assert variable is not None
    assert np.hypot(variable["x"] - VARIABLE[0], variable["y"] - VARIABLE[1]) < 1.0
    assert variable["snr"] >= 8 and variable["psfFlux"] > 0
    peer = fits.getdata(decam_dir / "FinalDifference.DeCorr.fits").astype(np.float32)
    peer = np.where(np.isfinite(peer), peer, np.float32(0))
    peer_variance = np.full(peer.shape, robust_sigma(peer[30:-30, 30:-30]) ** 2, np.float32)
    counts = {}
    for name, psf in (("our_psf", result.difference.psf), ("science_psf", science.psf)):
        peer_exposure = result.difference.with_planes(
            image=peer, variance=peer_variance, mask=np.zeros(peer.shape, np.uint32))
        peer_detection = detect_and_measure(peer_exposure.replace(psf=psf))
        peer_variable, peer_false = _split_variable(_real_sources(peer_detection))
        assert peer_variable is not None
        counts[name] = len(peer_false)
    record_property("decam_false_detections_ours", len(false))
    record_property("decam_false_detections_peer", counts)
    print(f"false 5σ detections: ours {len(false)}, peer {counts}")
    assert len(false) < min(counts.values()), (len(false), counts)


def test_decam_injected_psf_fluxes_unbiased(stacks, record_property):
    """Point sources injected into the science stack keep their flux in the difference.

    30 sources at S/N 20–50 rendered with the science stack's estimated PSF
    (``inject_sources``); psfFlux from ``detect_and_measure`` on the
    difference, matched within 2 px. With the unfiltered science PSF attached
    (``difference_psf='unconvolved'``, the previous default) the sharpening
    of the decorrelation filter biases PSF fluxes high.
    """
    qa = pytest.importorskip("diffim_dask.qa")
    science, template, _ = stacks
    injected = qa.inject_sources(
        science, qa.InjectionConfig(n_sources=30, snr_range=(20.0, 50.0), edge_margin=30,
                                    min_separation_fwhm=2.0), seed=7)
    truth = injected.truth
    assert len(truth) == 30

    def median_ratio(config):
        result = subtract_alard_lupton(injected.exposure, template, config)
        catalog = _real_sources(detect_and_measure(result.difference))
        distance, index = cKDTree(catalog[["x", "y"]].to_numpy()).query(
            truth[["x", "y"]].to_numpy())
        found = distance < 2.0
        assert found.sum() >= 25
        ratio = catalog["psfFlux"].to_numpy()[index[found]] / truth["flux_counts"].to_numpy()[found]
        return float(np.median(ratio)), result.metadata

    ratio, meta = median_ratio(None)
    record_property("decam_injected_median_flux_ratio", round(ratio, 4))
    assert meta["difference_psf"] == "decorrelated"
    assert ratio == pytest.approx(1.0, abs=0.05)
    unfiltered, _ = median_ratio(AlardLuptonConfig.from_dict(
        {"decorrelation": {"difference_psf": "unconvolved"}}))
    record_property("decam_injected_median_flux_ratio_unconvolved_psf", round(unfiltered, 4))
    assert unfiltered > 1.08


def test_decam_single_exposure_keeps_the_variable_with_the_shipped_pipeline(decam_dir):
    """One 256² exposure (OBS04a) against the deep template, the shipped pipeline's config.

    The frame has ~10 usable stars, so the kernel is fitted on all pixels; the pipeline asks
    for a 2nd-order spatial kernel, which those few stars cannot constrain: it bent around
    the variable and took 40 % of its flux (S/N 12.0, PSF flux 4490 against ~6200-7600 from
    aperture photometry of the two images). The order is capped by the star count
    (``_KernelFitting.all_pixels_spatial``): order 0, S/N 19.9, flux 7290.
    """
    from diffim_dask.workflow.pipeline import recommended_pipeline

    io = pytest.importorskip("diffim_dask.io")
    science = io.read_exposure(decam_dir / "DEC-OBS04a.mini.fits")
    template = io.read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    config = recommended_pipeline().alard_lupton
    result = subtract_alard_lupton(science, template, config)
    meta = result.metadata
    assert meta["strategy"] == "all-pixels" and meta["spatial_kernel_order"] == 2
    assert meta["spatial_kernel_order_used"] == 0
    img, var, _ = result.difference.arrays()
    flux, err = psf_flux(img, var, *VARIABLE, result.difference.psf, size=21)
    assert flux / err > 15
    assert 6000 < flux < 8500
    z = img / np.sqrt(np.where(var > 0, var, np.inf))
    assert 0.9 < robust_sigma(z[30:-30, 30:-30]) < 1.1


@pytest.mark.parametrize("science_file", ["Stack-DEC-OBS04.fits", "DEC-OBS04a.mini.fits"])
def test_decam_score_variant(decam_dir, science_file, record_property):
    """The preconvolution (score) variant on the real pair, with the shipped pipeline's config.

    Measured: score robust σ 1.11 (stack) and 1.10 (single exposure) over the interior sky
    (the plain difference's PSF-scale significance: 1.02 and 1.05); the variable's score
    peak 23.8 and 17.3.
    """
    from diffim_dask.subtract import subtract_alard_lupton_preconvolved
    from diffim_dask.workflow.pipeline import recommended_pipeline

    io = pytest.importorskip("diffim_dask.io")
    science = io.read_exposure(decam_dir / science_file)
    template = io.read_exposure(decam_dir / "Stack-DEC-OBS18.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    result = subtract_alard_lupton_preconvolved(science, template,
                                                recommended_pipeline().alard_lupton)
    score, _, mask = result.score.arrays()
    yy, xx = np.mgrid[:score.shape[0], :score.shape[1]]
    sky = (mask == 0) & (np.hypot(xx - VARIABLE[0], yy - VARIABLE[1]) > 10)
    sky[:30] = sky[-30:] = False
    sky[:, :30] = sky[:, -30:] = False
    sigma = robust_sigma(score[sky])
    record_property(f"decam_score_robust_sigma_{science_file}", round(float(sigma), 3))
    assert 0.9 < sigma < 1.2
    box = score[124:133, 125:134]
    peak_y, peak_x = np.unravel_index(np.argmax(box), box.shape)
    assert np.hypot(125 + peak_x - VARIABLE[0], 124 + peak_y - VARIABLE[1]) <= 1.0
    assert box.max() / sigma > 12


@pytest.mark.parametrize("letter", "abcde")
def test_decam_single_frame_pairs_pass_the_gate_and_find_the_variable(decam_dir, letter):
    """Each science exposure against the reference exposure of the same letter (256², ~10 stars).

    With the shipped 2nd-order kernel unconstrained by so few stars, frame e (PSF FWHM 3.7 vs
    3.4 px) failed the footprint residual gate (0.228 > 0.2); with the order capped by the star
    count every pair passes (ratios 0.04-0.13; frame d has no gate star) and the variable comes
    out at S/N 13-17.
    """
    from diffim_dask.workflow.pipeline import recommended_pipeline

    io = pytest.importorskip("diffim_dask.io")
    science = io.read_exposure(decam_dir / f"DEC-OBS04{letter}.mini.fits")
    template = io.read_exposure(decam_dir / f"DEC-OBS18{letter}.mini.fits")
    science = science.replace(psf=estimate_psf(science).psf)
    template = template.replace(psf=estimate_psf(template).psf)
    result = subtract_alard_lupton(science, template, recommended_pipeline().alard_lupton)
    assert result.metadata["quality_gate"] in ("passed", "skipped: no kernel stars")
    img, var, _ = result.difference.arrays()
    flux, err = psf_flux(img, var, *VARIABLE, result.difference.psf, size=21)
    assert flux / err > 10
