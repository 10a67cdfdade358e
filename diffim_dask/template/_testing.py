"""Helpers for tests and benchmarks of template assembly (not part of the public API).

They render the simulator's sky directly onto sky-map patches (noise-free
unless asked), fill a :class:`~diffim_dask.template.CoaddStore` with them, and
measure how well a warped template reproduces a reference rendering around
isolated stars.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..psf.models import PsfModel
from ..simulate.dcr import render_sky_image
from .skymap import PatchInfo

__all__ = ["render_patch", "fill_store", "isolated_star_metrics"]


def render_patch(sky, patch: PatchInfo, psf: PsfModel, calib: PhotoCalib, band: str, *,
                 wavelength_range=None, noise_sigma: float = 0.0, rng=None,
                 variance: float = 1.0, galaxies: bool = False) -> Exposure:
    """A coadd patch of the sky rendered directly on the patch grid (constant variance)."""
    model, _ = render_sky_image(sky, patch.wcs, patch.shape, psf, calib.njy_per_count, band=band,
                                origin=patch.origin, wavelength_range=wavelength_range,
                                galaxies=galaxies)
    if noise_sigma:
        model = model + noise_sigma * rng.standard_normal(model.shape)
    return Exposure.from_arrays(model.astype(np.float32),
                                np.full(patch.shape, variance, dtype=np.float32), wcs=patch.wcs,
                                psf=psf, photo_calib=calib, info=VisitInfo(band=band),
                                origin=patch.origin)


def fill_store(store, sky, patches, psf: PsfModel, calib: PhotoCalib, band: str, *,
               subfilter=None, wavelength_range=None, galaxies: bool = False) -> list:
    """Render and write every patch; returns their keys."""
    for patch in patches:
        exposure = render_patch(sky, patch, psf, calib, band, wavelength_range=wavelength_range,
                                galaxies=galaxies)
        store.write(exposure, band, patch.tract, patch.id, subfilter=subfilter, overwrite=True)
    return [p.key for p in patches]


def isolated_star_metrics(reference: np.ndarray, image: np.ndarray, stars: pd.DataFrame, *,
                          edge: int = 16, half: int = 8, core_radius: float = 2.5,
                          isolation: float = 20.0, min_counts: float = 200.0,
                          usable: np.ndarray | None = None) -> pd.DataFrame:
    """Per-star comparison of ``image`` with ``reference`` around isolated stars.

    A star is used when it lies ``edge`` pixels inside the image, has at least
    ``min_counts`` counts, and no other star within ``isolation`` pixels is
    brighter than 1 % of it.

    Returns
    -------
    pandas.DataFrame
        ``x, y, counts``; ``core_residual`` (mean |image − reference| within
        ``core_radius`` of the centre, over the reference peak); ``flux_ratio``
        (sums over the ``2 half + 1`` stamp, minus 1); ``offset`` (distance
        between the stamps' first-moment centroids, pixels); ``dipole``
        (first moment of the residual over the reference flux: the centroid
        shift it implies, pixels).
    """
    ny, nx = reference.shape
    x = stars["x"].to_numpy()
    y = stars["y"].to_numpy()
    counts = stars["counts"].to_numpy()
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    rows = []
    for i in range(len(stars)):
        if not (edge <= x[i] < nx - 1 - edge and edge <= y[i] < ny - 1 - edge):
            continue
        if counts[i] < min_counts:
            continue
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if np.any((distance < isolation) & (counts > 0.01 * counts[i])):
            continue
        ix, iy = int(round(x[i])), int(round(y[i]))
        box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        if usable is not None and not usable[box].all():
            continue
        a, b = reference[box].astype(float), image[box].astype(float)
        residual = b - a
        core = np.hypot(xx - (x[i] - ix), yy - (y[i] - iy)) < core_radius
        ax, ay = (a * xx).sum() / a.sum(), (a * yy).sum() / a.sum()
        bx, by = (b * xx).sum() / b.sum(), (b * yy).sum() / b.sum()
        rows.append({
            "x": x[i], "y": y[i], "counts": counts[i],
            "core_residual": float(np.abs(residual[core]).mean() / a.max()),
            "flux_ratio": float(b.sum() / a.sum() - 1.0),
            "offset": float(np.hypot(bx - ax, by - ay)),
            "dipole": float(np.hypot((residual * xx).sum(), (residual * yy).sum()) / a.sum()),
        })
    return pd.DataFrame(rows, columns=["x", "y", "counts", "core_residual", "flux_ratio",
                                       "offset", "dipole"])
