"""Decorrelation afterburners: whitening the difference image and normalising the score.

Difference image (Reiss & Lupton 2016; DMTN-021 eq. 1, generalised for a
kernel sum :math:`\\kappa_\\Sigma`). For ``D = U - C ⊗ κ`` with white noise of
variances :math:`\\sigma_U^2` (unconvolved image) and :math:`\\sigma_C^2`
(convolved image), the noise power of :math:`D` is
:math:`\\sigma_U^2 + \\sigma_C^2 |\\hat\\kappa(k)|^2`, and

.. math::
    \\hat\\phi(k) = \\sqrt{\\frac{\\sigma_U^2 + \\sigma_C^2 \\kappa_\\Sigma^2}
                              {\\sigma_U^2 + \\sigma_C^2 |\\hat\\kappa(k)|^2}}

makes :math:`D \\otimes \\phi` white with variance
:math:`\\sigma_U^2 + \\sigma_C^2 \\kappa_\\Sigma^2` while keeping the flux scale
(:math:`\\hat\\phi(0) = 1`). Its per-pixel variance is
:math:`V_U \\otimes \\phi^2 + V_C \\otimes (\\kappa \\otimes \\phi)^2`.

Score image (preconvolution, DMTN-179). With the science image preconvolved
by its reflected PSF :math:`\\bar P` and :math:`\\kappa'` matching the template
to it,

.. math::
    \\widehat{\\mathrm{corr}}(k) = \\frac{\\sigma_S^2 + \\sigma_T^2 \\kappa_\\Sigma^2}
        {\\sigma_S^2 + \\sigma_T^2 |\\hat\\kappa'(k)|^2 / |\\hat P(k)|^2}

(:math:`|\\hat P|^2` floored), applied to the preconvolved difference, gives
the matched-filter score; dividing by the square root of its propagated
variance :math:`V_S \\otimes (\\bar P \\otimes \\mathrm{corr})^2 + V_T \\otimes
(\\kappa' \\otimes \\mathrm{corr})^2` makes it the per-pixel point-source S/N with
unit variance in pure noise.

Both filters are returned as finite real-space kernels (odd size) so they
can be applied block by block with a halo; variances are always propagated
with the kernels actually applied, so truncation never miscalibrates them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decorrelation_kernel", "score_kernel", "mean_variance"]

_TINY = np.finfo(np.float64).tiny


def _grid_size(*sizes: int) -> int:
    n = 4 * max(sizes)
    return int(2 ** np.ceil(np.log2(max(n, 64))))


def _centred_spectrum(stamp: np.ndarray, n: int) -> np.ndarray:
    """FFT of a centred odd stamp on an ``n x n`` grid with the centre moved to the origin."""
    half = stamp.shape[0] // 2
    padded = np.zeros((n, n))
    padded[:stamp.shape[0], :stamp.shape[1]] = stamp
    padded = np.roll(padded, (-half, -half), axis=(0, 1))
    return np.fft.fft2(padded)


def _to_stamp(spectrum: np.ndarray, size: int) -> np.ndarray:
    """Real-space kernel of a (real, even) spectrum, cropped to an odd ``size`` stamp."""
    n = spectrum.shape[0]
    real = np.fft.fftshift(np.fft.ifft2(spectrum).real)
    centre = n // 2
    half = size // 2
    return real[centre - half:centre + half + 1, centre - half:centre + half + 1].copy()


def decorrelation_kernel(matching_kernel: np.ndarray, var_unconvolved: float,
                         var_convolved: float, size: int) -> np.ndarray:
    """Real-space decorrelation kernel :math:`\\phi` (odd ``size``), unit spectral gain at k = 0.

    Parameters
    ----------
    matching_kernel : numpy.ndarray
        The PSF-matching kernel stamp :math:`\\kappa` (at the image centre or a tile centre).
    var_unconvolved, var_convolved : float
        Mean per-pixel variances of the unconvolved and convolved input images.
    size : int
        Odd width of the returned kernel.
    """
    if size % 2 == 0:
        raise ValueError(f"decorrelation kernel size must be odd, got {size}")
    n = _grid_size(size, matching_kernel.shape[0])
    kappa_hat = _centred_spectrum(matching_kernel, n)
    kernel_sum = float(matching_kernel.sum())
    numerator = var_unconvolved + var_convolved * kernel_sum**2
    denominator = var_unconvolved + var_convolved * np.abs(kappa_hat) ** 2
    phi_hat = np.sqrt(numerator / np.maximum(denominator, _TINY))
    phi = _to_stamp(phi_hat, size)
    # Truncation moves the zero-frequency gain slightly; restore it so fluxes are unchanged.
    return phi / phi.sum()


def score_kernel(matching_kernel: np.ndarray, preconvolution_kernel: np.ndarray,
                 var_science: float, var_template: float, size: int) -> np.ndarray:
    """Real-space likelihood-correction kernel for the preconvolved difference (DMTN-179)."""
    if size % 2 == 0:
        raise ValueError(f"score kernel size must be odd, got {size}")
    n = _grid_size(size, matching_kernel.shape[0], preconvolution_kernel.shape[0])
    kappa_hat = _centred_spectrum(matching_kernel, n)
    psf_hat = _centred_spectrum(preconvolution_kernel, n)
    kernel_sum = float(matching_kernel.sum())
    psf_power = np.maximum(np.abs(psf_hat) ** 2, 1000.0 * _TINY)
    numerator = var_science + var_template * kernel_sum**2
    corr_hat = numerator / (var_science + var_template * np.abs(kappa_hat) ** 2 / psf_power)
    return _to_stamp(corr_hat, size)


def mean_variance(variance: np.ndarray, mask: np.ndarray, ignore_bits: int) -> float:
    """3σ-clipped (3 iterations) mean of the variance plane over unmasked, positive pixels."""
    from ._stats import clipped_mean_std

    good = ((mask & np.uint32(ignore_bits)) == 0) & np.isfinite(variance) & (variance > 0)
    values = variance[good]
    if values.size == 0:
        return float("nan")
    if values.size > 1_000_000:
        # A regular subsample gives the same clipped mean to well below 1e-3.
        values = values[:: values.size // 1_000_000 + 1]
    mean, _ = clipped_mean_std(values, 3.0, 3)
    return mean
