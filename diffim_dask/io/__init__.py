"""Readers and writers: FITS (LSST-style MEF, JWST-like, plain images) and a Zarr exposure store.

Public API
----------
:func:`read_exposure`, :func:`write_exposure_fits`
    FITS exposures (layouts and conventions in :mod:`diffim_dask.io.fits`).
:func:`read_psf_fits`, :func:`write_psf_fits`
    PSF models and stamps.
:class:`ExposureStore`
    One Zarr group per (visit, detector), lazy reads, atomic writes.
:func:`visit_info_from_header`, :func:`photo_calib_from_header`, :func:`seeing_fwhm_pixels`
    Header parsing across observatories, driven by the one synonym table
    :data:`HEADER_SYNONYMS` (:mod:`diffim_dask.io._headers`).
:class:`MissingInputError`
    A missing file or store entry (a ``BadInputDataError`` and a ``FileNotFoundError``).

Log lines (what was assumed or estimated while reading) go to the
``diffim_dask.io`` logger.
"""

from ._atomic import atomic_output_path
from ._errors import MissingInputError
from ._headers import (
    HEADER_SYNONYMS,
    photo_calib_from_header,
    seeing_fwhm_pixels,
    visit_info_from_header,
)
from .fits import read_exposure, read_psf_fits, write_exposure_fits, write_psf_fits
from .zarr_store import ExposureStore

__all__ = [
    "atomic_output_path",
    "HEADER_SYNONYMS",
    "ExposureStore",
    "MissingInputError",
    "photo_calib_from_header",
    "read_exposure",
    "read_psf_fits",
    "seeing_fwhm_pixels",
    "visit_info_from_header",
    "write_exposure_fits",
    "write_psf_fits",
]
