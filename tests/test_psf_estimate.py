"""PSF estimation from stars: simulated fields with known PSFs and the real DECam frames.

FWHMs are compared with the same definition on both sides: ``PsfModel.fwhm()``
is the intrinsic FWHM (before pixel integration) for the analytic truth and
for the estimated pixelized model alike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from diffim_dask.config import describe_config
from diffim_dask.errors import AlgorithmError, BadInputDataError, ConfigurationError
from diffim_dask.exposure import Exposure, VisitInfo
from diffim_dask.masks import mask_value
from diffim_dask.psf import (
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    PolynomialPsf,
    PsfEstimationConfig,
    estimate_psf,
    fwhm_of_stamp,
)

SKY = 1000.0  # counts per pixel (gain 1): sky noise ~31.6
SATURATION = 40000.0
BAD_COLUMN = 300


def _add_stamp(image, stamp, ix, iy):
    """Add ``stamp`` centred on pixel ``(ix, iy)``, clipped at the image edges."""
    half = stamp.shape[0] // 2
    ny, nx = image.shape
    y0, x0 = iy - half, ix - half
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + stamp.shape[0], ny), min(x0 + stamp.shape[1], nx)
    if ya < yb and xa < xb:
        image[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]


def _simulate(psf, *, shape=(1024, 1024), n_stars=300, seed=1, n_galaxies=8, stamp_size=None):
    """A star field with power-law fluxes, saturated stars, galaxies and a bad column.

    Returns the exposure and the truth (star positions and fluxes, galaxy positions).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    model = np.zeros(shape)
    xs, ys = rng.uniform(-5, nx + 5, n_stars), rng.uniform(-5, ny + 5, n_stars)
    # dN/dF ∝ F^-1.6 from ~5 sigma peaks up to far beyond saturation.
    fluxes = np.minimum(3000.0 * (1.0 - rng.uniform(size=n_stars)) ** (-1.0 / 0.6), 3e7)
    size = stamp_size or psf.default_size
    for x, y, flux in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        _add_stamp(model, flux * psf.image(x, y, size=size, offset=(x - ix, y - iy)), ix, iy)
    galaxies = []
    for _ in range(n_galaxies):
        x, y = rng.uniform(50, nx - 50), rng.uniform(50, ny - 50)
        blob = GaussianPsf(psf.fwhm(x, y) * rng.uniform(1.8, 3.0), ellipticity=rng.uniform(0, 0.5),
                           position_angle=rng.uniform(0, 180))
        ix, iy = int(round(x)), int(round(y))
        _add_stamp(model, rng.uniform(5e4, 5e5) * blob.image(size=61, offset=(x - ix, y - iy)),
                   ix, iy)
        galaxies.append((x, y))
    expected = SKY + model
    image = expected + rng.normal(size=shape) * np.sqrt(expected)
    mask = np.zeros(shape, dtype=np.uint32)
    saturated = image >= SATURATION
    image[saturated] = SATURATION
    mask[saturated] |= mask_value("SAT")
    image[:, BAD_COLUMN] = 30000.0  # a hot column, flagged BAD
    mask[:, BAD_COLUMN] |= mask_value("BAD")
    exposure = Exposure.from_arrays(image.astype(np.float32), expected.astype(np.float32), mask,
                                    info=VisitInfo(saturation=SATURATION))
    truth = dict(x=xs, y=ys, flux=fluxes, galaxies=np.array(galaxies),
                 n_saturated_pixels=int(saturated.sum()))
    return exposure, truth


def _stamp_residual(estimated, truth, x, y, size):
    """Max |estimated - truth| / truth peak and the L1 difference of unit-sum stamps."""
    est, tru = estimated.image(x, y, size=size), truth.image(x, y, size=size)
    return float(np.abs(est - tru).max() / tru.max()), float(np.abs(est - tru).sum())


# -- simulated constant PSFs -------------------------------------------------------------------


# Measured with these seeds: FWHM errors 0.08-0.11 %, max stamp residual 0.17-0.69 % of the
# peak, L1 difference of the unit-sum stamps 0.019-0.038 (mostly sky noise in the wings).
@pytest.mark.parametrize("truth_psf,seed", [
    (GaussianPsf(2.5), 11),
    (GaussianPsf(4.5), 12),
    (MoffatPsf(3.5, beta=2.5), 13),
    (MoffatPsf(6.0, beta=4.0), 14),
    (MoffatPsf(5.0, beta=2.5), 15),
], ids=["gauss2.5", "gauss4.5", "moffat3.5_b2.5", "moffat6_b4", "moffat5_b2.5"])
def test_estimated_fwhm_and_stamp_match_truth(truth_psf, seed):
    exposure, truth = _simulate(truth_psf, seed=seed)
    assert truth["n_saturated_pixels"] > 0
    result = estimate_psf(exposure)

    assert result.fwhm == pytest.approx(truth_psf.fwhm(), rel=0.03)
    assert abs(result.fwhm / truth_psf.fwhm() - 1.0) < 0.01  # what we actually reach
    size = result.metadata["stamp_size"]
    max_residual, l1 = _stamp_residual(result.psf, truth_psf, *exposure.center, size)
    assert max_residual < 0.01
    assert l1 < 0.05
    # The PSF is constant: a spatial model was tried and rejected as not significant.
    assert isinstance(result.psf, ImagePsf)
    assert "not significant" in result.metadata["spatial_model_reason"]
    # Per-star FWHMs scatter by ~1 % around the model.
    assert result.fwhm_scatter < 0.03 * result.fwhm
    assert np.nanmedian(result.star_fwhm) == pytest.approx(result.fwhm, rel=0.01)

    # The cuts did their job: no saturated, bad-column or galaxy source was used.
    assert result.n_used >= 50
    assert result.n_candidates > result.n_used
    half = size // 2
    assert np.all(np.abs(result.x - BAD_COLUMN) > half)
    _, _, mask = exposure.arrays()
    sat = (mask & mask_value("SAT")) != 0
    for x, y in zip(result.x, result.y):
        ix, iy = int(round(x)), int(round(y))
        assert not sat[iy - half:iy + half + 1, ix - half:ix + half + 1].any()
    gal = truth["galaxies"]
    distance = np.hypot(result.x[:, None] - gal[:, 0], result.y[:, None] - gal[:, 1])
    assert distance.min() > 3.0
    # Positions and fluxes are those of real stars.
    nearest = np.argmin(np.hypot(result.x[:, None] - truth["x"], result.y[:, None] - truth["y"]),
                        axis=1)
    offsets = np.hypot(result.x - truth["x"][nearest], result.y - truth["y"][nearest])
    assert np.median(offsets) < 0.05
    ratio = result.flux / truth["flux"][nearest]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    for cut in ("edge", "masked", "saturated", "blended", "snr", "extended"):
        assert result.metadata["rejected"][cut] >= 0
    assert result.metadata["rejected"]["saturated"] > 0
    assert result.metadata["rejected"]["masked"] > 0
    assert result.metadata["rejected"]["extended"] > 0


def test_constant_model_is_image_psf_and_stamp_size_is_honoured():
    truth_psf = GaussianPsf(3.0)
    exposure, _ = _simulate(truth_psf, shape=(512, 512), n_stars=150, seed=21, n_galaxies=2)
    result = estimate_psf(exposure, PsfEstimationConfig(spatial_model="constant", stamp_size=25))
    assert isinstance(result.psf, ImagePsf)
    assert result.psf.default_size == 25
    assert result.metadata["stamp_size"] == 25
    assert result.metadata["spatial_model"] == "constant"
    assert result.fwhm == pytest.approx(3.0, rel=0.02)
    # The pixel-integrated FWHM is reported too and is wider by the pixel response.
    sigma2 = (3.0 / 2.3548) ** 2
    assert result.metadata["fwhm_pixelized"] == pytest.approx(
        2.3548 * math.sqrt(sigma2 + 1.0 / 12.0), rel=0.02)


def test_saturation_level_without_sat_plane_and_placeholder_variance():
    # As for a sky-subtracted image read without a mask: only info.saturation flags saturation,
    # and the variance plane is the placeholder of ones (recalibrated from the pixel scatter).
    truth_psf = MoffatPsf(4.0, beta=3.0)
    exposure, _ = _simulate(truth_psf, shape=(512, 512), n_stars=200, seed=22, n_galaxies=2)
    image, _, mask = exposure.arrays()
    bare = Exposure.from_arrays(image, mask=mask & ~np.uint32(mask_value("SAT")),
                                info=exposure.info)
    result = estimate_psf(bare)
    assert result.metadata["variance_scale"] == pytest.approx(SKY, rel=0.1)
    assert result.metadata["rejected"]["saturated"] > 0
    half = result.metadata["stamp_size"] // 2
    for x, y in zip(result.x, result.y):
        ix, iy = int(round(x)), int(round(y))
        assert image[iy - half:iy + half + 1, ix - half:ix + half + 1].max() < 0.9 * SATURATION
    assert result.fwhm == pytest.approx(4.0, rel=0.03)


def test_dask_backed_exposure_with_origin_gives_same_result():
    exposure, truth = _simulate(MoffatPsf(4.0, beta=3.0), shape=(512, 512), n_stars=150, seed=31,
                                n_galaxies=2)
    image, variance, mask = exposure.arrays()
    shifted = Exposure.from_arrays(image, variance, mask, info=exposure.info,
                                   origin=(1000, 2000), chunks=128)
    assert shifted.is_lazy
    plain = estimate_psf(exposure)
    lazy = estimate_psf(shifted)
    assert lazy.fwhm == pytest.approx(plain.fwhm, rel=1e-9)
    assert lazy.n_used == plain.n_used
    assert lazy.x == pytest.approx(plain.x + 1000.0)
    assert lazy.y == pytest.approx(plain.y + 2000.0)
    assert lazy.psf.image(*shifted.center) == pytest.approx(plain.psf.image(*exposure.center),
                                                            abs=1e-12)


# -- simulated spatially varying PSF -----------------------------------------------------------


@pytest.mark.parametrize("spatial_model,model_type", [("polynomial", PolynomialPsf),
                                                      ("grid", GridPsf)])
def test_spatially_varying_psf_reproduces_corner_fwhm(spatial_model, model_type):
    n = 2048
    centre = (n - 1) / 2.0
    # FWHM 4 px at the centre, from 3.4 px (-15 %) to 4.6 px (+15 %) at opposite corners.
    truth_psf = GaussianPsf(4.0, fwhm_variation=(0.10, 0.05), reference=(centre, centre),
                            scale=(centre, centre))
    exposure, _ = _simulate(truth_psf, shape=(n, n), n_stars=600, seed=41, stamp_size=41)
    result = estimate_psf(exposure, PsfEstimationConfig(spatial_model=spatial_model))
    assert isinstance(result.psf, model_type)
    assert result.psf.is_spatially_varying
    assert result.metadata["spatial_model"] == spatial_model
    assert result.fwhm == pytest.approx(4.0, rel=0.03)
    corners = [(0.0, 0.0), (n - 1.0, 0.0), (0.0, n - 1.0), (n - 1.0, n - 1.0)]
    for x, y in corners:
        assert result.psf.fwhm(x, y) == pytest.approx(truth_psf.fwhm(x, y), rel=0.03), (x, y)
        max_residual, _ = _stamp_residual(result.psf, truth_psf, x, y, 31)
        assert max_residual < 0.06
    # The per-star FWHMs follow the truth at each star's position.
    true_widths = np.array([truth_psf.fwhm(x, y) for x, y in zip(result.x, result.y)])
    assert np.corrcoef(result.star_fwhm, true_widths)[0, 1] > 0.9


def test_too_few_stars_for_a_spatial_model_falls_back_to_constant():
    exposure, _ = _simulate(GaussianPsf(3.0), shape=(512, 512), n_stars=60, seed=51, n_galaxies=1)
    result = estimate_psf(exposure, PsfEstimationConfig(min_stars_spatial=200))
    assert isinstance(result.psf, ImagePsf)
    assert "min_stars_spatial" in result.metadata["spatial_model_reason"]


# -- failure paths -----------------------------------------------------------------------------


def test_too_few_stars_raises_algorithm_error_with_cut_counts():
    rng = np.random.default_rng(61)
    image = SKY + rng.normal(size=(256, 256)) * math.sqrt(SKY)
    for x, y in [(80.3, 90.7), (170.6, 160.2)]:
        ix, iy = int(round(x)), int(round(y))
        _add_stamp(image, 2e5 * GaussianPsf(3.0).image(size=21, offset=(x - ix, y - iy)), ix, iy)
    exposure = Exposure.from_arrays(image.astype(np.float32),
                                    np.full(image.shape, SKY, np.float32))
    with pytest.raises(AlgorithmError, match="min_stars=3") as info:
        estimate_psf(exposure)
    meta = info.value.metadata
    assert meta["n_peaks"] >= 2
    assert meta["passed"]["peaks"] == meta["n_peaks"]
    assert meta["passed"]["extended"] == 2
    assert set(meta["rejected"]) >= {"edge", "masked", "saturated", "blended", "snr"}
    # Allowing two stars makes it work.
    result = estimate_psf(exposure, PsfEstimationConfig(min_stars=2))
    assert result.n_used == 2
    assert result.fwhm == pytest.approx(3.0, rel=0.03)


def test_pure_noise_raises_algorithm_error():
    rng = np.random.default_rng(62)
    image = rng.normal(size=(200, 200)).astype(np.float32)
    with pytest.raises(AlgorithmError) as info:
        estimate_psf(Exposure.from_arrays(image))
    assert "passed" in info.value.metadata


def test_no_usable_pixels_is_bad_input():
    image = np.zeros((64, 64), np.float32)
    mask = np.full(image.shape, mask_value("NO_DATA"), np.uint32)
    with pytest.raises(BadInputDataError, match="usable pixels"):
        estimate_psf(Exposure.from_arrays(image, mask=mask))


@pytest.mark.parametrize("changes", [
    {"stamp_size": 24}, {"stamp_size": "big"}, {"stamp_size": 3},
    {"spatial_model": "spline"}, {"mask_planes": ("BAD", "NOT_A_PLANE")},
    {"min_stamp_size": 41, "max_stamp_size": 21}, {"min_snr": 50.0, "max_snr": 20.0},
    {"saturation_fraction": 0.0}, {"grid_shape": (3,)}, {"min_stamp_size": 16},
])
def test_invalid_config_raises(changes):
    with pytest.raises(ConfigurationError):
        PsfEstimationConfig(**changes)


def test_config_from_dict_and_docs():
    config = PsfEstimationConfig.from_dict({"stamp_size": 31, "spatial_model": "grid"})
    assert config.stamp_size == 31
    with pytest.raises(ConfigurationError, match="stamp_sise"):
        PsfEstimationConfig.from_dict({"stamp_sise": 31})
    text = describe_config(PsfEstimationConfig)
    assert "saturation_fraction" in text and "isolation_radius_fwhm" in text


# -- real DECam frames ---------------------------------------------------------------------------

DECAM_FRAMES = [f"DEC-OBS{group}{letter}.mini.fits" for group in ("04", "18") for letter in "abcde"]


def _decam_exposure(path):
    """The frame's pixels, a variance built from its own noise, saturation from the README.

    Only GAIN is read from the header here; the FWHM keyword is not.
    """
    with fits.open(path) as hdul:
        image = hdul[0].data.astype(np.float32)
        gain = float(hdul[0].header["GAIN"])
    median = float(np.median(image))
    sky_sigma = 1.4826 * float(np.median(np.abs(image - median)))
    variance = sky_sigma ** 2 + np.clip(image - median, 0.0, None) / gain
    return Exposure.from_arrays(image, variance.astype(np.float32),
                                info=VisitInfo(saturation=46000.0, gain=gain))


def _gaussian_core_fwhm(stamp):
    """FWHM of a Gaussian fitted to the core of a pixelized stamp (SExtractor FWHM_IMAGE style).

    A straight line ``ln I = a - b r²`` is fitted, with weights ``I²``, to the
    pixels above a fifth of the peak connected to the centre; FWHM =
    ``2 sqrt(ln 2 / b)``, less the empirical ``1 / (4 FWHM)`` undersampling
    correction SExtractor applies. For profiles with wings (Moffat-like) this
    reads larger than the true half-maximum width.
    """
    from scipy import ndimage

    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    labels, _ = ndimage.label(stamp > 0.2 * stamp.max())
    core = labels == labels[half, half]
    r2, values = (xx ** 2 + yy ** 2)[core], stamp[core]
    weights = values  # sqrt of the I² weights
    design = np.column_stack([np.ones_like(r2), r2]) * weights[:, None]
    (_, slope), *_ = np.linalg.lstsq(design, np.log(values) * weights, rcond=None)
    fwhm = 2.0 * math.sqrt(math.log(2.0) / -slope)
    return fwhm - 1.0 / (4.0 * fwhm)


@pytest.mark.realdata
@pytest.mark.parametrize("name", DECAM_FRAMES)
def test_decam_fwhm_matches_header(decam_dir, name):
    """Measured vs header FWHM of the ten DECam frames.

    The header FWHM ("Median FWHM in pixels" of the full CCD in the DESDM
    pipeline) is measured on pixel values, so the like-for-like quantity is the
    FWHM of our model *as pixelized* (``intrinsic=False``), which is 1.5-2.5 %
    wider than the intrinsic ``result.fwhm`` at these widths. Measured on the
    frames: intrinsic/header 0.90-0.94, pixelized/header 0.91-0.96. Most of
    the remaining gap is the header's definition: a Gaussian fitted to the core
    reads 3-8 % wider than the half-maximum width of a profile with Moffat-like
    wings (0.94-0.98 of the header with that definition applied to our model);
    the rest is that the header describes the whole CCD, not this 256² cut-out.
    """
    path = decam_dir / name
    result = estimate_psf(_decam_exposure(path))
    header_fwhm = float(fits.getheader(path)["FWHM"])  # for the comparison only

    model = result.psf.image(size=41)
    pixelized = fwhm_of_stamp(model, intrinsic=False)
    gaussian_core = _gaussian_core_fwhm(model)
    assert pixelized == pytest.approx(result.metadata["fwhm_pixelized"], rel=1e-3)
    assert pixelized == pytest.approx(header_fwhm, rel=0.10)
    # The definitions order as expected, and the header's own definition agrees best.
    assert result.fwhm < pixelized < gaussian_core
    assert gaussian_core == pytest.approx(header_fwhm, rel=0.07)
    # Few but consistent stars: 256² frames hold 3-5 usable ones.
    assert result.n_used >= 3
    assert result.fwhm_scatter < 0.03 * result.fwhm
    # The extended source at (130, 129) (a galaxy around the variable) is not a PSF star.
    assert np.all(np.hypot(result.x - 130.0, result.y - 129.0) > 5.0)
