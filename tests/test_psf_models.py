"""PSF models: normalisation, centring, FWHM definitions, spatial variation, serialisation.

FWHM convention under test: ``PsfModel.fwhm()`` is the *intrinsic* FWHM (the
profile before integration over the pixel); ``fwhm_of_stamp`` removes the pixel
response from a rendered stamp, so both agree, and ``intrinsic=False`` gives
the FWHM of the pixel-integrated stamp.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.psf import (
    FWHM_PER_SIGMA,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    PolynomialPsf,
    fwhm_of_stamp,
    psf_from_dict,
)


def _centroid(stamp):
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    return float((stamp * xx).sum() / stamp.sum()), float((stamp * yy).sum() / stamp.sum())


def _grid_psf():
    stamps = np.array([[GaussianPsf(f).image(size=31) for f in (3.0, 4.0)],
                       [GaussianPsf(f).image(size=31) for f in (3.5, 4.5)]])
    return GridPsf([0.0, 1000.0], [0.0, 2000.0], stamps)


def _polynomial_psf():
    wide, narrow = GaussianPsf(4.4).image(size=31), GaussianPsf(3.6).image(size=31)
    # Order 1 in (u, v), varying with u only: G(3.6) at u = -1 and G(4.4) at u = +1.
    return PolynomialPsf([(wide + narrow) / 2.0, (wide - narrow) / 2.0, np.zeros_like(wide)], 1,
                         reference=(500.0, 500.0), scale=(500.0, 500.0))


MODELS = {
    "gaussian": lambda: GaussianPsf(3.5),
    "gaussian_elliptical": lambda: GaussianPsf(4.0, ellipticity=0.3, position_angle=30.0),
    "moffat_2.5": lambda: MoffatPsf(4.0, beta=2.5),
    "moffat_4": lambda: MoffatPsf(5.0, beta=4.0),
    "image": lambda: ImagePsf(MoffatPsf(4.0, beta=3.0).image(size=41)),
    "grid": _grid_psf,
    "polynomial": _polynomial_psf,
}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


# -- normalisation, size and centring --------------------------------------------------------


@pytest.mark.parametrize("size", [15, 31])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.3, -0.45)])
def test_unit_sum_and_odd_shape(model, size, offset):
    stamp = model.image(400.0, 700.0, size=size, offset=offset)
    assert stamp.shape == (size, size)
    assert stamp.dtype == np.float64
    assert stamp.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.isfinite(stamp))
    default = model.image()
    assert default.shape == (model.default_size, model.default_size)
    assert model.default_size % 2 == 1


@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.25, -0.4), (-0.5, 0.5), (0.1, 0.0)])
def test_centroid_is_centre_plus_offset(model, offset):
    stamp = model.image(600.0, 300.0, size=41, offset=offset)
    cx, cy = _centroid(stamp)
    assert abs(cx - offset[0]) < 0.01
    assert abs(cy - offset[1]) < 0.01


@pytest.mark.parametrize("size", [0, -3, 2, 20, 2.5, "15", True])
def test_even_or_invalid_size_raises(model, size):
    with pytest.raises(ConfigurationError, match="odd"):
        model.image(size=size)


def test_image_psf_recentres_on_its_centroid():
    shifted = GaussianPsf(4.0).image(size=31, offset=(0.4, -0.3))
    centred = ImagePsf(shifted)
    assert _centroid(centred.image()) == pytest.approx((0.0, 0.0), abs=1e-3)
    kept = ImagePsf(shifted, recenter=False)
    assert _centroid(kept.image()) == pytest.approx((0.4, -0.3), abs=1e-3)


def test_image_psf_recentring_ignores_noisy_wings():
    # A far-wing blob (e.g. a residual neighbour) must not drag the centre of the core.
    stamp = GaussianPsf(4.0).image(size=41)
    stamp[5, 36] += 0.01
    centred = ImagePsf(stamp).image()
    half = 20
    core = centred[half - 3:half + 4, half - 3:half + 4]
    cx, cy = _centroid(core / core.sum())
    assert abs(cx) < 0.005 and abs(cy) < 0.005


# -- FWHM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fwhm", [2.5, 3.5, 5.0, 8.0])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.37, -0.21)])
def test_fwhm_of_stamp_matches_gaussian(fwhm, offset):
    psf = GaussianPsf(fwhm)
    stamp = psf.image(size=41, offset=offset)
    # The old half-maximum-area count came out ~2 % low at FWHM 3.5.
    assert fwhm_of_stamp(stamp) == pytest.approx(fwhm, rel=4e-3)
    sigma = fwhm / FWHM_PER_SIGMA
    pixelized = FWHM_PER_SIGMA * math.sqrt(sigma ** 2 + 1.0 / 12.0)
    assert fwhm_of_stamp(stamp, intrinsic=False) == pytest.approx(pixelized, rel=3e-3)


@pytest.mark.parametrize("make", [
    lambda: MoffatPsf(2.5, beta=2.5), lambda: MoffatPsf(3.5, beta=4.0),
    lambda: MoffatPsf(6.0, beta=2.5), lambda: MoffatPsf(4.0, beta=3.0, ellipticity=0.2,
                                                         position_angle=60.0),
    lambda: GaussianPsf(3.0, ellipticity=0.4, position_angle=-20.0),
])
def test_model_fwhm_is_intrinsic_fwhm_of_rendered_stamp(make):
    psf = make()
    stamp = psf.image(size=max(psf.default_size, 41))
    assert fwhm_of_stamp(stamp) == pytest.approx(psf.fwhm(), rel=4e-3)
    assert fwhm_of_stamp(stamp, intrinsic=False) > psf.fwhm()
    # A pixelized model of that stamp reports the same (intrinsic) FWHM.
    assert ImagePsf(stamp).fwhm() == pytest.approx(psf.fwhm(), rel=4e-3)
    assert psf.sigma() == pytest.approx(psf.fwhm() / FWHM_PER_SIGMA)


@pytest.mark.parametrize("beta", [1.5, 2.5, 4.765, 10.0])
def test_moffat_fwhm_formula(beta):
    psf = MoffatPsf(5.0, beta=beta)
    alpha = psf.alpha(5.0)
    assert alpha == pytest.approx(5.0 / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0)))
    # The profile at r = FWHM/2 is half its central value.
    assert (1.0 + (2.5 / alpha) ** 2) ** (-beta) == pytest.approx(0.5)
    # A finely sampled rendering (0.1 px "pixels" of a 10x larger PSF) has that FWHM too.
    fine = MoffatPsf(50.0, beta=beta, oversample=1).image(size=201)
    assert fwhm_of_stamp(fine) / 10.0 == pytest.approx(5.0, rel=2e-3)


def test_moffat_large_beta_tends_to_gaussian():
    moffat = MoffatPsf(4.0, beta=200.0).image(size=31)
    gauss = GaussianPsf(4.0).image(size=31)
    assert np.abs(moffat - gauss).max() < 0.01 * gauss.max()


@pytest.mark.parametrize("ellipticity,angle", [(0.2, 0.0), (0.3, 30.0), (0.5, 100.0)])
def test_elliptical_gaussian_moments(ellipticity, angle):
    fwhm = 4.0
    psf = GaussianPsf(fwhm, ellipticity=ellipticity, position_angle=angle, oversample=9)
    ixx, iyy, ixy = psf.moments()
    major = fwhm / math.sqrt(1.0 - ellipticity)
    sa, sb = major / FWHM_PER_SIGMA, major * (1.0 - ellipticity) / FWHM_PER_SIGMA
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pixel = 1.0 / 12.0  # a square pixel adds 1/12 to each axis variance
    assert ixx == pytest.approx(sa ** 2 * c * c + sb ** 2 * s * s + pixel, rel=5e-3)
    assert iyy == pytest.approx(sa ** 2 * s * s + sb ** 2 * c * c + pixel, rel=5e-3)
    assert ixy == pytest.approx((sa ** 2 - sb ** 2) * c * s, abs=5e-3)
    # Recover ellipticity and position angle from the moments.
    a, b, cxy = ixx - pixel, iyy - pixel, ixy
    root = math.hypot((a - b) / 2.0, cxy)
    lam_max, lam_min = (a + b) / 2.0 + root, (a + b) / 2.0 - root
    assert 1.0 - math.sqrt(lam_min / lam_max) == pytest.approx(ellipticity, abs=5e-3)
    measured_angle = math.degrees(0.5 * math.atan2(2.0 * cxy, a - b)) % 180.0
    assert measured_angle == pytest.approx(angle % 180.0, abs=0.5)


def test_circular_moments_equal_sigma_squared_plus_pixel():
    ixx, iyy, ixy = GaussianPsf(3.0).moments()
    sigma = 3.0 / FWHM_PER_SIGMA
    assert ixx == pytest.approx(sigma ** 2 + 1.0 / 12.0, rel=1e-4)
    assert iyy == pytest.approx(ixx, rel=1e-9)
    assert ixy == pytest.approx(0.0, abs=1e-10)


# -- spatial variation ---------------------------------------------------------------------------


def test_gaussian_fwhm_variation():
    psf = GaussianPsf(4.0, fwhm_variation=(0.1, -0.05, 0.02), reference=(1000.0, 500.0),
                      scale=(1000.0, 500.0))
    assert psf.is_spatially_varying
    assert psf.fwhm() == pytest.approx(4.0)
    for x, y in [(0.0, 0.0), (2000.0, 1000.0), (1500.0, 250.0)]:
        u, v = (x - 1000.0) / 1000.0, (y - 500.0) / 500.0
        expected = 4.0 * (1.0 + 0.1 * u - 0.05 * v + 0.02 * u * u)
        assert psf.fwhm(x, y) == pytest.approx(expected)
        assert fwhm_of_stamp(psf.image(x, y)) == pytest.approx(expected, rel=4e-3)
    assert not GaussianPsf(4.0).is_spatially_varying


def test_grid_psf_interpolates_between_nodes():
    psf = _grid_psf()
    assert psf.is_spatially_varying
    stamps = psf.stamps
    # At a node: that node's stamp and FWHM.
    assert psf.image(0.0, 0.0, size=31) == pytest.approx(stamps[0, 0], abs=1e-12)
    assert psf.fwhm(1000.0, 0.0) == pytest.approx(4.0, rel=4e-3)
    assert psf.fwhm(0.0, 2000.0) == pytest.approx(3.5, rel=4e-3)
    # Half-way along x: the mean of the two node stamps (bilinear weights 1/2, 1/2).
    mid = psf.image(500.0, 0.0, size=31)
    assert mid == pytest.approx(0.5 * (stamps[0, 0] + stamps[0, 1]), abs=1e-12)
    # A quarter of the way in both axes: bilinear weights.
    quarter = psf.image(250.0, 500.0, size=31)
    expected = (0.75 * 0.75 * stamps[0, 0] + 0.75 * 0.25 * stamps[0, 1]
                + 0.25 * 0.75 * stamps[1, 0] + 0.25 * 0.25 * stamps[1, 1])
    assert quarter == pytest.approx(expected / expected.sum(), abs=1e-12)
    # FWHM varies monotonically between the nodes and stays between their values.
    widths = [psf.fwhm(x, 0.0) for x in np.linspace(0.0, 1000.0, 6)]
    assert np.all(np.diff(widths) > 0)
    assert 3.0 < widths[2] < 4.0
    # Outside the grid the edge values are used.
    assert psf.image(-500.0, -10.0, size=31) == pytest.approx(stamps[0, 0], abs=1e-12)


def test_polynomial_psf_variation():
    psf = _polynomial_psf()
    assert psf.is_spatially_varying
    wide, narrow = GaussianPsf(4.4).image(size=31), GaussianPsf(3.6).image(size=31)
    assert psf.image(0.0, 500.0, size=31) == pytest.approx(narrow, abs=1e-12)
    assert psf.image(1000.0, 500.0, size=31) == pytest.approx(wide, abs=1e-12)
    widths = [psf.fwhm(x, 500.0) for x in (0.0, 250.0, 500.0, 750.0, 1000.0)]
    assert np.all(np.diff(widths) > 0)
    assert widths[0] == pytest.approx(3.6, rel=4e-3)
    assert widths[-1] == pytest.approx(4.4, rel=4e-3)
    assert widths[2] == pytest.approx(fwhm_of_stamp(wide + narrow), rel=1e-9)
    # v has a zero coefficient: no variation along y.
    assert psf.image(500.0, 0.0) == pytest.approx(psf.image(500.0, 1000.0), abs=1e-12)
    assert PolynomialPsf.terms(2.0, 3.0, 2) == pytest.approx([1, 2, 3, 4, 6, 9])


# -- serialisation ------------------------------------------------------------------------------


def test_to_dict_round_trip(model):
    data = json.loads(json.dumps(model.to_dict()))
    rebuilt = psf_from_dict(data)
    assert type(rebuilt) is type(model)
    assert rebuilt.to_dict() == model.to_dict()
    for x, y in [(100.0, 200.0), (900.0, 1800.0)]:
        for offset in [(0.0, 0.0), (0.3, -0.2)]:
            assert rebuilt.image(x, y, size=21, offset=offset) == pytest.approx(
                model.image(x, y, size=21, offset=offset), abs=1e-12)
        assert rebuilt.fwhm(x, y) == pytest.approx(model.fwhm(x, y), rel=1e-9)
    assert repr(rebuilt).startswith(type(model).__name__)


@pytest.mark.parametrize("data", [
    {"type": "NoSuchPsf", "fwhm": 3.0},
    {"fwhm": 3.0},
    {"type": "GaussianPsf"},
    {"type": "MoffatPsf", "fwhm": 3.0, "beta": 0.5},
    {"type": "ImagePsf", "stamp": [[1.0, 2.0], [3.0, 4.0]]},
    {"type": "PolynomialPsf", "order": 1, "reference": [0, 0], "scale": [1, 1],
     "coefficients": [[[1.0]]]},
])
def test_psf_from_dict_rejects_bad_descriptions(data):
    with pytest.raises(BadInputDataError):
        psf_from_dict(data)


# -- sub-pixel shifts -------------------------------------------------------------------------


@pytest.mark.parametrize("analytic", [GaussianPsf(3.0), GaussianPsf(4.5), MoffatPsf(4.0, beta=3.0)])
@pytest.mark.parametrize("offset", [(0.5, 0.0), (0.3, -0.45), (-0.17, 0.71)])
def test_image_psf_subpixel_shift_matches_analytic(analytic, offset):
    pixelized = ImagePsf(analytic.image(size=61))
    shifted = pixelized.image(size=25, offset=offset)
    truth = analytic.image(size=25, offset=offset)
    # Fourier interpolation is exact for band-limited stamps; well-sampled PSFs come close.
    assert np.abs(shifted - truth).max() < 2e-3 * truth.max()


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stamp", [
    np.full((5, 5), np.nan),
    np.where(np.eye(5) > 0, np.inf, 1.0),
    np.zeros((5, 5)),
    -np.ones((5, 5)),
    np.ones((4, 4)),
    np.ones((5, 7)),
    np.ones(5),
])
def test_pixelized_models_reject_bad_stamps(stamp):
    with pytest.raises(BadInputDataError):
        ImagePsf(stamp)
    with pytest.raises(BadInputDataError):
        fwhm_of_stamp(stamp)


def test_grid_and_polynomial_validate_shapes():
    good = GaussianPsf(3.0).image(size=11)
    with pytest.raises(BadInputDataError, match="grid"):
        GridPsf([0.0, 1.0], [0.0], np.array([[good]]))
    with pytest.raises(BadInputDataError, match="increasing"):
        GridPsf([1.0, 0.0], [0.0], np.array([[good, good]]))
    with pytest.raises(BadInputDataError, match="3 coefficient"):
        PolynomialPsf([good, good], 1)
    with pytest.raises(BadInputDataError, match="constant term"):
        PolynomialPsf([-good, good, good], 1)


@pytest.mark.parametrize("kwargs", [
    dict(fwhm=0.0), dict(fwhm=-1.0), dict(fwhm=np.nan), dict(fwhm=3.0, ellipticity=1.0),
    dict(fwhm=3.0, ellipticity=-0.1), dict(fwhm=3.0, scale=(0.0, 1.0)),
    dict(fwhm=3.0, fwhm_variation=(0.1,) * 6), dict(fwhm=3.0, oversample=0),
])
def test_analytic_models_reject_bad_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        GaussianPsf(**kwargs)
    with pytest.raises(ConfigurationError):
        MoffatPsf(beta=3.0, **kwargs)


@pytest.mark.parametrize("beta", [1.0, 0.5, np.inf])
def test_moffat_rejects_bad_beta(beta):
    with pytest.raises(ConfigurationError, match="beta"):
        MoffatPsf(3.0, beta=beta)
