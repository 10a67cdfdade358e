"""Seeded synthetic difference images for the detection tests.

Everything is rendered with the PSF models of :mod:`diffim_dask.psf` on
white Gaussian noise whose variance is the variance plane, so measured
errors can be compared with the scatter. Nothing here uses the code under test.

* :func:`add_point` — a PSF stamp (the model's full ``default_size`` stamp)
  of a given total flux at a sub-pixel position;
* :func:`add_trail` — a PSF integrated along a segment (a dense sum of points);
* :func:`make_difference` — a difference image with point sources (either
  sign), trails, a constant or two-level variance, optional mask planes;
* :func:`make_triplet` — science, matched template and difference for stars
  that vary in flux and/or move by ``(dx, dy)`` between template and science
  (the science star at ``x + dx/2``, the template star at ``x - dx/2``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from diffim_dask.exposure import Exposure, PhotoCalib, VisitInfo
from diffim_dask.masks import mask_value


def add_point(image: np.ndarray, psf, x: float, y: float, flux: float) -> None:
    """Add ``flux * PSF`` centred at local ``(x, y)`` (clipped at the image border)."""
    size = psf.default_size
    half = size // 2
    ix, iy = int(round(x)), int(round(y))
    stamp = psf.image(x, y, size=size, offset=(x - ix, y - iy)) * flux
    ny, nx = image.shape
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    if y1 <= y0 or x1 <= x0:
        return
    sy, sx = iy - half, ix - half
    image[y0:y1, x0:x1] += stamp[y0 - sy:y1 - sy, x0 - sx:x1 - sx]


def add_trail(image: np.ndarray, psf, x0: float, y0: float, x1: float, y1: float, flux: float,
              step: float = 0.05) -> None:
    """Add a trailed source: ``flux`` spread uniformly along the segment (x0, y0)-(x1, y1)."""
    length = math.hypot(x1 - x0, y1 - y0)
    n = max(2, int(math.ceil(length / step)))
    t = (np.arange(n) + 0.5) / n
    for ti in t:
        add_point(image, psf, x0 + ti * (x1 - x0), y0 + ti * (y1 - y0), flux / n)


def simple_wcs(shape, pixel_scale_arcsec: float = 0.2, ra: float = 150.0, dec: float = 2.0) -> WCS:
    """A TAN WCS with north up, east left, centred on the image."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [shape[1] / 2.0 + 0.5, shape[0] / 2.0 + 0.5]
    wcs.wcs.crval = [ra, dec]
    scale = pixel_scale_arcsec / 3600.0
    wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    return wcs


@dataclasses.dataclass
class Scene:
    """A synthetic data set and its truth table."""

    difference: Exposure
    truth: pd.DataFrame
    science: Exposure | None = None
    template: Exposure | None = None


def grid_positions(shape, spacing: float, margin: float, rng: np.random.Generator):
    """Positions on a regular grid with uniform sub-pixel jitter in [-0.5, 0.5)."""
    ys = np.arange(margin, shape[0] - margin, spacing)
    xs = np.arange(margin, shape[1] - margin, spacing)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy = yy.ravel() + rng.uniform(-0.5, 0.5, yy.size)
    xx = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    return xx, yy


def make_difference(shape, psf, *, noise_sigma: float = 10.0, points=(), trails=(),
                    seed: int = 0, variance_split: float | None = None, mask=None,
                    background=None, photo_calib: PhotoCalib | None = None, wcs=None,
                    info: VisitInfo | None = None, noiseless: bool = False) -> Scene:
    """A difference image: noise + point sources (x, y, flux) + trails (x0, y0, x1, y1, flux).

    ``variance_split`` makes the right half's noise sigma that factor times
    the left half's (a two-level variance plane). ``background`` is added
    (an array or a callable of (yy, xx)).
    """
    rng = np.random.default_rng(seed)
    image = np.zeros(shape)
    sigma = np.full(shape, float(noise_sigma))
    if variance_split is not None:
        sigma[:, shape[1] // 2:] *= variance_split
    rows = []
    for x, y, flux in points:
        add_point(image, psf, x, y, flux)
        rows.append({"kind": "point", "x": x, "y": y, "flux": flux})
    for x0, y0, x1, y1, flux in trails:
        add_trail(image, psf, x0, y0, x1, y1, flux)
        rows.append({"kind": "trail", "x": 0.5 * (x0 + x1), "y": 0.5 * (y0 + y1), "flux": flux,
                     "length": math.hypot(x1 - x0, y1 - y0),
                     "angle": math.degrees(math.atan2(y1 - y0, x1 - x0)) % 180.0})
    if background is not None:
        if callable(background):
            yy, xx = np.mgrid[:shape[0], :shape[1]]
            image += background(yy, xx)
        else:
            image += background
    if not noiseless:
        image += rng.normal(size=shape) * sigma
    exposure = Exposure.from_arrays(
        image.astype(np.float32), (sigma**2).astype(np.float32),
        None if mask is None else mask.astype(np.uint32), psf=psf, photo_calib=photo_calib,
        wcs=wcs, info=info or VisitInfo(visit=1234, detector=42, band="r", mjd=60000.5))
    return Scene(difference=exposure, truth=pd.DataFrame(rows))


def make_triplet(shape, psf, stars, *, science_sigma: float = 10.0, template_sigma: float = 5.0,
                 seed: int = 0, info: VisitInfo | None = None, wcs=None,
                 photo_calib: PhotoCalib | None = None) -> Scene:
    """Science, matched template and difference for ``stars``.

    Each star is ``(x, y, template_flux, science_flux, dx, dy)``: the template
    holds ``template_flux`` at ``(x - dx/2, y - dy/2)``, the science image
    ``science_flux`` at ``(x + dx/2, y + dy/2)``. Both images have independent
    white noise; the difference variance is the sum of the two variances.
    """
    rng = np.random.default_rng(seed)
    science = np.zeros(shape)
    template = np.zeros(shape)
    rows = []
    for x, y, f_t, f_s, dx, dy in stars:
        add_point(science, psf, x + dx / 2, y + dy / 2, f_s)
        add_point(template, psf, x - dx / 2, y - dy / 2, f_t)
        rows.append({"x": x, "y": y, "template_flux": f_t, "science_flux": f_s, "dx": dx, "dy": dy})
    science += rng.normal(size=shape) * science_sigma
    template += rng.normal(size=shape) * template_sigma
    info = info or VisitInfo(visit=77, detector=3, band="g", mjd=60100.25)
    common = dict(psf=psf, info=info, wcs=wcs, photo_calib=photo_calib)
    sci = Exposure.from_arrays(science.astype(np.float32),
                               np.full(shape, science_sigma**2, np.float32), **common)
    tmpl = Exposure.from_arrays(template.astype(np.float32),
                                np.full(shape, template_sigma**2, np.float32), **common)
    diff = Exposure.from_arrays((science - template).astype(np.float32),
                                np.full(shape, science_sigma**2 + template_sigma**2, np.float32),
                                **common)
    return Scene(difference=diff, truth=pd.DataFrame(rows), science=sci, template=tmpl)


def mask_with(shape, boxes) -> np.ndarray:
    """A mask with planes set in boxes: ``{plane: [(y0, y1, x0, x1), ...]}``."""
    mask = np.zeros(shape, dtype=np.uint32)
    for plane, regions in boxes.items():
        for y0, y1, x0, x1 in regions:
            mask[y0:y1, x0:x1] |= np.uint32(mask_value(plane))
    return mask


def match(catalog: pd.DataFrame, x, y, radius: float = 2.0) -> np.ndarray:
    """Row index in ``catalog`` of the nearest non-sky source within ``radius`` (-1 if none)."""
    real = catalog.loc[~catalog["isSky"]]
    cx, cy = real["x"].to_numpy(), real["y"].to_numpy()
    out = np.full(np.size(x), -1)
    for i, (xi, yi) in enumerate(zip(np.atleast_1d(x), np.atleast_1d(y))):
        if cx.size == 0:
            break
        d = np.hypot(cx - xi, cy - yi)
        j = int(np.argmin(d))
        if d[j] <= radius:
            out[i] = real.index[j]
    return out
