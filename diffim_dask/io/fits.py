"""FITS input and output of exposures and PSF models.

Reading
-------
:func:`read_exposure` recognises three layouts.

``mef``
    LSST-style multi-extension FITS with ``IMAGE``, ``MASK`` and ``VARIANCE``
    image HDUs (what :func:`write_exposure_fits` writes; LSST ``calexp`` files
    have the same shape). The parent-frame origin comes from ``LTV1/LTV2``
    (``x0 = -LTV1``), the mask bits from its ``MP_*`` cards (without them,
    nonzero → ``BAD``). Files we wrote also
    carry lossless JSON metadata in the primary header and a ``PSF`` table.
``jwst``
    ``SCI`` (image), ``ERR`` (1σ, variance = ERR²; without it
    ``VAR_POISSON + VAR_RNOISE [+ VAR_FLAT]``) and ``DQ`` (JWST flags mapped by
    :data:`~diffim_dask.io._mask_io.JWST_DQ_PLANES`). Metadata from the ``SCI``
    header, then the primary header. Pixel values keep their unit (e.g.
    ``MJy/sr``); the zero point accounts for it.
``plain``
    Any other file: the first 2-D image HDU (or ``hdu=``) is the image;
    variance, mask and PSF may come from companion files. The origin is
    (0, 0): ``LTV`` cards of foreign files are ignored (the DECam test frames
    carry a stale ``LTV1 = -1`` from an earlier trim).

Pixels are converted as follows.

* NaN, ±inf and fill values (``|v| ≥ 1e30``) → ``NO_DATA`` (all layouts).
* Plain images: pixels at or above the header saturation level
  (``ESATUR``/``SATURATE``…, see :mod:`~diffim_dask.io._headers`) → ``SAT``.
* Companion ``mask=`` (any layout): an integer mask with ``MP_*`` cards keeps
  its planes by name; any other mask (boolean, float or an undocumented
  integer bit mask) sets ``BAD`` where nonzero. The bits are OR-ed into the
  mask found so far.
* Companion ``variance=`` (counts²), ``weight=`` (inverse variance) or
  ``noise=`` (1σ, counts), at most one (any layout, replacing the file's
  variance). Pixels where it is non-finite or not positive (zero weight)
  become ``NO_DATA``.
* Files without any variance (plain images, JWST files lacking ``ERR``) get
  a modelled variance
  (:mod:`~diffim_dask.io._noise`): measured sky variance plus the sources'
  photon noise ``max(image - sky, 0)/gain``, with the header gain or, when
  there is none, an effective gain estimated from the sky; a log line on the
  ``diffim_dask.io`` logger says what was done. An estimated gain is stored
  in :attr:`VisitInfo.gain`.

Everywhere, ``NO_DATA`` pixels end with image 0 and variance 0, data are
converted to native byte order, and the image and variance planes are
``float32``. Float64 inputs (the DECam frames are ``>f8``) therefore lose
precision beyond float32's 24-bit mantissa (relative 6e-8, far below any
pixel noise); everything downstream works in float32, so writing and re-reading
an exposure is lossless.

With ``chunks=`` the result is dask-backed. ``mef`` files without companions
are read lazily, chunk by chunk, straight from the file by a picklable reader
(only one pixel per plane is read up front, to learn its type; checksums are
then not verified and an all-NaN image is not detected up front); the other
layouts need global statistics and are read eagerly, then chunked.

Writing
-------
:func:`write_exposure_fits` writes the primary HDU (readable cards plus the
lossless JSON of :class:`VisitInfo` and :class:`PhotoCalib` in ``DDINFO`` /
``DDCALIB`` long-string cards), then ``IMAGE`` (float32), ``MASK`` (the uint32
bits stored bit for bit as int32, documented by ``MP_<PLANE>`` cards) and
``VARIANCE`` (float32) — each with the WCS moved to the HDU's own pixel frame,
``LTV1/LTV2 = -x0, -y0`` and LSST's alternate ``A`` WCS for the parent frame —
and a ``PSF`` binary table holding the model's JSON (lossless, any model).
Checksums are written. The file appears atomically (temporary file in the
same directory, then rename).

Errors
------
Unusable inputs raise :class:`~diffim_dask.errors.BadInputDataError` whose
message starts with the file name; a missing file or companion raises
:class:`~diffim_dask.io.MissingInputError`, which is both a
``BadInputDataError`` (recorded as bad data, never retried) and a
:class:`FileNotFoundError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import BadInputDataError, ConfigurationError, DiffimError
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, mask_value, plane_set
from ..psf.models import ImagePsf, PsfModel, psf_from_dict
from ._atomic import atomic_output_path
from ._errors import MissingInputError
from ._headers import photo_calib_from_header, visit_info_from_header
from ._mask_io import (
    as_mask_dtype,
    invalid_pixels,
    mask_from_foreign,
    mask_from_jwst_dq,
    mask_plane_cards,
    remap_mask,
    stored_mask_planes,
)
from ._noise import effective_gain, looks_sky_subtracted, model_variance, sky_statistics
from ._warnings import captured_warnings
from ._wcs import offset_pixel_frame, wcs_from_header

__all__ = [
    "read_exposure",
    "write_exposure_fits",
    "read_psf_fits",
    "write_psf_fits",
    "FORMAT_NAME",
]

logger = logging.getLogger("diffim_dask.io")

#: Value of the primary-header card ``DDFORMAT`` in files we write.
FORMAT_NAME = "diffim_dask.exposure"
_FORMAT_VERSION = 1
_PLANE_HDUS = ("IMAGE", "MASK", "VARIANCE")
_PSF_HDU = "PSF"
_PSF_COLUMN = "MODEL"
#: Fewest usable pixels for a measured sky variance.
_MIN_SKY_PIXELS = 25
#: Planes excluded from the sky statistics.
_NOT_SKY = ("NO_DATA", "SAT", "BAD", "CR")
_NO_DATA = MASK_DTYPE(mask_value("NO_DATA"))


@dataclasses.dataclass
class _Planes:
    """What a layout reader found, before companions and the variance model."""

    image: Any
    variance: Any
    mask: Any
    headers: list[fits.Header]
    wcs: WCS | None
    origin: tuple[int, int] = (0, 0)
    psf: PsfModel | None = None
    photo_calib: PhotoCalib | None = None
    info: VisitInfo | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)


# ----------------------------------------------------------------------------------------------
# Low-level helpers: opening files and reading HDU data with errors that name the file.
# ----------------------------------------------------------------------------------------------


def _require_file(source: str, what: str = "file") -> None:
    if not os.path.exists(source):
        raise MissingInputError(f"{source}: {what} not found")
    if os.path.isdir(source):
        raise BadInputDataError(f"{source}: {what} is a directory, not a FITS file")


def _log_warnings(caught, source: str) -> None:
    for item in caught:
        logger.info("%s: %s: %s", source, item.category.__name__, item.message)


@contextlib.contextmanager
def _open_fits(source: str, what: str = "file") -> Iterator[fits.HDUList]:
    """Open a FITS file; unreadable files raise BadInputDataError naming it."""
    _require_file(source, what)
    try:
        with captured_warnings() as caught:
            hdul = fits.open(source, memmap=False, lazy_load_hdus=False)
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError... for bad files
        raise BadInputDataError(f"{source}: not a readable FITS file ({type(exc).__name__}: "
                                f"{exc})") from exc
    _log_warnings(caught, source)
    try:
        yield hdul
    finally:
        hdul.close()


def _native(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _hdu_data(hdu, source: str) -> np.ndarray:
    """The HDU's data as a native-byte-order numpy array."""
    try:
        with captured_warnings() as caught:
            data = hdu.data
            data = None if data is None else np.array(data)
    except Exception as exc:
        raise BadInputDataError(f"{source}: cannot read the data of HDU {hdu.name!r}; the file "
                                f"may be truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    for item in caught:
        if "truncated" in str(item.message).lower():
            raise BadInputDataError(f"{source}: file is truncated ({item.message})")
    _log_warnings(caught, source)
    if data is None:
        raise BadInputDataError(f"{source}: HDU {hdu.name!r} has no data")
    return _native(data)


def _hdu_shape(hdu) -> tuple[int, ...]:
    return tuple(int(n) for n in hdu.shape) if hdu.is_image else ()


def _get_hdu(hdul: fits.HDUList, key, source: str):
    try:
        return hdul[key]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise BadInputDataError(f"{source}: no HDU {key!r} (HDUs present: {names})") from None


def _check_shapes(shapes: dict[str, tuple], source: str) -> None:
    distinct = set(shapes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise BadInputDataError(f"{source}: plane shapes differ: {listing}")


# ----------------------------------------------------------------------------------------------
# Layout detection and the three layout readers.
# ----------------------------------------------------------------------------------------------


def _layout(hdul: fits.HDUList, hdu) -> str:
    if hdu is not None:
        return "plain"
    names = {h.name.upper() for h in hdul}
    if "IMAGE" in names:
        return "mef"
    if "SCI" in names:
        return "jwst"
    return "plain"


def _is_ours(hdul: fits.HDUList) -> bool:
    return hdul[0].header.get("DDFORMAT") == FORMAT_NAME


def _verify_datasums(hdul: fits.HDUList, source: str) -> None:
    for hdu in hdul:
        if "DATASUM" in hdu.header and hdu.verify_datasum() == 0:
            raise BadInputDataError(f"{source}: HDU {hdu.name!r} fails its DATASUM check (the data "
                                    f"are corrupt)")
        if "CHECKSUM" in hdu.header and hdu.verify_checksum() == 0:
            logger.info("%s: HDU %r CHECKSUM mismatch with intact data: the header was edited",
                        source, hdu.name)


def _origin_from_ltv(header: fits.Header, source: str) -> tuple[int, int]:
    origin = []
    for key in ("LTV1", "LTV2"):
        try:
            value = float(header.get(key, 0.0))
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value == round(value)):
            raise BadInputDataError(f"{source}: {key} = {value} is not an integer pixel offset")
        origin.append(-int(round(value)))
    return origin[0], origin[1]


def _json_card(header: fits.Header, key: str, source: str) -> Any:
    text = header.get(key, "")
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise BadInputDataError(f"{source}: primary-header card {key} is not valid JSON ({exc})") from exc


def _psf_from_table(hdul: fits.HDUList, source: str) -> PsfModel | None:
    if _PSF_HDU not in hdul or not isinstance(hdul[_PSF_HDU], fits.BinTableHDU):
        return None
    table = hdul[_PSF_HDU]
    if table.data is None or _PSF_COLUMN not in table.columns.names:
        return None
    try:
        return psf_from_dict(json.loads(table.data[_PSF_COLUMN][0]))
    except DiffimError:
        raise
    except Exception as exc:
        raise BadInputDataError(f"{source}: PSF table holds no valid model ({exc})") from exc


class _FitsSection:
    """Array-like that reads one image HDU on demand (a picklable dask source).

    Each access opens the file and reads only the requested section.
    """

    def __init__(self, path: str, extname: str, shape: tuple[int, int], dtype):
        self.path = path
        self.extname = extname
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        with fits.open(self.path, memmap=False) as hdul:
            block = np.asarray(hdul[self.extname].section[key])
        return block.astype(self.dtype, copy=False)


def _lazy_plane(source: str, hdul: fits.HDUList, extname: str, chunks):
    import dask.array as da
    from dask.base import tokenize

    hdu = hdul[extname]
    probe = _native(np.asarray(hdu.section[0:1, 0:1]))
    reader = _FitsSection(source, extname, _hdu_shape(hdu), probe.dtype)
    name = "fits-" + extname.lower() + "-" + tokenize(os.path.abspath(source), extname,
                                                      os.path.getmtime(source))
    return da.from_array(reader, chunks=chunks, name=name, meta=np.empty((0, 0), probe.dtype))


def _read_mef(hdul: fits.HDUList, source: str, chunks) -> _Planes:
    """IMAGE/MASK/VARIANCE layout (ours or LSST's); lazy when ``chunks`` is given."""
    missing = [name for name in _PLANE_HDUS if name not in hdul]
    if missing:
        names = [h.name for h in hdul]
        raise BadInputDataError(f"{source}: multi-extension file lacks HDU(s) {missing} "
                                f"(HDUs present: {names})")
    _check_shapes({name: _hdu_shape(hdul[name]) for name in _PLANE_HDUS}, source)
    ours = _is_ours(hdul)
    image_header = hdul["IMAGE"].header
    shape = _hdu_shape(hdul["IMAGE"])
    if len(shape) != 2:
        raise BadInputDataError(f"{source}: IMAGE HDU is not 2-D (shape {shape})")
    if chunks is None:
        if ours:
            _verify_datasums(hdul, source)
        image, mask, variance = (_hdu_data(hdul[name], source) for name in _PLANE_HDUS)
    else:
        image, mask, variance = (_lazy_plane(source, hdul, name, chunks) for name in _PLANE_HDUS)
    mask = as_mask_dtype(mask)
    stored = stored_mask_planes(hdul["MASK"].header)
    if stored is not None:
        mask = remap_mask(mask, stored, source)
    else:
        mask = np.where(mask != 0, MASK_DTYPE(mask_value("BAD")), MASK_DTYPE(0)).astype(MASK_DTYPE)
    x0, y0 = _origin_from_ltv(image_header, source)
    wcs = offset_pixel_frame(wcs_from_header(image_header, shape, source), -x0, -y0)
    primary = hdul[0].header
    planes = _Planes(image, variance, mask, [image_header, primary], wcs, origin=(x0, y0))
    if ours:
        info = _json_card(primary, "DDINFO", source)
        calib = _json_card(primary, "DDCALIB", source)
        planes.info = VisitInfo.from_dict(info) if info is not None else VisitInfo()
        planes.photo_calib = PhotoCalib(**calib) if calib else None
        planes.psf = _psf_from_table(hdul, source)
    else:
        planes.photo_calib = photo_calib_from_header(planes.headers, wcs)
    return planes


def _jwst_variance(hdul: fits.HDUList, source: str) -> np.ndarray | None:
    if "ERR" in hdul:
        error = _hdu_data(hdul["ERR"], source).astype(np.float64)
        return error * error
    parts = [name for name in ("VAR_POISSON", "VAR_RNOISE", "VAR_FLAT") if name in hdul]
    if {"VAR_POISSON", "VAR_RNOISE"} <= set(parts):
        logger.info("%s: no ERR HDU; variance = sum of %s", source, parts)
        return sum(_hdu_data(hdul[name], source).astype(np.float64) for name in parts)
    return None


def _read_jwst(hdul: fits.HDUList, source: str) -> _Planes:
    """SCI/ERR/DQ layout (JWST level-2/3 products)."""
    sci = hdul["SCI"]
    image = _hdu_data(sci, source).astype(np.float64)
    if image.ndim != 2:
        raise BadInputDataError(f"{source}: SCI HDU is not 2-D (shape {image.shape})")
    variance = _jwst_variance(hdul, source)
    if "DQ" in hdul:
        dq = _hdu_data(hdul["DQ"], source)
        _check_shapes({"SCI": image.shape, "DQ": dq.shape}, source)
        mask = mask_from_jwst_dq(dq)
    else:
        mask = np.zeros(image.shape, dtype=MASK_DTYPE)
    if variance is not None:
        _check_shapes({"SCI": image.shape, "ERR/VAR": variance.shape}, source)
    headers = [sci.header, hdul[0].header]
    wcs = wcs_from_header(sci.header, image.shape, source)
    planes = _Planes(image, variance, mask, headers, wcs)
    planes.photo_calib = photo_calib_from_header(headers, wcs)
    return planes


def _plain_hdu(hdul: fits.HDUList, hdu, source: str):
    if hdu is not None:
        chosen = _get_hdu(hdul, hdu, source)
        if len(_hdu_shape(chosen)) != 2:
            raise BadInputDataError(f"{source}: HDU {hdu!r} is not a 2-D image "
                                    f"(shape {_hdu_shape(chosen)})")
        return chosen
    for candidate in hdul:
        if len(_hdu_shape(candidate)) == 2:
            return candidate
    raise BadInputDataError(f"{source}: no 2-D image HDU found "
                            f"(HDUs: {[(h.name, _hdu_shape(h)) for h in hdul]})")


def _read_plain(hdul: fits.HDUList, source: str, hdu) -> _Planes:
    """Single image HDU; NaN → NO_DATA, saturation → SAT happen in :func:`_finish`."""
    chosen = _plain_hdu(hdul, hdu, source)
    image = _hdu_data(chosen, source).astype(np.float64)
    headers = [chosen.header] if chosen is hdul[0] else [chosen.header, hdul[0].header]
    wcs = wcs_from_header(chosen.header, image.shape, source)
    planes = _Planes(image, None, np.zeros(image.shape, dtype=MASK_DTYPE), headers, wcs)
    planes.photo_calib = photo_calib_from_header(headers, wcs)
    return planes


# ----------------------------------------------------------------------------------------------
# Companion files.
# ----------------------------------------------------------------------------------------------


def _single_noise_companion(**given) -> tuple[str, str] | None:
    present = {kind: path for kind, path in given.items() if path is not None}
    if len(present) > 1:
        raise ConfigurationError(f"give at most one of variance=, weight=, noise= (got "
                                 f"{sorted(present)})")
    if not present:
        return None
    kind, path = present.popitem()
    return kind, os.fspath(path)


def _companion_array(path: str, what: str, shape: tuple[int, int], source: str):
    with _open_fits(path, what=f"{what} file") as hdul:
        chosen = _plain_hdu(hdul, None, path)
        data = _hdu_data(chosen, path)
        header = chosen.header
    if data.shape != tuple(shape):
        raise BadInputDataError(f"{path}: {what} plane has shape {data.shape} but the image "
                                f"{source} has shape {tuple(shape)}")
    return data, header


def _unusable_variance(variance, *, allow_zero: bool = False):
    """Non-finite or negative variance (or zero, unless ``allow_zero``); numpy or dask."""
    with np.errstate(invalid="ignore"):
        usable = variance >= 0 if allow_zero else variance > 0
        return ~(np.isfinite(variance) & usable)


def _variance_from_companion(kind: str, path: str, shape, source: str) -> np.ndarray:
    data, _ = _companion_array(path, kind, shape, source)
    data = data.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "weight":
            variance = np.where(data > 0, 1.0 / data, np.nan)
        elif kind == "noise":
            variance = np.where(data > 0, data * data, np.nan)
        else:
            variance = data
    bad = int(np.count_nonzero(_unusable_variance(variance)))
    logger.info("%s: variance from %s file %s (%d pixels non-finite or not positive → NO_DATA)",
                source, kind, path, bad)
    return variance


def _mask_from_companion(path: str, shape, source: str) -> np.ndarray:
    data, header = _companion_array(path, "mask", shape, source)
    return mask_from_foreign(data, header, path)


def _resolve_psf(psf) -> PsfModel | None:
    if psf is None or isinstance(psf, PsfModel):
        return psf
    return read_psf_fits(psf)


# ----------------------------------------------------------------------------------------------
# Final assembly: flags, variance model, NO_DATA convention.
# ----------------------------------------------------------------------------------------------


def _flag_pixels(planes: _Planes, info: VisitInfo) -> None:
    """NaN/inf/fill → NO_DATA; at or above the saturation level → SAT (plain files)."""
    invalid = invalid_pixels(planes.image)
    planes.mask |= np.where(invalid, _NO_DATA, MASK_DTYPE(0))
    if math.isfinite(info.saturation):
        with np.errstate(invalid="ignore"):
            saturated = (planes.image >= info.saturation) & ~invalid
        planes.mask |= np.where(saturated, MASK_DTYPE(mask_value("SAT")), MASK_DTYPE(0))


def _gain_for_model(sky, info: VisitInfo, source: str) -> tuple[float, str]:
    found = "header"
    gain = info.gain
    if math.isfinite(gain) and gain > 0:
        return gain, found
    gain = effective_gain(sky, info.read_noise)
    if math.isfinite(gain):
        how = "sky level / sky variance" if not math.isfinite(info.read_noise) else (
            "sky level, sky variance and read noise")
        logger.info("%s: no gain in the header; effective gain %.4g e-/count estimated from %s "
                    "(sky %.4g, sky sigma %.4g)", source, gain, how, sky.level, sky.sigma)
        return gain, "estimated"
    logger.warning("%s: no gain in the header and the sky is subtracted (level %.4g, sigma %.4g): "
                   "cannot estimate a gain, so the variance is the sky variance alone and omits "
                   "the sources' photon noise", source, sky.level, sky.sigma)
    return math.nan, "none"


def _modelled_variance(planes: _Planes, info: VisitInfo, source: str) -> tuple[np.ndarray, VisitInfo]:
    usable = ~plane_set(planes.mask, _NOT_SKY)
    sky = sky_statistics(planes.image, usable)
    if sky.n_pixels < _MIN_SKY_PIXELS or not sky.sigma > 0:
        raise BadInputDataError(f"{source}: cannot model the variance ({sky.n_pixels} usable sky "
                                f"pixels, sky sigma {sky.sigma}); give a variance, weight or noise "
                                f"file")
    gain, origin = _gain_for_model(sky, info, source)
    note = ""
    if looks_sky_subtracted(sky):
        note = ("; the image looks sky-subtracted, so a Poisson variance from the image alone "
                "would underestimate the noise")
    elif origin == "header" and math.isfinite(info.read_noise):
        expected = sky.level / gain + (info.read_noise / gain) ** 2
        note = f"; GAIN/RDNOISE predict a sky variance of {expected:.4g}"
    logger.info("%s: no variance given; variance = measured sky variance %.4g (1.4826 MAD of %d "
                "clipped pixels, sky level %.4g) + max(image - sky, 0) / gain with gain %.4g (%s)%s",
                source, sky.variance, sky.n_pixels, sky.level, gain, origin, note)
    if origin == "estimated":
        info = info.replace(gain=gain)
    return model_variance(planes.image, sky, gain), info


def _check_not_empty(planes: _Planes, source: str) -> None:
    if bool(np.all((planes.mask & _NO_DATA) != 0)):
        raise BadInputDataError(f"{source}: image has no valid pixel (all NaN, inf, fill values or "
                                f"zero weight)")


def _apply_no_data(planes: _Planes) -> None:
    """NO_DATA convention: image 0 and variance 0 there (numpy or dask)."""
    no_data = (planes.mask & _NO_DATA) != 0
    planes.image = np.where(no_data, 0.0, planes.image)
    planes.variance = np.where(no_data, 0.0, planes.variance)


def _sanitize_lazy(planes: _Planes) -> None:
    """Element-wise NO_DATA flags for lazily read planes (no global statistics)."""
    bad = invalid_pixels(planes.image) | _unusable_variance(planes.variance, allow_zero=True)
    planes.mask = planes.mask | np.where(bad, _NO_DATA, MASK_DTYPE(0))


def _finish_eager(planes: _Planes, layout: str, source: str,
                  noise_companion: tuple[str, str] | None, mask_path) -> None:
    """Flags, companions and (if needed) the variance model for numpy planes."""
    if layout == "plain":
        _flag_pixels(planes, planes.info)
    else:
        planes.mask |= np.where(invalid_pixels(planes.image), _NO_DATA, MASK_DTYPE(0))
    if mask_path is not None:
        planes.mask |= _mask_from_companion(os.fspath(mask_path), planes.shape, source)
    if noise_companion is not None:
        planes.variance = _variance_from_companion(*noise_companion, planes.shape, source)
    if planes.variance is not None:
        # Our own files store variance 0 legitimately (NO_DATA, noiseless simulations);
        # a zero variance (zero weight) from anywhere else means "no data".
        allow_zero = layout == "mef" and noise_companion is None
        unusable = _unusable_variance(planes.variance, allow_zero=allow_zero)
        planes.mask |= np.where(unusable, _NO_DATA, MASK_DTYPE(0))
    _check_not_empty(planes, source)
    if planes.variance is None:
        planes.variance, planes.info = _modelled_variance(planes, planes.info, source)


# ----------------------------------------------------------------------------------------------
# Public readers.
# ----------------------------------------------------------------------------------------------


def read_exposure(path: str | os.PathLike, *, variance: str | os.PathLike | None = None,
                  weight: str | os.PathLike | None = None, noise: str | os.PathLike | None = None,
                  mask: str | os.PathLike | None = None,
                  psf: str | os.PathLike | PsfModel | None = None, hdu: int | str | None = None,
                  chunks: int | tuple[int, int] | None = None) -> Exposure:
    """Read an exposure from FITS, detecting the layout (see the module notes).

    Parameters
    ----------
    path : str or os.PathLike
        The FITS file.
    variance, weight, noise : str or os.PathLike, optional
        Companion file with the variance (counts²), the inverse variance, or
        the 1σ noise (counts); at most one. Replaces any variance in the file.
    mask : str or os.PathLike, optional
        Companion mask; its planes are OR-ed into the mask (``MP_*`` cards →
        by name, otherwise nonzero → ``BAD``).
    psf : str, os.PathLike or PsfModel, optional
        PSF model, or a FITS file for :func:`read_psf_fits`. Replaces any PSF
        in the file.
    hdu : int or str, optional
        Read this HDU as a plain image (disables layout detection).
    chunks : int or (int, int), optional
        Return a dask-backed exposure with these chunks.

    Returns
    -------
    Exposure

    Raises
    ------
    MissingInputError
        If the file or a companion file does not exist.
    BadInputDataError
        For unreadable files, missing HDUs, planes of different shapes,
        images without a valid pixel, bad WCS, or when no variance can be
        modelled.
    ConfigurationError
        If more than one of ``variance``, ``weight``, ``noise`` is given.
    """
    source = os.fspath(path)
    noise_companion = _single_noise_companion(variance=variance, weight=weight, noise=noise)
    with _open_fits(source) as hdul:
        layout = _layout(hdul, hdu)
        lazy = layout == "mef" and chunks is not None and noise_companion is None and mask is None
        if layout == "mef":
            planes = _read_mef(hdul, source, chunks if lazy else None)
        elif layout == "jwst":
            planes = _read_jwst(hdul, source)
        else:
            planes = _read_plain(hdul, source, hdu)
    if planes.info is None:
        planes.info = visit_info_from_header(planes.headers, source)
    if lazy:
        _sanitize_lazy(planes)
    else:
        _finish_eager(planes, layout, source, noise_companion, mask)
    _apply_no_data(planes)
    psf_model = _resolve_psf(psf) if psf is not None else planes.psf
    exposure = Exposure.from_arrays(planes.image, planes.variance, planes.mask, wcs=planes.wcs,
                                    psf=psf_model, photo_calib=planes.photo_calib, info=planes.info,
                                    origin=planes.origin, chunks=None if lazy else chunks)
    logger.debug("%s: read %s layout: %r", source, layout, exposure)
    return exposure


def read_psf_fits(path: str | os.PathLike) -> PsfModel:
    """Read a PSF model written by :func:`write_psf_fits`, or any PSF stamp image.

    Files with a ``PSF`` table give back the exact model. Otherwise the stamp
    is the ``DET_SAMP`` HDU when present (WebbPSF's detector-sampled PSF), else
    the first 2-D image HDU; it is zero-padded to an odd square if needed and
    becomes an :class:`~diffim_dask.psf.ImagePsf` (normalised, re-centred on its
    centroid).

    Raises
    ------
    MissingInputError
        If the file does not exist.
    BadInputDataError
        If it holds no usable PSF.
    """
    source = os.fspath(path)
    with _open_fits(source, what="PSF file") as hdul:
        model = _psf_from_table(hdul, source)
        if model is not None:
            return model
        chosen = hdul["DET_SAMP"] if "DET_SAMP" in hdul else _plain_hdu(hdul, None, source)
        stamp = _hdu_data(chosen, source).astype(np.float64)
    try:
        return ImagePsf(_odd_square(stamp))
    except DiffimError as exc:
        raise BadInputDataError(f"{source}: unusable PSF stamp: {exc}") from exc


def _odd_square(stamp: np.ndarray) -> np.ndarray:
    """Zero-pad a stamp at its high ends to an odd square (ImagePsf re-centres it)."""
    if stamp.ndim != 2:
        raise BadInputDataError(f"PSF stamp must be 2-D, got shape {stamp.shape}")
    side = max(stamp.shape)
    side += 1 - side % 2
    return np.pad(stamp, ((0, side - stamp.shape[0]), (0, side - stamp.shape[1])))


# ----------------------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------------------


def _set_if_known(header: fits.Header, key: str, value, comment: str) -> None:
    if isinstance(value, str):
        if value:
            header[key] = (value, comment)
    elif value is not None and math.isfinite(value):
        header[key] = (value, comment)


def _to_json(data: dict) -> str:
    """JSON text; numpy scalars become Python numbers (``repr`` precision: lossless)."""
    return json.dumps(data, default=lambda value: value.item() if isinstance(value, np.generic)
                      else str(value))


def _primary_header(exposure: Exposure) -> fits.Header:
    """Readable metadata cards plus lossless JSON of VisitInfo and PhotoCalib."""
    info, calib = exposure.info, exposure.photo_calib
    header = fits.Header()
    header["DDFORMAT"] = (FORMAT_NAME, "file layout written by diffim_dask")
    header["DDVERSN"] = (_FORMAT_VERSION, "layout version")
    _set_if_known(header, "INSTRUME", info.instrument, "instrument")
    _set_if_known(header, "FILTER", info.band, "band")
    header["VISIT"] = (int(info.visit), "visit id")
    header["DETECTOR"] = (int(info.detector), "detector id")
    _set_if_known(header, "MJD-MID", info.mjd, "[d] MJD at mid-exposure")
    _set_if_known(header, "EXPTIME", info.exposure_time, "[s] exposure time")
    _set_if_known(header, "GAIN", info.gain, "[e-/count] gain")
    _set_if_known(header, "RDNOISE", info.read_noise, "[e-] read noise")
    _set_if_known(header, "SATURATE", info.saturation, "[count] saturation level")
    _set_if_known(header, "AIRMASS", info.airmass, "airmass at mid-exposure")
    _set_if_known(header, "PARANG", info.parallactic_angle, "[deg] parallactic angle")
    if calib is not None:
        _set_if_known(header, "MAGZERO", calib.zero_point, "[mag] AB magnitude of one count")
        _set_if_known(header, "MAGZERR", calib.zero_point_err, "[mag] zero-point uncertainty")
    # Long JSON strings span CONTINUE cards; a comment there could overflow a card (VerifyWarning).
    header["COMMENT"] = "DDINFO, DDCALIB: VisitInfo and PhotoCalib as JSON (lossless)"
    header["DDINFO"] = _to_json(info.to_dict())
    header["DDCALIB"] = _to_json(calib.to_dict()) if calib is not None else ""
    return header


def _pixel_frame_header(wcs: WCS | None, x0: int, y0: int) -> fits.Header:
    """WCS of an HDU whose first pixel is parent pixel (x0, y0), plus LTV and LSST's 'A' WCS."""
    header = fits.Header()
    if wcs is not None:
        header.extend(offset_pixel_frame(wcs, x0, y0).to_header(relax=True))
    header["LTV1"] = (-x0, "parent x = image x - LTV1")
    header["LTV2"] = (-y0, "parent y = image y - LTV2")
    header["LTM1_1"] = 1.0
    header["LTM2_2"] = 1.0
    header["WCSNAMEA"] = ("PARENT", "parent-frame pixel positions (LSST xy0)")
    for axis, start in ((1, x0), (2, y0)):
        header[f"CTYPE{axis}A"] = "LINEAR"
        header[f"CUNIT{axis}A"] = "PIXEL"
        header[f"CRPIX{axis}A"] = 1.0
        header[f"CRVAL{axis}A"] = start
    return header


def _psf_table(psf: PsfModel) -> fits.BinTableHDU:
    text = _to_json(psf.to_dict())
    column = fits.Column(name=_PSF_COLUMN, format=f"{len(text)}A", array=np.array([text]))
    table = fits.BinTableHDU.from_columns([column], name=_PSF_HDU)
    table.header["PSFTYPE"] = (type(psf).__name__, "PSF model class")
    table.header["PSFFWHM"] = (float(psf.fwhm()), "[pixel] FWHM at the reference position")
    return table


def _exposure_hdus(exposure: Exposure) -> fits.HDUList:
    image, variance, mask = exposure.arrays()
    x0, y0 = exposure.origin
    frame = _pixel_frame_header(exposure.wcs, x0, y0)
    mask_header = frame.copy()
    mask_header.extend(mask_plane_cards())
    hdus = [
        fits.PrimaryHDU(header=_primary_header(exposure)),
        fits.ImageHDU(np.ascontiguousarray(image, dtype=np.float32), header=frame.copy(), name="IMAGE"),
        fits.ImageHDU(np.ascontiguousarray(mask, dtype=MASK_DTYPE).view(np.int32), header=mask_header,
                      name="MASK"),
        fits.ImageHDU(np.ascontiguousarray(variance, dtype=np.float32), header=frame.copy(),
                      name="VARIANCE"),
    ]
    if exposure.psf is not None:
        hdus.append(_psf_table(exposure.psf))
    return fits.HDUList(hdus)


def write_exposure_fits(exposure: Exposure, path: str | os.PathLike, *,
                        overwrite: bool = False) -> None:
    """Write an exposure as an LSST-style multi-extension FITS file, atomically.

    Parameters
    ----------
    exposure : Exposure
        Dask-backed exposures are computed.
    path : str or os.PathLike
        Output file; written to a temporary file in the same directory first.
    overwrite : bool
        Replace an existing file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    hdus = _exposure_hdus(exposure)
    with atomic_output_path(path, overwrite=overwrite) as temporary:
        hdus.writeto(temporary, checksum=True)


def write_psf_fits(psf: PsfModel, path: str | os.PathLike, *, overwrite: bool = False,
                   position: tuple[float, float] | None = None, size: int | None = None) -> None:
    """Write a PSF model: its stamp as the primary image plus the exact model as a table.

    Any FITS reader sees the stamp at ``position`` (default: the model's
    reference position); :func:`read_psf_fits` restores the model itself.

    Parameters
    ----------
    psf : PsfModel
        The model.
    path : str or os.PathLike
        Output file (written atomically).
    overwrite : bool
        Replace an existing file.
    position : (float, float), optional
        Where to render the stamp.
    size : int, optional
        Odd stamp size (default: the model's).
    """
    x, y = position if position is not None else psf.reference_position
    primary = fits.PrimaryHDU(psf.image(x, y, size))
    primary.header["PSFTYPE"] = (type(psf).__name__, "PSF model class")
    primary.header["PSFX"] = (float(x), "[pixel] position of the stamp")
    primary.header["PSFY"] = (float(y), "[pixel] position of the stamp")
    primary.header["PSFFWHM"] = (float(psf.fwhm(x, y)), "[pixel] FWHM at that position")
    with atomic_output_path(path, overwrite=overwrite) as temporary:
        fits.HDUList([primary, _psf_table(psf)]).writeto(temporary, checksum=True)
