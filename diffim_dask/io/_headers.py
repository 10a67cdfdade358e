"""Observatory header keywords: the one table of synonyms and the parsers that use it.

Header conventions differ between observatories. :data:`HEADER_SYNONYMS` lists,
for every :class:`~diffim_dask.exposure.VisitInfo` field (and the zero point and
seeing), the keywords that may carry it, in priority order; the first keyword
present with a usable value wins. The table covers the real DECam (NOIRLab
community pipeline + SWarp cut-outs) and ZTF alert-stamp headers of the test
data, JWST level-2/3 conventions and common synonyms.

Conventions worth knowing
-------------------------
* **Times.** :attr:`VisitInfo.mjd` is *mid-exposure*. ``MJD-MID`` and ``EXPMID``
  already are; ``MJD-OBS``, ``OBSMJD``, ``EXPSTART`` and ``MJD-BEG`` mark the
  start of the exposure, so half the exposure time is added when it is known
  (:data:`MJD_START_KEYWORDS`). ZTF's ``MJD-OBS`` (from the alert's ``jd``) is the
  start of the exposure too.
* **Saturation.** ``ESATUR`` (the "effective" saturation after sky subtraction
  written by the SFFT preprocessing of the DECam test frames) is preferred over
  ``SATURATE``: on a sky-subtracted image a saturated pixel holds
  ``SATURATE - sky``, so flagging at ``SATURATE`` would miss it.
* **Band.** The first word of ``FILTER`` (DECam: ``"i DECam SDSS c0003 7835.0
  1470.0"`` → ``"i"``); a ``ZTF_`` prefix is dropped; ZTF's numeric ``FID``
  maps 1, 2, 3 → g, r, i. JWST filter names (``F200W``) are kept as they are.
* **Visit.** ``EXPNUM`` / ``VISIT_ID`` / ``VISIT`` as integers (not ZTF's
  ``CANDID``: it names an alert, not an exposure, and is too large for a
  ``diaSourceId``); for DECam cut-outs without ``EXPNUM`` the exposure basename
  ``EXP_BN = 'c4d_YYMMDD_HHMMSS_...'`` gives ``YYMMDDHHMMSS``.
* **Detector.** ``CCDNUM`` (DECam), an *integer* ``DETECTOR`` (JWST's
  ``'NRCA1'`` and DECam's serial-number string are skipped), ``RCID`` (ZTF
  readout channel).
* **Zero point.** The magnitude keywords are taken as the AB magnitude of one
  count in the whole exposure (what ZTF's ``MAGZPSCI`` means). Without one,
  ``BUNIT`` gives it for calibrated units: ``MJy/sr`` (JWST, with the pixel
  solid angle ``PIXAR_SR``/``PIXAR_A2`` or the WCS), ``DN/s`` with ``PHOTMJSR``,
  ``nJy``, ``uJy``, ``Jy``.
* **Seeing.** :func:`seeing_fwhm_pixels` reads ``FWHM``/``FWHM_AVE``/``SEEING``.
  Units are ambiguous in practice: a card comment mentioning ``arcsec`` or
  ``pix`` decides; otherwise ``FWHM*`` are taken as pixels (DECam community
  pipeline, SExtractor, ZTF) and ``SEEING`` as arcseconds, converted with the
  WCS pixel scale (or ``PIXSCALE``/``SECPIX``). It exists so that tests can
  compare a PSF estimate with the header; estimators must never read it.

Values that are missing, non-numeric where a number is expected, non-finite or
out of range (e.g. ZTF's ``-999`` nulls, non-positive gains) are skipped and the
next synonym is tried.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from astropy.io import fits

from ..exposure import PhotoCalib, VisitInfo

__all__ = [
    "HEADER_SYNONYMS",
    "MJD_START_KEYWORDS",
    "ZTF_FILTER_IDS",
    "header_value",
    "visit_info_from_header",
    "photo_calib_from_header",
    "seeing_fwhm_pixels",
]

logger = logging.getLogger("diffim_dask.io")

#: For each quantity, the header keywords that may carry it, highest priority first.
HEADER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "visit": ("EXPNUM", "VISIT_ID", "VISIT", "EXP_BN"),
    "detector": ("CCDNUM", "DETECTOR", "RCID"),
    "band": ("FILTER", "BAND", "FILTNAME", "FID"),
    "mjd": ("MJD-MID", "EXPMID", "MJD-OBS", "OBSMJD", "EXPSTART", "MJD-BEG"),
    "exposure_time": ("EFFEXPTM", "XPOSURE", "EXPTIME", "EXPOSURE"),
    "gain": ("GAIN", "EGAIN", "GAINA"),
    "read_noise": ("RDNOISE", "READNOI", "RDNOISEA"),
    "saturation": ("ESATUR", "SATURATE", "SATURATN", "SATURATA"),
    "airmass": ("AIRMASS", "SECZ"),
    "parallactic_angle": ("PARANG", "PA"),
    "instrument": ("INSTRUME", "TELESCOP"),
    "zero_point": ("MAGZERO", "MAGZP", "MAGZPT", "MAGZPSCI", "ZP", "PHOTZP"),
    "zero_point_err": ("MAGZERR", "MAGZPUNC", "MAGZPERR", "ZPERR", "PHOTZPER"),
    "seeing": ("FWHM", "FWHM_AVE", "SEEING"),
    "pixel_scale": ("PIXSCALE", "PIXSCAL1", "SECPIX"),
}

#: MJD keywords that mark the *start* of the exposure (mid = start + exposure_time / 2).
MJD_START_KEYWORDS = frozenset({"MJD-OBS", "OBSMJD", "EXPSTART", "MJD-BEG"})

#: ZTF filter ids (``FID``) → band.
ZTF_FILTER_IDS = {1: "g", 2: "r", 3: "i"}

#: Seeing keywords whose value is in arcseconds unless the card comment says otherwise.
_ARCSEC_BY_DEFAULT = frozenset({"SEEING"})

_DECAM_BASENAME = re.compile(r"^c4d_(\d{6})_(\d{6})")
_SECONDS_PER_DAY = 86400.0
_ARCSEC_PER_RADIAN = 180.0 / math.pi * 3600.0
_AB_JY_ZERO_POINT = 8.9  # m_AB = -2.5 log10(f / Jy) + 8.90

HeaderLike = fits.Header | Sequence[fits.Header]


# ----------------------------------------------------------------------------------------------
# Value parsers: return the parsed value or None when the card is unusable.
# ----------------------------------------------------------------------------------------------


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _positive(value: Any) -> float | None:
    out = _as_float(value)
    return out if out is not None and out > 0 else None


def _non_negative(value: Any) -> float | None:
    out = _as_float(value)
    return out if out is not None and out >= 0 else None


def _airmass(value: Any) -> float | None:
    out = _as_float(value)
    return out if out is not None and 1.0 <= out < 100.0 else None


def _zero_point(value: Any) -> float | None:
    out = _as_float(value)
    return out if out is not None and 0.0 < out < 60.0 else None


def _mjd(value: Any) -> float | None:
    out = _positive(value)
    if out is not None and out > 2_400_000.5:  # a Julian date slipped into an MJD keyword
        out -= 2_400_000.5
    return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _visit(value: Any) -> int | None:
    number = _as_int(value)
    if number is not None:
        return number if number >= 0 else None
    if isinstance(value, str):
        match = _DECAM_BASENAME.match(value.strip())
        if match:
            return int(match.group(1) + match.group(2))
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _band(value: Any) -> str | None:
    """Band name from a FILTER-like card (or a ZTF numeric FID)."""
    number = _as_int(value)
    if number is not None:
        return ZTF_FILTER_IDS.get(number, str(number))
    text = _text(value)
    if text is None:
        return None
    token = text.split()[0]
    if token.upper().startswith("ZTF_"):
        token = token[4:]
    return token or None


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "visit": _visit,
    "detector": _as_int,
    "band": _band,
    "mjd": _mjd,
    "exposure_time": _non_negative,
    "gain": _positive,
    "read_noise": _non_negative,
    "saturation": _positive,
    "airmass": _airmass,
    "parallactic_angle": _as_float,
    "instrument": _text,
    "zero_point": _zero_point,
    "zero_point_err": _non_negative,
    "seeing": _positive,
    "pixel_scale": _positive,
}


# ----------------------------------------------------------------------------------------------
# Lookup.
# ----------------------------------------------------------------------------------------------


def _as_header_list(header: HeaderLike) -> list[fits.Header]:
    if isinstance(header, fits.Header):
        return [header]
    return [h for h in header if h is not None]


def _card(headers: list[fits.Header], keyword: str) -> tuple[Any, str] | None:
    """Value and comment of ``keyword`` in the first header holding it with a value."""
    for header in headers:
        if keyword in header:
            value = header[keyword]
            if isinstance(value, fits.card.Undefined):
                continue
            return value, header.comments[keyword]
    return None


def header_value(header: HeaderLike, quantity: str) -> tuple[Any, str] | None:
    """First usable value of ``quantity`` among its synonyms.

    Parameters
    ----------
    header : astropy.io.fits.Header or sequence of Header
        One header, or several searched in order (e.g. an extension header
        before the primary header).
    quantity : str
        A key of :data:`HEADER_SYNONYMS`.

    Returns
    -------
    (value, keyword) or None
        The parsed value and the keyword it came from.
    """
    headers = _as_header_list(header)
    parse = _PARSERS[quantity]
    for keyword in HEADER_SYNONYMS[quantity]:
        card = _card(headers, keyword)
        if card is None:
            continue
        value = parse(card[0])
        if value is not None:
            return value, keyword
    return None


def _value(headers: list[fits.Header], quantity: str, default: Any) -> Any:
    found = header_value(headers, quantity)
    return default if found is None else found[0]


# ----------------------------------------------------------------------------------------------
# VisitInfo, PhotoCalib, seeing.
# ----------------------------------------------------------------------------------------------


def _mid_exposure_mjd(headers: list[fits.Header], exposure_time: float, source: str) -> float:
    found = header_value(headers, "mjd")
    if found is None:
        return math.nan
    mjd, keyword = found
    if keyword in MJD_START_KEYWORDS:
        if math.isfinite(exposure_time):
            return mjd + 0.5 * exposure_time / _SECONDS_PER_DAY
        logger.info("%s%s gives the exposure start and no exposure time is known: using it as "
                    "the mid-exposure MJD", f"{source}: " if source else "", keyword)
    return mjd


def visit_info_from_header(header: HeaderLike, source: str = "") -> VisitInfo:
    """Observation metadata from a FITS header using :data:`HEADER_SYNONYMS`.

    Parameters
    ----------
    header : astropy.io.fits.Header or sequence of Header
        Searched in order (put the image-extension header before the primary).
    source : str, optional
        File name for log lines.

    Returns
    -------
    VisitInfo
        Unknown fields keep their defaults (0, ``""`` or NaN).
    """
    headers = _as_header_list(header)
    exposure_time = _value(headers, "exposure_time", math.nan)
    return VisitInfo(
        visit=_value(headers, "visit", 0),
        detector=_value(headers, "detector", 0),
        band=_value(headers, "band", ""),
        mjd=_mid_exposure_mjd(headers, exposure_time, source),
        exposure_time=exposure_time,
        gain=_value(headers, "gain", math.nan),
        read_noise=_value(headers, "read_noise", math.nan),
        saturation=_value(headers, "saturation", math.nan),
        airmass=_value(headers, "airmass", math.nan),
        parallactic_angle=_value(headers, "parallactic_angle", math.nan),
        instrument=_value(headers, "instrument", ""),
    )


def _pixel_solid_angle(headers: list[fits.Header], wcs) -> float | None:
    """Pixel solid angle in steradians from PIXAR_SR, PIXAR_A2 or the WCS."""
    card = _card(headers, "PIXAR_SR")
    if card is not None and _positive(card[0]):
        return _positive(card[0])
    card = _card(headers, "PIXAR_A2")
    if card is not None and _positive(card[0]):
        return _positive(card[0]) / _ARCSEC_PER_RADIAN ** 2
    if wcs is not None and wcs.has_celestial:
        from astropy.wcs.utils import proj_plane_pixel_area

        area_deg2 = float(proj_plane_pixel_area(wcs.celestial))
        return area_deg2 * (math.pi / 180.0) ** 2
    return None


def _zero_point_from_bunit(headers: list[fits.Header], wcs) -> tuple[float, str] | None:
    """AB zero point of one image unit for calibrated BUNIT values."""
    card = _card(headers, "BUNIT")
    if card is None or not isinstance(card[0], str):
        return None
    unit = card[0].strip().replace(" ", "").lower()
    per_jy = {"njy": 1e-9, "ujy": 1e-6, "microjy": 1e-6, "jy": 1.0}
    if unit in per_jy:
        return _AB_JY_ZERO_POINT - 2.5 * math.log10(per_jy[unit]), f"BUNIT={card[0]!r}"
    if unit in ("mjy/sr", "mjy/steradian"):
        jy_per_unit = 1e6
        how = f"BUNIT={card[0]!r}"
    elif unit in ("dn/s", "counts/s", "dn/sec") and _card(headers, "PHOTMJSR") is not None:
        photmjsr = _positive(_card(headers, "PHOTMJSR")[0])
        if photmjsr is None:
            return None
        jy_per_unit = 1e6 * photmjsr
        how = f"BUNIT={card[0]!r} with PHOTMJSR={photmjsr}"
    else:
        return None
    solid_angle = _pixel_solid_angle(headers, wcs)
    if solid_angle is None:
        logger.info("%s but no pixel solid angle (PIXAR_SR, PIXAR_A2 or a WCS): no zero point", how)
        return None
    return _AB_JY_ZERO_POINT - 2.5 * math.log10(jy_per_unit * solid_angle), how


def photo_calib_from_header(header: HeaderLike, wcs=None) -> PhotoCalib | None:
    """Photometric zero point from a header, or None when it has none.

    A zero-point keyword (:data:`HEADER_SYNONYMS` ``["zero_point"]``) wins;
    otherwise calibrated ``BUNIT`` values give it (``MJy/sr``:
    ``ZP = 8.90 - 2.5 log10(1e6 Ω)`` with the pixel solid angle Ω in sr;
    ``DN/s`` with ``PHOTMJSR``: ``ZP = 8.90 - 2.5 log10(PHOTMJSR 1e6 Ω)``;
    ``nJy``: 31.4).

    Parameters
    ----------
    header : astropy.io.fits.Header or sequence of Header
        Searched in order.
    wcs : astropy.wcs.WCS, optional
        Used for the pixel solid angle when the header gives none.
    """
    headers = _as_header_list(header)
    found = header_value(headers, "zero_point")
    error = _value(headers, "zero_point_err", 0.0)
    if found is not None:
        return PhotoCalib(zero_point=found[0], zero_point_err=error)
    from_unit = _zero_point_from_bunit(headers, wcs)
    if from_unit is None:
        return None
    logger.info("zero point %.4f (AB mag of one image unit) from %s", from_unit[0], from_unit[1])
    return PhotoCalib(zero_point=from_unit[0], zero_point_err=error)


def _pixel_scale_arcsec(headers: list[fits.Header], wcs) -> float | None:
    if wcs is not None and wcs.has_celestial:
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.sqrt(np.prod(proj_plane_pixel_scales(wcs.celestial)))) * 3600.0
    return _value(headers, "pixel_scale", None)


def _seeing_unit(keyword: str, comment: str) -> str:
    comment = comment.lower()
    if "arcsec" in comment or '"' in comment:
        return "arcsec"
    if "pix" in comment:
        return "pixel"
    return "arcsec" if keyword in _ARCSEC_BY_DEFAULT else "pixel"


def seeing_fwhm_pixels(header: HeaderLike, wcs=None) -> float | None:
    """The header's seeing FWHM in pixels, for *comparison* with a PSF estimate.

    Reads ``FWHM``, ``FWHM_AVE`` or ``SEEING``. The unit comes from the card
    comment when it mentions ``arcsec`` or ``pix``; otherwise ``FWHM*`` keywords
    are taken as pixels and ``SEEING`` as arcseconds (this is a convention, not
    a standard: check new instruments). Arcseconds are converted with the WCS
    pixel scale, else ``PIXSCALE``/``PIXSCAL1``/``SECPIX``.

    PSF estimators must never call this; it is the header's claim, not a
    measurement.

    Parameters
    ----------
    header : astropy.io.fits.Header or sequence of Header
        Searched in order.
    wcs : astropy.wcs.WCS, optional
        Gives the pixel scale for arcsecond values.

    Returns
    -------
    float or None
        FWHM in pixels; None when no keyword is present or an arcsecond value
        cannot be converted.
    """
    headers = _as_header_list(header)
    found = header_value(headers, "seeing")
    if found is None:
        return None
    value, keyword = found
    comment = _card(headers, keyword)[1]
    if _seeing_unit(keyword, comment) == "pixel":
        return value
    scale = _pixel_scale_arcsec(headers, wcs)
    if scale is None:
        logger.info("%s=%s is in arcsec but no pixel scale is known: no seeing in pixels",
                    keyword, value)
        return None
    return value / scale
