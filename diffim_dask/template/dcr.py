"""Differential chromatic refraction (DCR): a template matched to a visit's airmass and colour shifts.

Refraction lifts a source towards the zenith by an angle that grows with the
refractive index of air, :math:`n(\\lambda)`, which is larger in the blue. The
visit's astrometric solution absorbs the refraction at the band's effective
wavelength :math:`\\lambda_\\mathrm{eff}`; what remains is *differential*: light
at wavelength :math:`\\lambda` lands

.. math::

    \\Delta R(\\lambda) = \\left[n(\\lambda) - n(\\lambda_\\mathrm{eff})\\right] \\tan z

radians further towards the zenith (blue light up, red light down), so blue and
red stars shift relative to each other and a template without DCR leaves
dipoles on them in the difference image.

A **DCR model** is a set of coadds of one band, one per sub-band ("subfilter")
of equal width in wavelength, each the sky as it would look without
refraction in that sub-band; their sum is the ordinary coadd. The DCR
template of a visit (:func:`get_dcr_template`) is

.. math::

    T = \\sum_k \\mathcal{S}_{\\delta_k}\\!\\left[W(M_k)\\right], \\qquad
    \\delta_k = \\Delta R(\\lambda_k)\\,(\\sin q, \\cos q)_{(E, N)},

where :math:`W` warps sub-band model :math:`M_k` onto the science grid,
:math:`\\lambda_k` is the sub-band's effective wavelength (its centre) and
:math:`q` the parallactic angle (position angle of the zenith, from north
through east). The shift :math:`\\mathcal{S}` is folded into the warp's pixel
mapping, so each sub-band is interpolated once. The sky offset
:math:`\\delta_k` is converted to science pixels with the local Jacobian of the
science WCS at the detector centre.

Refractive index (:func:`refractive_index_minus_one`)
---------------------------------------------------
Edlén (1966, Metrologia 2, 71): dry air with 0.03 % CO₂ at 15 °C and 760 Torr,

.. math::

    (n_s - 1)\\,10^8 = 8342.13 + \\frac{2406030}{130 - \\sigma^2} + \\frac{15997}{38.9 - \\sigma^2},

(:math:`\\sigma = 1/\\lambda` in µm⁻¹), scaled to pressure :math:`p` (Torr) and
temperature :math:`t` (°C) by
:math:`(n_s - 1)\\, p\\,[1 + p\\,(0.817 - 0.0133\\,t)\\,10^{-6}] / [720.775\\,(1 + 0.003661\\,t)]`,
minus the water-vapour term :math:`f\\,(5.722 - 0.0457\\,\\sigma^2)\\,10^{-8}` for a
vapour pressure :math:`f` (Torr) from the relative humidity and the Magnus
saturation pressure :math:`6.1078\\,\\exp(17.27\\,t/(t + 237.3))` hPa.

Assumptions: a plane-parallel atmosphere (refraction :math:`(n - 1)\\tan z`;
the curvature term changes :math:`\\Delta R` by well under 1 % for
:math:`z < 60°`), the zenith distance from the airmass as
:math:`z = \\arccos(1/X)`, one weather state for the site (no humidity or
temperature profile), one shift per sub-band evaluated at the detector
centre (:math:`\\Delta R` varies by < 0.1 % across a detector), and no
dispersion *within* a sub-band (the model is as sharp as its sub-band width:
with three sub-bands of g at airmass 1.6 the spread inside one sub-band is
about a third of the band's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from ..config import ConfigBase, config_field
from ..errors import BadInputDataError, ConfigurationError
from ..exposure import Exposure
from .get_template import (GetTemplateConfig, TemplateResult, _Component, _science_band,
                           _assemble_template)

__all__ = [
    "BAND_WAVELENGTHS",
    "DcrConfig",
    "refractive_index_minus_one",
    "differential_refraction",
    "dcr_pixel_offsets",
    "get_dcr_template",
]

#: (minimum, maximum, effective) wavelength in nm of LSST-like bands (top-hat approximation).
BAND_WAVELENGTHS: dict[str, tuple[float, float, float]] = {
    "u": (320.0, 400.0, 367.0),
    "g": (400.0, 552.0, 482.5),
    "r": (552.0, 691.0, 622.2),
    "i": (691.0, 818.0, 754.5),
    "z": (818.0, 922.0, 869.1),
    "y": (922.0, 1060.0, 971.0),
}

_HPA_TO_TORR = 760.0 / 1013.25
_RADIAN_ARCSEC = 180.0 * 3600.0 / math.pi


@dataclass(frozen=True)
class DcrConfig(ConfigBase):
    """Sub-bands of a DCR model and the site's weather."""

    n_subfilters: int = config_field(3, "Number of sub-bands of equal wavelength width.",
                                     minimum=1)
    wavelength_min: float | None = config_field(
        None, "Blue edge of the band (nm); None takes it from BAND_WAVELENGTHS.", minimum=100.0)
    wavelength_max: float | None = config_field(
        None, "Red edge of the band (nm); None takes it from BAND_WAVELENGTHS.", minimum=100.0)
    effective_wavelength: float | None = config_field(
        None, "Wavelength whose refraction the visit's WCS absorbs (nm); None takes the band's "
        "effective wavelength from BAND_WAVELENGTHS.", minimum=100.0)
    pressure: float = config_field(750.0, "Air pressure at the site (hPa).", minimum=0.0)
    temperature: float = config_field(10.0, "Air temperature at the site (deg C).",
                                      minimum=-60.0, maximum=60.0)
    relative_humidity: float = config_field(0.4, "Relative humidity (0-1).", minimum=0.0,
                                            maximum=1.0)

    def band_wavelengths(self, band: str) -> tuple[float, float, float]:
        """``(minimum, maximum, effective)`` wavelength of ``band`` in nm.

        Raises
        ------
        ConfigurationError
            If a value is neither configured nor tabulated, or the range is empty.
        """
        table = BAND_WAVELENGTHS.get(band)
        values = []
        for name, index in (("wavelength_min", 0), ("wavelength_max", 1),
                            ("effective_wavelength", 2)):
            value = getattr(self, name)
            if value is None:
                if table is None:
                    raise ConfigurationError(
                        f"DcrConfig.{name} is needed for band {band!r} (tabulated bands: "
                        f"{sorted(BAND_WAVELENGTHS)})")
                value = table[index]
            values.append(float(value))
        lo, hi, effective = values
        if not lo < hi:
            raise ConfigurationError(f"DCR band {band!r}: wavelength range [{lo}, {hi}] nm is empty")
        return lo, hi, effective

    def subfilter_wavelengths(self, band: str) -> np.ndarray:
        """Effective (central) wavelength of each sub-band (nm)."""
        lo, hi, _ = self.band_wavelengths(band)
        edges = np.linspace(lo, hi, self.n_subfilters + 1)
        return 0.5 * (edges[1:] + edges[:-1])


def refractive_index_minus_one(wavelength, pressure: float = 750.0, temperature: float = 10.0,
                               relative_humidity: float = 0.4):
    """:math:`n - 1` of moist air (Edlén 1966; see module notes).

    Parameters
    ----------
    wavelength : float or array_like
        Vacuum wavelength (nm).
    pressure : float
        hPa.
    temperature : float
        deg C.
    relative_humidity : float
        0-1.
    """
    sigma2 = (1000.0 / np.asarray(wavelength, dtype=float)) ** 2
    standard = (8342.13 + 2406030.0 / (130.0 - sigma2) + 15997.0 / (38.9 - sigma2)) * 1e-8
    p = pressure * _HPA_TO_TORR
    t = temperature
    dry = standard * p * (1.0 + p * (0.817 - 0.0133 * t) * 1e-6) / (720.775 * (1.0 + 0.003661 * t))
    vapour = relative_humidity * 6.1078 * math.exp(17.27 * t / (t + 237.3)) * _HPA_TO_TORR
    return dry - vapour * (5.722 - 0.0457 * sigma2) * 1e-8


def differential_refraction(wavelength, reference_wavelength: float, airmass: float,
                            config: DcrConfig | None = None):
    """:math:`\\Delta R` (arcsec, positive towards the zenith) of ``wavelength`` relative to the reference.

    Raises
    ------
    BadInputDataError
        If the airmass is not a finite number >= 1.
    """
    config = DcrConfig() if config is None else config
    if not (np.isfinite(airmass) and airmass >= 1.0):
        raise BadInputDataError(f"airmass must be a finite number >= 1 for DCR, got {airmass}")
    tan_z = math.tan(math.acos(1.0 / airmass))
    weather = dict(pressure=config.pressure, temperature=config.temperature,
                   relative_humidity=config.relative_humidity)
    delta = (refractive_index_minus_one(wavelength, **weather)
             - refractive_index_minus_one(reference_wavelength, **weather))
    return delta * tan_z * _RADIAN_ARCSEC


def _sky_to_pixel_jacobian(wcs, x: float, y: float) -> np.ndarray:
    """``∂(x, y)/∂(east, north)`` in pixels per arcsec at a pixel position."""
    wcs = copy.deepcopy(wcs)
    (ra,), (dec,) = wcs.all_pix2world([x], [y], 0)
    step = 1.0 / 3600.0
    cos_dec = math.cos(math.radians(dec))
    px, py = wcs.all_world2pix([ra, ra + step / cos_dec, ra], [dec, dec, dec + step], 0)
    return np.array([[px[1] - px[0], px[2] - px[0]], [py[1] - py[0], py[2] - py[0]]])


def dcr_pixel_offsets(wcs, position: tuple[float, float], shifts_arcsec,
                      parallactic_angle: float) -> np.ndarray:
    """Pixel offsets ``(dx, dy)`` of sky shifts towards the zenith.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Science WCS.
    position : (float, float)
        Pixel position where the local Jacobian is evaluated.
    shifts_arcsec : array_like
        Shifts towards the zenith (arcsec).
    parallactic_angle : float
        Position angle of the zenith (deg, north through east).

    Returns
    -------
    numpy.ndarray, shape (n, 2)
    """
    q = math.radians(parallactic_angle)
    direction = np.array([math.sin(q), math.cos(q)])  # (east, north)
    jacobian = _sky_to_pixel_jacobian(wcs, *position)
    shifts = np.atleast_1d(np.asarray(shifts_arcsec, dtype=float))
    return shifts[:, None] * (jacobian @ direction)[None, :]


def get_dcr_template(science: Exposure, store, dcr_config: DcrConfig | None = None,
                     config: GetTemplateConfig | None = None) -> TemplateResult:
    """DCR-matched template: sub-band models shifted by their differential refraction and summed.

    Parameters
    ----------
    science : Exposure
        Needs a WCS, a band, and ``info.airmass`` / ``info.parallactic_angle``.
    store : CoaddStore
        Holds the DCR model: coadds of ``n_subfilters`` sub-bands of the band
        (:meth:`CoaddStore.write` with ``subfilter=k``).
    dcr_config : DcrConfig, optional
    config : GetTemplateConfig, optional

    Returns
    -------
    TemplateResult
        ``metadata["dcr"]`` lists each sub-band's wavelength, shift (arcsec)
        and pixel offset.

    Raises
    ------
    ConfigurationError
        If the store lacks the band's DCR model or some of its sub-bands.
    BadInputDataError
        If the airmass or parallactic angle is missing.
    NoWorkFound
        As for :func:`~diffim_dask.template.get_template`.
    """
    dcr_config = DcrConfig() if dcr_config is None else dcr_config
    config = GetTemplateConfig() if config is None else config
    band = _science_band(science)
    stored = store.subfilters(band) if band in store.dcr_bands() else []
    expected = list(range(dcr_config.n_subfilters))
    if not set(expected) <= set(stored):
        raise ConfigurationError(
            f"the template store holds DCR sub-bands {stored} of band {band!r}, but "
            f"DcrConfig.n_subfilters = {dcr_config.n_subfilters} needs {expected}")
    airmass = science.info.airmass
    angle = science.info.parallactic_angle
    if not (np.isfinite(airmass) and airmass >= 1.0 and np.isfinite(angle)):
        raise BadInputDataError(
            f"visit {science.info.visit}, detector {science.info.detector}: a DCR template needs "
            f"the airmass (got {airmass}) and parallactic angle (got {angle})")
    _, _, effective = dcr_config.band_wavelengths(band)
    wavelengths = dcr_config.subfilter_wavelengths(band)
    shifts = differential_refraction(wavelengths, effective, airmass, dcr_config)
    offsets = dcr_pixel_offsets(science.wcs, science.center, shifts, angle)
    components = [_Component(band, k, (float(offsets[k, 0]), float(offsets[k, 1])))
                  for k in expected]
    result = _assemble_template(science, store, components, config)
    result.metadata["dcr"] = [
        {"subfilter": k, "wavelength": float(wavelengths[k]), "shift_arcsec": float(shifts[k]),
         "offset_pixels": [float(offsets[k, 0]), float(offsets[k, 1])]} for k in expected]
    return result
