"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016), tiled, with the full score noise.

Public API
----------
subtract_zogy(science, template, config=None) -> SubtractionResult
    The proper difference in science flux units (PSF ``P_D``, full variance),
    ``S_corr`` as the score, the registered template in science units.
ZogyConfig, ZogyStarConfig
    Configuration (every field documented).
ZogyKernel, BinnedBackground
    The effective kernels per tile and the removed differential background.
NoiseCorrelation, measure_noise_correlation
    Pixel-to-pixel noise correlation of an image (:mod:`diffim_dask.noise_correlation`,
    shared with Alard–Lupton decorrelation; re-exported here).
proper_image_subtraction, zogy_kernels, apply_zogy, psf_spectrum, shift_phase
    The pure Fourier-space mathematics (:mod:`.core`).
plan_tiles, TileLayout, Tile
    The overlapping-tile layout (:mod:`.tiles`).
"""

from .background import BinnedBackground
from .config import ZogyConfig, ZogyStarConfig
from .core import (ZogyImages, ZogyKernels, apply_zogy, correlation_spectrum,
                   proper_image_subtraction, psf_spectrum, shift_phase, zogy_kernels)
from ..noise_correlation import NoiseCorrelation, measure_noise_correlation
from .products import ZogyKernel
from .subtract import subtract_zogy
from .tiles import Tile, TileLayout, plan_tiles

__all__ = [
    "subtract_zogy",
    "ZogyConfig",
    "ZogyStarConfig",
    "ZogyKernel",
    "BinnedBackground",
    "NoiseCorrelation",
    "measure_noise_correlation",
    "correlation_spectrum",
    "ZogyImages",
    "ZogyKernels",
    "apply_zogy",
    "proper_image_subtraction",
    "psf_spectrum",
    "shift_phase",
    "zogy_kernels",
    "Tile",
    "TileLayout",
    "plan_tiles",
]
