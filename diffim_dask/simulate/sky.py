"""The static sky: stars (some variable) and galaxies, defined on the sky with fluxes in nJy.

Sources are drawn uniformly over a rectangle of a tangent plane (the tract of
the survey, or any WCS and pixel box), with power-law fluxes:
the cumulative counts follow :math:`N(>F) \\propto F^{-a}` between
:math:`F_\\mathrm{min}` and :math:`F_\\mathrm{max}`, sampled by inverting

.. math::

    F = F_\\mathrm{min}\\,\\left[1 - u\\,\\left(1 - (F_\\mathrm{max}/F_\\mathrm{min})^{-a}
        \\right)\\right]^{-1/a}, \\quad u \\sim U(0, 1).

Variable stars have sinusoidal light curves
:math:`f(t) = \\bar f\\,(1 + A \\sin(2\\pi t / P + \\varphi))` (t in MJD); templates
show the mean flux :math:`\\bar f`.

A ``color`` column (g − i for stars, a rough galaxy colour) is carried for a
later differential-chromatic-refraction model; nothing uses it yet.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from . import _streams
from .config import SurveyConfig

__all__ = ["SkyModel", "make_sky", "draw_sky", "power_law_fluxes", "variable_flux",
           "STAR_ID_START", "GALAXY_ID_START"]

#: First id of stars and galaxies (ids are unique across kinds; see also survey ids).
STAR_ID_START = 1
GALAXY_ID_START = 1_000_000_000


def power_law_fluxes(rng: np.random.Generator, n: int, flux_range: tuple[float, float],
                     slope: float) -> np.ndarray:
    """``n`` fluxes with cumulative counts :math:`N(>F) \\propto F^{-slope}` in ``flux_range``."""
    lo, hi = flux_range
    if hi <= lo:
        return np.full(n, float(lo))
    u = rng.random(n)
    span = 1.0 - (hi / lo) ** (-slope)
    return lo * (1.0 - u * span) ** (-1.0 / slope)


def variable_flux(table: pd.DataFrame, mjd: float) -> np.ndarray:
    """Flux (nJy) at ``mjd`` of every row of a star table (constant for non-variables)."""
    flux = table["flux"].to_numpy(dtype=float)
    amplitude = table["amplitude"].to_numpy(dtype=float)
    period = table["period"].to_numpy(dtype=float)
    phase = table["phase"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        wave = np.where(amplitude > 0, np.sin(2.0 * math.pi * mjd / period + phase), 0.0)
    return flux * (1.0 + amplitude * wave)


@dataclasses.dataclass(frozen=True, eq=False)
class SkyModel:
    """The static sky of a survey.

    Attributes
    ----------
    stars : pandas.DataFrame
        ``id, ra, dec`` (deg), ``flux`` (mean nJy), ``color``, ``variable`` (bool),
        ``amplitude``, ``period`` (days), ``phase`` (rad); non-variables have
        amplitude 0 and NaN period.
    galaxies : pandas.DataFrame
        ``id, ra, dec, flux`` (nJy), ``r_eff`` (circularised half-light radius,
        arcsec), ``sersic_n``, ``axis_ratio`` (b/a), ``position_angle`` (deg east
        of north), ``color``.
    wcs : astropy.wcs.WCS
        Tangent plane the sources were drawn on.
    bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)``: the pixel box of ``wcs`` that was populated.
    """

    stars: pd.DataFrame
    galaxies: pd.DataFrame
    wcs: WCS
    bbox: tuple[int, int, int, int]

    @property
    def variables(self) -> pd.DataFrame:
        """The variable stars."""
        return self.stars[self.stars["variable"]]

    def star_flux(self, mjd: float) -> np.ndarray:
        """Flux (nJy) of every star at ``mjd``."""
        return variable_flux(self.stars, mjd)


def draw_sky(rng: np.random.Generator, config: SurveyConfig, wcs: WCS,
             bbox: tuple[int, int, int, int], *, star_density: float | None = None,
             galaxy_density: float | None = None) -> SkyModel:
    """Draw stars and galaxies uniformly over the pixel box ``bbox`` of a tangent-plane WCS.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (the result is a deterministic function of its state).
    config : SurveyConfig
        Flux, size and variability distributions.
    wcs : astropy.wcs.WCS
        Tangent plane (no distortion expected).
    bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)`` in ``wcs`` pixels.
    star_density, galaxy_density : float, optional
        Override the config's densities (per square degree).
    """
    x0, y0, nx, ny = bbox
    scale = abs(float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))))  # deg / px
    area = nx * ny * scale ** 2
    star_density = config.star_density if star_density is None else star_density
    galaxy_density = config.galaxy_density if galaxy_density is None else galaxy_density
    wcs = copy.deepcopy(wcs)

    def positions(n):
        x = rng.uniform(x0 - 0.5, x0 + nx - 0.5, n)
        y = rng.uniform(y0 - 0.5, y0 + ny - 0.5, n)
        ra, dec = wcs.all_pix2world(x, y, 0)
        return np.asarray(ra), np.asarray(dec)

    n_stars = int(rng.poisson(star_density * area))
    ra, dec = positions(n_stars)
    flux = power_law_fluxes(rng, n_stars, config.star_flux_range, config.star_flux_slope)
    color = rng.uniform(0.2, 3.0, n_stars)
    variable = rng.random(n_stars) < config.variable_fraction
    amp_lo, amp_hi = config.variable_amplitude_range
    per_lo, per_hi = config.variable_period_range
    amplitude = np.where(variable, rng.uniform(amp_lo, amp_hi, n_stars), 0.0)
    period = np.where(variable, np.exp(rng.uniform(math.log(per_lo), math.log(per_hi), n_stars)),
                      np.nan)
    phase = np.where(variable, rng.uniform(0.0, 2.0 * math.pi, n_stars), 0.0)
    stars = pd.DataFrame({
        "id": np.arange(STAR_ID_START, STAR_ID_START + n_stars, dtype=np.int64),
        "ra": ra, "dec": dec, "flux": flux, "color": color, "variable": variable,
        "amplitude": amplitude, "period": period, "phase": phase,
    })

    n_gal = int(rng.poisson(galaxy_density * area))
    ra, dec = positions(n_gal)
    size_lo, size_hi = config.galaxy_size_range
    n_lo, n_hi = config.galaxy_sersic_range
    q_lo, q_hi = config.galaxy_axis_ratio_range
    galaxies = pd.DataFrame({
        "id": np.arange(GALAXY_ID_START, GALAXY_ID_START + n_gal, dtype=np.int64),
        "ra": ra, "dec": dec,
        "flux": power_law_fluxes(rng, n_gal, config.galaxy_flux_range, config.galaxy_flux_slope),
        "r_eff": np.exp(rng.uniform(math.log(size_lo), math.log(size_hi), n_gal)),
        "sersic_n": rng.uniform(n_lo, n_hi, n_gal),
        "axis_ratio": rng.uniform(q_lo, q_hi, n_gal),
        "position_angle": rng.uniform(0.0, 180.0, n_gal),
        "color": rng.normal(1.0, 0.4, n_gal),
    })
    return SkyModel(stars=stars, galaxies=galaxies, wcs=wcs, bbox=(x0, y0, nx, ny))


def make_sky(config: SurveyConfig) -> SkyModel:
    """The static sky of the survey described by ``config``.

    Sources cover every template patch of the survey tract (which covers every
    visit's detectors) plus a margin for PSF and galaxy wings; the result
    depends only on ``config`` (stream ``SKY`` of its seed).
    """
    from .survey import survey_tract

    tract = survey_tract(config)
    margin = 64
    x_lo = min(p.outer_bbox[0] for p in tract.patches) - margin
    y_lo = min(p.outer_bbox[1] for p in tract.patches) - margin
    x_hi = max(p.outer_bbox[0] + p.outer_bbox[2] for p in tract.patches) + margin
    y_hi = max(p.outer_bbox[1] + p.outer_bbox[3] for p in tract.patches) + margin
    rng = _streams.rng_for(config.seed, _streams.SKY)
    return draw_sky(rng, config, tract.wcs, (x_lo, y_lo, x_hi - x_lo, y_hi - y_lo))
