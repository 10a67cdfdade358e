"""Alard–Lupton kernel basis, spatial polynomials and the fast convolution helpers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d, fftconvolve

from diffim_dask.errors import ConfigurationError
from diffim_dask.psf import FWHM_PER_SIGMA
from diffim_dask.subtract import KernelBasisConfig, basis_sigmas, kernel_size_for_sigmas, make_basis
from diffim_dask.subtract._convolve import (dilate_bits, fft_convolve_same,
                                            kernel_spectrum, quadratic_form_grid,
                                            stamp_raw_convolutions)
from diffim_dask.subtract._spatial import ChebyshevBasis2D
from diffim_dask.subtract.kernel import SpatialKernel


def _fwhm_for_kernel_sigma(target_fwhm, sigma_k):
    sigma_t = target_fwhm / FWHM_PER_SIGMA
    return FWHM_PER_SIGMA * np.sqrt(sigma_t**2 + sigma_k**2)


def test_default_basis_has_27_functions_with_zero_sums():
    basis, info = make_basis(KernelBasisConfig(), 2.5, 3.5)
    assert len(basis) == 27 == 15 + 6 + 6
    sums = basis.stamps.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose((basis.stamps[1:] ** 2).sum(axis=(1, 2)), 1.0, rtol=1e-12)
    assert info["basis_degrees"] == [4, 2, 2]
    assert basis.size % 2 == 1


def test_separable_representation_reproduces_the_stamps():
    basis, _ = make_basis(KernelBasisConfig(), 2.5, 4.5)
    raw = basis.raw_y[:, :, None] * basis.x_factors[basis.raw_x_index][:, None, :]
    np.testing.assert_allclose(np.tensordot(basis.transform, raw, axes=1), basis.stamps, atol=1e-14)


@pytest.mark.parametrize("sigma_k, expected_sigmas, expected_size", [
    (2.0, (1.0, 2.0, 4.0), 25),      # §13 example: σ_K = 2 -> 1, 2, 4 -> 25 px
    (1.0, (0.7, 1.4, 2.8), 21),      # floor 0.7 on the first sigma, small kernel -> 21 px
    (0.3, (0.7, 1.4, 2.8), 21),      # σ_K itself floored at 0.7
    (4.0, (2.0, 4.0, 8.0), 35),      # int(6 * 8) = 48 clamped to 35
])
def test_sigma_rule_and_kernel_size(sigma_k, expected_sigmas, expected_size):
    reference = _fwhm_for_kernel_sigma(2.5, sigma_k)
    sigmas, mode = basis_sigmas(2.5, reference)
    assert mode == "convolution"
    np.testing.assert_allclose(sigmas, expected_sigmas, rtol=1e-9)
    assert kernel_size_for_sigmas(expected_sigmas) == expected_size


def test_kernel_size_rule_exact_values():
    assert kernel_size_for_sigmas((1.0, 2.0, 4.0)) == 25
    assert kernel_size_for_sigmas((0.7, 1.4, 2.8)) == 21   # int(16.8) = 16 -> 17 -> min 21
    assert kernel_size_for_sigmas((1.5, 3.0, 6.0)) == 35   # 36 -> 37 -> max 35
    assert kernel_size_for_sigmas((1.2, 2.4, 4.8), size_min=3, size_max=99) == 29


def test_deconvolution_and_config_modes():
    # Template broader than the science image: deconvolution floor 0.4.
    sigmas, mode = basis_sigmas(4.0, 3.9)
    assert mode == "deconvolution"
    assert sigmas[0] == pytest.approx(0.4)
    sigmas, mode = basis_sigmas(3.0, 3.0)
    assert mode == "config" and sigmas == (0.7, 1.5, 3.0)
    sigmas, mode = basis_sigmas(2.5, 3.5, scale_by_fwhm=False)
    assert mode == "config"
    basis, info = make_basis(KernelBasisConfig(scale_by_fwhm=False, kernel_size=19), 2.5, 3.5)
    assert info["kernel_size"] == 19 and basis.size == 19


def test_custom_degrees_change_the_count():
    basis, _ = make_basis(KernelBasisConfig(gauss_sigmas=(0.8, 2.0), gauss_degrees=(2, 1)), None, None)
    assert len(basis) == 6 + 3


def test_delta_function_basis_and_regularisation():
    basis, info = make_basis(KernelBasisConfig(basis="delta-function", kernel_size=11), 2.5, 3.5)
    assert len(basis) == 121 and info["basis_mode"] == "delta-function"
    sums = basis.stamps.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    penalty = basis.penalty
    np.testing.assert_allclose(penalty, penalty.T, atol=1e-12)
    assert np.linalg.eigvalsh(penalty).min() > -1e-9
    # A smooth (wide Gaussian) kernel is penalised far less than a noisy one of the same norm.
    to_coeff = np.linalg.lstsq(basis.stamps.reshape(121, -1).T, np.eye(121), rcond=None)[0]
    yy, xx = np.mgrid[-5:6, -5:6]
    smooth = np.exp(-(xx**2 + yy**2) / 8.0)
    noisy = np.random.default_rng(0).normal(size=(11, 11))
    noisy *= np.linalg.norm(smooth) / np.linalg.norm(noisy)
    cost = [to_coeff @ k.ravel() @ penalty @ (to_coeff @ k.ravel()) for k in (smooth, noisy)]
    assert cost[0] < 0.1 * cost[1]


def test_basis_config_validation():
    with pytest.raises(ConfigurationError, match="equal length"):
        KernelBasisConfig(gauss_sigmas=(1.0, 2.0), gauss_degrees=(2,))
    with pytest.raises(ConfigurationError, match="odd"):
        KernelBasisConfig(kernel_size_min=20)
    with pytest.raises(ConfigurationError, match="not one of"):
        KernelBasisConfig(basis="zernike")


def test_stamp_convolutions_match_direct_convolution():
    basis, _ = make_basis(KernelBasisConfig(), 2.5, 3.5)
    rng = np.random.default_rng(4)
    out_half = 6
    cutouts = rng.normal(size=(3, 2 * (out_half + basis.half_width) + 1,
                               2 * (out_half + basis.half_width) + 1))
    out = stamp_raw_convolutions(cutouts, basis, out_half)
    raw = basis.raw_y[:, :, None] * basis.x_factors[basis.raw_x_index][:, None, :]
    for n in range(3):
        for r in (0, 7, 20, 26):
            np.testing.assert_allclose(out[r, n], convolve2d(cutouts[n], raw[r], mode="valid"),
                                       atol=1e-12)


def test_fft_convolution_and_kernel_spectrum():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(97, 131)).astype(np.float32)
    kernels = [rng.normal(size=(21, 21)), rng.normal(size=(21, 21))]
    for kernel, got in zip(kernels, fft_convolve_same(image, kernels)):
        np.testing.assert_allclose(got, fftconvolve(image, kernel, mode="same"), atol=2e-4)
    import scipy.fft as sfft

    spectrum = kernel_spectrum(kernels[0], (300, 400))
    reference = sfft.rfft2(kernels[0], s=(300, 400))
    assert np.abs(spectrum - reference).max() < 1e-5 * np.abs(reference).max()


def test_spatial_convolution_equals_per_pixel_kernels_for_constant_kernel():
    basis, _ = make_basis(KernelBasisConfig(), 2.5, 3.5)
    spatial = ChebyshevBasis2D(1, (0.0, 79.0, 0.0, 59.0))
    coefficients = np.zeros((len(basis), 3))
    coefficients[0, 0] = 1.3
    coefficients[5, 0] = 0.2
    kernel = SpatialKernel(basis.stamps, coefficients, spatial)
    image = np.random.default_rng(6).normal(size=(60, 80)).astype(np.float32)
    np.testing.assert_allclose(kernel.convolve(image), fftconvolve(image, kernel.image(), mode="same"),
                               atol=2e-5)


def test_spatial_convolution_follows_the_kernel_at_each_pixel():
    """Σ_s P_s (T ⊗ K_s) equals T ⊗ K(x, y) wherever the image is locally constant."""
    basis, _ = make_basis(KernelBasisConfig(), 2.5, 3.5)
    spatial = ChebyshevBasis2D(1, (0.0, 99.0, 0.0, 99.0))
    coefficients = np.zeros((len(basis), 3))
    coefficients[0, 0] = 1.0
    coefficients[1, 1] = 0.3  # an x-gradient of a zero-sum term
    kernel = SpatialKernel(basis.stamps, coefficients, spatial)
    delta = np.zeros((100, 100), np.float32)
    delta[50, 70] = 1.0
    out = kernel.convolve(delta)
    # For a delta at (70, 50), the output around it is the kernel evaluated at the output pixel,
    # which for a slowly varying kernel is close to K(70, 50).
    half = kernel.half_width
    stamp = out[50 - half:50 + half + 1, 70 - half:70 + half + 1]
    np.testing.assert_allclose(stamp, kernel.image(70, 50), atol=0.01 * kernel.image(70, 50).max())
    assert kernel.kernel_sum(0, 0) == pytest.approx(1.0)


def test_kernel_serialisation_roundtrip():
    basis, _ = make_basis(KernelBasisConfig(), 2.5, 3.5)
    spatial = ChebyshevBasis2D(2, (10.0, 200.0, 5.0, 300.0))
    coefficients = np.random.default_rng(7).normal(size=(len(basis), len(spatial)))
    kernel = SpatialKernel(basis.stamps, coefficients, spatial)
    again = SpatialKernel.from_dict(kernel.to_dict())
    np.testing.assert_allclose(again.image(50.0, 60.0), kernel.image(50.0, 60.0))


def test_quadratic_form_and_mask_dilation():
    rng = np.random.default_rng(8)
    spatial = ChebyshevBasis2D(2, (0.0, 59.0, 0.0, 49.0))
    gram = rng.normal(size=(6, 6))
    gram = gram + gram.T
    values = quadratic_form_grid(gram, spatial, shape=(50, 60))
    terms = spatial.evaluate_grid(np.arange(60), np.arange(50))
    np.testing.assert_allclose(values, np.einsum("sij,st,tij->ij", terms, gram, terms), atol=1e-5)
    mask = np.zeros((40, 50), np.uint32)
    mask[10, 20] = 0b101
    mask[39, 0] = 0b100
    grown = dilate_bits(mask, 2, 0b001)
    assert ((grown & 1) != 0).sum() == 25 and grown[8, 18] & 1 and not grown[7, 20] & 1
    assert ((grown & 4) != 0).sum() == 2  # plane 4 not dilated
