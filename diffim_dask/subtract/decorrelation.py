"""Decorrelation afterburners: whitening the difference image and normalising the score.

Difference image (Reiss & Lupton 2016; DMTN-021 eq. 1, generalised for a
kernel sum :math:`\\kappa_\\Sigma` and for correlated input noise). For
``D = U - C ⊗ κ``, with stationary input noise of per-pixel variances
:math:`\\sigma_U^2` (unconvolved image) and :math:`\\sigma_C^2` (convolved image)
and normalised noise power spectra :math:`R_U(k)`, :math:`R_C(k)` (the
transforms of the normalised autocorrelations, :math:`\\rho(0) = 1`, so the
mean of :math:`R` over the frequencies is 1; :math:`R \\equiv 1` for white
noise), the noise power of :math:`D` is

.. math::
    N(k) = \\sigma_U^2 R_U(k) + \\sigma_C^2 R_C(k) |\\hat\\kappa(k)|^2 ,

and the filter

.. math::
    \\hat\\phi(k) = \\sqrt{\\frac{N(0)}{N(k)}}, \\qquad
    N(0) = \\sigma_U^2 R_U(0) + \\sigma_C^2 R_C(0) \\kappa_\\Sigma^2

makes :math:`D \\otimes \\phi` white with noise power :math:`N(0)` at every
frequency while keeping the flux scale (:math:`\\hat\\phi(0) = 1`, the target
normalisation). For white inputs this is the published filter
:math:`\\sqrt{(\\sigma_U^2 + \\sigma_C^2 \\kappa_\\Sigma^2) / (\\sigma_U^2 +
\\sigma_C^2 |\\hat\\kappa|^2)}`. For correlated inputs (resampled frames,
coadds) the whitened difference has per-pixel variance :math:`N(0)`, larger
than the white-noise prediction by the factor the correlation adds on large
(PSF) scales — which is exactly what makes ``D / sqrt(var)`` have unit
variance after any smoothing, not only per pixel.

Variance plane. The per-pixel variance of :math:`g \\otimes n` for a kernel
:math:`g` and noise of variance :math:`V` and spectrum :math:`R` is
:math:`c\\,V \\lVert g \\rVert^2` with the correlation factor

.. math::
    c = \\frac{\\sum_k |\\hat g(k)|^2 R(k)}{\\sum_k |\\hat g(k)|^2}

(1 for white noise). The decorrelated difference's variance is
:math:`c_U V_U \\otimes \\phi^2 + c_C V_C \\otimes (\\kappa \\otimes \\phi)^2`
(or the pointwise form), with :math:`c_U` for :math:`g = \\phi` and :math:`c_C`
for :math:`g = \\kappa \\otimes \\phi`, computed for the truncated kernels
actually applied (:func:`decorrelation_filter`). Without truncation
:math:`c_U \\sigma_U^2 \\lVert\\phi\\rVert^2 + c_C \\sigma_C^2
\\lVert\\kappa\\otimes\\phi\\rVert^2 = N(0)`.

Noise spectra. :math:`R` is the transform of the autocorrelation measured on
sky pixels (:func:`diffim_dask.noise_correlation.measure_noise_correlation`, lags up
to a few pixels). The transform of a truncated, noisy autocorrelation rings:
at high frequencies, where resampling leaves little noise power, it dips
towards zero at frequencies that change with the truncation radius, and a
filter whitening those dips amplifies residuals of bright stars for no gain
in detection (a PSF carries no power there). :math:`R` is therefore floored
(:data:`NOISE_POWER_FLOOR`, 0.2 of the white level), which bounds the
filter's gain at :math:`\\sqrt{N(0) / (\\sigma_U^2\\,\\mathrm{floor})}`; where the
floor binds the output has a little less noise than :math:`N(0)` and the
variance plane, propagated with the same floored spectra, errs slightly on
the high side per pixel, while the PSF-scale noise (low frequencies) is
unaffected.

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
unit variance in pure (white) noise. For correlated inputs each
:math:`\\sigma^2` becomes :math:`\\sigma^2 R(k)` (the numerator its value at
:math:`k = 0`), which keeps the score the optimal point-source statistic, and
the variance terms take the correlation factors :math:`c` as above.

Both filters are returned as finite real-space kernels (odd size) so they
can be applied block by block with a halo; variances are always propagated
with the kernels actually applied, so truncation never miscalibrates them.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

__all__ = ["decorrelation_kernel", "noise_correlation_factor", "noise_power_spectrum",
           "psf_flux_bias", "score_kernel", "mean_variance", "NOISE_POWER_FLOOR"]

_TINY = np.finfo(np.float64).tiny

#: Default floor of a normalised noise power spectrum ``R(k)`` built from a truncated
#: autocorrelation (see the module notes and ``DecorrelationConfig.noise_power_floor``).
NOISE_POWER_FLOOR = 0.2


def _grid_size(*sizes: int) -> int:
    n = 4 * max(sizes)
    return int(2 ** np.ceil(np.log2(max(n, 64))))


def _centred_spectrum(stamp: np.ndarray, n: int) -> np.ndarray:
    """FFT of a centred odd stamp on an ``n x n`` grid with the centre moved to the origin."""
    half_y, half_x = stamp.shape[0] // 2, stamp.shape[1] // 2
    padded = np.zeros((n, n))
    padded[:stamp.shape[0], :stamp.shape[1]] = stamp
    padded = np.roll(padded, (-half_y, -half_x), axis=(0, 1))
    return np.fft.fft2(padded)


def _to_stamp(spectrum: np.ndarray, size: int) -> np.ndarray:
    """Real-space kernel of a (real, even) spectrum, cropped to an odd ``size`` stamp."""
    n = spectrum.shape[0]
    real = np.fft.fftshift(np.fft.ifft2(spectrum).real)
    centre = n // 2
    half = size // 2
    return real[centre - half:centre + half + 1, centre - half:centre + half + 1].copy()


def noise_power_spectrum(correlation, n: int, floor: float = NOISE_POWER_FLOOR
                         ) -> np.ndarray | float:
    """Normalised noise power spectrum :math:`R(k)` on an ``n x n`` FFT grid.

    Parameters
    ----------
    correlation : numpy.ndarray or None
        Centred, odd, symmetric normalised autocorrelation stamp (1 at the
        centre), e.g. :attr:`diffim_dask.noise_correlation.NoiseCorrelation.acf`.
        ``None`` means white noise.
    n : int
        Grid side (at least the stamp side).
    floor : float
        Lower bound of ``R`` (default :data:`NOISE_POWER_FLOOR`).

    Returns
    -------
    numpy.ndarray or float
        ``R`` (``fft2`` layout, real, floored), or the scalar 1 for white noise.
    """
    if correlation is None:
        return 1.0
    acf = np.asarray(correlation, dtype=np.float64)
    centre = acf[acf.shape[0] // 2, acf.shape[1] // 2]
    if not centre > 0:
        raise ValueError("a noise autocorrelation stamp must be positive at its centre")
    if max(acf.shape) > n:
        raise ValueError(f"noise autocorrelation stamp {acf.shape} exceeds the grid side {n}")
    return np.maximum(_centred_spectrum(acf / centre, n).real, floor)


def decorrelation_kernel(matching_kernel: np.ndarray, var_unconvolved: float,
                         var_convolved: float, size: int, *, correlation_unconvolved=None,
                         correlation_convolved=None,
                         power_floor: float = NOISE_POWER_FLOOR) -> np.ndarray:
    """Real-space decorrelation kernel :math:`\\phi` (odd ``size``), unit spectral gain at k = 0.

    :math:`\\hat\\phi = \\sqrt{N(0) / N(k)}` with
    :math:`N = \\sigma_U^2 R_U + \\sigma_C^2 R_C |\\hat\\kappa|^2` (module notes).

    Parameters
    ----------
    matching_kernel : numpy.ndarray
        The PSF-matching kernel stamp :math:`\\kappa` (at the image centre or a tile centre).
    var_unconvolved, var_convolved : float
        Mean per-pixel variances of the unconvolved and convolved input images.
    size : int
        Odd width of the returned kernel.
    correlation_unconvolved, correlation_convolved : numpy.ndarray, optional
        Normalised noise autocorrelation stamps of the two inputs (see
        :func:`noise_power_spectrum`); ``None`` (default) is white noise,
        which gives the published white-noise filter.
    power_floor : float
        Floor of the normalised noise power spectra (:func:`noise_power_spectrum`).
    """
    if size % 2 == 0:
        raise ValueError(f"decorrelation kernel size must be odd, got {size}")
    stamps = [size, matching_kernel.shape[0]]
    stamps += [np.shape(c)[0] for c in (correlation_unconvolved, correlation_convolved)
               if c is not None]
    n = _grid_size(*stamps)
    kappa_hat = _centred_spectrum(matching_kernel, n)
    power_u = noise_power_spectrum(correlation_unconvolved, n, power_floor)
    power_c = noise_power_spectrum(correlation_convolved, n, power_floor)
    noise = var_unconvolved * power_u + var_convolved * power_c * np.abs(kappa_hat) ** 2
    noise = np.broadcast_to(noise, kappa_hat.shape)
    phi_hat = np.sqrt(noise[0, 0] / np.maximum(noise, _TINY))
    phi = _to_stamp(phi_hat, size)
    # Truncation moves the zero-frequency gain slightly; restore it so fluxes are unchanged.
    return phi / phi.sum()


def noise_correlation_factor(kernel: np.ndarray, correlation,
                             power_floor: float = NOISE_POWER_FLOOR) -> float:
    """Variance of ``kernel ⊗ n`` for correlated noise ``n`` over that for white noise.

    :math:`c = \\sum_k |\\hat g|^2 R / \\sum_k |\\hat g|^2` for the kernel
    :math:`g` and the noise's normalised power spectrum :math:`R`
    (:func:`noise_power_spectrum`); 1 when ``correlation`` is ``None``.
    Multiply the white-noise variance :math:`V \\lVert g \\rVert^2` by it.
    """
    if correlation is None:
        return 1.0
    kernel = np.asarray(kernel, dtype=np.float64)
    n = _grid_size(kernel.shape[0], np.shape(correlation)[0])
    power = np.abs(_centred_spectrum(kernel, n)) ** 2
    total = float(power.sum())
    if not total > 0:
        return 1.0
    return float((power * noise_power_spectrum(correlation, n, power_floor)).sum() / total)


def psf_flux_bias(psf_stamp: np.ndarray, decorrelation: np.ndarray) -> float:
    """Fractional PSF-flux bias from ignoring the decorrelation filter in the PSF.

    A point source of flux ``F`` has profile ``F (P ⊗ φ)`` in the decorrelated
    difference; a linear PSF fit with the unfiltered ``P`` measures
    ``F <P, P ⊗ φ> / <P, P>``, so the bias is
    :math:`\\langle P, P \\otimes \\phi\\rangle / \\langle P, P\\rangle - 1`
    (0 for a delta function; positive when φ sharpens the PSF).
    """
    psf = np.asarray(psf_stamp, dtype=np.float64)
    psf = psf / psf.sum()
    filtered = fftconvolve(psf, decorrelation, mode="same")
    return float((psf * filtered).sum() / (psf * psf).sum() - 1.0)


def score_kernel(matching_kernel: np.ndarray, preconvolution_kernel: np.ndarray,
                 var_science: float, var_template: float, size: int, *,
                 correlation_science=None, correlation_template=None,
                 power_floor: float = NOISE_POWER_FLOOR) -> np.ndarray:
    """Real-space likelihood-correction kernel for the preconvolved difference (DMTN-179).

    :math:`\\widehat{\\mathrm{corr}} = N(0) / (\\sigma_S^2 R_S + \\sigma_T^2 R_T
    |\\hat\\kappa'|^2 / |\\hat P|^2)`, the white-noise formula of the module notes
    with each variance replaced by its noise power spectrum (``correlation_*``:
    normalised autocorrelation stamps, ``None`` = white), which keeps the
    score the optimal point-source statistic for correlated inputs.
    """
    if size % 2 == 0:
        raise ValueError(f"score kernel size must be odd, got {size}")
    stamps = [size, matching_kernel.shape[0], preconvolution_kernel.shape[0]]
    stamps += [np.shape(c)[0] for c in (correlation_science, correlation_template)
               if c is not None]
    n = _grid_size(*stamps)
    kappa_hat = _centred_spectrum(matching_kernel, n)
    psf_hat = _centred_spectrum(preconvolution_kernel, n)
    kernel_sum = float(matching_kernel.sum())
    psf_power = np.maximum(np.abs(psf_hat) ** 2, 1000.0 * _TINY)
    power_s = noise_power_spectrum(correlation_science, n, power_floor)
    power_t = noise_power_spectrum(correlation_template, n, power_floor)
    numerator = (var_science * np.ravel(power_s)[0]
                 + var_template * np.ravel(power_t)[0] * kernel_sum**2)
    corr_hat = numerator / (var_science * power_s
                            + var_template * power_t * np.abs(kappa_hat) ** 2 / psf_power)
    return _to_stamp(np.broadcast_to(corr_hat, kappa_hat.shape), size)


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
