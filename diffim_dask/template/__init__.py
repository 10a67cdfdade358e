"""Template assembly: sky map, coadd store, coadd builder, template warping and DCR templates.

Public API
----------
:class:`RingsSkyMap`, :class:`SkyMapConfig`, :class:`TractInfo`, :class:`PatchInfo`, :func:`skymap_from_dict`
    The tiling of the sky into tracts and overlapping patches (:mod:`.skymap`).
:class:`CoaddStore`
    Coadd patches per band/tract/patch in Zarr, carrying the sky map (:mod:`.coadd_store`).
:func:`build_coadd`, :class:`CoaddConfig`, :class:`CoaddResult`
    Warp exposures onto patches and combine them (:mod:`.coadd`).
:func:`get_template`, :class:`GetTemplateConfig`, :class:`TemplateResult`
    A template on a science exposure's pixel grid (:mod:`.get_template`).
:func:`get_dcr_template`, :class:`DcrConfig`
    The DCR-matched variant (:mod:`.dcr`).
:class:`WarpConfig`, :class:`PixelMapping`, :func:`warp_planes`, :func:`warp_psf_stamp`
    The resampling machinery (:mod:`.warp`).
"""

from .coadd import CoaddConfig, CoaddResult, build_coadd
from .coadd_store import CoaddStore, check_patch_geometry
from .dcr import (BAND_WAVELENGTHS, DcrConfig, dcr_pixel_offsets, differential_refraction,
                  get_dcr_template, refractive_index_minus_one)
from .get_template import GetTemplateConfig, TemplateResult, get_template
from .skymap import PatchInfo, RingsSkyMap, SkyMapConfig, TractInfo, skymap_from_dict
from .warp import PixelMapping, WarpConfig, warp_planes, warp_psf_stamp

__all__ = [
    "BAND_WAVELENGTHS",
    "CoaddConfig",
    "CoaddResult",
    "CoaddStore",
    "DcrConfig",
    "GetTemplateConfig",
    "PatchInfo",
    "PixelMapping",
    "RingsSkyMap",
    "SkyMapConfig",
    "TemplateResult",
    "TractInfo",
    "WarpConfig",
    "build_coadd",
    "check_patch_geometry",
    "dcr_pixel_offsets",
    "differential_refraction",
    "get_dcr_template",
    "get_template",
    "refractive_index_minus_one",
    "skymap_from_dict",
    "warp_planes",
    "warp_psf_stamp",
]
