"""Celestial WCS from FITS headers: parsing, validation and pixel-frame offsets.

TPV (the DECam community pipeline's ``RA---TPV``/``DEC--TPV`` polynomial
distortion) needs no special handling, and no particular astropy major
version: WCSLIB, which :mod:`astropy.wcs` wraps, has implemented TPV since
its 5.x series (2015; astropy PR #3905 is where DECam TPV images started to
load correctly, and astropy PR #14295 later also mapped SCAMP's ``-TAN`` +
``PVi_5+`` headers to TPV). WCSLIB turns TPV into a TAN projection with a
polynomial distortion applied by every transformation, and
:meth:`astropy.wcs.WCS.to_header` writes the ``PV`` cards back. Verified here
with astropy 8.0.2 / WCSLIB 8.6: the DECam test frames put the known variable
star at pixel (129, 128) on RA 318.1081°, Dec −66.0158°, as documented, while
dropping the PV terms moves it by more than a degree; a TPV WCS survives
``to_header`` → ``WCS`` exactly. SIP (``-SIP`` suffix with ``A_p_q``/``B_p_q``)
is also handled. Both distortions are defined relative to ``CRPIX``, so moving
the pixel frame only moves ``CRPIX`` (and the SIP reference pixel).

``to_header`` writes 12–13 significant digits, i.e. ~1e-11 degree on the sky
after a FITS or Zarr round trip.

Header parsing runs with ``relax=True``; astropy's ``FITSFixedWarning`` notes
(e.g. "set MJD-OBS from DATE-OBS") are logged at DEBUG level instead of being
raised as warnings.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning, Sip

from ..errors import BadInputDataError
from ._warnings import captured_warnings

__all__ = ["wcs_from_header", "offset_pixel_frame", "has_wcs_cards"]

logger = logging.getLogger("diffim_dask.io")

_WCS_CARDS = ("CTYPE1", "CTYPE2", "CD1_1", "PC1_1", "CRVAL1")


def has_wcs_cards(header: fits.Header) -> bool:
    """Whether a header carries a primary WCS at all (any of CTYPEi, CDi_j, PCi_j, CRVALi)."""
    return any(key in header for key in _WCS_CARDS)


def _parse(header: fits.Header, source: str) -> WCS:
    with captured_warnings() as caught:
        try:
            wcs = WCS(header, relax=True)
        except Exception as exc:  # astropy raises many types for bad WCS cards
            raise BadInputDataError(f"{source}: invalid WCS in header ({type(exc).__name__}: "
                                    f"{exc})") from exc
    for item in caught:
        if issubclass(item.category, FITSFixedWarning):
            logger.debug("%s: WCS fix-up: %s", source, item.message)
        else:
            logger.info("%s: WCS warning: %s", source, item.message)
    return wcs


def _check_at_centre(wcs: WCS, shape: tuple[int, int], source: str) -> None:
    ny, nx = shape
    x, y = (nx - 1) / 2.0, (ny - 1) / 2.0
    try:
        with captured_warnings():
            world = copy.deepcopy(wcs).all_pix2world(np.array([x]), np.array([y]), 0)
    except Exception as exc:
        raise BadInputDataError(f"{source}: WCS cannot transform the image centre ({x}, {y}): "
                                f"{exc}") from exc
    if not np.all(np.isfinite(world)):
        raise BadInputDataError(f"{source}: WCS gives non-finite sky coordinates at the image "
                                f"centre ({x}, {y})")


def wcs_from_header(header: fits.Header, shape: tuple[int, int], source: str) -> WCS | None:
    """Celestial WCS of an image HDU, or None when the header has no WCS.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The image HDU's header.
    shape : (int, int)
        ``(ny, nx)`` of the image, for the validity check at its centre.
    source : str
        File name used in error messages.

    Raises
    ------
    BadInputDataError
        If the WCS cards cannot be parsed, describe no celestial axes, or give
        non-finite coordinates at the image centre.
    """
    if not has_wcs_cards(header):
        return None
    wcs = _parse(header, source)
    if not wcs.has_celestial:
        raise BadInputDataError(f"{source}: header WCS is not celestial (CTYPE = "
                                f"{list(wcs.wcs.ctype)})")
    if wcs.naxis != 2:
        logger.info("%s: keeping the celestial axes of a %d-axis WCS", source, wcs.naxis)
        wcs = wcs.celestial
    _check_at_centre(wcs, shape, source)
    return wcs


def offset_pixel_frame(wcs: WCS | None, dx: float, dy: float) -> WCS | None:
    """WCS ``W'`` with ``W'(x, y) = W(x + dx, y + dy)`` (a copy; None stays None).

    Writing a cut-out whose first pixel sits at parent position ``(x0, y0)``
    uses ``dx, dy = x0, y0``; reading it back uses ``-x0, -y0``.

    Raises
    ------
    BadInputDataError
        For lookup-table distortions (``CPDIS``/``D2IMDIS``), whose reference
        pixels this function does not move.
    """
    if wcs is None:
        return None
    out = copy.deepcopy(wcs)
    if dx == 0 and dy == 0:
        return out
    if any(getattr(out, name, None) is not None for name in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        raise BadInputDataError("cannot move the pixel frame of a WCS with lookup-table distortions")
    shift = np.array([dx, dy], dtype=np.float64)
    out.wcs.crpix = out.wcs.crpix - shift
    if out.sip is not None:
        sip = out.sip
        out.sip = Sip(sip.a, sip.b, sip.ap, sip.bp, np.asarray(sip.crpix) - shift)
    out.wcs.set()
    return out
