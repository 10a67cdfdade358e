"""A science/template pair on one pixel grid, for algorithm tests (PSF matching, ZOGY, detection).

Both images render the same sky through the same WCS; the template uses its
own sharp PSF, its sources are displaced by a sub-pixel ``misregistration``
and its noise is ``template_noise_factor`` times the science noise. The
science PSF varies across the image. Because the true PSFs and the
noise-free models are returned, a test can build the oracle matching kernel
and the expected difference image.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd

from ..errors import ConfigurationError
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, mask_value
from ..psf.models import PsfModel
from . import _scene, _streams, render
from .config import SurveyConfig
from .geometry import tangent_wcs
from .sky import draw_sky, variable_flux
from .survey import (
    COSMIC_RAY_ID_START,
    MOVING_ID_START,
    TRANSIENT_ID_START,
    fwhm_variation_coefficients,
    make_psf,
)

__all__ = ["SimulatedPair", "simulate_pair", "POINT_SOURCE_ID_START"]

#: Ids of user-supplied point sources start here.
POINT_SOURCE_ID_START = 5 * 10 ** 15

# Sub-streams of the pair's seed.
_SKY, _PSF, _INJECT, _SCIENCE_NOISE, _TEMPLATE_NOISE, _DEFECTS = range(6)


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedPair:
    """A simulated science image and its template on the same pixel grid.

    Attributes
    ----------
    science, template : Exposure
        Same shape, same WCS; each carries its own true PSF. Both are
        sky-subtracted (unless ``sky_subtracted=False``, which affects the
        science image only) and share the PhotoCalib.
    truth : pandas.DataFrame
        Every object whose centre is on the image, with the standard truth
        columns (positions are science positions) plus ``template_x`` and
        ``template_y``: where the object was drawn in the template.
    science_psf, template_psf : PsfModel
        The true PSFs.
    misregistration : (float, float)
        Shift ``(dx, dy)`` in pixels of template sources relative to the science.
    science_model, template_model : numpy.ndarray
        Noise-free source images (counts, float32).
    """

    science: Exposure
    template: Exposure
    truth: pd.DataFrame
    science_psf: PsfModel
    template_psf: PsfModel
    misregistration: tuple[float, float]
    science_model: np.ndarray
    template_model: np.ndarray


def simulate_pair(shape: tuple[int, int] = (2048, 2048), *, template_fwhm: float = 2.5,
                  science_fwhm: float = 3.5, science_fwhm_variation: float = 0.15,
                  misregistration: tuple[float, float] = (0.0, 0.0), n_transients: int = 50,
                  snr_range: tuple[float, float] = (3.0, 100.0), seed: int = 0,
                  psf_profile: str = "gaussian", moffat_beta: float = 3.0,
                  template_noise_factor: float = 0.25, star_density: float | None = None,
                  galaxy_density: float | None = None, host_fraction: float = 0.3,
                  n_moving: int = 0, trail_length_range: tuple[float, float] = (5.0, 30.0),
                  moving_snr_range: tuple[float, float] = (5.0, 50.0),
                  point_sources: pd.DataFrame | None = None, n_bad_columns: int = 0,
                  cosmic_ray_rate: float = 0.0, sky_subtracted: bool = True,
                  edge_margin: int = 20, config: SurveyConfig | None = None) -> SimulatedPair:
    """Simulate a science image and a template on the same pixel grid.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)``.
    template_fwhm : float
        Template PSF FWHM (pixels), constant.
    science_fwhm : float
        Science PSF FWHM at the image centre (pixels).
    science_fwhm_variation : float
        Largest fractional change of the science FWHM across the image
        (random quadratic pattern, see :func:`fwhm_variation_coefficients`).
    misregistration : (float, float)
        ``(dx, dy)``: template sources are drawn at ``(x + dx, y + dy)``.
    n_transients : int
        Transients in the science image (none in the template).
    snr_range : (float, float)
        Transient S/N range, log-uniform (S/N as defined in
        :mod:`~diffim_dask.simulate.survey`, against the science sky noise).
    seed : int
        Seed; the same arguments and seed give bit-identical images.
    psf_profile : {"gaussian", "moffat"}
        Profile of both PSFs (``moffat_beta`` for Moffat).
    template_noise_factor : float
        Template background noise σ relative to the science's (0.25 ≈ a
        coadd of 16 visits); 0 gives a noiseless template.
    star_density, galaxy_density : float, optional
        Per square degree; default to ``config``'s.
    host_fraction : float
        Fraction of transients placed on galaxies.
    n_moving : int
        Moving objects (trails) in the science image.
    trail_length_range, moving_snr_range : (float, float)
        Trail lengths (pixels) and S/N range of moving objects.
    point_sources : pandas.DataFrame, optional
        Extra point sources: columns ``x, y, flux`` (nJy in the science) and
        optionally ``template_flux`` (nJy; default ``flux``), ``template_x``,
        ``template_y`` (default: science position plus misregistration) and
        ``kind`` (default ``"star"``). Use it to displace a star between the
        images (dipoles) or to inject sources at chosen places.
    n_bad_columns : int
        Bad columns in the science image.
    cosmic_ray_rate : float
        Cosmic rays per megapixel in the science image.
    sky_subtracted : bool
        Subtract the sky from the science image.
    edge_margin : int
        Transients keep this distance from the edges (pixels).
    config : SurveyConfig, optional
        Photometric and sky parameters (sky level, gain, read noise, zero
        point, saturation, flux and galaxy distributions, pixel scale,
        centre); defaults to ``SurveyConfig()``. Its seed and PSF fields are
        ignored.

    Returns
    -------
    SimulatedPair

    Raises
    ------
    ConfigurationError
        On an impossible parameter (unknown profile, bad shape, negative noise factor,
        missing point-source columns).

    Examples
    --------
    >>> pair = simulate_pair((256, 256), n_transients=3, seed=1)
    >>> pair.science.shape == pair.template.shape
    True
    """
    cfg = SurveyConfig() if config is None else config
    if len(shape) != 2 or min(shape) < 2 * edge_margin + 2:
        raise ConfigurationError(
            f"simulate_pair: shape {shape} too small for edge_margin {edge_margin}")
    if template_noise_factor < 0:
        raise ConfigurationError(
            f"simulate_pair: template_noise_factor must be >= 0, got {template_noise_factor}")
    if psf_profile not in ("gaussian", "moffat"):
        raise ConfigurationError(f"simulate_pair: psf_profile must be 'gaussian' or 'moffat', "
                                 f"got {psf_profile!r}")
    if seed < 0:
        raise ConfigurationError(f"simulate_pair: seed must be >= 0, got {seed}")
    ny, nx = (int(s) for s in shape)
    shape = (ny, nx)
    dx, dy = (float(v) for v in misregistration)

    def stream(k):
        return _streams.rng_for(seed, _streams.PAIR, k)

    wcs = tangent_wcs(cfg.ra, cfg.dec, cfg.pixel_scale, ((nx - 1) / 2.0, (ny - 1) / 2.0))
    margin = _scene.GALAXY_MARGIN
    sky = draw_sky(stream(_SKY), cfg, wcs, (-margin, -margin, nx + 2 * margin, ny + 2 * margin),
                   star_density=star_density, galaxy_density=galaxy_density)
    science_psf = make_psf(psf_profile, science_fwhm, beta=moffat_beta, shape=shape,
                           fwhm_variation=fwhm_variation_coefficients(stream(_PSF),
                                                                      science_fwhm_variation))
    template_psf = make_psf(psf_profile, template_fwhm, beta=moffat_beta,
                            reference=((nx - 1) / 2.0, (ny - 1) / 2.0))
    calib = PhotoCalib(cfg.zero_point)
    njy = calib.njy_per_count
    mjd = cfg.first_mjd
    background = np.full(shape, float(cfg.sky_level))
    sigma = _scene.sky_sigma_function(background, cfg.gain, cfg.read_noise)

    science_model = np.zeros(shape)
    stars, galaxies, galaxy_shapes = _scene.render_sky(
        science_model, sky, wcs, science_psf, (0, 0), lambda rows: variable_flux(rows, mjd), njy)
    template_model = np.zeros(shape)
    _scene.render_sky(template_model, sky, wcs, template_psf, (0, 0),
                      lambda rows: rows["flux"].to_numpy(), njy, star_offset=(dx, dy))
    star_sigma = sigma(stars["x"].to_numpy(), stars["y"].to_numpy())
    static = _scene.static_truth(stars, galaxies, template_star_flux=stars["flux"].to_numpy(),
                                 delta_snr_scale=1.0 / (star_sigma * njy))

    on_image = galaxies[galaxies["inside"]]
    injected = _scene.draw_injections(
        stream(_INJECT), psf=science_psf, wcs=wcs, shape=shape,
        galaxies=on_image.reset_index(drop=True),
        galaxy_shapes=galaxy_shapes[galaxies["inside"].to_numpy()], sky_sigma=sigma,
        njy_per_count=njy, n_transients=n_transients, snr_range=snr_range,
        host_fraction=host_fraction, n_moving=n_moving, moving_snr_range=moving_snr_range,
        trail_length_range=trail_length_range, edge_margin=edge_margin,
        transient_id_start=TRANSIENT_ID_START, moving_id_start=MOVING_ID_START)
    _scene.render_injections(science_model, injected, science_psf, njy)

    extra = _point_source_truth(point_sources, wcs, science_psf, sigma, njy, dx, dy)
    if len(extra):
        render.render_point_sources(science_model, extra["x"].to_numpy(), extra["y"].to_numpy(),
                                    extra["flux"].to_numpy() / njy, science_psf)
        render.render_point_sources(template_model, extra["template_x"].to_numpy(),
                                    extra["template_y"].to_numpy(),
                                    extra["template_flux"].to_numpy() / njy, template_psf)

    expected = science_model + background
    bad_columns = render.draw_bad_columns(stream(_DEFECTS), shape, n_bad_columns)
    image, variance, mask, cosmic_rays = _scene.add_detector_effects(
        expected, background, stream(_SCIENCE_NOISE), gain=cfg.gain, read_noise=cfg.read_noise,
        saturation=cfg.saturation, cosmic_ray_rate=cosmic_ray_rate,
        cosmic_ray_energy_range=cfg.cosmic_ray_energy_range, bad_columns=bad_columns,
        sky_subtracted=sky_subtracted)
    rays = _scene.cosmic_ray_truth(cosmic_rays, wcs, njy, cfg.gain, COSMIC_RAY_ID_START)

    template_expected = template_model + background
    template_variance = template_noise_factor ** 2 * (
        template_expected / cfg.gain + (cfg.read_noise / cfg.gain) ** 2)
    template_noise = stream(_TEMPLATE_NOISE).standard_normal(shape)
    template_image = template_model + np.sqrt(template_variance) * template_noise
    template_saturated = template_expected >= cfg.saturation
    template_image[template_saturated] = cfg.saturation - cfg.sky_level
    template_mask = np.where(template_saturated, MASK_DTYPE(mask_value("SAT")),
                             MASK_DTYPE(0)).astype(MASK_DTYPE)

    parts = [t.drop(columns=["template_x", "template_y"], errors="ignore")
             for t in (static, injected, extra, rays) if len(t)]
    truth = pd.concat(parts or [static], ignore_index=True)
    truth["saturated"] = _scene.peak_saturated(truth, expected, (0, 0), cfg.saturation)
    truth["visit"] = 0
    truth["detector"] = 0
    truth = _scene.normalise_truth(truth)
    truth["template_x"] = truth["x"] + dx
    truth["template_y"] = truth["y"] + dy
    if len(extra):
        user = truth["id"].to_numpy() >= POINT_SOURCE_ID_START
        truth.loc[user, "template_x"] = extra["template_x"].to_numpy()
        truth.loc[user, "template_y"] = extra["template_y"].to_numpy()
    no_template = truth["kind"].isin(["transient", "moving", "cosmic_ray"]).to_numpy()
    truth.loc[no_template, ["template_x", "template_y"]] = np.nan

    info = VisitInfo(visit=0, detector=0, band=cfg.band, mjd=mjd, exposure_time=cfg.exposure_time,
                     gain=cfg.gain, read_noise=cfg.read_noise, saturation=cfg.saturation,
                     airmass=1.0, instrument=cfg.instrument)
    science = Exposure.from_arrays(image.astype(np.float32), variance.astype(np.float32), mask,
                                   wcs=copy.deepcopy(wcs), psf=science_psf, photo_calib=calib,
                                   info=info)
    depth = 1.0 / template_noise_factor ** 2 if template_noise_factor > 0 else np.inf
    template_info = VisitInfo(visit=-1, detector=0, band=cfg.band,
                              instrument=f"{cfg.instrument}-coadd",
                              exposure_time=cfg.exposure_time * depth, saturation=cfg.saturation)
    template = Exposure.from_arrays(template_image.astype(np.float32),
                                    template_variance.astype(np.float32), template_mask,
                                    wcs=copy.deepcopy(wcs), psf=template_psf, photo_calib=calib,
                                    info=template_info)
    return SimulatedPair(science=science, template=template, truth=truth, science_psf=science_psf,
                         template_psf=template_psf, misregistration=(dx, dy),
                         science_model=science_model.astype(np.float32),
                         template_model=template_model.astype(np.float32))


def _point_source_truth(point_sources, wcs, psf, sigma, njy, dx, dy) -> pd.DataFrame:
    """Truth rows of user-supplied point sources (with template positions)."""
    if point_sources is None or len(point_sources) == 0:
        return pd.DataFrame()
    table = pd.DataFrame(point_sources).reset_index(drop=True)
    missing = [c for c in ("x", "y", "flux") if c not in table]
    if missing:
        raise ConfigurationError(f"simulate_pair: point_sources lacks column(s) {missing}; "
                                 f"it needs x, y, flux (nJy)")
    x = table["x"].to_numpy(dtype=float)
    y = table["y"].to_numpy(dtype=float)
    flux = table["flux"].to_numpy(dtype=float)
    template_flux = (table["template_flux"].to_numpy(dtype=float) if "template_flux" in table
                     else flux)
    template_x = table["template_x"].to_numpy(dtype=float) if "template_x" in table else x + dx
    template_y = table["template_y"].to_numpy(dtype=float) if "template_y" in table else y + dy
    kind = table["kind"].astype(str).to_numpy() if "kind" in table else np.full(x.size, "star")
    ra, dec = wcs.all_pix2world(x, y, 0)
    delta = flux - template_flux
    snr = delta / njy * render.point_source_norms(psf, x, y) / sigma(x, y)
    return pd.DataFrame({
        "id": POINT_SOURCE_ID_START + np.arange(x.size, dtype=np.int64), "kind": kind,
        "ra": ra, "dec": dec, "x": x, "y": y, "flux": flux, "template_flux": template_flux,
        "delta_flux": delta, "snr": snr, "template_x": template_x, "template_y": template_y,
    })
