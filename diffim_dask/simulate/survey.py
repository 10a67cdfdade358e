"""A simulated survey: visits of several detectors and a tract of template patches.

Every image renders the same :class:`~diffim_dask.simulate.sky.SkyModel`
through its own WCS and PSF:

* **science images** ``(visit, detector)``: the visit's pointing, rotation
  and (optionally distorted) WCS; a Gaussian or Moffat PSF whose FWHM is drawn
  per visit and varies across the detector by up to ``psf_variation``; stars
  at their flux on the visit's MJD; galaxies; transients and moving objects
  drawn for this image; sky + Poisson + read noise; cosmic rays (not flagged);
  saturation (clipped, SAT); bad columns (BAD).
* **template patches**: the tract's TAN WCS, a sharp constant PSF, variables
  at their mean flux, no transients, and Gaussian noise of a coadd of
  ``template_depth`` visits: variance ``[(sky + source)/gain + (rn/gain)²] / depth``.

S/N of an injected or variable source (the ``snr`` truth column) is the
matched-filter S/N of its *flux change* against the visit's sky noise,

.. math::

    \\mathrm{S/N} = \\frac{\\Delta F \\sqrt{\\sum_i P_i^2}}{\\sigma_\\mathrm{sky}},
    \\qquad \\sigma_\\mathrm{sky}^2 = \\frac{B}{g} + \\frac{r^2}{g^2},

with ΔF in counts, P the unit-sum profile drawn (PSF, or the trail for moving
objects), B the local sky (counts), g the gain and r the read noise
(electrons). It ignores the template's noise and the source's own Poisson
noise, so it is the S/N a PSF fit on the science image would reach for a
faint source on empty sky; it is signed (fading variables are negative).

Truth tables (one per image, listing every object whose centre is on it):

==================  =============================================================
column              meaning
==================  =============================================================
id                  unique int64 (stars from 1, galaxies from 1e9, per-image
                    objects from 2e15 (transient), 3e15 (moving), 4e15 (cosmic
                    ray), 5e15 (user point sources of :func:`simulate_pair`))
kind                ``star``, ``variable``, ``galaxy``, ``transient``, ``moving``,
                    ``cosmic_ray``
ra, dec             degrees (trail / cosmic-ray midpoint)
x, y                parent-frame pixel position in *this* image
flux                nJy in this image (cosmic rays: deposited charge in nJy)
template_flux       nJy in the template (0 for transients, movers, cosmic rays)
delta_flux          ``flux - template_flux`` (nJy)
snr                 expected matched-filter S/N of ``delta_flux`` (see above);
                    0 for constant sources, NaN for cosmic rays
on_galaxy, host_id  transient placed on a galaxy, and that galaxy's id (-1)
trail_length        pixels (moving objects, cosmic rays; 0 otherwise)
trail_angle         degrees counter-clockwise from +x
saturated           the expected counts at the centre pixel reach saturation
r_eff, sersic_n,    galaxy shape: circularised half-light radius (arcsec),
axis_ratio,         Sérsic index, b/a, major-axis angle east of north (deg);
position_angle      NaN for other kinds
color               g - i style colour (stars, galaxies), for a future DCR model
visit, detector     the image (-1 for templates)
patch               template patch id (-1 for visits)
==================  =============================================================

Randomness: the sky comes from stream ``SKY`` of the seed; visit parameters
from ``(VISIT, visit)``; per-detector PSF variation and sky gradient from
``(VISIT, visit, detector)``; injections from ``(INJECTIONS, visit,
detector)``; noise and cosmic rays from ``(IMAGE_NOISE, visit, detector)``;
bad columns from ``(DETECTOR, detector)`` (a detector keeps its defects);
template noise from ``(PATCH_NOISE, patch)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from ..errors import ConfigurationError
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..masks import MASK_DTYPE, mask_value
from ..psf.models import GaussianPsf, MoffatPsf, PsfModel
from . import _scene, _streams, render
from .config import SurveyConfig
from .geometry import PatchInfo, Tract, focal_plane_origins, make_tract, tangent_wcs
from .sky import SkyModel, make_sky, variable_flux

__all__ = [
    "Survey",
    "SimulatedImage",
    "VisitSpec",
    "visit_spec",
    "survey_tract",
    "make_psf",
    "fwhm_variation_coefficients",
    "TRANSIENT_ID_START",
    "MOVING_ID_START",
    "COSMIC_RAY_ID_START",
]

#: Id ranges of per-image objects: start + (visit * 10_000 + detector) * 100_000 + index.
TRANSIENT_ID_START = 2 * 10 ** 15
MOVING_ID_START = 3 * 10 ** 15
COSMIC_RAY_ID_START = 4 * 10 ** 15


def _image_id_start(start: int, visit: int, detector: int) -> int:
    return start + (visit * 10_000 + detector) * 100_000


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedImage:
    """A simulated exposure with its truth.

    Attributes
    ----------
    exposure : Exposure
        Image (counts), variance (counts², the true expected variance), mask,
        the WCS and the *true* PSF model used to draw it, PhotoCalib and VisitInfo.
    truth : pandas.DataFrame
        One row per object whose centre is on the image (columns listed in
        :data:`TRUTH_COLUMNS`).
    model : numpy.ndarray
        Noise-free source image (counts, float32, no sky, no defects).
    background : numpy.ndarray
        The sky model (counts, float32) — subtracted from ``exposure.image``
        when the image is sky-subtracted.
    """

    exposure: Exposure
    truth: pd.DataFrame
    model: np.ndarray
    background: np.ndarray


#: Columns of every truth table.
TRUTH_COLUMNS = _scene.TRUTH_COLUMNS


@dataclasses.dataclass(frozen=True)
class VisitSpec:
    """Per-visit observing conditions (deterministic function of the config and visit id).

    Attributes
    ----------
    visit : int
    ra, dec : float
        Pointing (tangent point of the focal plane), degrees.
    rotation : float
        Rotation of the focal plane (deg).
    mjd : float
        Mid-exposure MJD.
    psf_fwhm : float
        Science PSF FWHM at each detector's centre (pixels).
    sky_level : float
        Mean sky (counts per pixel).
    zero_point : float
        PhotoCalib zero point.
    airmass, parallactic_angle : float
    """

    visit: int
    ra: float
    dec: float
    rotation: float
    mjd: float
    psf_fwhm: float
    sky_level: float
    zero_point: float
    airmass: float
    parallactic_angle: float


def visit_spec(config: SurveyConfig, visit: int) -> VisitSpec:
    """Observing conditions of ``visit`` (stream ``(VISIT, visit)``)."""
    rng = _streams.rng_for(config.seed, _streams.VISIT, visit)
    east, north = rng.uniform(-1.0, 1.0, 2) * config.pointing_offset / 3600.0
    dec = config.dec + north
    ra = (config.ra + east / math.cos(math.radians(dec))) % 360.0
    rotation = float(rng.uniform(-1.0, 1.0) * config.rotation_range)
    psf_fwhm = float(rng.uniform(*config.science_fwhm_range))
    sky = config.sky_level * (1.0 + float(rng.uniform(-1.0, 1.0)) * config.sky_level_variation)
    zero_point = config.zero_point + float(rng.uniform(-1.0, 1.0)) * config.zero_point_variation
    airmass = float(rng.uniform(1.0, 1.6))
    parallactic = float(rng.uniform(-90.0, 90.0))
    mjd = config.first_mjd + visit * config.visit_cadence + float(rng.uniform(0.0, 0.3))
    return VisitSpec(visit=int(visit), ra=float(ra), dec=float(dec), rotation=rotation, mjd=mjd,
                     psf_fwhm=psf_fwhm, sky_level=float(sky), zero_point=float(zero_point),
                     airmass=airmass, parallactic_angle=parallactic)


def fwhm_variation_coefficients(rng: np.random.Generator, amplitude: float) -> tuple[float, ...]:
    """Random quadratic FWHM variation ``(c_u, c_v, c_uu, c_uv, c_vv)`` peaking at ``amplitude``.

    The polynomial ``Σ c_k t_k(u, v)`` over ``u, v ∈ [-1, 1]`` is scaled so its
    largest absolute value is ``amplitude`` (a fractional FWHM change).
    """
    coefficients = rng.uniform(-1.0, 1.0, 5)
    coefficients[2:] *= 0.5  # keep the variation mostly linear, as across a real detector
    if amplitude <= 0:
        return ()
    grid = np.linspace(-1.0, 1.0, 21)
    u, v = np.meshgrid(grid, grid)
    poly = (coefficients[0] * u + coefficients[1] * v + coefficients[2] * u * u
            + coefficients[3] * u * v + coefficients[4] * v * v)
    peak = float(np.abs(poly).max())
    return tuple(float(c) for c in coefficients * (amplitude / peak))


def make_psf(profile: str, fwhm: float, *, beta: float = 3.0, fwhm_variation=(),
             shape: tuple[int, int] | None = None, reference: tuple[float, float] | None = None
             ) -> PsfModel:
    """A Gaussian or Moffat PSF whose variation is normalised to a detector of ``shape``.

    With ``shape = (ny, nx)`` the variation polynomial uses
    ``u = (x - (nx - 1)/2) / (nx/2)``, ``v = (y - (ny - 1)/2) / (ny/2)``, so
    ``u, v ∈ [-1, 1]`` over the detector.
    """
    kwargs = {}
    if shape is not None:
        ny, nx = shape
        kwargs["reference"] = ((nx - 1) / 2.0, (ny - 1) / 2.0)
        kwargs["scale"] = (nx / 2.0, ny / 2.0)
    if reference is not None:
        kwargs["reference"] = reference
    if fwhm_variation:
        kwargs["fwhm_variation"] = tuple(fwhm_variation)
    if profile == "gaussian":
        return GaussianPsf(fwhm, **kwargs)
    if profile == "moffat":
        return MoffatPsf(fwhm, beta=beta, **kwargs)
    raise ConfigurationError(f"unknown PSF profile {profile!r}; use 'gaussian' or 'moffat'")


def _focal_plane_radius(config: SurveyConfig) -> float:
    origins = focal_plane_origins(config.n_detectors, config.detector_shape, config.detector_gap)
    ny, nx = config.detector_shape
    corners_x = np.concatenate([origins[:, 0] - 0.5, origins[:, 0] + nx - 0.5])
    corners_y = np.concatenate([origins[:, 1] - 0.5, origins[:, 1] + ny - 0.5])
    return float(np.hypot(np.abs(corners_x).max(), np.abs(corners_y).max()))


def detector_wcs(config: SurveyConfig, spec: VisitSpec, detector: int) -> WCS:
    """WCS of ``detector`` in the visit described by ``spec``."""
    _check_detector(config, detector)
    origin = focal_plane_origins(config.n_detectors, config.detector_shape,
                                 config.detector_gap)[detector]
    k = config.distortion / _focal_plane_radius(config) ** 3 if config.distortion else 0.0
    return tangent_wcs(spec.ra, spec.dec, config.pixel_scale, (-origin[0], -origin[1]),
                       rotation=spec.rotation, distortion=k)


def _check_detector(config: SurveyConfig, detector: int) -> None:
    if not 0 <= detector < config.n_detectors:
        raise ConfigurationError(
            f"detector {detector} does not exist: the survey has detectors "
            f"0..{config.n_detectors - 1}")


def _check_visit(config: SurveyConfig, visit: int) -> None:
    if not 0 <= visit < config.n_visits:
        raise ConfigurationError(
            f"visit {visit} does not exist: the survey has visits 0..{config.n_visits - 1}")


def survey_tract(config: SurveyConfig) -> Tract:
    """The tract (TAN plane at the survey centre) covering every detector of every visit."""
    ny, nx = config.detector_shape
    corner_x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    corner_y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ras, decs = [], []
    for visit in range(config.n_visits):
        spec = visit_spec(config, visit)
        for detector in range(config.n_detectors):
            ra, dec = detector_wcs(config, spec, detector).all_pix2world(corner_x, corner_y, 0)
            ras.append(ra)
            decs.append(dec)
    return make_tract(config.ra, config.dec, config.pixel_scale, np.concatenate(ras),
                      np.concatenate(decs), config.patch_size, config.patch_border, margin=16)


class Survey:
    """A deterministic simulated survey.

    Parameters
    ----------
    config : SurveyConfig, optional
        Defaults to ``SurveyConfig()``.

    Examples
    --------
    >>> survey = Survey(SurveyConfig(n_visits=1, detector_shape=(256, 256), seed=1))
    >>> image = survey.simulate_visit(0, 0)
    >>> image.exposure.shape
    (256, 256)
    """

    def __init__(self, config: SurveyConfig | None = None):
        self.config = SurveyConfig() if config is None else config
        self.tract = survey_tract(self.config)
        self._sky: SkyModel | None = None

    def __repr__(self) -> str:
        c = self.config
        return (f"Survey(seed={c.seed}, n_visits={c.n_visits}, n_detectors={c.n_detectors}, "
                f"detector_shape={c.detector_shape}, patches={len(self.tract.patches)})")

    # -- description -------------------------------------------------------------------------

    @property
    def sky(self) -> SkyModel:
        """The static sky (drawn on first use)."""
        if self._sky is None:
            self._sky = make_sky(self.config)
        return self._sky

    @property
    def visits(self) -> list[tuple[int, int]]:
        """Every ``(visit, detector)`` of the survey."""
        return [(v, d) for v in range(self.config.n_visits) for d in range(self.config.n_detectors)]

    def visit_spec(self, visit: int) -> VisitSpec:
        """Observing conditions of ``visit``."""
        _check_visit(self.config, visit)
        return visit_spec(self.config, visit)

    def wcs(self, visit: int, detector: int) -> WCS:
        """WCS of a detector in a visit."""
        return detector_wcs(self.config, self.visit_spec(visit), detector)

    def psf(self, visit: int, detector: int) -> PsfModel:
        """The true science PSF of a detector in a visit."""
        spec = self.visit_spec(visit)
        coefficients, _ = self._detector_draws(visit, detector)
        return make_psf(self.config.psf_profile, spec.psf_fwhm, beta=self.config.moffat_beta,
                        fwhm_variation=coefficients, shape=self.config.detector_shape)

    def photo_calib(self, visit: int) -> PhotoCalib:
        """Calibration of a visit."""
        return PhotoCalib(self.visit_spec(visit).zero_point)

    def visit_info(self, visit: int, detector: int) -> VisitInfo:
        """Metadata of a detector in a visit."""
        spec = self.visit_spec(visit)
        c = self.config
        return VisitInfo(visit=visit, detector=detector, band=c.band, mjd=spec.mjd,
                         exposure_time=c.exposure_time, gain=c.gain, read_noise=c.read_noise,
                         saturation=c.saturation, airmass=spec.airmass,
                         parallactic_angle=spec.parallactic_angle, instrument=c.instrument)

    def _detector_draws(self, visit: int, detector: int) -> tuple[tuple[float, ...], float]:
        """PSF variation coefficients and sky-gradient direction of a detector in a visit."""
        _check_visit(self.config, visit)
        _check_detector(self.config, detector)
        rng = _streams.rng_for(self.config.seed, _streams.VISIT, visit, detector)
        coefficients = fwhm_variation_coefficients(rng, self.config.psf_variation)
        gradient_angle = float(rng.uniform(0.0, 2.0 * math.pi))
        return coefficients, gradient_angle

    def background(self, visit: int, detector: int) -> np.ndarray:
        """The sky model of a detector in a visit (counts per pixel, float64).

        Flat at the visit's sky level, tilted by ``sky_gradient`` (fractional
        change from the centre to the edge) in a direction drawn per detector.
        """
        spec = self.visit_spec(visit)
        ny, nx = self.config.detector_shape
        if self.config.sky_gradient == 0:
            return np.full((ny, nx), spec.sky_level)
        _, angle = self._detector_draws(visit, detector)
        u = (np.arange(nx) - (nx - 1) / 2.0) / (nx / 2.0)
        v = (np.arange(ny) - (ny - 1) / 2.0) / (ny / 2.0)
        tilt = math.cos(angle) * u[None, :] + math.sin(angle) * v[:, None]
        return spec.sky_level * (1.0 + self.config.sky_gradient * tilt)

    def bad_columns(self, detector: int) -> pd.DataFrame:
        """The bad columns of a detector (the same in every visit)."""
        _check_detector(self.config, detector)
        rng = _streams.rng_for(self.config.seed, _streams.DETECTOR, detector)
        return render.draw_bad_columns(rng, self.config.detector_shape, self.config.n_bad_columns)

    # -- injections ----------------------------------------------------------------------------

    def injections(self, visit: int, detector: int) -> pd.DataFrame:
        """Transients and moving objects of a detector in a visit (truth rows, nothing drawn).

        ``n_transients`` point sources with S/N log-uniform in
        ``transient_snr_range``; a fraction ``transient_host_fraction`` sits on a
        galaxy of the detector (offset from its centre drawn from the galaxy's
        shape scaled by 1/2), the others uniformly; all keep ``edge_margin``
        pixels from the edges. ``n_moving`` trails of length uniform in
        ``trail_length_range``, uniform direction and S/N log-uniform in
        ``moving_snr_range``, entirely inside the margins. Fluxes follow from
        the S/N: ``F = S/N × σ_sky / sqrt(ΣP²)`` counts. The table depends only
        on the config, the visit and the detector (stream ``(INJECTIONS, visit,
        detector)``), so it can be read without simulating any pixels.
        """
        c = self.config
        spec = self.visit_spec(visit)
        wcs = self.wcs(visit, detector)
        psf = self.psf(visit, detector)
        galaxies = _scene.project(self.sky.galaxies, wcs, c.detector_shape, (0, 0), margin=0)
        shapes = _scene.galaxy_pixel_shapes(galaxies, wcs) if len(galaxies) else np.zeros((0, 2, 2))
        sigma = _scene.sky_sigma_function(self.background(visit, detector), c.gain, c.read_noise)
        rng = _streams.rng_for(c.seed, _streams.INJECTIONS, visit, detector)
        out = _scene.draw_injections(
            rng, psf=psf, wcs=wcs, shape=c.detector_shape, galaxies=galaxies, galaxy_shapes=shapes,
            sky_sigma=sigma, njy_per_count=PhotoCalib(spec.zero_point).njy_per_count,
            n_transients=c.n_transients, snr_range=c.transient_snr_range,
            host_fraction=c.transient_host_fraction, n_moving=c.n_moving,
            moving_snr_range=c.moving_snr_range, trail_length_range=c.trail_length_range,
            edge_margin=c.edge_margin,
            transient_id_start=_image_id_start(TRANSIENT_ID_START, visit, detector),
            moving_id_start=_image_id_start(MOVING_ID_START, visit, detector))
        out["visit"] = visit
        out["detector"] = detector
        return out

    # -- science images ------------------------------------------------------------------------

    def simulate_visit(self, visit: int, detector: int) -> SimulatedImage:
        """Simulate one detector of one visit (independent of every other image).

        Returns
        -------
        SimulatedImage
            The exposure (sky-subtracted unless ``config.sky_subtracted`` is
            False) and the truth of every star, variable, galaxy, transient,
            moving object and cosmic ray on it.
        """
        c = self.config
        spec = self.visit_spec(visit)
        wcs = self.wcs(visit, detector)
        psf = self.psf(visit, detector)
        calib = PhotoCalib(spec.zero_point)
        background = self.background(visit, detector)
        sigma = _scene.sky_sigma_function(background, c.gain, c.read_noise)
        model = np.zeros(c.detector_shape)

        stars, galaxies, _ = _scene.render_sky(
            model, self.sky, wcs, psf, (0, 0), lambda rows: variable_flux(rows, spec.mjd),
            calib.njy_per_count)
        star_sigma = sigma(stars["x"].to_numpy(), stars["y"].to_numpy())
        static = _scene.static_truth(stars, galaxies, template_star_flux=stars["flux"].to_numpy(),
                                     delta_snr_scale=1.0 / (star_sigma * calib.njy_per_count))
        injected = self.injections(visit, detector)
        _scene.render_injections(model, injected, psf, calib.njy_per_count)

        expected = model + background
        rng = _streams.rng_for(c.seed, _streams.IMAGE_NOISE, visit, detector)
        image, variance, mask, cosmic_rays = _scene.add_detector_effects(
            expected, background, rng, gain=c.gain, read_noise=c.read_noise,
            saturation=c.saturation, cosmic_ray_rate=c.cosmic_ray_rate,
            cosmic_ray_energy_range=c.cosmic_ray_energy_range,
            bad_columns=self.bad_columns(detector), sky_subtracted=c.sky_subtracted)

        rays = _scene.cosmic_ray_truth(cosmic_rays, wcs, calib.njy_per_count, c.gain,
                                       _image_id_start(COSMIC_RAY_ID_START, visit, detector))
        truth = pd.concat([t for t in (static, injected, rays) if len(t)] or [static],
                          ignore_index=True)
        truth["saturated"] = _scene.peak_saturated(truth, expected, (0, 0), c.saturation)
        truth["visit"] = visit
        truth["detector"] = detector
        truth = _scene.normalise_truth(truth)

        exposure = Exposure.from_arrays(
            image.astype(np.float32), variance.astype(np.float32), mask, wcs=wcs, psf=psf,
            photo_calib=calib, info=self.visit_info(visit, detector))
        return SimulatedImage(exposure=exposure, truth=truth, model=model.astype(np.float32),
                              background=background.astype(np.float32))

    # -- templates -----------------------------------------------------------------------------

    def template_patches(self) -> list[PatchInfo]:
        """The patches tiling the tract (ids, boxes, shared tract WCS)."""
        return list(self.tract.patches)

    def patches_overlapping(self, visit: int, detector: int) -> list[int]:
        """Ids of the template patches overlapping a detector in a visit."""
        return self.tract.patches_overlapping(self.wcs(visit, detector), self.config.detector_shape)

    def template_psf(self, patch_id: int | None = None) -> PsfModel:
        """The (constant) template PSF, referenced at the patch centre when given."""
        reference = None
        if patch_id is not None:
            patch = self._patch(patch_id)
            x0, y0 = patch.origin
            ny, nx = patch.shape
            reference = (x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0)
        return make_psf(self.config.psf_profile, self.config.template_fwhm,
                        beta=self.config.moffat_beta, reference=reference)

    def _patch(self, patch_id: int) -> PatchInfo:
        n = len(self.tract.patches)
        if not 0 <= patch_id < n:
            raise ConfigurationError(
                f"patch {patch_id} does not exist: the tract has patches 0..{n - 1}")
        return self.tract.patch(patch_id)

    def simulate_template_patch(self, patch_id: int) -> SimulatedImage:
        """Simulate the deep template coadd of one patch of the simulator's own tiling.

        See :meth:`simulate_template` for what a template contains.
        """
        patch = self._patch(patch_id)
        image = self.simulate_template(patch.wcs, patch.shape, patch.origin, noise_key=patch_id,
                                       psf=self.template_psf(patch_id))
        truth = image.truth.assign(patch=patch_id)
        return dataclasses.replace(image, truth=_scene.normalise_truth(truth))

    def simulate_template(self, wcs: WCS, shape: tuple[int, int], origin: tuple[int, int] = (0, 0),
                          *, noise_key: int = 0, psf: PsfModel | None = None) -> SimulatedImage:
        """Simulate a deep template coadd on any pixel grid (e.g. a sky-map patch).

        The image is sky-subtracted; noise is Gaussian with the variance of a
        mean of ``template_depth`` visits (the variance plane holds it);
        variables show their mean flux; there are no transients, movers,
        cosmic rays or bad columns. Pixels whose single-visit counts would
        saturate are clipped and flagged SAT, as in a coadd of saturated inputs.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            WCS of the grid (parent pixel frame).
        shape : (int, int)
            ``(ny, nx)``.
        origin : (int, int)
            Parent-frame ``(x0, y0)`` of the first pixel.
        noise_key : int
            Key of the noise stream: distinct grids need distinct keys for
            independent noise; the same key reproduces the same noise.
        psf : PsfModel, optional
            The template PSF (default: the survey's constant template PSF,
            referenced at the grid centre).
        """
        c = self.config
        if psf is None:
            ny, nx = shape
            psf = make_psf(c.psf_profile, c.template_fwhm, beta=c.moffat_beta,
                           reference=(origin[0] + (nx - 1) / 2.0, origin[1] + (ny - 1) / 2.0))
        calib = PhotoCalib(c.zero_point)
        shape = (int(shape[0]), int(shape[1]))
        origin = (int(origin[0]), int(origin[1]))
        model = np.zeros(shape)
        stars, galaxies, _ = _scene.render_sky(
            model, self.sky, wcs, psf, origin, lambda rows: rows["flux"].to_numpy(),
            calib.njy_per_count)
        truth = _scene.static_truth(stars, galaxies, template_star_flux=stars["flux"].to_numpy(),
                                    delta_snr_scale=0.0)
        expected = model + c.sky_level
        variance = (expected / c.gain + (c.read_noise / c.gain) ** 2) / c.template_depth
        rng = _streams.rng_for(c.seed, _streams.PATCH_NOISE, noise_key)
        image = model + np.sqrt(variance) * rng.standard_normal(shape)
        saturated = expected >= c.saturation
        image[saturated] = c.saturation - c.sky_level
        mask = np.where(saturated, MASK_DTYPE(mask_value("SAT")), MASK_DTYPE(0)).astype(MASK_DTYPE)
        truth["saturated"] = _scene.peak_saturated(truth, expected, origin, c.saturation)
        truth = _scene.normalise_truth(truth)
        info = VisitInfo(visit=-1, detector=-1, band=c.band,
                         exposure_time=c.exposure_time * c.template_depth,
                         gain=c.gain * c.template_depth,
                         read_noise=c.read_noise * math.sqrt(c.template_depth),
                         saturation=c.saturation, instrument=f"{c.instrument}-coadd")
        exposure = Exposure.from_arrays(image.astype(np.float32), variance.astype(np.float32), mask,
                                        wcs=copy.deepcopy(wcs), psf=psf, photo_calib=calib,
                                        info=info, origin=origin)
        return SimulatedImage(exposure=exposure, truth=truth, model=model.astype(np.float32),
                              background=np.full(shape, c.sky_level, dtype=np.float32))
