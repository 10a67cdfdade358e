"""Helpers for I/O tests: a fully populated synthetic exposure and a strict comparison.

Kept in the package (private) so that the FITS and Zarr test modules share one
definition of "lossless round trip".
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
from astropy.wcs import WCS, Sip

from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, mask_value
from ..psf.models import GaussianPsf, PsfModel

__all__ = [
    "sip_wcs",
    "make_test_exposure",
    "sky_probe_points",
    "max_sky_separation_deg",
    "assert_exposures_equal",
]


def sip_wcs(crpix=(40.0, 30.0), crval=(150.1234567890123, 2.3456789012345)) -> WCS:
    """A TAN-SIP WCS (0.2"/px, slightly rotated, second-order distortion)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.crval = list(crval)
    scale = 0.2 / 3600.0
    angle = math.radians(12.345)
    wcs.wcs.cd = scale * np.array([[-math.cos(angle), math.sin(angle)],
                                   [math.sin(angle), math.cos(angle)]])
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], a[1, 1], a[0, 2] = 2.1e-6, -1.3e-6, 0.7e-6
    b[2, 0], b[1, 1], b[0, 2] = -0.4e-6, 1.9e-6, 1.1e-6
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def make_test_exposure(rng: np.random.Generator, *, shape=(48, 64), origin=(37, -12),
                       wcs: WCS | None | str = "sip", psf: PsfModel | None | str = "gaussian",
                       visit: int = 123456, detector: int = 42) -> Exposure:
    """Synthetic exposure with every attribute populated (for round-trip tests).

    The mask uses low and high planes, including ``NO_DATA`` pixels that carry
    image 0 and variance 0 as the convention requires.
    """
    ny, nx = shape
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    variance = rng.uniform(80.0, 120.0, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=MASK_DTYPE)
    mask[rng.random(shape) < 0.05] |= MASK_DTYPE(mask_value("CR"))
    mask[rng.random(shape) < 0.05] |= MASK_DTYPE(mask_value(["SAT", "INJECTED_TEMPLATE"]))
    mask[: ny // 8, : nx // 8] = MASK_DTYPE(mask_value("NO_DATA"))
    image[: ny // 8, : nx // 8] = 0.0
    variance[: ny // 8, : nx // 8] = 0.0
    if wcs == "sip":
        wcs = sip_wcs(crpix=(origin[0] + nx / 2.0 + 3.25, origin[1] + ny / 2.0 - 5.5))
    if psf == "gaussian":
        psf = GaussianPsf(3.1, ellipticity=0.12, position_angle=33.0,
                          fwhm_variation=(0.05, -0.02, 0.01), reference=(origin[0] + nx / 2,
                                                                         origin[1] + ny / 2),
                          scale=(nx, ny))
    info = VisitInfo(visit=visit, detector=detector, band="r", mjd=60123.123456789,
                     exposure_time=30.5, gain=1.7, read_noise=6.25, saturation=65535.0,
                     airmass=1.234, parallactic_angle=math.nan, instrument="TestCam")
    calib = PhotoCalib(zero_point=27.123456789, zero_point_err=0.0123)
    return Exposure.from_arrays(image, variance, mask, wcs=wcs, psf=psf, photo_calib=calib,
                                info=info, origin=origin)


def sky_probe_points(exposure: Exposure) -> tuple[np.ndarray, np.ndarray]:
    """Parent-frame positions at the corners, centre and an off-image point."""
    x0, y0 = exposure.origin
    ny, nx = exposure.shape
    xs = np.array([x0, x0 + nx - 1, x0, x0 + nx - 1, x0 + (nx - 1) / 2, x0 + 0.3 * nx, x0 - 20.5])
    ys = np.array([y0, y0, y0 + ny - 1, y0 + ny - 1, y0 + (ny - 1) / 2, y0 + 0.7 * ny, y0 + ny + 9])
    return xs, ys


def max_sky_separation_deg(wcs_a: WCS, wcs_b: WCS, xs, ys) -> float:
    """Largest great-circle distance (degrees) between the two WCSs' sky positions."""
    from astropy.coordinates import SkyCoord

    ra_a, dec_a = copy.deepcopy(wcs_a).all_pix2world(xs, ys, 0)
    ra_b, dec_b = copy.deepcopy(wcs_b).all_pix2world(xs, ys, 0)
    a = SkyCoord(ra_a, dec_a, unit="deg")
    b = SkyCoord(ra_b, dec_b, unit="deg")
    return float(np.max(a.separation(b).deg))


def _same_info(a: VisitInfo, b: VisitInfo) -> bool:
    for field in dataclasses.fields(VisitInfo):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        if isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb):
            continue
        if va != vb:
            return False
    return True


def assert_exposures_equal(actual: Exposure, expected: Exposure, *,
                           sky_tolerance_deg: float = 1e-9) -> None:
    """Assert a lossless round trip: pixels bit for bit, origin, metadata, WCS, PSF.

    The WCS is compared through pixel → sky at :func:`sky_probe_points`; PSF
    models through their type and rendered stamps at three positions.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.origin == expected.origin, (actual.origin, expected.origin)
    for name, got, want in zip(("image", "variance", "mask"), actual.arrays(), expected.arrays()):
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.dtype.isnative, (name, got.dtype)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} plane differs")
    assert _same_info(actual.info, expected.info), (actual.info, expected.info)
    assert actual.photo_calib == expected.photo_calib, (actual.photo_calib, expected.photo_calib)
    assert (actual.wcs is None) == (expected.wcs is None)
    if expected.wcs is not None:
        xs, ys = sky_probe_points(expected)
        separation = max_sky_separation_deg(actual.wcs, expected.wcs, xs, ys)
        assert separation <= sky_tolerance_deg, f"WCS differs by {separation:.3g} deg"
    assert (actual.psf is None) == (expected.psf is None)
    if expected.psf is not None:
        assert type(actual.psf) is type(expected.psf)
        x0, y0 = expected.origin
        for x, y in ((x0, y0), expected.center, (x0 + 7.5, y0 + 3.25)):
            np.testing.assert_allclose(actual.psf.image(x, y), expected.psf.image(x, y),
                                       rtol=0, atol=1e-13)
