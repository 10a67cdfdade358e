"""Small seeded synthetic image pairs for the Alard–Lupton tests.

Two constructions:

* :func:`rendered_pair`: stars drawn with each image's own ``GaussianPsf``
  (pixel-integrated stamps), optional sub-pixel shift of the template, optional
  transients in the science image — a miniature survey pair;
* :func:`convolved_pair`: the science image is the noise-free template convolved
  with a *known* kernel, so the fitted kernel can be compared with the truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.signal import fftconvolve

from diffim_dask import Exposure, GaussianPsf, PhotoCalib, VisitInfo

ZERO_POINT = 27.0


@dataclasses.dataclass
class Pair:
    science: Exposure
    template: Exposure
    stars: dict
    transients: dict
    science_model: np.ndarray
    template_model: np.ndarray


def star_field(shape, n_stars, seed, flux_range=(2e3, 2e5), margin=12):
    """Positions (x, y) and power-law fluxes of ``n_stars`` stars."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(margin, nx - 1 - margin, n_stars)
    y = rng.uniform(margin, ny - 1 - margin, n_stars)
    lo, hi = flux_range
    flux = lo * (hi / lo) ** rng.uniform(0, 1, n_stars) ** 2.0
    return x, y, flux


def render(shape, x, y, flux, psf, size=None):
    """Sum of pixel-integrated PSF stamps."""
    image = np.zeros(shape)
    size = size or psf.default_size
    half = size // 2
    for xi, yi, fi in zip(x, y, flux):
        cx, cy = int(round(xi)), int(round(yi))
        stamp = psf.image(xi, yi, size=size, offset=(xi - cx, yi - cy))
        y0, y1 = cy - half, cy + half + 1
        x0, x1 = cx - half, cx + half + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1 = size - max(0, y1 - shape[0])
        sx1 = size - max(0, x1 - shape[1])
        image[max(0, y0):min(shape[0], y1), max(0, x0):min(shape[1], x1)] += \
            fi * stamp[sy0:sy1, sx0:sx1]
    return image


def _exposure(image, variance, psf, mask=None, band="r", chunks=None):
    return Exposure.from_arrays(image.astype(np.float32), variance.astype(np.float32), mask,
                                psf=psf, photo_calib=PhotoCalib(ZERO_POINT),
                                info=VisitInfo(band=band), chunks=chunks)


def rendered_pair(shape=(256, 256), *, template_fwhm=2.5, science_fwhm=3.5,
                  science_variation=(), shift=(0.0, 0.0), n_stars=150, sky_sigma=10.0,
                  template_sigma=3.0, seed=1, transients=0, transient_flux=3000.0,
                  template_scale=1.0, background=0.0, poisson=True, flux_range=(2e3, 2e5),
                  chunks=None) -> Pair:
    """Science/template pair drawn with their own PSFs (template shifted by ``shift``)."""
    rng = np.random.default_rng(seed + 1000)
    ny, nx = shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    science_psf = GaussianPsf(science_fwhm, fwhm_variation=tuple(science_variation),
                              reference=centre, scale=(nx / 2.0, ny / 2.0))
    template_psf = GaussianPsf(template_fwhm, reference=centre)
    x, y, flux = star_field(shape, n_stars, seed, flux_range)
    science_model = render(shape, x, y, flux, science_psf)
    template_model = template_scale * render(shape, x + shift[0], y + shift[1], flux, template_psf)
    tx = rng.uniform(30, nx - 30, transients)
    ty = rng.uniform(30, ny - 30, transients)
    tflux = np.full(transients, float(transient_flux))
    if transients:
        science_model += render(shape, tx, ty, tflux, science_psf)
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = background * (xx - nx / 2) / nx if np.ndim(background) == 0 else background
    science_var = np.full(shape, sky_sigma**2)
    template_var = np.full(shape, template_sigma**2)
    if poisson:
        science_var += np.clip(science_model, 0, None)
        template_var += np.clip(template_model, 0, None) * (template_sigma / sky_sigma) ** 2
    science = science_model + sky + np.sqrt(science_var) * rng.standard_normal(shape)
    template = template_model + np.sqrt(template_var) * rng.standard_normal(shape)
    return Pair(_exposure(science, science_var, science_psf, chunks=chunks),
                _exposure(template, template_var, template_psf, chunks=chunks),
                {"x": x, "y": y, "flux": flux}, {"x": tx, "y": ty, "flux": tflux},
                science_model, template_model)


def gaussian_kernel(size, sigma, shift=(0.0, 0.0), total=1.0):
    """Sampled Gaussian stamp (odd ``size``) centred at ``shift``, summing to ``total``."""
    half = size // 2
    g = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (((g[None, :] - shift[0]) ** 2) + (g[:, None] - shift[1]) ** 2) / sigma**2)
    return total * kernel / kernel.sum()


def convolved_pair(shape=(256, 256), *, template_fwhm=2.5, kernel=None, n_stars=120,
                   sky_sigma=1.0, template_sigma=0.2, seed=3, flux_range=(5e3, 5e5)) -> Pair:
    """Science = noise-free template ⊗ ``kernel`` (+ small noise): the true kernel is known."""
    rng = np.random.default_rng(seed + 2000)
    kernel = gaussian_kernel(21, 1.3) if kernel is None else kernel
    template_psf = GaussianPsf(template_fwhm)
    x, y, flux = star_field(shape, n_stars, seed, flux_range, margin=20)
    template_model = render(shape, x, y, flux, template_psf)
    science_model = fftconvolve(template_model, kernel, mode="same")
    science_psf_stamp = fftconvolve(template_psf.image(size=31), kernel, mode="same")
    from diffim_dask import ImagePsf

    science_psf = ImagePsf(science_psf_stamp / science_psf_stamp.sum())
    science_var = np.full(shape, sky_sigma**2)
    template_var = np.full(shape, template_sigma**2)
    science = science_model + sky_sigma * rng.standard_normal(shape)
    template = template_model + template_sigma * rng.standard_normal(shape)
    return Pair(_exposure(science, science_var, science_psf),
                _exposure(template, template_var, template_psf),
                {"x": x, "y": y, "flux": flux}, {}, science_model, template_model)


def psf_flux(image, variance, x, y, psf, size=15):
    """PSF-fit flux and its error at (x, y) (sub-pixel PSF placement)."""
    half = size // 2
    cx, cy = int(round(x)), int(round(y))
    stamp = psf.image(x, y, size=size, offset=(x - cx, y - cy))
    data = image[cy - half:cy + half + 1, cx - half:cx + half + 1]
    var = variance[cy - half:cy + half + 1, cx - half:cx + half + 1]
    norm = (stamp**2).sum()
    return float((data * stamp).sum() / norm), float(np.sqrt((var * stamp**2).sum()) / norm)


def sky_pixels(pair: Pair, mask, threshold=0.05):
    """Pixels far from any source in both noise-free models, with an empty mask."""
    sci_sigma = np.sqrt(np.median(pair.science.arrays()[1]))
    return ((np.abs(pair.science_model) < threshold * sci_sigma)
            & (np.abs(pair.template_model) < threshold * sci_sigma) & (mask == 0))


def exclusion_zone(mask, grow_bits, grow_radius, bits):
    """Pixels with ``bits``, or within ``grow_radius`` of a pixel with ``grow_bits``."""
    from scipy import ndimage

    grown = (mask & np.uint32(grow_bits)) != 0
    if grow_radius and grown.any():
        grown = ndimage.maximum_filter(grown.astype(np.uint8), size=2 * grow_radius + 1) > 0
    return grown | ((mask & np.uint32(bits)) != 0)


def matched_filter_detections(image, variance, psf_stamp, excluded, *, threshold=5.0):
    """Simple matched-filter detection (test helper, not the detection stage).

    S/N map ``(D ⊗ P̄) / sqrt(V ⊗ P̄²)``; peaks (5×5 local extrema) above
    ``threshold`` in either polarity, outside the ``excluded`` pixels.
    Returns ``(x, y, snr)`` arrays.
    """
    from scipy import ndimage

    data = np.where(excluded, 0.0, image)
    var = np.where(excluded, 0.0, variance)
    flipped = psf_stamp[::-1, ::-1]
    num = fftconvolve(data, flipped, mode="same")
    den = fftconvolve(var, flipped**2, mode="same")
    snr = np.where((den > 0) & ~excluded, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
    out = []
    for sign in (1.0, -1.0):
        values = sign * snr
        peaks = (values >= threshold) & (values == ndimage.maximum_filter(values, size=5))
        iy, ix = np.nonzero(peaks)
        out.append((ix, iy, snr[iy, ix]))
    x = np.concatenate([o[0] for o in out]).astype(float)
    y = np.concatenate([o[1] for o in out]).astype(float)
    return x, y, np.concatenate([o[2] for o in out])
