"""Shared steps of rendering one image: select sky sources, project them, draw them, build truth."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from ..psf.models import PsfModel
from . import render
from .profiles import sersic_mixture, shape_matrix
from .sky import SkyModel

#: Extra pixels around an image inside which galaxies are still drawn (their wings reach in).
GALAXY_MARGIN = 128

#: Columns of every truth table, in order.
TRUTH_COLUMNS = (
    "id", "kind", "ra", "dec", "x", "y", "flux", "template_flux", "delta_flux", "snr",
    "on_galaxy", "host_id", "trail_length", "trail_angle", "saturated", "r_eff", "sersic_n",
    "axis_ratio", "position_angle", "color", "visit", "detector", "patch",
)

_ARCSEC = 1.0 / 3600.0


def _footprint_circle(wcs: WCS, shape, origin, margin):
    """Centre (ra, dec) and radius (deg) of a circle enclosing the image plus ``margin`` px."""
    ny, nx = shape
    x0, y0 = origin
    left, right = x0 - 0.5 - margin, x0 + nx - 0.5 + margin
    bottom, top = y0 - 0.5 - margin, y0 + ny - 0.5 + margin
    xs = np.array([left, right, left, right, x0 + (nx - 1) / 2.0])
    ys = np.array([bottom, bottom, top, top, y0 + (ny - 1) / 2.0])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    sep = _separation(ra[:4], dec[:4], ra[4], dec[4])
    return ra[4], dec[4], float(sep.max()) * 1.02 + 1e-4


def _separation(ra, dec, ra0, dec0):
    """Angular separation (deg), haversine."""
    ra, dec, ra0, dec0 = (np.radians(np.asarray(v, dtype=float)) for v in (ra, dec, ra0, dec0))
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def project(table: pd.DataFrame, wcs: WCS, shape, origin, margin: float) -> pd.DataFrame:
    """Rows of ``table`` (with ``ra, dec``) whose pixel position is within ``margin`` of the image.

    Adds columns ``x, y`` (parent-frame pixels) and ``inside`` (centre on the image).
    """
    ra0, dec0, radius = _footprint_circle(wcs, shape, origin, margin)
    near = _separation(table["ra"].to_numpy(), table["dec"].to_numpy(), ra0, dec0) < radius
    sub = table[near]
    if len(sub) == 0:
        return sub.assign(x=np.zeros(0), y=np.zeros(0), inside=np.zeros(0, dtype=bool))
    x, y = wcs.all_world2pix(sub["ra"].to_numpy(), sub["dec"].to_numpy(), 0)
    ny, nx = shape
    x0, y0 = origin
    keep = ((x > x0 - 0.5 - margin) & (x < x0 + nx - 0.5 + margin)
            & (y > y0 - 0.5 - margin) & (y < y0 + ny - 0.5 + margin))
    out = sub[keep].copy()
    out["x"] = x[keep]
    out["y"] = y[keep]
    out["inside"] = ((out["x"] > x0 - 0.5) & (out["x"] < x0 + nx - 0.5)
                     & (out["y"] > y0 - 0.5) & (out["y"] < y0 + ny - 0.5))
    return out.reset_index(drop=True)


def pixel_jacobian(wcs: WCS, ra, dec) -> np.ndarray:
    """``d(x, y) / d(east, north)`` in pixels per arcsec at each position, shape (n, 2, 2)."""
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    cos_dec = np.cos(np.radians(dec))
    x, y = wcs.all_world2pix(ra, dec, 0)
    xe, ye = wcs.all_world2pix(ra + _ARCSEC / cos_dec, dec, 0)
    xn, yn = wcs.all_world2pix(ra, dec + _ARCSEC, 0)
    jac = np.empty(ra.shape + (2, 2))
    jac[:, 0, 0], jac[:, 1, 0] = xe - x, ye - y
    jac[:, 0, 1], jac[:, 1, 1] = xn - x, yn - y
    return jac


def galaxy_pixel_shapes(galaxies: pd.DataFrame, wcs: WCS) -> np.ndarray:
    """Pixel-frame shape matrices (px², ordered x, y) of projected galaxies."""
    sky = shape_matrix(galaxies["r_eff"].to_numpy(), galaxies["axis_ratio"].to_numpy(),
                       galaxies["position_angle"].to_numpy())
    jac = pixel_jacobian(wcs, galaxies["ra"].to_numpy(), galaxies["dec"].to_numpy())
    return jac @ sky @ np.transpose(jac, (0, 2, 1))


def render_sky(model: np.ndarray, sky: SkyModel, wcs: WCS, psf: PsfModel, origin,
               star_flux_njy_of, njy_per_count: float, *, star_offset=(0.0, 0.0)):
    """Draw the sky's stars and galaxies into ``model``.

    Parameters
    ----------
    star_flux_njy_of : callable
        ``f(stars) -> flux in nJy`` of the projected star rows (e.g. at a visit's MJD).
    star_offset : (float, float)
        Pixel shift applied to every source when drawing (template misregistration).

    Returns
    -------
    stars, galaxies : pandas.DataFrame
        Projected rows with ``x, y, inside, image_flux`` (nJy drawn) and ``norm``.
    galaxy_shapes : numpy.ndarray, shape (n_galaxies, 2, 2)
        Pixel-frame shape matrices of the galaxies.
    """
    wcs = copy.deepcopy(wcs)
    shape = model.shape
    stars = project(sky.stars, wcs, shape, origin, margin=psf.default_size // 2 + 2)
    star_flux = np.asarray(star_flux_njy_of(stars), dtype=float)
    stars["image_flux"] = star_flux
    stars["norm"] = render.render_point_sources(
        model, stars["x"].to_numpy() + star_offset[0], stars["y"].to_numpy() + star_offset[1],
        star_flux / njy_per_count, psf, origin=origin)
    galaxies = project(sky.galaxies, wcs, shape, origin, margin=GALAXY_MARGIN)
    shapes = galaxy_pixel_shapes(galaxies, wcs) if len(galaxies) else np.zeros((0, 2, 2))
    mixtures = [sersic_mixture(n) for n in galaxies["sersic_n"].to_numpy()]
    galaxies["image_flux"] = galaxies["flux"].to_numpy(dtype=float)
    galaxies["norm"] = render.render_galaxies(
        model, galaxies["x"].to_numpy() + star_offset[0], galaxies["y"].to_numpy() + star_offset[1],
        galaxies["flux"].to_numpy(dtype=float) / njy_per_count, shapes,
        [m[0] for m in mixtures], [m[1] for m in mixtures], psf, origin=origin)
    return stars, galaxies, shapes


def empty_truth() -> pd.DataFrame:
    """A truth table with no rows and the standard columns and dtypes."""
    return normalise_truth(pd.DataFrame({name: [] for name in TRUTH_COLUMNS}))


def normalise_truth(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill missing standard columns and fix dtypes and column order."""
    defaults = {
        "on_galaxy": False, "host_id": -1, "trail_length": 0.0, "trail_angle": 0.0,
        "saturated": False, "r_eff": math.nan, "sersic_n": math.nan, "axis_ratio": math.nan,
        "position_angle": math.nan, "color": math.nan, "visit": -1, "detector": -1, "patch": -1,
        "template_flux": 0.0, "delta_flux": 0.0, "snr": math.nan,
    }
    frame = frame.copy()
    dtypes = {"id": np.int64, "kind": str, "on_galaxy": bool, "host_id": np.int64,
              "saturated": bool, "visit": np.int64, "detector": np.int64, "patch": np.int64}
    for name in TRUTH_COLUMNS:
        dtype = dtypes.get(name, np.float64)
        if name not in frame:
            frame[name] = defaults.get(name, math.nan)
        values = frame[name].to_numpy(copy=True)
        if name in defaults:
            # Rows concatenated from tables without this column are NaN: give them the default.
            missing = pd.isna(values)
            if missing.any():
                values = values.astype(object)
                values[missing] = defaults[name]
        frame[name] = np.asarray(values).astype(dtype)
    extra = [c for c in frame.columns if c not in TRUTH_COLUMNS]
    return frame[list(TRUTH_COLUMNS) + extra].reset_index(drop=True)


def static_truth(stars: pd.DataFrame, galaxies: pd.DataFrame, *, template_star_flux,
                 delta_snr_scale) -> pd.DataFrame:
    """Truth rows for the stars and galaxies whose centre is on the image.

    ``template_star_flux`` is the per-row template flux of ``stars``;
    ``delta_snr_scale`` multiplies ``delta_flux × norm`` to give the S/N, i.e.
    1 / (σ × nJy per count): an array over star rows, or a scalar.
    """
    inside = stars["inside"].to_numpy()
    template_flux = np.asarray(template_star_flux, dtype=float)
    delta = stars["image_flux"].to_numpy() - template_flux
    scale = np.broadcast_to(np.asarray(delta_snr_scale, dtype=float), delta.shape)
    star_rows = pd.DataFrame({
        "id": stars["id"].to_numpy(),
        "kind": np.where(stars["variable"].to_numpy(), "variable", "star"),
        "ra": stars["ra"].to_numpy(), "dec": stars["dec"].to_numpy(),
        "x": stars["x"].to_numpy(), "y": stars["y"].to_numpy(),
        "flux": stars["image_flux"].to_numpy(), "template_flux": template_flux,
        "delta_flux": delta, "snr": delta * stars["norm"].to_numpy() * scale,
        "color": stars["color"].to_numpy(),
    })[inside]
    g_inside = galaxies["inside"].to_numpy()
    galaxy_rows = pd.DataFrame({
        "id": galaxies["id"].to_numpy(), "kind": "galaxy",
        "ra": galaxies["ra"].to_numpy(), "dec": galaxies["dec"].to_numpy(),
        "x": galaxies["x"].to_numpy(), "y": galaxies["y"].to_numpy(),
        "flux": galaxies["image_flux"].to_numpy(), "template_flux": galaxies["flux"].to_numpy(),
        "delta_flux": 0.0, "snr": 0.0,
        "r_eff": galaxies["r_eff"].to_numpy(), "sersic_n": galaxies["sersic_n"].to_numpy(),
        "axis_ratio": galaxies["axis_ratio"].to_numpy(),
        "position_angle": galaxies["position_angle"].to_numpy(),
        "color": galaxies["color"].to_numpy(),
    })[g_inside]
    parts = [p for p in (star_rows, galaxy_rows) if len(p)]
    if not parts:
        return empty_truth()
    return normalise_truth(pd.concat(parts, ignore_index=True))


def peak_saturated(truth: pd.DataFrame, expected_raw: np.ndarray, origin,
                   saturation: float) -> np.ndarray:
    """Whether the expected counts (noiseless, sky included) at each row's pixel saturate."""
    if len(truth) == 0:
        return np.zeros(0, dtype=bool)
    ny, nx = expected_raw.shape
    ix = np.clip(np.floor(truth["x"].to_numpy() + 0.5).astype(int) - origin[0], 0, nx - 1)
    iy = np.clip(np.floor(truth["y"].to_numpy() + 0.5).astype(int) - origin[1], 0, ny - 1)
    return expected_raw[iy, ix] >= saturation


def draw_injections(rng: np.random.Generator, *, psf: PsfModel, wcs: WCS, shape,
                    galaxies: pd.DataFrame, galaxy_shapes: np.ndarray, sky_sigma,
                    njy_per_count: float, n_transients: int, snr_range, host_fraction: float,
                    n_moving: int, moving_snr_range, trail_length_range, edge_margin: float,
                    transient_id_start: int, moving_id_start: int) -> pd.DataFrame:
    """Transients and moving objects for one image (truth rows; nothing is drawn).

    Transients get a log-uniform S/N in ``snr_range``; a fraction
    ``host_fraction`` sits on a galaxy whose centre is at least ``edge_margin``
    from the edges (offset from the centre drawn from the galaxy's shape matrix
    scaled by 1/2), the rest uniformly. Moving objects are trails of uniform
    length in ``trail_length_range`` and uniform direction, entirely inside the
    margins, with log-uniform S/N in ``moving_snr_range``. Fluxes follow from the
    S/N: ``F = S/N × σ_sky / sqrt(ΣP²)`` counts. The number of random draws does
    not depend on the data, so the result is stable.

    Parameters
    ----------
    galaxies : pandas.DataFrame
        Projected galaxies (``x, y, id``) that may host transients.
    galaxy_shapes : numpy.ndarray
        Their pixel-frame shape matrices.
    sky_sigma : callable
        ``sky_sigma(x, y)``: background noise (counts) at pixel positions.
    """
    ny, nx = shape
    m = float(edge_margin)
    n = int(n_transients)
    log_snr = rng.uniform(*np.log(snr_range), n)
    want_host = rng.random(n) < host_fraction
    x = rng.uniform(m, nx - 1 - m, n)
    y = rng.uniform(m, ny - 1 - m, n)
    host_pick = rng.random(n)
    host_offset = rng.standard_normal((n, 2))
    host_id = np.full(n, -1, dtype=np.int64)
    if len(galaxies):
        gx = galaxies["x"].to_numpy()
        gy = galaxies["y"].to_numpy()
        usable = np.flatnonzero((gx > m) & (gx < nx - 1 - m) & (gy > m) & (gy < ny - 1 - m))
    else:
        usable = np.zeros(0, dtype=int)
    if usable.size:
        for i in np.flatnonzero(want_host):
            k = usable[min(int(host_pick[i] * usable.size), usable.size - 1)]
            dx, dy = 0.5 * np.linalg.cholesky(galaxy_shapes[k]) @ host_offset[i]
            x[i] = float(np.clip(gx[k] + dx, m, nx - 1 - m))
            y[i] = float(np.clip(gy[k] + dy, m, ny - 1 - m))
            host_id[i] = galaxies["id"].iloc[k]
    snr = np.exp(log_snr)
    counts = snr * sky_sigma(x, y) / render.point_source_norms(psf, x, y) if n else np.zeros(0)
    ra, dec = wcs.all_pix2world(x, y, 0)
    transients = pd.DataFrame({
        "id": transient_id_start + np.arange(n, dtype=np.int64),
        "kind": "transient", "ra": ra, "dec": dec, "x": x, "y": y,
        "flux": counts * njy_per_count, "template_flux": 0.0,
        "delta_flux": counts * njy_per_count, "snr": snr,
        "on_galaxy": host_id >= 0, "host_id": host_id,
    })

    n_move = int(n_moving)
    log_snr = rng.uniform(*np.log(moving_snr_range), n_move)
    length = rng.uniform(*trail_length_range, n_move)
    angle = rng.uniform(0.0, 360.0, n_move)
    reach = m + 0.5 * length
    mx = reach + rng.random(n_move) * np.clip(nx - 1 - 2 * reach, 0.0, None)
    my = reach + rng.random(n_move) * np.clip(ny - 1 - 2 * reach, 0.0, None)
    snr = np.exp(log_snr)
    norms = np.array([render.trail_norm(psf, mx[i], my[i], length[i], angle[i])
                      for i in range(n_move)])
    counts = snr * sky_sigma(mx, my) / norms if n_move else np.zeros(0)
    ra, dec = wcs.all_pix2world(mx, my, 0)
    movers = pd.DataFrame({
        "id": moving_id_start + np.arange(n_move, dtype=np.int64),
        "kind": "moving", "ra": ra, "dec": dec, "x": mx, "y": my,
        "flux": counts * njy_per_count, "template_flux": 0.0,
        "delta_flux": counts * njy_per_count, "snr": snr,
        "trail_length": length, "trail_angle": angle,
    })
    parts = [p for p in (transients, movers) if len(p)]
    if not parts:
        return empty_truth()
    return normalise_truth(pd.concat(parts, ignore_index=True))


def render_injections(model: np.ndarray, injections: pd.DataFrame, psf: PsfModel,
                      njy_per_count: float, origin=(0, 0)) -> None:
    """Draw the transients (PSF) and moving objects (trails) of an injection table."""
    transients = injections[injections["kind"] == "transient"]
    render.render_point_sources(model, transients["x"].to_numpy(), transients["y"].to_numpy(),
                                transients["flux"].to_numpy() / njy_per_count, psf, origin=origin)
    movers = injections[injections["kind"] == "moving"]
    render.render_trails(model, movers["x"].to_numpy(), movers["y"].to_numpy(),
                         movers["flux"].to_numpy() / njy_per_count,
                         movers["trail_length"].to_numpy(), movers["trail_angle"].to_numpy(), psf,
                         origin=origin)


def sky_sigma_function(background: np.ndarray, gain: float, read_noise: float):
    """``f(x, y)``: per-pixel background noise (counts) at the nearest pixel of a background map."""
    ny, nx = background.shape

    def sigma(x, y):
        ix = np.clip(np.floor(np.asarray(x, dtype=float) + 0.5).astype(int), 0, nx - 1)
        iy = np.clip(np.floor(np.asarray(y, dtype=float) + 0.5).astype(int), 0, ny - 1)
        return np.sqrt(background[iy, ix] / gain + (read_noise / gain) ** 2)

    return sigma


def add_detector_effects(expected: np.ndarray, background: np.ndarray, rng: np.random.Generator, *,
                         gain: float, read_noise: float, saturation: float, cosmic_ray_rate: float,
                         cosmic_ray_energy_range, bad_columns: pd.DataFrame, sky_subtracted: bool):
    """Noise, cosmic rays, saturation, bad columns: expected counts -> image planes.

    Order: Poisson + read noise (:func:`render.poisson_read_noise`), cosmic
    rays (charge added, not flagged), saturation (raw counts ≥ ``saturation``
    clipped, SAT), sky subtraction, bad columns (dead → 0, hot → + level; BAD).
    The variance is the expected one, ``expected / gain + (read_noise / gain)²``.

    Returns
    -------
    image, variance : numpy.ndarray
        float64 counts and counts².
    mask : numpy.ndarray
        uint32 planes (SAT, BAD).
    cosmic_rays : pandas.DataFrame
        The hits deposited (see :func:`render.draw_cosmic_rays`).
    """
    from ..masks import MASK_DTYPE, mask_value

    raw = render.poisson_read_noise(expected, gain, read_noise, rng)
    cosmic_rays = render.draw_cosmic_rays(rng, expected.shape, cosmic_ray_rate,
                                          cosmic_ray_energy_range)
    render.deposit_cosmic_rays(raw, cosmic_rays, gain)
    mask = np.zeros(expected.shape, dtype=MASK_DTYPE)
    saturated = raw >= saturation
    raw[saturated] = saturation
    mask[saturated] |= MASK_DTYPE(mask_value("SAT"))
    variance = expected / gain + (read_noise / gain) ** 2
    image = raw - background if sky_subtracted else raw
    bad = MASK_DTYPE(mask_value("BAD"))
    for column in bad_columns.itertuples(index=False):
        rows = slice(column.y_start, column.y_stop)
        if column.hot:
            image[rows, column.column] += column.level
        else:
            image[rows, column.column] = 0.0
        mask[rows, column.column] |= bad
    return image, variance, mask, cosmic_rays


def cosmic_ray_truth(cosmic_rays: pd.DataFrame, wcs: WCS, njy_per_count: float, gain: float,
                     id_start: int) -> pd.DataFrame:
    """Truth rows (kind ``cosmic_ray``) of deposited cosmic rays."""
    n = len(cosmic_rays)
    if n == 0:
        return empty_truth()
    ra, dec = wcs.all_pix2world(cosmic_rays["x"].to_numpy(), cosmic_rays["y"].to_numpy(), 0)
    flux = cosmic_rays["electrons"].to_numpy() / gain * njy_per_count
    return normalise_truth(pd.DataFrame({
        "id": id_start + np.arange(n, dtype=np.int64),
        "kind": "cosmic_ray", "ra": ra, "dec": dec,
        "x": cosmic_rays["x"].to_numpy(), "y": cosmic_rays["y"].to_numpy(),
        "flux": flux, "template_flux": 0.0, "delta_flux": flux, "snr": np.nan,
        "trail_length": cosmic_rays["length"].to_numpy(),
        "trail_angle": cosmic_rays["angle"].to_numpy(),
    }))
