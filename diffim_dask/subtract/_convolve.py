"""Fast convolutions for PSF matching: FFT block convolution, separable stamp passes, mask dilation.

Spatially varying convolution without a kernel per pixel
--------------------------------------------------------
The kernel is :math:`K(x, y) = \\sum_i a_i(x, y) B_i` with
:math:`a_i(x, y) = \\sum_s c_{is} P_s(x, y)` (Chebyshev terms :math:`P_s`). The Alard
approximation of the convolved image is

.. math::
    (T \\otimes K)(x, y) \\approx \\sum_i a_i(x, y)\\,(T \\otimes B_i)(x, y)
    = \\sum_s P_s(x, y)\\,(T \\otimes K_s)(x, y), \\qquad K_s = \\sum_i c_{is} B_i ,

exact when the coefficients vary slowly over a kernel width. The right-hand
form needs one convolution per *spatial term* (3 for order 1) instead of one
per basis function (27): the image is Fourier-transformed once, multiplied by
each :math:`\\hat K_s`, and the inverse transforms are weighted by
:math:`P_s` evaluated at global pixel positions, so any block of the image
(with a halo of one kernel half-width) gives the same pixels as the whole image.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

__all__ = []


def fft_shape(shape, kernel_size: int) -> tuple[int, int]:
    """Padded FFT shape for a linear ('same') convolution of ``shape`` with a kernel."""
    return tuple(sfft.next_fast_len(int(n) + kernel_size - 1, real=True) for n in shape)


def kernel_spectrum(kernel: np.ndarray, shape, dtype=np.float32, workers: int = 1) -> np.ndarray:
    """``rfft2`` of ``kernel`` zero-padded (at the end) to ``shape``.

    A small kernel has only ``k`` non-zero rows: the x transform runs on those
    rows only and the y transform is a direct DFT of ``k`` terms (one complex
    GEMM), cheaper than transforming the padded array.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    k = kernel.shape[0]
    if k * 8 > shape[0]:
        return sfft.rfft2(kernel.astype(dtype), s=shape, workers=workers)
    rows = sfft.rfft(kernel, n=shape[1], axis=1, workers=workers)  # (k, nx//2 + 1)
    phase = np.exp((-2j * np.pi / shape[0]) * np.outer(np.arange(shape[0]), np.arange(k)))
    complex_dtype = np.result_type(dtype, np.complex64)
    return phase.astype(complex_dtype) @ rows.astype(complex_dtype)


def fft_convolve_same(image: np.ndarray, kernels, *, workers: int = 1, dtype=np.float32):
    """Yield ``image ⊗ k`` for each odd square kernel, same shape, zeros beyond the edges.

    One forward transform of ``image`` is shared by all kernels. Convolution
    convention: ``out[y, x] = Σ_{u,v} k[v + h, u + h] · image[y - v, x - u]``.
    """
    kernels = list(kernels)
    if not kernels:
        return
    size = kernels[0].shape[-1]
    half = size // 2
    ny, nx = image.shape
    shape = fft_shape(image.shape, size)
    spectrum = sfft.rfft2(np.asarray(image, dtype=dtype), s=shape, workers=workers)
    for kernel in kernels:
        product = kernel_spectrum(kernel, shape, dtype, workers)
        product *= spectrum  # in place: one spectrum-sized buffer per kernel
        full = sfft.irfft2(product, s=shape, workers=workers, overwrite_x=True)
        del product
        yield full[half:half + ny, half:half + nx]


def spatial_axis_values(spatial, offset_yx, shape, origin_xy, dtype=np.float32):
    """1-D Chebyshev values along the block's x and y axes (global positions)."""
    y0 = origin_xy[1] + offset_yx[0]
    x0 = origin_xy[0] + offset_yx[1]
    x = np.arange(x0, x0 + shape[1], dtype=np.float64)
    y = np.arange(y0, y0 + shape[0], dtype=np.float64)
    sx, sy = spatial._scaled(x, y)
    return spatial._axis_values(sx).astype(dtype), spatial._axis_values(sy).astype(dtype)


def convolve_spatial(image: np.ndarray, term_kernels: np.ndarray, spatial, *, offset=(0, 0),
                     origin=(0, 0), workers: int = 1, dtype=np.float32) -> np.ndarray:
    """Spatially varying convolution ``Σ_s P_s(x, y) · (image ⊗ K_s)`` of one block.

    Parameters
    ----------
    image : numpy.ndarray
        Block (with halo) of the image to convolve.
    term_kernels : numpy.ndarray
        ``(n_terms, size, size)`` kernels :math:`K_s`, one per spatial term.
    spatial : ChebyshevBasis2D
        Spatial terms :math:`P_s`.
    offset : (int, int)
        Global ``(y, x)`` array index of ``image[0, 0]``.
    origin : (int, int)
        Parent-frame ``(x0, y0)`` of the full image's first pixel.
    dtype : numpy dtype
        FFT precision (float32 or float64); the result is float32.
    """
    tx, ty = spatial_axis_values(spatial, offset, image.shape, origin, dtype=dtype)
    terms = spatial.terms
    active = [s for s in range(len(terms)) if np.any(term_kernels[s] != 0)]
    if not active:
        return np.zeros(image.shape, np.float32)
    if len(active) == 1 and terms[active[0]] == (0, 0):
        (out,) = fft_convolve_same(image, [term_kernels[active[0]]], workers=workers, dtype=dtype)
        return out.astype(np.float32)
    # The inverse transform runs in two passes: the y pass per term, then one x pass per x
    # degree i for Σ_j T_j(y) (y-inverse of term (i, j)), since T_j(y) commutes with the x
    # pass. Order 2 needs 6 y passes and 3 x passes instead of 6 full inverse transforms,
    # and the x passes run on the output rows only.
    ny, nx = image.shape
    size = term_kernels.shape[-1]
    half = size // 2
    shape = fft_shape(image.shape, size)
    spectrum = sfft.rfft2(np.asarray(image, dtype=dtype), s=shape, workers=workers)
    out = None
    for i in sorted({terms[s][0] for s in active}):
        rows_sum = None  # Σ_j T_j(y) · (y-inverse of term (i, j)), output rows only
        for s in active:
            if terms[s][0] != i:
                continue
            j = terms[s][1]
            product = kernel_spectrum(term_kernels[s], shape, dtype, workers)
            product *= spectrum
            rows = sfft.ifft(product, axis=0, workers=workers, overwrite_x=True)[half:half + ny]
            del product
            if j:
                rows *= ty[j][:, None]
            if rows_sum is None:
                rows_sum = np.ascontiguousarray(rows)
            else:
                rows_sum += rows
            del rows
        part = sfft.irfft(rows_sum, n=shape[1], axis=1, workers=workers,
                          overwrite_x=True)[:, half:half + nx]
        del rows_sum
        if i:
            part *= tx[i][None, :]
        if out is None:
            out = part  # accumulate into the first result (no extra image-sized buffer)
        else:
            out += part
        del part
    return out.astype(np.float32)


def quadratic_form_grid(gram: np.ndarray, spatial, *, offset=(0, 0), shape=(1, 1),
                        origin=(0, 0)) -> np.ndarray:
    """Evaluate ``Σ_{s,t} P_s P_t G_{st}`` on a block (e.g. the squared kernel norm).

    With ``P_s = T_i(x) T_j(y)`` the form is ``Σ C[(i,k),(j,m)] T_iT_k(x) T_jT_m(y)``,
    evaluated as one small GEMM ``Y C^T X`` over products of 1-D Chebyshev values.
    """
    tx, ty = spatial_axis_values(spatial, offset, shape, origin, dtype=np.float32)
    terms = spatial.terms
    n_axis = spatial.order + 1
    coeff = np.zeros((n_axis, n_axis, n_axis, n_axis))  # [i, k, j, m]
    for s, (i, j) in enumerate(terms):
        for t, (k, m) in enumerate(terms):
            coeff[i, k, j, m] += gram[s, t]
    x_products = (tx[:, None, :] * tx[None, :, :]).reshape(n_axis * n_axis, -1)
    y_products = (ty[:, None, :] * ty[None, :, :]).reshape(n_axis * n_axis, -1)
    coeff = coeff.reshape(n_axis * n_axis, n_axis * n_axis).astype(np.float32)
    return (y_products.T @ coeff.T) @ x_products


def grow_flags(flags: np.ndarray, half: int) -> np.ndarray:
    """Boolean dilation by a ``(2 half + 1)²`` square (zeros beyond the edges)."""
    if half <= 0 or not flags.any():
        return flags.astype(bool, copy=True)
    # maximum_filter with a size is separable (two 1-D running maxima).
    grown = ndimage.maximum_filter(flags.view(np.uint8) if flags.dtype == bool else
                                   flags.astype(np.uint8), size=2 * half + 1, mode="constant")
    return grown.view(bool)


def dilate_bits(mask: np.ndarray, half: int, bits: int) -> np.ndarray:
    """OR-dilate the planes in ``bits`` over a ``(2 half + 1)²`` box; other planes unchanged."""
    bits = int(bits) & 0xFFFFFFFF
    selected = mask & mask.dtype.type(bits)
    if half <= 0 or not selected.any():
        return mask.copy()
    out = mask & mask.dtype.type(~bits & 0xFFFFFFFF)
    present = int(np.bitwise_or.reduce(selected, axis=None))
    for bit in range(32):
        value = 1 << bit
        if present & value:
            grown = grow_flags((selected & mask.dtype.type(value)) != 0, half)
            out |= grown.astype(mask.dtype) << mask.dtype.type(bit)
    return out


# -- stamp convolutions with separable basis functions ------------------------------------------


def _pass_matrix(factors: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Stacked 1-D 'valid' convolution matrices: ``(n_in, n_factors · n_out)``.

    ``(X @ C)[..., f·n_out + p] = Σ_u factors[f, u + h] X[..., p + h - u]``.
    """
    size = factors.shape[1]
    half = size // 2
    n_f = factors.shape[0]
    matrix = np.zeros((n_in, n_f, n_out))
    p = np.arange(n_out)
    for u in range(-half, half + 1):
        q = p + half - u
        matrix[q, :, p] = factors[:, u + half][None, :]
    return matrix.reshape(n_in, n_f * n_out)


def stamp_raw_convolutions(cutouts: np.ndarray, basis, out_half: int) -> np.ndarray:
    """Convolve stamps with every raw (separable) basis function; 'valid' region only.

    Each raw function is ``fy ⊗ fx``: one x pass per distinct ``fx`` (one GEMM
    for all of them), then one y pass per raw function (one GEMM per distinct
    ``fx`` group). Large contiguous GEMMs keep this fast for hundreds of stamps.

    Parameters
    ----------
    cutouts : numpy.ndarray
        ``(n, 2(out_half + h) + 1, same)`` image cut-outs.
    basis : KernelBasis
    out_half : int
        Half-width of the output (fit) region.

    Returns
    -------
    numpy.ndarray
        ``(n_raw, n, 2 out_half + 1, 2 out_half + 1)`` (raw function first, so
        the basis transform is one GEMM).
    """
    n = cutouts.shape[0]
    half = basis.half_width
    n_out = 2 * out_half + 1
    n_in = n_out + 2 * half
    if cutouts.shape[1:] != (n_in, n_in):
        raise ValueError(f"cut-outs of shape {cutouts.shape[1:]}, expected {(n_in, n_in)}")
    n_x = len(basis.x_factors)
    # x pass: (n·n_in, n_in) @ (n_in, n_x·n_out) -> (n, n_in, n_x, n_out)
    x_pass = cutouts.reshape(n * n_in, n_in) @ _pass_matrix(basis.x_factors, n_in, n_out)
    # Bring the y axis to the front for the y-pass GEMM: (n_x, n_in, n, n_out).
    x_pass = np.ascontiguousarray(x_pass.reshape(n, n_in, n_x, n_out).transpose(2, 1, 0, 3))
    out = np.empty((len(basis.raw_x_index), n, n_out, n_out))
    for jx in range(n_x):
        members = np.flatnonzero(basis.raw_x_index == jx)
        if members.size == 0:
            continue
        y_matrix = _pass_matrix(basis.raw_y[members], n_in, n_out)  # (n_in, m·n_out)
        block = y_matrix.T @ x_pass[jx].reshape(n_in, n * n_out)  # (m·n_out, n·n_out)
        out[members] = block.reshape(members.size, n_out, n, n_out).transpose(0, 2, 1, 3)
    return out
