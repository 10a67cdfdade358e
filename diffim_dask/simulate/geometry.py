"""Simulated geometry: tangent-plane WCSs, the focal-plane layout, the tract and its patches.

Conventions: pixel positions are 0-based (``image[y, x]``); astropy's
``all_pix2world(x, y, 0)`` maps them to (RA, Dec) in degrees. A visit's
detectors share one tangent plane whose reference point (CRVAL) is the visit's
pointing and whose reference pixel is the focal-plane centre expressed in each
detector's own pixel frame. Template patches share the tract's tangent plane
and are cut from it by pixel bounding boxes (LSST's skymap convention, kept
deliberately simple here).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
from astropy.wcs import WCS

from ..template.skymap import tangent_wcs

__all__ = ["tangent_wcs", "focal_plane_origins", "PatchInfo", "Tract", "make_tract"]


def focal_plane_origins(n_detectors: int, shape: tuple[int, int], gap: int) -> np.ndarray:
    """Focal-plane position of pixel (0, 0) of each detector.

    Detectors sit on a near-square grid (``ceil(sqrt(n))`` columns), row by row,
    separated by ``gap`` pixels; the focal-plane origin is the centre of the grid.

    Returns
    -------
    numpy.ndarray, shape (n_detectors, 2)
        ``(x, y)`` focal-plane coordinates in pixels.
    """
    ny, nx = shape
    n_cols = int(math.ceil(math.sqrt(n_detectors)))
    n_rows = int(math.ceil(n_detectors / n_cols))
    width = n_cols * nx + (n_cols - 1) * gap
    height = n_rows * ny + (n_rows - 1) * gap
    out = np.empty((n_detectors, 2))
    for d in range(n_detectors):
        col, row = d % n_cols, d // n_cols
        out[d, 0] = col * (nx + gap) - (width - 1) / 2.0
        out[d, 1] = row * (ny + gap) - (height - 1) / 2.0
    return out


@dataclasses.dataclass(frozen=True)
class PatchInfo:
    """One template patch of the tract.

    Attributes
    ----------
    id : int
        ``index_y * n_patches_x + index_x``.
    index : (int, int)
        ``(index_x, index_y)`` on the patch grid.
    inner_bbox, outer_bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)`` in tract pixels; the outer box adds the overlap border.
    wcs : astropy.wcs.WCS
        The tract WCS (shared by every patch; pixel positions are tract pixels).
    """

    id: int
    index: tuple[int, int]
    inner_bbox: tuple[int, int, int, int]
    outer_bbox: tuple[int, int, int, int]
    # Patches are identified by id and boxes; the shared WCS takes no part in == or hash().
    wcs: WCS = dataclasses.field(compare=False)

    @property
    def origin(self) -> tuple[int, int]:
        """Tract-frame position ``(x0, y0)`` of the patch image's first pixel."""
        return self.outer_bbox[0], self.outer_bbox[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the patch image (with border)."""
        return self.outer_bbox[3], self.outer_bbox[2]


@dataclasses.dataclass(frozen=True, eq=False)
class Tract:
    """The tangent plane of the survey and its tiling into overlapping patches.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        TAN WCS centred on the survey centre; tract pixel (0, 0) is the corner
        of the area covered by the visits (minus a margin).
    shape : (int, int)
        ``(ny, nx)`` of the covered area in tract pixels.
    patch_size, patch_border : int
        Inner side and overlap border of patches.
    patches : tuple of PatchInfo
    """

    wcs: WCS
    shape: tuple[int, int]
    patch_size: int
    patch_border: int
    patches: tuple[PatchInfo, ...]

    @property
    def n_patches(self) -> tuple[int, int]:
        """``(n_x, n_y)``."""
        ny, nx = self.shape
        return (int(math.ceil(nx / self.patch_size)), int(math.ceil(ny / self.patch_size)))

    def patch(self, patch_id: int) -> PatchInfo:
        """The patch with this id."""
        return self.patches[patch_id]

    def patches_overlapping(self, wcs: WCS, shape: tuple[int, int]) -> list[int]:
        """Ids of the patches whose outer box overlaps an image's footprint.

        The footprint is the polygon of the image's boundary (sampled every
        ~64 px) projected to tract pixels; its bounding box is tested.
        """
        ny, nx = shape
        edge_x = np.linspace(-0.5, nx - 0.5, max(2, nx // 64 + 1))
        edge_y = np.linspace(-0.5, ny - 0.5, max(2, ny // 64 + 1))
        bx = np.concatenate([edge_x, edge_x, np.full(edge_y.size, -0.5),
                             np.full(edge_y.size, nx - 0.5)])
        by = np.concatenate([np.full(edge_x.size, -0.5), np.full(edge_x.size, ny - 0.5),
                             edge_y, edge_y])
        ra, dec = copy.deepcopy(wcs).all_pix2world(bx, by, 0)
        tx, ty = copy.deepcopy(self.wcs).all_world2pix(ra, dec, 0)
        xmin, xmax, ymin, ymax = tx.min(), tx.max(), ty.min(), ty.max()
        out = []
        for patch in self.patches:
            px0, py0, pnx, pny = patch.outer_bbox
            overlaps_x = px0 - 0.5 < xmax and px0 + pnx - 0.5 > xmin
            overlaps_y = py0 - 0.5 < ymax and py0 + pny - 0.5 > ymin
            if overlaps_x and overlaps_y:
                out.append(patch.id)
        return out


def make_tract(ra: float, dec: float, pixel_scale: float, footprints_ra: np.ndarray,
               footprints_dec: np.ndarray, patch_size: int, patch_border: int,
               margin: int = 0) -> Tract:
    """Tract covering the given sky points (e.g. all detector corners) plus ``margin`` pixels.

    Parameters
    ----------
    ra, dec : float
        Tangent point (deg).
    pixel_scale : float
        arcsec per pixel.
    footprints_ra, footprints_dec : numpy.ndarray
        Sky points the tract must cover.
    patch_size, patch_border : int
        Patch inner side and overlap border (pixels).
    margin : int
        Extra pixels around the covered area.
    """
    probe = tangent_wcs(ra, dec, pixel_scale, (0.0, 0.0))
    px, py = probe.all_world2pix(np.asarray(footprints_ra), np.asarray(footprints_dec), 0)
    x_lo = math.floor(px.min()) - margin
    y_lo = math.floor(py.min()) - margin
    nx = int(math.ceil(px.max())) + margin - x_lo + 1
    ny = int(math.ceil(py.max())) + margin - y_lo + 1
    wcs = tangent_wcs(ra, dec, pixel_scale, (-float(x_lo), -float(y_lo)))
    n_px = int(math.ceil(nx / patch_size))
    n_py = int(math.ceil(ny / patch_size))
    patches = []
    for iy in range(n_py):
        for ix in range(n_px):
            inner = (ix * patch_size, iy * patch_size, patch_size, patch_size)
            outer = (inner[0] - patch_border, inner[1] - patch_border,
                     patch_size + 2 * patch_border, patch_size + 2 * patch_border)
            patches.append(PatchInfo(id=iy * n_px + ix, index=(ix, iy), inner_bbox=inner,
                                     outer_bbox=outer, wcs=wcs))
    return Tract(wcs=wcs, shape=(ny, nx), patch_size=patch_size, patch_border=patch_border,
                 patches=tuple(patches))
