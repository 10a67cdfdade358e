"""Unit tests of the detection building blocks (background, matched filter, footprints,
moments, apertures, dipole and trail fits, sky sources, streaks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, optimize

from _detect_fixtures import add_point, add_trail
from diffim_dask.detect import (
    estimate_background,
    find_streaks,
    fit_dipole,
    fit_trail,
    make_smoothing_kernel,
    place_sky_sources,
    significance,
)
from diffim_dask.detect._fourier import FourierPsf, levenberg_marquardt
from diffim_dask.detect.background import _median_filter, interpolate_grid
from diffim_dask.detect.detection import correlate_separable
from diffim_dask.detect.footprints import (
    find_peaks,
    grow_pixels,
    label_pixels,
    subpixel_peak,
    threshold_pixels,
)
from diffim_dask.detect.measure import PsfStamps, adaptive_moments, aperture_flux, gather
from diffim_dask.masks import mask_value
from diffim_dask.psf import GaussianPsf, MoffatPsf


def test_background_follows_a_smooth_surface_and_ignores_masked_pixels():
    rng = np.random.default_rng(1)
    shape = (300, 420)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    surface = 10.0 + 0.02 * xx + 2.0 * np.sin(yy / 150.0)
    image = (surface + rng.normal(size=shape) * 2.0).astype(np.float32)
    variance = np.full(shape, 4.0, np.float32)
    mask = np.zeros(shape, np.uint32)
    image[100:140, 200:260] = 1e4                 # a bad blob, masked
    mask[100:140, 200:260] = mask_value("BAD")
    model = estimate_background(image, variance, mask, bin_size=40)
    assert model.grid.shape == (8, 11)
    residual = model.image - surface
    assert np.sqrt(np.mean(residual**2)) < 0.15
    assert np.abs(residual).max() < 0.6           # edges too (linear extrapolation)
    # Without the mask (and the super-pixel filter) the blob drags its super-pixels up.
    unmasked = estimate_background(image, variance, np.zeros(shape, np.uint32), bin_size=40,
                                   filter_size=1)
    assert unmasked.image[120, 230] > surface[120, 230] + 100
    # A fully masked image is an error that names the cause.
    with pytest.raises(Exception, match="super-pixel"):
        estimate_background(image, np.zeros(shape, np.float32), mask, bin_size=40)


def test_background_fills_empty_super_pixels_from_neighbours():
    shape = (160, 160)
    image = np.full(shape, 3.0, np.float32)
    mask = np.zeros(shape, np.uint32)
    mask[:40, :40] = mask_value("NO_DATA")
    model = estimate_background(image, np.ones(shape, np.float32), mask, bin_size=40)
    assert model.n_filled == 1
    np.testing.assert_allclose(model.image, 3.0, atol=1e-5)


@pytest.mark.parametrize("psf, kind", [(GaussianPsf(3.0), "psf"), (MoffatPsf(3.5, beta=2.5), "psf"),
                                       (MoffatPsf(3.5, beta=2.5), "gaussian")])
def test_significance_of_pure_noise_has_unit_variance(psf, kind):
    rng = np.random.default_rng(2)
    shape = (512, 512)
    sigma = np.where(np.arange(shape[1])[None, :] < 256, 5.0, 15.0) * np.ones(shape)
    image = (rng.normal(size=shape) * sigma).astype(np.float32)
    kernel = make_smoothing_kernel(psf, 256, 256, kind=kind)
    _, _, nu = significance(image, (sigma**2).astype(np.float32), kernel)
    core = nu[20:-20, 20:-20]
    assert abs(core[:, :200].std() - 1) < 0.03 and abs(core[:, 260:].std() - 1) < 0.03
    assert abs(core.mean()) < 0.03
    # The kernel decomposition reproduces K and K².
    k = kernel.kernel
    approx = sum(np.outer(u, v) for u, v in kernel.terms)
    approx2 = sum(np.outer(u, v) for u, v in kernel.squared_terms)
    assert np.abs(approx - k).max() < 5e-3 * k.max()          # the default tolerance
    assert np.abs(approx2 - k**2).max() < 5e-3 * (k**2).max()


def test_separable_correlation_equals_direct_correlation():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(64, 80)).astype(np.float32)
    kernel = make_smoothing_kernel(MoffatPsf(3.0, beta=3.0), 0, 0, max_rank=9, tolerance=0.0)
    direct = ndimage.correlate(image.astype(float), kernel.kernel, mode="constant")
    np.testing.assert_allclose(correlate_separable(image, kernel.terms), direct, atol=1e-5)


def test_matched_filter_peak_significance_equals_psf_flux_snr():
    psf = GaussianPsf(3.0)
    image = np.zeros((65, 65))
    flux, sigma = 2000.0, 10.0
    add_point(image, psf, 32.0, 32.0, flux)
    kernel = make_smoothing_kernel(psf, 32, 32, width_sigma=12)
    _, _, nu = significance(image.astype(np.float32), np.full((65, 65), sigma**2, np.float32),
                            kernel)
    stamp = psf.image(size=psf.default_size)
    expected = flux * math.sqrt(np.sum(stamp**2)) / sigma
    assert nu[32, 32] == pytest.approx(expected, rel=1e-3)


def test_label_pixels_matches_ndimage_label():
    rng = np.random.default_rng(4)
    blobs = ndimage.gaussian_filter(rng.normal(size=(200, 300)), 2) > 0.15
    flat = np.flatnonzero(blobs)
    labels, n = label_pixels(flat, blobs.shape)
    reference, n_ref = ndimage.label(blobs, structure=np.ones((3, 3)))
    assert n == n_ref
    # Same partition: a one-to-one map between the two labelings.
    pairs = set(zip(labels.tolist(), reference.ravel()[flat].tolist()))
    assert len(pairs) == n
    assert label_pixels(np.zeros(0, int), blobs.shape)[1] == 0


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_grow_pixels_is_an_isotropic_dilation(radius):
    rng = np.random.default_rng(5)
    region = ndimage.gaussian_filter(rng.normal(size=(120, 130)), 3) > 0.1
    grown = np.zeros(region.shape, bool)
    grown.ravel()[grow_pixels(np.flatnonzero(region), region.shape, radius)] = True
    expected = ndimage.distance_transform_edt(~region) <= radius
    np.testing.assert_array_equal(grown, expected)


def test_threshold_min_pixels_and_peaks():
    nu = np.zeros((50, 50), np.float32)
    nu[10, 10] = 6.0                                   # a single pixel
    nu[30:33, 30:33] = 5.5
    nu[31, 31] = 8.0
    nu[31, 40] = -7.0
    assert set(threshold_pixels(nu, 5.0, 1, min_pixels=1)) >= {10 * 50 + 10}
    big = threshold_pixels(nu, 5.0, 1, min_pixels=4)
    assert 10 * 50 + 10 not in big and 31 * 50 + 31 in big
    peaks = find_peaks(nu, threshold_pixels(nu, 5.0, 1), +1)
    assert set(peaks.tolist()) == {10 * 50 + 10, 31 * 50 + 31}
    neg = find_peaks(nu, threshold_pixels(nu, 5.0, -1), -1)
    assert neg.tolist() == [31 * 50 + 40]


def test_subpixel_peak_is_exact_for_a_sampled_gaussian():
    yy, xx = np.mgrid[:21, :21]
    truth = (10.3, 9.8)
    values = np.exp(-0.5 * ((xx - truth[0]) ** 2 + (yy - truth[1]) ** 2) / 2.0**2)
    y, x = subpixel_peak(values, np.array([10]), np.array([10]), np.array([1.0]))
    assert x[0] == pytest.approx(truth[0], abs=1e-9) and y[0] == pytest.approx(truth[1], abs=1e-9)
    y, x = subpixel_peak(-values, np.array([10]), np.array([10]), np.array([-1.0]))
    assert x[0] == pytest.approx(truth[0], abs=1e-9)


def test_adaptive_moments_of_elliptical_gaussian():
    psf = GaussianPsf(5.0, ellipticity=0.4, position_angle=30.0)
    stamp = psf.image(size=41, offset=(0.3, -0.2))
    moments, failed = adaptive_moments(stamp[None] * 1e4, np.ones((1, 41, 41), bool),
                                       np.array([0.3]), np.array([-0.2]),
                                       np.array([[4.0, 4.0, 0.0]]))
    assert not failed[0]
    np.testing.assert_allclose(moments[0], psf.moments(), rtol=0.01, atol=0.01)
    # Non-positive flux fails cleanly.
    _, failed = adaptive_moments(-stamp[None], np.ones((1, 41, 41), bool), np.zeros(1),
                                 np.zeros(1), np.array([[4.0, 4.0, 0.0]]))
    assert failed[0]


def test_aperture_flux_of_a_flat_image_is_the_circle_area():
    shape = (60, 60)
    image = np.ones(shape, np.float32)
    variance = np.full(shape, 4.0, np.float32)
    unusable = np.zeros(shape, bool)
    x, y = np.array([30.0, 30.37, 4.0]), np.array([30.0, 29.81, 30.0])
    flux, err, flag = aperture_flux(image, variance, unusable, x, y, 12.0)
    assert flux[0] == pytest.approx(math.pi * 144, rel=0.003)
    assert flux[1] == pytest.approx(math.pi * 144, rel=0.003)
    assert err[0] == pytest.approx(2.0 * math.sqrt(math.pi * 144), rel=0.03)
    assert not flag[0] and flag[2]                           # off the image edge


def test_gather_pads_off_image_pixels():
    array = np.arange(25.0).reshape(5, 5)
    stamps, inside = gather(array, np.array([0]), np.array([4]), 1, fill=-1)
    assert stamps[0, 0, 0] == -1 and stamps[0, 1, 1] == array[0, 4] and not inside[0, 0, 2]


def test_dipole_fit_recovers_lobes_from_the_difference_and_direct_images():
    psf = GaussianPsf(3.0)
    rng = np.random.default_rng(7)
    shape = (31, 31)
    science, template = np.zeros(shape), np.zeros(shape)
    add_point(science, psf, 15.6, 15.2, 30000.0)
    add_point(template, psf, 15.1, 15.0, 30000.0)
    science += rng.normal(size=shape) * 10
    template += rng.normal(size=shape) * 5
    weight = np.full(shape, 1 / 125.0)
    fit = fit_dipole((science - template, weight), (science, np.full(shape, 0.01)),
                     (template, np.full(shape, 0.04)), psfs=(psf, psf, psf), origin=(0, 0),
                     start=(17.0, 15.5, 13.8, 14.8))
    assert fit.converged
    assert fit.separation == pytest.approx(math.hypot(0.5, 0.2), abs=0.03)
    assert fit.pos_flux == pytest.approx(30000, rel=0.02)
    assert fit.neg_flux == pytest.approx(30000, rel=0.02)
    assert fit.angle == pytest.approx(math.degrees(math.atan2(0.2, 0.5)), abs=4)
    assert fit.significance > 20 and 0.5 < fit.chi2_dof < 1.5


def test_trail_fit_recovers_length_angle_and_flux():
    psf = MoffatPsf(3.0, beta=3.0)
    rng = np.random.default_rng(8)
    shape = (60, 60)
    image = np.zeros(shape)
    add_trail(image, psf, 18.0, 22.0, 42.0, 36.0, 25000.0)
    image += rng.normal(size=shape) * 5
    fit = fit_trail((0, 60, 0, 60), image, np.full(shape, 1 / 25.0), psf=psf, origin=(0, 0),
                    start=(29.0, 28.0, 10.0, 20.0), max_length=100.0)
    assert fit.converged
    assert fit.length == pytest.approx(math.hypot(24, 14), rel=0.03)
    assert fit.angle == pytest.approx(math.degrees(math.atan2(14, 24)), abs=1.5)
    assert fit.flux == pytest.approx(25000, rel=0.03)
    assert fit.x == pytest.approx(30.0, abs=0.3) and fit.y == pytest.approx(29.0, abs=0.3)


def test_background_does_not_depend_on_the_number_of_threads():
    rng = np.random.default_rng(12)
    shape = (333, 250)                     # not a multiple of the bins: partial edge bins
    image = (rng.normal(size=shape) * 3 + 0.01 * np.arange(shape[1])).astype(np.float32)
    variance = np.full(shape, 9.0, np.float32)
    mask = np.zeros(shape, np.uint32)
    mask[rng.random(shape) < 0.2] = mask_value("BAD")
    mask[:90, :70] = mask_value("BAD")     # empty super-pixels, filled from neighbours
    one = estimate_background(image, variance, mask, bin_size=16, workers=1)
    terms = [(np.array([0.25, 0.5, 0.25]), np.array([0.2, 0.6, 0.2]))]
    for workers in (2, 3):
        many = estimate_background(image, variance, mask, bin_size=16, workers=workers)
        np.testing.assert_array_equal(many.grid, one.grid)
        assert many.n_filled == one.n_filled > 0
        np.testing.assert_array_equal(many.image, one.image)
        np.testing.assert_array_equal(many.filtered(terms), one.filtered(terms))
    # The running median of the grid equals scipy's on the grid's interior.
    grid = rng.normal(size=(12, 9))
    padded = np.pad(grid, 1, mode="edge")
    expected = ndimage.median_filter(padded, size=3, mode="nearest")[1:-1, 1:-1]
    np.testing.assert_array_equal(_median_filter(padded, 3), expected)
    # Band-split interpolation equals the single product.
    np.testing.assert_array_equal(interpolate_grid(grid, (100, 77), 9, workers=4),
                                  interpolate_grid(grid, (100, 77), 9, workers=1))


def test_levenberg_marquardt_fits_bounded_nonlinear_models():
    t = np.linspace(0.0, 4.0, 60)
    truth = np.array([3.0, 0.7, 0.5])
    rng = np.random.default_rng(13)
    data = truth[0] * np.exp(-truth[1] * t) + truth[2] + rng.normal(size=t.size) * 0.01

    def evaluate(p):
        e = np.exp(-p[1] * t)
        resid = (data - (p[0] * e + p[2])) / 0.01
        jac = -np.column_stack([e, -p[0] * t * e, np.ones_like(t)]) / 0.01
        return resid, jac

    lower, upper = np.array([0.0, 0.0, -5.0]), np.array([10.0, 5.0, 5.0])
    params, jac, converged = levenberg_marquardt(evaluate, [1.0, 2.0, 0.0], lower, upper,
                                                 max_evaluations=100)
    assert converged and jac.shape == (t.size, 3)
    cov = np.linalg.inv(jac.T @ jac)
    # scipy's answer with tight tolerances, to a small fraction of the errors.
    reference = optimize.least_squares(lambda p: evaluate(p)[0], params, jac=lambda p: evaluate(p)[1],
                              xtol=1e-14, ftol=1e-14, gtol=1e-14).x
    assert np.all(np.abs(params - reference) < 0.05 * np.sqrt(np.diag(cov)))
    assert np.all(np.abs(params - truth) < 5 * np.sqrt(np.diag(cov)))
    # A bound that excludes the minimum pins the parameter there.
    pinned, _, converged = levenberg_marquardt(evaluate, [1.0, 2.0, 0.0], lower,
                                               np.array([10.0, 0.5, 5.0]), max_evaluations=100)
    assert converged and pinned[1] == 0.5
    # An exhausted budget is reported.
    _, _, converged = levenberg_marquardt(evaluate, [1.0, 4.0, 3.0], lower, upper,
                                          max_evaluations=3)
    assert not converged


def test_trailed_model_gradient_matches_finite_differences():
    psf = MoffatPsf(3.5, beta=3.0)
    model = FourierPsf(psf, 50.0, 50.0, (40, 45))
    params = np.array([20.3, 18.7, 7.3, -4.1])
    planes = model.trail_with_gradient(*params)
    np.testing.assert_allclose(planes[0], model.model(*params), atol=1e-15)
    assert planes[0].sum() == pytest.approx(1.0, abs=1e-3)
    for k in range(4):
        step = np.zeros(4)
        step[k] = 1e-5
        numeric = (model.model(*(params + step)) - model.model(*(params - step))) / 2e-5
        # Centre derivatives leave out the (negligible) Nyquist terms: agreement ~1e-4.
        assert np.abs(numeric - planes[k + 1]).max() < 1e-4 * np.abs(planes[k + 1]).max()


def test_psf_stamps_render_directly_or_from_the_offset_table_alike():
    psf = MoffatPsf(3.2, beta=3.0)
    rng = np.random.default_rng(14)
    x, y = rng.uniform(20, 80, 40), rng.uniform(20, 80, 40)
    table = PsfStamps(psf, 7, (100, 100), (0, 0))
    direct = PsfStamps(psf, 7, (100, 100), (0, 0), expected_renders=40)
    a, b = table.render(x, y), direct.render(x, y)
    assert table._table is not None and direct._table is None
    assert np.abs(a - b).max() < 5e-4 * b.max()     # bilinear steps of 1/20 pixel


def test_sky_sources_avoid_planes_and_each_other():
    shape = (200, 200)
    mask = np.zeros(shape, np.uint32)
    mask[:, :100] = mask_value("DETECTED")
    rng = np.random.default_rng(9)
    ys, xs = place_sky_sources(mask, n_sources=30, radius=8.0, avoid_planes=("DETECTED",), rng=rng)
    assert ys.size == 30
    assert (xs - 8 >= 100).all() and (xs + 8 < 200).all() and (ys >= 8).all() and (ys < 192).all()
    d = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :])
    assert d[~np.eye(30, dtype=bool)].min() >= 16
    full = np.full(shape, mask_value("BAD"), np.uint32)
    ys, _ = place_sky_sources(full, n_sources=10, radius=8.0, avoid_planes=("BAD",), rng=rng)
    assert ys.size == 0
    # More sources asked for than fit: as many as the spacing allows, still 2 r apart, and
    # the same for the same seed.
    crowded = np.zeros((120, 120), np.uint32)
    ys, xs = place_sky_sources(crowded, n_sources=200, radius=8.0, avoid_planes=("BAD",),
                               rng=np.random.default_rng(3))
    assert 20 < ys.size < 200
    d2 = (xs[:, None] - xs[None, :]) ** 2 + (ys[:, None] - ys[None, :]) ** 2
    assert d2[~np.eye(ys.size, dtype=bool)].min() >= 16**2
    again = place_sky_sources(crowded, n_sources=200, radius=8.0, avoid_planes=("BAD",),
                              rng=np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], ys)
    np.testing.assert_array_equal(again[1], xs)


def test_streak_finder_joins_a_broken_streak_and_ignores_short_trails():
    psf = GaussianPsf(3.0)
    rng = np.random.default_rng(10)
    shape = (400, 400)
    image = rng.normal(size=shape) * 5.0
    for start, stop in ((0.0, 0.3), (0.4, 0.75), (0.85, 1.0)):     # three pieces of one line
        x0, y0 = 20 + start * 360, 50 + start * 300
        x1, y1 = 20 + stop * 360, 50 + stop * 300
        add_trail(image, psf, x0, y0, x1, y1, 40.0 * math.hypot(x1 - x0, y1 - y0), step=0.25)
    add_trail(image, psf, 300.0, 60.0, 325.0, 60.0, 8000.0)          # a short moving object
    found, streaks = find_streaks(image.astype(np.float32), np.full(shape, 25.0, np.float32),
                                  None, psf_fwhm=3.0)
    assert len(streaks) == 1
    assert streaks[0].angle == pytest.approx(math.degrees(math.atan2(300, 360)), abs=1.0)
    assert found[int(50 + 0.5 * 300), int(20 + 0.5 * 360)]
    assert found[int(50 + 0.8 * 300), int(20 + 0.8 * 360)]          # the gap is masked too
    assert not found[60, 300:326].any()
    empty, none = find_streaks(rng.normal(size=shape).astype(np.float32),
                               np.ones(shape, np.float32), None, psf_fwhm=3.0)
    assert none == [] and not empty.any()
