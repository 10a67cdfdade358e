"""Differential chromatic refraction in the simulator: coloured sources seen through the atmosphere.

Spectra
-------
Every star and galaxy has a ``color`` (g − i, AB). Inside a band its spectrum
is a power law :math:`F_\\nu \\propto \\lambda^{\\alpha}` with
:math:`\\alpha = (g - i) / (2.5 \\log_{10}(\\lambda_i / \\lambda_g))`, so the
photon rate per unit wavelength is :math:`N_\\lambda \\propto \\lambda^{\\alpha - 1}`;
a source's ``flux`` (nJy) is its band flux, and the fraction of its counts
between :math:`\\lambda_1` and :math:`\\lambda_2` is
:math:`\\int_{\\lambda_1}^{\\lambda_2} \\lambda^{\\alpha-1} d\\lambda / \\int_\\mathrm{band}`
(top-hat throughput, edges from
:data:`~diffim_dask.template.dcr.BAND_WAVELENGTHS`).

Refraction
----------
The band is cut into ``n_wavelengths`` equal slices; the light of each slice
is drawn displaced towards the zenith (position angle = parallactic angle)
by its refraction relative to the band's effective wavelength (which the
visit's WCS absorbs). Refraction comes from ERFA's ``refco``
(:math:`R = A \\tan z + B \\tan^3 z`, Hohenkerk & Sinclair / Green 1987) — a
model independent of the Edlén formula the DCR template uses — with
:math:`z = \\arccos(1/X)`. The displaced sky positions are projected through the
image's WCS, so the direction needs no pixel-frame convention. Galaxies are
drawn once at their photon-weighted mean displacement; transients, movers and
cosmic rays are not refracted.

Entry points: :func:`render_sky_image` (any WCS, box, PSF, band or sub-band,
with or without refraction — e.g. template patches of a DCR model or
noise-free references on a science grid) and :func:`simulate_dcr_visit` (a
full science image, noise and defects included, with refraction at a chosen
airmass and parallactic angle).
"""

from __future__ import annotations

import copy
import math

import erfa
import numpy as np
import pandas as pd
from astropy.wcs import WCS

from ..errors import ConfigurationError
from ..exposure import Exposure
from ..psf.models import PsfModel
from ..template.dcr import BAND_WAVELENGTHS
from . import _scene, _streams, render
from .profiles import sersic_mixture
from .sky import SkyModel, variable_flux
from .survey import SimulatedImage, Survey

__all__ = [
    "spectral_index",
    "band_fractions",
    "refraction_arcsec",
    "render_sky_image",
    "simulate_dcr_visit",
    "DEFAULT_WEATHER",
]

#: Site weather used unless given: pressure (hPa), temperature (deg C), relative humidity (0-1).
DEFAULT_WEATHER = {"pressure": 750.0, "temperature": 10.0, "relative_humidity": 0.4}


def spectral_index(color) -> np.ndarray:
    """Power-law index α of :math:`F_\\nu \\propto \\lambda^\\alpha` for a g − i colour."""
    lambda_g, lambda_i = BAND_WAVELENGTHS["g"][2], BAND_WAVELENGTHS["i"][2]
    return np.asarray(color, dtype=float) / (2.5 * math.log10(lambda_i / lambda_g))


def _photon_integral(alpha: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """:math:`\\int_{lo}^{hi} \\lambda^{\\alpha - 1} d\\lambda` (λ in units of 500 nm, for conditioning)."""
    a = np.asarray(alpha, dtype=float)
    lo, hi = lo / 500.0, hi / 500.0
    small = np.abs(a) < 1e-8
    with np.errstate(divide="ignore", invalid="ignore"):
        power = (hi ** a - lo ** a) / np.where(small, 1.0, a)
    return np.where(small, math.log(hi / lo), power)


def band_fractions(color, band: str, edges) -> np.ndarray:
    """Fraction of each source's counts in each wavelength interval.

    Parameters
    ----------
    color : array_like
        g − i colours (n sources).
    band : str
        Band whose wavelength range normalises the fractions.
    edges : array_like
        Interval edges (nm), m + 1 values inside the band.

    Returns
    -------
    numpy.ndarray, shape (n, m)
    """
    lo, hi, _ = _band(band)
    alpha = spectral_index(np.atleast_1d(color))
    edges = np.asarray(edges, dtype=float)
    total = _photon_integral(alpha, lo, hi)
    parts = np.stack([_photon_integral(alpha, a, b) for a, b in zip(edges[:-1], edges[1:])], axis=-1)
    return parts / total[:, None]


def _band(band: str) -> tuple[float, float, float]:
    try:
        return BAND_WAVELENGTHS[band]
    except KeyError:
        raise ConfigurationError(
            f"no wavelength range for band {band!r}; known: {sorted(BAND_WAVELENGTHS)}") from None


def refraction_arcsec(wavelength, airmass: float, *, pressure: float = 750.0,
                      temperature: float = 10.0, relative_humidity: float = 0.4) -> np.ndarray:
    """Atmospheric refraction (arcsec) at ``wavelength`` (nm) and ``airmass`` from ERFA ``refco``."""
    if not airmass >= 1.0:
        raise ConfigurationError(f"airmass must be >= 1, got {airmass}")
    tan_z = math.tan(math.acos(1.0 / airmass))
    wavelength = np.atleast_1d(np.asarray(wavelength, dtype=float))
    out = np.empty(wavelength.shape)
    for i, wl in enumerate(wavelength):
        refa, refb = erfa.refco(pressure, temperature, relative_humidity, wl / 1000.0)
        out[i] = (refa * tan_z + refb * tan_z ** 3) * 180.0 * 3600.0 / math.pi
    return out


def _shifted_pixels(wcs: WCS, ra, dec, shift_arcsec, parallactic_angle: float):
    """Pixel positions of sky points moved ``shift_arcsec`` towards position angle ``parallactic_angle``."""
    q = math.radians(parallactic_angle)
    shift = np.asarray(shift_arcsec, dtype=float) / 3600.0
    dec_new = np.asarray(dec) + shift * math.cos(q)
    ra_new = np.asarray(ra) + shift * math.sin(q) / np.cos(np.radians(dec))
    x, y = wcs.all_world2pix(ra_new, dec_new, 0)
    return np.asarray(x), np.asarray(y)


def render_sky_image(sky: SkyModel, wcs: WCS, shape: tuple[int, int], psf: PsfModel,
                     njy_per_count: float, *, band: str, origin: tuple[int, int] = (0, 0),
                     mjd: float | None = None, wavelength_range: tuple[float, float] | None = None,
                     airmass: float = 1.0, parallactic_angle: float = 0.0,
                     weather: dict | None = None, n_wavelengths: int = 16,
                     galaxies: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Noise-free image of the sky's stars (and galaxies), optionally refracted, on any pixel grid.

    Parameters
    ----------
    sky : SkyModel
        Sources (``Survey.sky``).
    wcs : astropy.wcs.WCS
        Pixel frame of the image (parent frame).
    shape : (int, int)
        ``(ny, nx)``.
    psf : PsfModel
        PSF evaluated at each source's (unrefracted) position.
    njy_per_count : float
        Calibration of the image.
    band : str
        Band of the image.
    origin : (int, int)
        Parent position of the first pixel.
    mjd : float, optional
        Draw variables at this date (default: mean flux, as templates do).
    wavelength_range : (float, float), optional
        Keep only the counts in this interval (a DCR sub-band); default the whole band.
    airmass, parallactic_angle : float
        Refraction (airmass 1: none). Parallactic angle in degrees.
    weather : dict, optional
        ``pressure`` (hPa), ``temperature`` (deg C), ``relative_humidity`` (0-1).
    n_wavelengths : int
        Wavelength slices of the band for refracted rendering.
    galaxies : bool
        Draw galaxies too.

    Returns
    -------
    model : numpy.ndarray
        float64 counts.
    stars : pandas.DataFrame
        Stars drawn: ``id, ra, dec, x, y`` (unrefracted position), ``color``,
        ``counts`` (in this image), ``dx, dy`` (photon-weighted mean refraction
        offset in pixels), ``inside``.
    """
    weather = dict(DEFAULT_WEATHER if weather is None else weather)
    lo, hi, effective = _band(band)
    wcs = copy.deepcopy(wcs)
    model = np.zeros(shape)
    margin = psf.default_size // 2 + 2
    if airmass > 1.0:
        # Refraction moves sources by up to a few arcsec; project a little wider.
        margin += int(math.ceil(5.0 / (3600.0 * np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))))
    stars = _scene.project(sky.stars, wcs, shape, origin, margin=margin)
    flux = variable_flux(stars, mjd) if mjd is not None else stars["flux"].to_numpy(dtype=float)
    color = stars["color"].to_numpy(dtype=float)
    sub_lo, sub_hi = (lo, hi) if wavelength_range is None else wavelength_range
    if not (lo - 1e-6 <= sub_lo < sub_hi <= hi + 1e-6):
        raise ConfigurationError(
            f"wavelength range {wavelength_range} is not inside band {band!r} ({lo}-{hi} nm)")
    slices = max(1, int(n_wavelengths)) if airmass > 1.0 else 1
    edges = np.linspace(sub_lo, sub_hi, slices + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    fractions = band_fractions(color, band, edges) if len(stars) else np.zeros((0, slices))
    shifts = (refraction_arcsec(centres, airmass, **weather)
              - refraction_arcsec(effective, airmass, **weather)) if airmass > 1.0 \
        else np.zeros(slices)
    counts = flux / njy_per_count
    ra, dec = stars["ra"].to_numpy(), stars["dec"].to_numpy()
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    mean_dx = np.zeros(len(stars))
    mean_dy = np.zeros(len(stars))
    for k in range(slices):
        if airmass > 1.0:
            sx, sy = _shifted_pixels(wcs, ra, dec, shifts[k], parallactic_angle)
        else:
            sx, sy = x, y
        render.render_point_sources(model, sx, sy, counts * fractions[:, k], psf, origin=origin)
        mean_dx += fractions[:, k] * (sx - x)
        mean_dy += fractions[:, k] * (sy - y)
    kept = fractions.sum(axis=1) if len(stars) else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_dx = np.where(kept > 0, mean_dx / np.where(kept > 0, kept, 1.0), 0.0)
        mean_dy = np.where(kept > 0, mean_dy / np.where(kept > 0, kept, 1.0), 0.0)
    star_table = pd.DataFrame({
        "id": stars["id"].to_numpy(), "ra": ra, "dec": dec, "x": x, "y": y, "color": color,
        "counts": counts * kept, "dx": mean_dx, "dy": mean_dy,
        "inside": stars["inside"].to_numpy(dtype=bool),
    })
    if galaxies:
        _render_galaxies(model, sky, wcs, shape, origin, psf, njy_per_count, band,
                         (sub_lo, sub_hi), centres, shifts, edges, parallactic_angle, airmass)
    return model, star_table


def _render_galaxies(model, sky, wcs, shape, origin, psf, njy_per_count, band, sub_range,
                     centres, shifts, edges, parallactic_angle, airmass):
    table = _scene.project(sky.galaxies, wcs, shape, origin, margin=_scene.GALAXY_MARGIN)
    if len(table) == 0:
        return
    fractions = band_fractions(table["color"].to_numpy(dtype=float), band, edges)
    kept = fractions.sum(axis=1)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    if airmass > 1.0:
        mean_shift = (fractions @ shifts) / np.where(kept > 0, kept, 1.0)
        x, y = _shifted_pixels(wcs, table["ra"].to_numpy(), table["dec"].to_numpy(), mean_shift,
                               parallactic_angle)
    shapes = _scene.galaxy_pixel_shapes(table, wcs)
    mixtures = [sersic_mixture(n) for n in table["sersic_n"].to_numpy()]
    counts = table["flux"].to_numpy(dtype=float) * kept / njy_per_count
    render.render_galaxies(model, x, y, counts, shapes, [m[0] for m in mixtures],
                           [m[1] for m in mixtures], psf, origin=origin)


def simulate_dcr_visit(survey: Survey, visit: int, detector: int, *, airmass: float | None = None,
                       parallactic_angle: float | None = None, psf: PsfModel | None = None,
                       weather: dict | None = None, n_wavelengths: int = 16,
                       noise: bool = True) -> SimulatedImage:
    """Simulate a detector of a visit with differential chromatic refraction.

    Like :meth:`Survey.simulate_visit` (same WCS, sky, injections, noise
    streams and detector effects) but stars and galaxies are refracted by
    wavelength (see module notes). The VisitInfo carries the airmass and
    parallactic angle used.

    Parameters
    ----------
    survey : Survey
    visit, detector : int
    airmass, parallactic_angle : float, optional
        Override the visit's values (degrees for the angle).
    psf : PsfModel, optional
        Override the visit's true PSF (e.g. use the template PSF to isolate DCR).
    weather : dict, optional
        See :func:`render_sky_image`.
    n_wavelengths : int
        Wavelength slices of the band.
    noise : bool
        Add noise, cosmic rays, saturation and bad columns; otherwise the
        exposure holds the noise-free model with the expected variance.

    Returns
    -------
    SimulatedImage
        Truth rows of stars carry ``dcr_dx, dcr_dy``: their photon-weighted
        refraction offset (pixels).
    """
    c = survey.config
    spec = survey.visit_spec(visit)
    airmass = spec.airmass if airmass is None else float(airmass)
    angle = spec.parallactic_angle if parallactic_angle is None else float(parallactic_angle)
    wcs = survey.wcs(visit, detector)
    psf = survey.psf(visit, detector) if psf is None else psf
    calib = survey.photo_calib(visit)
    background = survey.background(visit, detector)
    model, stars = render_sky_image(
        survey.sky, wcs, c.detector_shape, psf, calib.njy_per_count, band=c.band,
        mjd=spec.mjd, airmass=airmass, parallactic_angle=angle, weather=weather,
        n_wavelengths=n_wavelengths)
    injected = survey.injections(visit, detector)
    _scene.render_injections(model, injected, psf, calib.njy_per_count)
    expected = model + background
    if noise:
        rng = _streams.rng_for(c.seed, _streams.IMAGE_NOISE, visit, detector)
        image, variance, mask, _ = _scene.add_detector_effects(
            expected, background, rng, gain=c.gain, read_noise=c.read_noise,
            saturation=c.saturation, cosmic_ray_rate=c.cosmic_ray_rate,
            cosmic_ray_energy_range=c.cosmic_ray_energy_range,
            bad_columns=survey.bad_columns(detector), sky_subtracted=c.sky_subtracted)
    else:
        image = model + (0.0 if c.sky_subtracted else background)
        variance = expected / c.gain + (c.read_noise / c.gain) ** 2
        mask = None
    info = survey.visit_info(visit, detector).replace(airmass=airmass, parallactic_angle=angle)
    inside = stars[stars["inside"]]
    truth = pd.DataFrame({
        "id": inside["id"].to_numpy(), "kind": "star", "ra": inside["ra"].to_numpy(),
        "dec": inside["dec"].to_numpy(), "x": inside["x"].to_numpy(), "y": inside["y"].to_numpy(),
        "flux": inside["counts"].to_numpy() * calib.njy_per_count,
        "color": inside["color"].to_numpy(),
        "dcr_dx": inside["dx"].to_numpy(), "dcr_dy": inside["dy"].to_numpy(),
    })
    truth = pd.concat([truth, injected], ignore_index=True) if len(injected) else truth
    truth["visit"] = visit
    truth["detector"] = detector
    truth = _scene.normalise_truth(truth)
    exposure = Exposure.from_arrays(image.astype(np.float32), variance.astype(np.float32), mask,
                                    wcs=wcs, psf=psf, photo_calib=calib, info=info)
    return SimulatedImage(exposure=exposure, truth=truth, model=model.astype(np.float32),
                          background=background.astype(np.float32))
