r"""The Fourier-space mathematics of ZOGY proper image subtraction (pure numpy, no I/O).

Notation (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27; hats are 2-D discrete
Fourier transforms, overbars complex conjugates): ``N`` the new (science)
image, ``R`` the reference (template), ``P_n``, ``P_r`` their unit-sum PSFs,
``σ_n``, ``σ_r`` their background noise, ``F_n``, ``F_r`` their flux zero
points. Here fluxes are measured in *science counts*: ``F_n = 1`` and
``F_r = 1 / r`` with ``r = F_N / F_R`` the flux ratio (science counts per
template count of one source). With

.. math::

    Δ(k) = σ_n^2 F_r^2 |\hat P_r|^2 + σ_r^2 F_n^2 |\hat P_n|^2

the proper difference (eq. 13), its zero point (eq. 15) and PSF (eq. 14) are

.. math::

    \hat D = \frac{F_r \hat P_r \hat N - F_n \hat P_n \hat R}{\sqrt{Δ}}, \qquad
    F_D = \frac{F_r F_n}{\sqrt{σ_n^2 F_r^2 + σ_r^2 F_n^2}}, \qquad
    \hat P_D = \frac{F_r F_n \hat P_r \hat P_n}{F_D \sqrt{Δ}};

``D`` has white noise of unit variance (``|c_N|^2 σ_n^2 + |c_R|^2 σ_r^2 = 1``
at every frequency, with ``c_N = F_r \hat P_r / \sqrt{Δ}`` and
``c_R = F_n \hat P_n / \sqrt{Δ}``). ``D / F_D`` is in science flux units and a
point source of science flux ``f`` appears in it as ``f P_D``. The score
(eqs. 12, 17) is the matched filter of ``D``,

.. math::

    \hat S = F_D \hat D \overline{\hat P_D} = \hat k_n \hat N - \hat k_r \hat R, \quad
    \hat k_n = \frac{F_n F_r^2 \overline{\hat P_n} |\hat P_r|^2}{Δ}, \quad
    \hat k_r = \frac{F_r F_n^2 \overline{\hat P_r} |\hat P_n|^2}{Δ},

its value at a point source of flux ``α`` is ``α F_S`` with
``F_S = \frac{1}{N_{pix}} \sum_k F_n^2 F_r^2 |\hat P_n|^2 |\hat P_r|^2 / Δ``
(so ``α = S / F_S``), and its variance in uniform background noise is
``F_S``. With per-pixel variance planes ``V_N``, ``V_R`` (which include the
sources' Poisson noise) the variance of ``S`` is (eqs. 26–29)
``V(S_N) + V(S_R) = V_N ⊗ k_n^2 + V_R ⊗ k_r^2``, and a registration noise
``σ_x, σ_y`` adds (eqs. 30–33)
``V_ast = σ_x^2 [(∂_x S_N)^2 + (∂_x S_R)^2] + σ_y^2 [(∂_y S_N)^2 + (∂_y S_R)^2]``
with ``S_N = k_n ⊗ N``, ``S_R = k_r ⊗ R``. The corrected score is
``S_corr = S / \sqrt{V(S_N) + V(S_R) + V_ast}``; the flux estimate
``α = S / F_S`` has the error ``\sqrt{V(S)} / F_S``.

Correlated noise (a generalisation for resampled frames and coadds): with
stationary noise of power spectrum ``σ² R(k)`` (``R`` the transform of the
normalised autocorrelation, mean 1) in place of ``σ²``, the same formulas keep
``D`` white and ``S`` optimal; the variance-plane terms are multiplied by the
ratio of each kernel's correlated to white noise variance.

Numerics
--------
* Regularisation: a constant ``η`` (``floor``) is added to both PSF spectra —
  a delta function of weight ``η`` in each PSF — so ``Δ`` never vanishes.
  ``D`` stays exactly white wherever the PSFs carry no power: there the
  weights tend to their limits ``F_r / \sqrt{σ_n^2 F_r^2 + σ_r^2 F_n^2}`` and
  ``F_n / \sqrt{…}``. Frequencies where ``Δ`` is still zero (``η = 0`` and both
  PSFs exactly zero) get those limiting weights and contribute nothing to
  ``P_D`` and ``S``.
* PSF stamps of odd or even size are placed with their centre (default: the
  geometric centre ``((n_x - 1)/2, (n_y - 1)/2)``, half-integer for even
  sizes) at the origin: the integer part by a cyclic roll, the fraction by a
  Fourier phase ramp. On even-length axes the Nyquist term of a sub-pixel
  shift is taken real (``cos``), the band-limited convention that keeps real
  images real. A stamp symmetric about a pixel corner has no Nyquist term.
* Registration: the template is moved by an exact (unitary) phase ramp, the
  only shift that keeps ``D`` white; it is band-limited, hence not local, so
  sharp artefacts in the template should be smoothed first.
* ``F_S``, ``P_D``, the real-space kernels (for the variance planes) and
  their support are computed in float64 on a kernel grid; the operators on
  the tile grid and the image transforms run in the requested precision.
* The astrometric derivatives use a 5-point stencil (exact to < 1 % for
  PSF-smoothed images).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from ..errors import BadInputDataError, ConfigurationError

__all__ = [
    "ZogyKernels",
    "ZogyImages",
    "psf_spectrum",
    "shift_phase",
    "correlation_spectrum",
    "zogy_kernels",
    "apply_zogy",
    "proper_image_subtraction",
]


# -- frequency grids and phases -------------------------------------------------------------------


def _frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(ky, kx)`` in cycles per pixel for an ``rfft2`` of ``shape``.

    Shapes ``(ny, 1)`` and ``(1, nx // 2 + 1)``.
    """
    ny, nx = shape
    return sfft.fftfreq(ny)[:, None], sfft.rfftfreq(nx)[None, :]


def _axis_phase(n: int, shift: float, freq: np.ndarray) -> np.ndarray:
    """``exp(-2πi k shift)`` along one axis, with a real Nyquist term on even lengths."""
    phase = np.exp(-2j * np.pi * freq * shift)
    if n % 2 == 0:
        nyquist = np.isclose(np.abs(freq), 0.5)
        phase = np.where(nyquist, np.cos(np.pi * shift), phase)
    return phase


def shift_phase(shape: tuple[int, int], dx: float, dy: float) -> np.ndarray:
    """Multiplier of an ``rfft2`` spectrum that moves the image content by ``(+dx, +dy)`` pixels.

    ``irfft2(rfft2(a) * shift_phase(a.shape, dx, dy))`` is ``a`` translated by
    ``(dx, dy)`` (cyclically, band-limited interpolation). On even axes the
    Nyquist term is multiplied by ``cos(π d)`` (real), so the result stays the
    real band-limited interpolant.

    Returns
    -------
    numpy.ndarray
        complex128, shape ``(ny, nx // 2 + 1)``.
    """
    ny, nx = shape
    ky, kx = _frequencies(shape)
    return _axis_phase(ny, float(dy), ky) * _axis_phase(nx, float(dx), kx)


def _placement(stamp_shape, center) -> tuple[int, int, float, float]:
    """Integer pixel ``(iy, ix)`` nearest the centre and the remainder ``(fy, fx)``."""
    sy, sx = stamp_shape
    cx, cy = ((sx - 1) / 2.0, (sy - 1) / 2.0) if center is None else (float(center[0]),
                                                                       float(center[1]))
    ix, iy = math.floor(cx + 0.5), math.floor(cy + 0.5)
    return iy, ix, cy - iy, cx - ix


def _place_into(canvas: np.ndarray, stamp: np.ndarray, iy: int, ix: int) -> None:
    """Write a stamp cyclically into ``canvas`` with stamp pixel ``(iy, ix)`` at the origin."""
    ny, nx = canvas.shape
    rows = (np.arange(stamp.shape[0]) - iy) % ny
    cols = (np.arange(stamp.shape[1]) - ix) % nx
    canvas[rows[:, None], cols[None, :]] = stamp


def _place(stamps: np.ndarray, shape: tuple[int, int], iy: int, ix: int) -> np.ndarray:
    """Stamps ``(n, sy, sx)`` put cyclically on ``shape`` grids, ``(iy, ix)`` at the origin."""
    n, sy, sx = stamps.shape
    ny, nx = shape
    canvas = np.zeros((n, ny, nx), dtype=stamps.dtype)
    rows = (np.arange(sy) - iy) % ny
    cols = (np.arange(sx) - ix) % nx
    canvas[:, rows[:, None], cols[None, :]] = stamps
    return canvas


def psf_spectrum(stamp, shape: tuple[int, int], center: tuple[float, float] | None = None
                 ) -> np.ndarray:
    """``rfft2`` of a PSF stamp placed with its centre at the origin of a ``shape`` grid.

    Parameters
    ----------
    stamp : array_like
        2-D PSF image, any (odd or even, non-square) size up to ``shape``;
        normalised to unit sum here.
    shape : (int, int)
        Transform shape ``(ny, nx)``.
    center : (float, float), optional
        ``(x, y)`` position of the PSF centre in stamp pixel indices; default
        the geometric centre ``((n_x - 1)/2, (n_y - 1)/2)``, i.e. the central
        pixel of an odd stamp and the corner shared by the four central pixels
        of an even one.

    Returns
    -------
    numpy.ndarray
        complex128 spectrum, shape ``(ny, nx // 2 + 1)``, equal to 1 at zero
        frequency.

    Raises
    ------
    BadInputDataError
        Non-finite values, non-positive sum, or a stamp larger than ``shape``.
    """
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or not np.all(np.isfinite(stamp)):
        raise BadInputDataError(f"PSF stamp must be a finite 2-D array, got shape {stamp.shape}")
    total = stamp.sum()
    if not total > 0:
        raise BadInputDataError(f"PSF stamp has non-positive sum {total}")
    if stamp.shape[0] > shape[0] or stamp.shape[1] > shape[1]:
        raise BadInputDataError(f"PSF stamp {stamp.shape} is larger than the transform {shape}")
    iy, ix, fy, fx = _placement(stamp.shape, center)
    spectrum = sfft.rfft2(_place((stamp / total)[None], shape, iy, ix)[0])
    if fx or fy:
        # The centre sits at (+fx, +fy) from the origin: move it back.
        spectrum *= shift_phase(shape, -fx, -fy)
    return spectrum


def _rfft_weights(nx: int) -> np.ndarray:
    """Multiplicity of each ``rfft`` column in the full spectrum (1 or 2)."""
    weights = np.full(nx // 2 + 1, 2.0)
    weights[0] = 1.0
    if nx % 2 == 0:
        weights[-1] = 1.0
    return weights


@functools.lru_cache(maxsize=8)
def _radial_order(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a wrapped grid sorted by distance from the origin: ``(order, radius)``."""
    ny, nx = shape
    yy = np.minimum(np.arange(ny), ny - np.arange(ny))[:, None]
    xx = np.minimum(np.arange(nx), nx - np.arange(nx))[None, :]
    radius = np.hypot(yy, xx).ravel()
    order = np.argsort(radius, kind="stable")
    return order, radius[order]


def _radius_enclosing(values: np.ndarray, fraction: float) -> float:
    """Smallest radius enclosing ``fraction`` of the sum of non-negative wrapped ``values``."""
    order, radius = _radial_order(values.shape)
    cumulative = np.cumsum(values.ravel()[order])
    if not cumulative[-1] > 0:
        return 0.0
    index = int(np.searchsorted(cumulative, fraction * cumulative[-1]))
    return float(radius[min(index, radius.size - 1)])


def _centred_stamps(kernels: np.ndarray, half: int) -> np.ndarray:
    """``(n, 2 half + 1, 2 half + 1)`` stamps centred on the origin of wrapped kernels."""
    ny, nx = kernels.shape[-2:]
    ys = (np.arange(-half, half + 1)) % ny
    xs = (np.arange(-half, half + 1)) % nx
    return kernels[..., ys[:, None], xs[None, :]]


# -- kernels --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ZogyKernels:
    """The ZOGY operators of one tile, as ``rfft2`` spectra on its transform grid.

    Fluxes are in science counts (``F_n = 1``, ``F_r = 1 / flux_ratio``).

    Attributes
    ----------
    shape : (int, int)
        Transform shape.
    difference_science, difference_template : numpy.ndarray
        ``c_N = F_r P̂_r / √Δ`` and ``c_R = F_n P̂_n / √Δ``: ``D̂ = c_N N̂ − c_R R̂``
        (unit-variance ``D``).
    score_science, score_template : numpy.ndarray
        ``k̂_n`` and ``k̂_r``: ``Ŝ = k̂_n N̂ − k̂_r R̂``.
    difference_science_squared, difference_template_squared : numpy.ndarray
        Spectra of the squared real-space ``c_N``, ``c_R`` (variance of ``D``).
    score_science_squared, score_template_squared : numpy.ndarray
        Spectra of ``k_n²`` and ``k_r²`` (``V(S_N)``, ``V(S_R)``).
    zero_point : float
        ``F_D``.
    score_zero_point : float
        ``F_S``.
    flux_ratio, sigma_science, sigma_template : float
        The inputs ``r``, ``σ_n``, ``σ_r``.
    difference_psf : numpy.ndarray
        ``P_D`` as an odd, centred, unit-sum stamp.
    science_kernel, template_kernel : numpy.ndarray
        Real-space kernels of the difference in science units,
        ``D / F_D = science_kernel ⊗ N − template_kernel ⊗ R`` (centred odd
        stamps; sums 1 and ``flux_ratio``).
    reach : int
        Radius (pixels) enclosing 99.9 % of the summed absolute kernels of
        ``D`` and ``S``: how far a pixel's value spreads (mask growth).
    support : int
        Radius enclosing all but 1e-6 of the summed, peak-normalised absolute
        kernels: the border a tile needs against wrap-around (meaningful when
        the kernel grid is at least twice as large).
    n_degenerate : int
        Frequencies where ``Δ`` was exactly zero (given the limiting weights).
    template_transfer : numpy.ndarray or None
        Transfer function of the registering shift applied to the template
        (``None``: no shift).
    """

    shape: tuple[int, int]
    difference_science: np.ndarray
    difference_template: np.ndarray
    score_science: np.ndarray
    score_template: np.ndarray
    difference_science_squared: np.ndarray
    difference_template_squared: np.ndarray
    score_science_squared: np.ndarray
    score_template_squared: np.ndarray
    zero_point: float
    score_zero_point: float
    flux_ratio: float
    sigma_science: float
    sigma_template: float
    difference_psf: np.ndarray
    science_kernel: np.ndarray
    template_kernel: np.ndarray
    reach: int
    support: int
    n_degenerate: int
    template_transfer: np.ndarray | None = None

    @property
    def dtype(self):
        """Real dtype of the image products (float32 or float64)."""
        return np.float32 if self.difference_science.dtype == np.complex64 else np.float64


def _kernel_spectra(science_hat, template_hat, sigma_science, sigma_template, flux_ratio, floor,
                    science_noise=1.0, template_noise=1.0):
    """``c_N, c_R, k_n, k_r``, the score power ``F_n²F_r²|P̂_n|²|P̂_r|²/Δ``, ``F_D P̂_D``.

    Computed in the precision of the inputs; ``F_n = 1``, ``F_r = 1 / r``.
    ``science_noise`` and ``template_noise`` are the normalised noise power
    spectra ``R(k)`` (1 for white noise): the noise power is ``σ² R(k)``.
    """
    fr = 1.0 / flux_ratio
    pn = science_hat + floor
    pr = template_hat + floor
    pn2 = pn.real * pn.real + pn.imag * pn.imag
    pr2 = pr.real * pr.real + pr.imag * pr.imag
    noise_n = (sigma_science**2 * fr**2) * science_noise
    noise_r = sigma_template**2 * template_noise
    delta = noise_n * pr2 + noise_r * pn2
    degenerate = ~(delta > 0)
    n_degenerate = int(degenerate.sum())
    if n_degenerate:
        delta = np.where(degenerate, 1.0, delta).astype(pn2.dtype)
    inverse = 1.0 / delta
    inverse_root = np.sqrt(inverse)
    c_n = pr * (fr * inverse_root)
    c_r = pn * inverse_root
    k_n = np.conj(pn) * (fr**2 * pr2 * inverse)
    k_r = np.conj(pr) * (fr * pn2 * inverse)
    power = fr**2 * pn2 * pr2 * inverse
    psf_d_scaled = c_n * pn
    if n_degenerate:
        # Both PSFs exactly zero: limiting weights keep D white; nothing reaches P_D or S.
        norm = np.broadcast_to(np.sqrt(noise_n + noise_r), delta.shape)[degenerate]
        c_n[degenerate] = fr / norm
        c_r[degenerate] = 1.0 / norm
        for array in (k_n, k_r, power, psf_d_scaled):
            array[degenerate] = 0.0
    return c_n, c_r, k_n, k_r, power, psf_d_scaled, n_degenerate


def correlation_spectrum(acf, shape: tuple[int, int]) -> np.ndarray | float:
    """Normalised noise power spectrum ``R(k)`` (``rfft2`` layout) of a centred odd ACF stamp.

    ``None`` (white noise) gives the scalar 1. Values are floored at 1e-3:
    the transform of a truncated autocorrelation may dip below zero.
    """
    if acf is None:
        return 1.0
    acf = np.asarray(acf, dtype=np.float64)
    half_y, half_x = acf.shape[0] // 2, acf.shape[1] // 2
    if acf.shape[0] > shape[0] or acf.shape[1] > shape[1]:
        raise BadInputDataError(f"noise correlation stamp {acf.shape} exceeds the grid {shape}")
    canvas = np.zeros(shape)
    _place_into(canvas, acf / acf[half_y, half_x], half_y, half_x)
    return np.maximum(sfft.rfft2(canvas).real, 1e-3)


def zogy_kernels(science_psf, template_psf, shape: tuple[int, int], sigma_science: float,
                 sigma_template: float, flux_ratio: float = 1.0, *, floor: float = 1e-6,
                 science_center=None, template_center=None, kernel_grid: int | None = None,
                 stamp_size: int | None = None, science_correlation=None,
                 template_correlation=None, template_shift=(0.0, 0.0),
                 dtype=np.float32) -> ZogyKernels:
    """Build the ZOGY operators of one tile.

    Parameters
    ----------
    science_psf, template_psf : numpy.ndarray
        PSF stamps (any size up to ``shape``; see :func:`psf_spectrum`).
    shape : (int, int)
        Transform shape of the tile (its outer box).
    sigma_science, sigma_template : float
        Background noise ``σ_n``, ``σ_r`` (counts of each image); one may be 0.
    flux_ratio : float
        ``r = F_N / F_R``.
    floor : float
        Regularisation ``η`` added to both PSF spectra (see module notes).
    science_center, template_center : (float, float), optional
        PSF centres in stamp pixels (default: geometric centres).
    kernel_grid : int, optional
        Side of the periodic grid on which the real-space kernels (for the
        variance planes, ``P_D``, ``F_S`` and the reported kernels) are formed
        in float64; it must hold the kernels without wrap-around. Default: a
        fast size ≥ 4× the larger stamp and ≥ 64, capped at ``shape``.
    stamp_size : int, optional
        Odd size of ``difference_psf`` and of the reported kernels; default
        the larger stamp side (made odd).
    science_correlation, template_correlation : numpy.ndarray, optional
        Normalised noise autocorrelation stamps (odd, centred, 1 at the
        centre) of correlated-noise inputs (see :mod:`diffim_dask.noise_correlation`); the noise
        power becomes ``σ² R(k)`` with ``R`` their transform, so ``D`` stays
        white and ``S`` optimal. The variance-plane terms are multiplied by
        the ratio of each kernel's correlated to white noise variance.
        Default: white noise.
    template_shift : (float, float)
        ``(dx, dy)``: template sources sit at ``(x + dx, y + dy)`` relative to
        the science image; the template is moved back by a Fourier phase ramp
        (:func:`shift_phase`) before subtraction. The shift must be exact
        (unitary) for ``D`` to stay white, so it is band-limited and not
        local: sharp features of the template (e.g. filled saturated cores)
        should be smoothed before (the caller's job).
    dtype : numpy dtype
        float32 or float64: precision of the returned spectra (the tile-grid
        operators are formed in this precision from float64 PSF spectra).

    Returns
    -------
    ZogyKernels

    Raises
    ------
    ConfigurationError
        Non-positive flux ratio, negative noise, or both noises zero.
    """
    sigma_science, sigma_template = float(sigma_science), float(sigma_template)
    flux_ratio = float(flux_ratio)
    if not flux_ratio > 0 or not math.isfinite(flux_ratio):
        raise ConfigurationError(f"ZOGY flux ratio must be positive and finite, got {flux_ratio}")
    if not (sigma_science >= 0 and sigma_template >= 0) or not (sigma_science > 0
                                                                 or sigma_template > 0):
        raise ConfigurationError(
            f"ZOGY needs non-negative noise levels, not both zero: σ_science = {sigma_science}, "
            f"σ_template = {sigma_template}")
    science_psf = np.asarray(science_psf, dtype=np.float64)
    template_psf = np.asarray(template_psf, dtype=np.float64)
    shape = (int(shape[0]), int(shape[1]))
    largest = max(science_psf.shape + template_psf.shape)
    if stamp_size is None:
        stamp_size = largest if largest % 2 else largest + 1
    if kernel_grid is None:
        kernel_grid = sfft.next_fast_len(max(4 * largest, 64), real=True)
    grid = (min(kernel_grid, shape[0]), min(kernel_grid, shape[1]))
    stamp_size = min(stamp_size, (min(grid) - 1) | 1)
    real_dtype = np.dtype(dtype).type
    complex_dtype = np.complex64 if real_dtype == np.float32 else np.complex128

    # Kernel grid, float64: real-space kernels, P_D, F_S.
    dx, dy = (float(v) for v in template_shift)
    gn = psf_spectrum(science_psf, grid, science_center)
    gr = psf_spectrum(template_psf, grid, template_center)
    g_noise_n = correlation_spectrum(science_correlation, grid)
    g_noise_r = correlation_spectrum(template_correlation, grid)
    spectra = _kernel_spectra(gn, gr, sigma_science, sigma_template, flux_ratio, floor,
                              g_noise_n, g_noise_r)
    power = spectra[4]
    weights = _rfft_weights(grid[1])[None, :]
    score_zero_point = float((power * weights).sum() / (grid[0] * grid[1]))
    r0_n = float(np.ravel(g_noise_n)[0])
    r0_r = float(np.ravel(g_noise_r)[0])
    zero_point = (1.0 / flux_ratio) / math.sqrt(sigma_science**2 * r0_n / flux_ratio**2
                                                + sigma_template**2 * r0_r)

    def correlation_factor(spectrum, noise):
        # Variance of (kernel ⊗ correlated noise) over that of (kernel ⊗ white noise).
        if np.isscalar(noise):
            return 1.0
        power_k = (spectrum.real**2 + spectrum.imag**2) * weights
        total = power_k.sum()
        return float((power_k * noise).sum() / total) if total > 0 else 1.0

    factors = [correlation_factor(spectra[0], g_noise_n), correlation_factor(spectra[1], g_noise_r),
               correlation_factor(spectra[2], g_noise_n), correlation_factor(spectra[3], g_noise_r)]
    real = sfft.irfft2(np.stack([spectra[i] for i in (0, 1, 2, 3, 5)]), s=grid, axes=(-2, -1))
    c_n_real, c_r_real, k_n_real, k_r_real, psf_d = real
    psf_d = psf_d / zero_point
    half = stamp_size // 2
    difference_psf = _centred_stamps(psf_d, half)
    difference_psf /= difference_psf.sum()
    science_kernel = _centred_stamps(c_n_real / zero_point, half)
    template_kernel = _centred_stamps(c_r_real / zero_point, half)
    reach = _radius_enclosing(np.abs(c_n_real) + np.abs(c_r_real), 0.999)
    reach = max(reach, _radius_enclosing(np.abs(k_n_real) + np.abs(k_r_real), 0.999))
    normalised = sum(np.abs(k) / max(np.abs(k).max(), 1e-300)
                     for k in (c_n_real, c_r_real, k_n_real, k_r_real))
    support = _radius_enclosing(normalised, 1.0 - 1e-6)
    squared = np.stack([c_n_real, c_r_real, k_n_real, k_r_real]) ** 2
    squared *= np.asarray(factors)[:, None, None]

    transfer = shift_phase(shape, -dx, -dy) if (dx or dy) else None
    if grid == shape:
        tile = [s.astype(complex_dtype) for s in spectra[:4]]
        n_degenerate = spectra[6]
        squared_hat = sfft.rfft2(squared, axes=(-2, -1)).astype(complex_dtype)
    else:
        # One batched transform: both PSFs and the four squared kernels (compact supports).
        square_half = max(_radius_enclosing(k, 1.0 - 1e-10) for k in squared)
        square_half = int(min(math.ceil(square_half) + 1, min(grid) // 2 - 1))
        iy_n, ix_n, fy_n, fx_n = _placement(science_psf.shape, science_center)
        iy_r, ix_r, fy_r, fx_r = _placement(template_psf.shape, template_center)
        canvas = np.zeros((6,) + shape, dtype=real_dtype)
        _place_into(canvas[0], science_psf / science_psf.sum(), iy_n, ix_n)
        _place_into(canvas[1], template_psf / template_psf.sum(), iy_r, ix_r)
        for index, stamp in enumerate(_centred_stamps(squared, square_half)):
            _place_into(canvas[2 + index], stamp, square_half, square_half)
        transformed = sfft.rfft2(canvas, axes=(-2, -1))
        del canvas
        if fx_n or fy_n:
            transformed[0] *= shift_phase(shape, -fx_n, -fy_n)
        if fx_r or fy_r:
            transformed[1] *= shift_phase(shape, -fx_r, -fy_r)
        noise_n = correlation_spectrum(science_correlation, shape)
        noise_r = correlation_spectrum(template_correlation, shape)
        transformed = transformed.astype(complex_dtype)
        cast_noise = [v if np.isscalar(v) else v.astype(real_dtype) for v in (noise_n, noise_r)]
        tile_spectra = _kernel_spectra(transformed[0], transformed[1], real_dtype(sigma_science),
                                       real_dtype(sigma_template), flux_ratio,
                                       real_dtype(floor), *cast_noise)
        tile = list(tile_spectra[:4])
        n_degenerate = tile_spectra[6]
        squared_hat = transformed[2:]

    return ZogyKernels(
        shape=shape,
        difference_science=tile[0], difference_template=tile[1],
        score_science=tile[2], score_template=tile[3],
        difference_science_squared=squared_hat[0], difference_template_squared=squared_hat[1],
        score_science_squared=squared_hat[2], score_template_squared=squared_hat[3],
        zero_point=float(zero_point), score_zero_point=score_zero_point,
        flux_ratio=flux_ratio, sigma_science=sigma_science, sigma_template=sigma_template,
        difference_psf=difference_psf, science_kernel=science_kernel,
        template_kernel=template_kernel, reach=int(math.ceil(reach)),
        support=int(math.ceil(support)), n_degenerate=int(n_degenerate),
        template_transfer=None if transfer is None else transfer.astype(complex_dtype))


# -- applying the operators -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ZogyImages:
    """ZOGY products of one tile (arrays of the transform shape; ``None`` when not requested).

    Attributes
    ----------
    difference : numpy.ndarray
        ``D / F_D``: the proper difference in science flux units (PSF ``P_D``).
    difference_variance : numpy.ndarray
        Its variance, ``(V_N ⊗ c_N² + V_R ⊗ c_R²) / F_D²``.
    score : numpy.ndarray
        ``S``.
    score_variance : numpy.ndarray
        The variance that normalises the score (see ``score_noise``).
    score_corrected : numpy.ndarray
        ``S / sqrt(score_variance)`` (0 where the variance is not positive).
    flux, flux_variance : numpy.ndarray
        ``S / F_S`` (science counts) and ``score_variance / F_S²``.
    registered_template : numpy.ndarray
        The template moved onto the science image's registration (template counts).
    """

    difference: np.ndarray
    difference_variance: np.ndarray | None
    score: np.ndarray
    score_variance: np.ndarray
    score_corrected: np.ndarray
    flux: np.ndarray | None
    flux_variance: np.ndarray | None
    registered_template: np.ndarray | None


def apply_zogy(science, template, science_variance, template_variance, kernels: ZogyKernels, *,
               registration_noise: tuple[float, float] = (0.0, 0.0),
               score_noise: str = "full", difference_variance: bool = True,
               flux: bool = True, registered_template: bool = True,
               workers: int = 1) -> ZogyImages:
    """Apply the ZOGY operators of one tile to its (zero-padded) images.

    Parameters
    ----------
    science, template : numpy.ndarray
        Background-subtracted images of ``kernels.shape`` (bad pixels filled).
    science_variance, template_variance : numpy.ndarray or None
        Per-pixel variance planes (including source noise); ``None`` means the
        constant ``σ²`` of the kernels. Needed for ``score_noise`` 'full' and
        'source' to include source noise.
    kernels : ZogyKernels
        From :func:`zogy_kernels` for this shape.
    registration_noise : (float, float)
        ``(σ_x, σ_y)`` in pixels for the astrometric-noise terms.
    score_noise : {'full', 'source', 'background'}
        'full': ``V(S_N) + V(S_R) + V_ast``; 'source': without ``V_ast``;
        'background': the constant ``F_S``.
    difference_variance, flux, registered_template : bool
        Whether to compute these products.
    workers : int
        Threads per FFT.

    Returns
    -------
    ZogyImages
    """
    if score_noise not in ("full", "source", "background"):
        raise ConfigurationError(f"score_noise must be 'full', 'source' or 'background', "
                                 f"got {score_noise!r}")
    shape = kernels.shape
    dtype = kernels.dtype
    for name, array in (("science", science), ("template", template),
                        ("science_variance", science_variance),
                        ("template_variance", template_variance)):
        if array is not None and tuple(np.shape(array)) != shape:
            raise BadInputDataError(f"{name} has shape {np.shape(array)}, expected {shape}")

    def forward(a):
        return sfft.rfft2(np.asarray(a, dtype=dtype), workers=workers)

    def inverse(a):
        return sfft.irfft2(a, s=shape, workers=workers)

    phase = kernels.template_transfer
    shifted = phase is not None
    n_hat = forward(science)
    r_hat = forward(template)
    if shifted:
        r_hat *= phase
    zero_point = kernels.zero_point
    difference = inverse(kernels.difference_science * n_hat
                         - kernels.difference_template * r_hat)
    difference *= dtype(1.0 / zero_point)
    registered = None
    if registered_template:
        registered = inverse(r_hat) if shifted else np.asarray(template, dtype=dtype).copy()
    score_n = inverse(kernels.score_science * n_hat)
    score_r = inverse(kernels.score_template * r_hat)
    del n_hat, r_hat
    score = score_n - score_r

    need_planes = difference_variance or score_noise != "background"
    vn_hat = vr_hat = None
    if need_planes:
        if science_variance is None or template_variance is None:
            raise BadInputDataError("variance planes are required for the difference variance "
                                    "and for score_noise 'full' or 'source'")
        vn_hat = forward(science_variance)
        # The template variance is not moved: the sub-pixel shift preserves white-noise
        # variance (its taps' squares sum to ~1) and sources' variance is smooth.
        vr_hat = forward(template_variance)
    diff_var = None
    if difference_variance:
        diff_var = inverse(kernels.difference_science_squared * vn_hat
                           + kernels.difference_template_squared * vr_hat)
        diff_var *= dtype(1.0 / zero_point**2)
        np.clip(diff_var, 0.0, None, out=diff_var)
    if score_noise == "background":
        score_var = np.full(shape, kernels.score_zero_point, dtype=dtype)
    else:
        score_var = inverse(kernels.score_science_squared * vn_hat
                            + kernels.score_template_squared * vr_hat)
        np.clip(score_var, 0.0, None, out=score_var)
        sigma_x, sigma_y = (float(v) for v in registration_noise)
        if score_noise == "full" and (sigma_x > 0 or sigma_y > 0):
            for sigma, axis in ((sigma_x, 1), (sigma_y, 0)):
                if sigma <= 0:
                    continue
                for part in (score_n, score_r):
                    gradient = _derivative(part, axis)
                    gradient *= gradient
                    gradient *= dtype(sigma**2)
                    score_var += gradient
    del vn_hat, vr_hat, score_n, score_r
    sigma = np.sqrt(score_var)
    corrected = np.zeros(shape, dtype=dtype)
    np.divide(score, sigma, out=corrected, where=sigma > 0)
    flux_image = flux_var = None
    if flux:
        flux_image = score * dtype(1.0 / kernels.score_zero_point)
        flux_var = score_var * dtype(1.0 / kernels.score_zero_point**2)
    return ZogyImages(difference, diff_var, score, score_var, corrected, flux_image, flux_var,
                      registered)


_STENCIL = np.array([-1.0, 8.0, 0.0, -8.0, 1.0]) / 12.0


def _derivative(values: np.ndarray, axis: int) -> np.ndarray:
    """∂/∂(axis) by the 5-point central stencil (edges: nearest-value extension).

    For PSF-smoothed images (power below ~0.15 cycles/pixel) it is exact to
    better than 1 %; it only enters the astrometric variance.
    """
    return ndimage.correlate1d(values, _STENCIL.astype(values.dtype)[::-1], axis=axis,
                               mode="nearest")


def proper_image_subtraction(science, template, science_psf, template_psf, sigma_science: float,
                             sigma_template: float, flux_ratio: float = 1.0, *,
                             science_variance=None, template_variance=None,
                             template_shift=(0.0, 0.0), registration_noise=(0.0, 0.0),
                             score_noise: str = "full", pad: int | None = None,
                             floor: float = 1e-6, dtype=np.float64, science_center=None,
                             template_center=None, science_correlation=None,
                             template_correlation=None) -> tuple[ZogyImages, ZogyKernels]:
    """ZOGY on whole numpy arrays with constant PSFs (one tile, zero-padded against wrap-around).

    Parameters
    ----------
    science, template : numpy.ndarray
        Background-subtracted images on one grid (counts of each image).
    science_psf, template_psf : numpy.ndarray
        PSF stamps (odd or even size).
    sigma_science, sigma_template, flux_ratio
        See :func:`zogy_kernels`.
    science_variance, template_variance : numpy.ndarray, optional
        Variance planes; default constant ``σ²``.
    template_shift : (float, float)
        See :func:`zogy_kernels`.
    registration_noise, score_noise
        See :func:`apply_zogy`.
    science_correlation, template_correlation : numpy.ndarray, optional
        Noise autocorrelation stamps (see :func:`zogy_kernels`).
    pad : int, optional
        Zero padding on every side (default: the larger stamp side); the
        padded size is rounded up to a fast FFT length.
    floor : float
        Spectrum regularisation.
    dtype : numpy dtype
        Precision of the image transforms.
    science_center, template_center : (float, float), optional
        PSF centres in stamp pixels (default: geometric centres).

    Returns
    -------
    (ZogyImages, ZogyKernels)
        Images cropped back to the input shape.
    """
    science = np.asarray(science, dtype=np.float64)
    template = np.asarray(template, dtype=np.float64)
    if science.shape != template.shape or science.ndim != 2:
        raise BadInputDataError(f"science {science.shape} and template {template.shape} must be "
                                f"2-D arrays of one shape")
    ny, nx = science.shape
    if pad is None:
        pad = max(np.shape(science_psf) + np.shape(template_psf))
    full = (sfft.next_fast_len(ny + 2 * pad, real=True),
            sfft.next_fast_len(nx + 2 * pad, real=True))
    y0, x0 = (full[0] - ny) // 2, (full[1] - nx) // 2

    def padded(a, fill):
        out = np.zeros(full)
        out[y0:y0 + ny, x0:x0 + nx] = fill if a is None else a
        return out

    kernels = zogy_kernels(science_psf, template_psf, full, sigma_science, sigma_template,
                           flux_ratio, floor=floor, science_center=science_center,
                           template_center=template_center, science_correlation=science_correlation,
                           template_correlation=template_correlation,
                           template_shift=template_shift, dtype=dtype)
    images = apply_zogy(padded(science, 0.0), padded(template, 0.0),
                        padded(science_variance, sigma_science**2),
                        padded(template_variance, sigma_template**2), kernels,
                        registration_noise=registration_noise, score_noise=score_noise)
    crop = (slice(y0, y0 + ny), slice(x0, x0 + nx))
    cropped = {field.name: (None if getattr(images, field.name) is None
                            else getattr(images, field.name)[crop])
               for field in dataclasses.fields(images)}
    return ZogyImages(**cropped), kernels
