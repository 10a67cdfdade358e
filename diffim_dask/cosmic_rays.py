"""Cosmic-ray detection and repair on a single exposure, using the PSF.

A cosmic ray deposits charge in one or a few pixels without passing through
the optics, so it is sharper than any astronomical source. For a point source
with PSF ``P`` (unit peak at the source centre), the mean of the two
neighbours of any pixel along a direction ``d`` (axis or diagonal) is at least
``r_d`` times the pixel itself, with

.. math::

    r_d = \\min_{\\delta} \\frac{P(\\delta + d) + P(\\delta - d)}{2 P(\\delta)},

the minimum over sub-pixel offsets ``δ`` of the source (exact for a Gaussian,
where the ratio is :math:`e^{-|d|^2/2\\sigma^2}\\cosh(\\delta \\cdot d/\\sigma^2)`, smallest
at ``δ = 0``); extended sources are smoother still. A pixel ``c`` with
background-subtracted value ``I_c`` and variance ``V_c`` is a cosmic-ray
candidate when

1. it is significant: :math:`I_c \\ge` ``min_sigma`` :math:`\\sqrt{V_c}`, and
2. for at least one of the four directions it is sharper than the PSF allows,
   beyond the noise:

   .. math::

       \\frac{r_d I_c - \\tfrac12 (I_a + I_b)}
             {\\sqrt{r_d^2 V_c + \\tfrac14 (V_a + V_b)}} \\ge k,

   with ``a, b`` the two neighbours along ``d`` and ``k`` = ``sharpness_sigma``.

3. it has little *fine structure* (L.A.Cosmic's object test, van Dokkum 2001):
   with ``M3`` the 3x3 median of the image and ``M7`` the 7x7 median of ``M3``,

   .. math::

       I_c - \\tfrac14 \\textstyle\\sum_{4\\ \\mathrm{axis\\ neighbours}} I
       \\ge f_\\mathrm{lim} \\, \\max(M3 - M7, 0)_c ,

   a test that does not rely on the PSF model: a median of 3x3 pixels removes a
   hit (one or a few pixels wide) but keeps a star core, so stars sharper than
   the PSF model says (an undersampled core, a FWHM measured too broad) are
   not flagged.

Candidates are replaced by an interpolation from the surrounding good pixels
(linear across the gap along the axis and diagonal directions, favouring
short gaps and small differences between the two ends) and the tests run again on the
pixels next to them, with the looser ``grow_sigma`` for both thresholds, until
a pass finds nothing (at most ``max_passes``): the remaining pixels of a
track, whose neighbours were cosmic-ray pixels, now stand out, so tracks are
followed to their faint ends. Star pixels never become sharp by interpolating
a neighbour, so a hit on a star removes the hit, not the star.

The anchor's single-frame processing finds cosmic rays, interpolates them
and flags the pixels CR and INTRP; DIA detection then drops sources centred
on interpolated pixels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import ConfigBase, config_field
from .errors import AlgorithmError, BadInputDataError
from .exposure import Exposure
from .masks import MASK_PLANES, mask_value, plane_set

__all__ = ["CosmicRayConfig", "CosmicRayResult", "find_cosmic_rays", "psf_sharpness_ratios"]

_PLANES = tuple(MASK_PLANES)
#: The four directions of the sharpness test: along x, along y and the two diagonals.
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass(frozen=True)
class CosmicRayConfig(ConfigBase):
    """Cosmic-ray finding on a single exposure (PSF sharpness test)."""

    enabled: bool = config_field(
        True, "Find cosmic rays; when False, find_cosmic_rays returns the exposure unchanged.")
    min_sigma: float = config_field(
        6.0, "A candidate pixel must exceed the local background by this many sigma of its "
        "own noise (sqrt of the variance plane).", minimum=0.0)
    sharpness_sigma: float = config_field(
        4.0, "A candidate must be sharper than the PSF allows by this many sigma: "
        "(r_d I_c - mean of its two neighbours along d) / noise >= this, for some direction d.",
        minimum=0.0)
    grow_sigma: float = config_field(
        3.0, "Looser value of both thresholds for pixels 8-adjacent to cosmic-ray pixels found "
        "on an earlier pass (the faint ends and sides of tracks).", minimum=0.0)
    max_passes: int = config_field(
        30, "Largest number of detect-then-interpolate passes; after the first, each pass tests "
        "only the pixels next to cosmic-ray pixels (so a long track is followed one pixel per "
        "pass at each end) and the search stops when a pass finds nothing.", minimum=1,
        maximum=200)
    background_bin_size: int = config_field(
        64, "Side (pixels) of the super-pixels whose median is the local background "
        "(bilinearly interpolated); cosmic rays are tested on image minus background.",
        minimum=8)
    ignore_planes: tuple[str, ...] = config_field(
        ("SAT", "BAD", "NO_DATA", "SUSPECT"), "Pixels in these planes are never flagged and are "
        "not used as neighbours or for interpolation (non-finite pixels neither).",
        choices=_PLANES)
    interpolate: bool = config_field(
        True, "Replace cosmic-ray pixels by an interpolation from good neighbours and flag them "
        "INTRP as well as CR; otherwise only set CR and keep the pixel values.")
    interpolation_sigma_fwhm: float = config_field(
        0.5, "Pixels without good neighbours on both sides along any direction (within 8 px) "
        "are interpolated by a Gaussian-weighted mean of good pixels of this sigma in PSF "
        "FWHM (at least 1 pixel; three times wider where that finds nothing).", minimum=0.05)
    fine_structure_limit: float = config_field(
        3.0, "Second, PSF-independent test (L.A.Cosmic's object limit, van Dokkum 2001): the "
        "candidate's contrast I_c - mean(4 axis neighbours) must exceed this multiple of the "
        "fine structure med3 - med7(med3) at the pixel. Sampled stars stay below ~1.3 for "
        "FWHM >= 2 px and ~1.9 at 1.75 px; a hit on sky has almost no fine structure. "
        "0 disables the test.", minimum=0.0)
    psf_width_margin: float = config_field(
        1.0, "Tolerance for PSF-model error: the ratios are those of a PSF narrower by this "
        "factor, r_d -> r_d ** (1 / margin²) (exact for a Gaussian); 1 trusts the PSF (the "
        "fine-structure test already protects stars sharper than the model), lower values "
        "trade faint hits for safety on poorly known PSFs.",
        minimum=0.1, maximum=1.0)
    psf_grid: int = config_field(
        3, "The sharpness ratios r_d are the minimum over a psf_grid x psf_grid grid of "
        "positions on the image (the sharpest PSF decides, so no star is flagged).",
        minimum=1, maximum=9)
    max_fraction: float = config_field(
        0.02, "More cosmic-ray pixels than this fraction of the usable pixels means the test "
        "is failing (wrong PSF or variance): AlgorithmError.", minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class CosmicRayResult:
    """Cosmic rays found on an exposure.

    Attributes
    ----------
    exposure : Exposure
        The input with CR set on cosmic-ray pixels (and, when the config
        interpolates, the pixels replaced and INTRP set).
    mask : numpy.ndarray of bool
        Cosmic-ray pixels.
    n_pixels : int
        Number of cosmic-ray pixels.
    n_cosmic_rays : int
        Number of 8-connected groups of cosmic-ray pixels (events).
    ratios : tuple of float
        The PSF sharpness ratios ``r_d`` used (x, y, diagonal, anti-diagonal), after
        the ``psf_width_margin`` (NaN when the config is disabled).
    """

    exposure: Exposure
    mask: np.ndarray
    n_pixels: int
    n_cosmic_rays: int
    ratios: tuple[float, float, float, float]


def psf_sharpness_ratios(psf, positions, offsets=(-0.5, -0.25, 0.0, 0.25, 0.5)) -> np.ndarray:
    """The smallest neighbour-pair-to-centre ratio ``r_d`` of the PSF per direction.

    Parameters
    ----------
    psf : PsfModel
        The exposure's PSF.
    positions : iterable of (x, y)
        Where the PSF is evaluated.
    offsets : sequence of float
        Sub-pixel offsets tried along each axis.

    Returns
    -------
    numpy.ndarray, shape (4,)
        ``min (P(δ + d) + P(δ - d)) / (2 P(δ))`` over positions and offsets, for
        the directions x, y, diagonal and anti-diagonal.
    """
    best = np.full(len(_DIRECTIONS), np.inf)
    for x, y in positions:
        size = max(7, int(psf.default_size))
        size += 1 - size % 2
        half = size // 2
        for ox in offsets:
            for oy in offsets:
                stamp = np.asarray(psf.image(x, y, size=size, offset=(ox, oy)), dtype=float)
                # The pixel holding the source centre (offsets reach ±0.5).
                cy = half + int(np.floor(oy + 0.5))
                cx = half + int(np.floor(ox + 0.5))
                centre = stamp[cy, cx]
                if not centre > 0:
                    continue
                for k, (dy, dx) in enumerate(_DIRECTIONS):
                    pair = stamp[cy + dy, cx + dx] + stamp[cy - dy, cx - dx]
                    best[k] = min(best[k], 0.5 * pair / centre)
    if not np.all(np.isfinite(best)):
        raise BadInputDataError("the PSF has no positive central pixel; cannot compute its "
                                "sharpness ratios")
    return best


def _background(image: np.ndarray, usable: np.ndarray, bin_size: int) -> np.ndarray:
    """Median of usable pixels in super-pixels, bilinearly interpolated to full size."""
    ny, nx = image.shape
    nby, nbx = max(1, round(ny / bin_size)), max(1, round(nx / bin_size))
    y_edges = np.linspace(0, ny, nby + 1).astype(int)
    x_edges = np.linspace(0, nx, nbx + 1).astype(int)
    grid = np.full((nby, nbx), np.nan)
    for i in range(nby):
        for j in range(nbx):
            block = image[y_edges[i]:y_edges[i + 1], x_edges[j]:x_edges[j + 1]]
            ok = usable[y_edges[i]:y_edges[i + 1], x_edges[j]:x_edges[j + 1]]
            if ok.any():
                grid[i, j] = np.median(block[ok])
    if np.isnan(grid).all():
        return np.zeros_like(image)
    if np.isnan(grid).any():
        # Empty super-pixels take the nearest valid one.
        _, (iy, ix) = ndimage.distance_transform_edt(np.isnan(grid), return_indices=True)
        grid = grid[iy, ix]
    yc = 0.5 * (y_edges[:-1] + y_edges[1:]) - 0.5
    xc = 0.5 * (x_edges[:-1] + x_edges[1:]) - 0.5
    fy = np.clip(np.interp(np.arange(ny), yc, np.arange(nby)), 0, nby - 1)
    fx = np.clip(np.interp(np.arange(nx), xc, np.arange(nbx)), 0, nbx - 1)
    return ndimage.map_coordinates(grid, np.meshgrid(fy, fx, indexing="ij"), order=1,
                                   mode="nearest")


def _padded(array: np.ndarray, width: int, fill) -> np.ndarray:
    return np.pad(array, width, mode="constant", constant_values=fill)


def _sharp_at(signal, variance, usable, ratios, min_sigma, sharpness_sigma, ys, xs):
    """Which pixels ``(ys, xs)`` pass the significance and PSF-sharpness tests."""
    sig_p = _padded(signal, 1, 0.0)
    var_p = _padded(variance, 1, 0.0)
    use_p = _padded(usable, 1, False)
    py, px = ys + 1, xs + 1
    value = sig_p[py, px]
    var_c = var_p[py, px]
    sigma = np.sqrt(var_c)
    passed = use_p[py, px] & (sigma > 0) & (value >= min_sigma * sigma)
    sharp = np.zeros(ys.size, dtype=bool)
    for (dy, dx), ratio in zip(_DIRECTIONS, ratios):
        ay, ax, by, bx = py + dy, px + dx, py - dy, px - dx
        pair = 0.5 * (sig_p[ay, ax] + sig_p[by, bx])
        noise = np.sqrt(ratio**2 * var_c + 0.25 * (var_p[ay, ax] + var_p[by, bx]))
        sharp |= (use_p[ay, ax] & use_p[by, bx]
                  & (ratio * value - pair >= sharpness_sigma * noise))
    return passed & sharp


def _little_fine_structure(signal, usable, limit, ys, xs):
    """Which pixels ``(ys, xs)`` pass L.A.Cosmic's object test.

    The contrast over the 4 axis neighbours must exceed ``limit`` times the
    fine structure ``M3 - M7(M3)`` (3x3 median minus the 7x7 median of the
    3x3 medians), computed only on the 7x7 windows of the given pixels.
    """
    if limit <= 0 or ys.size == 0:
        return np.ones(ys.size, dtype=bool)
    clean = _padded(np.where(usable, signal, 0.0), 4, 0.0)
    py, px = ys + 4, xs + 4
    dy, dx = np.mgrid[-3:4, -3:4]
    # 3x3 medians on the 7x7 window of each pixel, then their median.
    wy = py[:, None, None] + dy[None]
    wx = px[:, None, None] + dx[None]
    ring_y, ring_x = np.mgrid[-1:2, -1:2]
    blocks = clean[wy[..., None, None] + ring_y, wx[..., None, None] + ring_x]
    median3 = np.median(blocks.reshape(ys.size, 7, 7, 9), axis=3)
    fine = median3[:, 3, 3] - np.median(median3.reshape(ys.size, 49), axis=1)
    around = 0.25 * (clean[py, px + 1] + clean[py, px - 1] + clean[py + 1, px]
                     + clean[py - 1, px])
    return clean[py, px] - around > limit * np.maximum(fine, 0.0)


def _smooth_at(image, good, sigma, ys, xs):
    """Gaussian-weighted mean of the ``good`` pixels around each ``(ys, xs)``.

    Pixels with (almost) no good pixel within 3 sigma get a second pass at
    three times the width, and 0 (the background) beyond.
    """
    values = np.zeros(ys.size)
    todo = np.arange(ys.size)
    for width in (sigma, 3.0 * sigma):
        if todo.size == 0:
            break
        r = int(math.ceil(3.0 * width))
        img_p = _padded(np.where(good, image, 0.0), r, 0.0)
        good_p = _padded(good, r, False)
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        kernel = np.exp(-0.5 * (dy**2 + dx**2) / width**2)
        wy = ys[todo, None, None] + r + dy[None]
        wx = xs[todo, None, None] + r + dx[None]
        weight = (good_p[wy, wx] * kernel[None]).sum(axis=(1, 2))
        total = (img_p[wy, wx] * kernel[None]).sum(axis=(1, 2))
        ok = weight > 1e-3 * kernel.sum() / kernel.size
        values[todo[ok]] = total[ok] / weight[ok]
        todo = todo[~ok]
    return values


def _fill_at(image, variance, good, sigma, ys, xs, max_steps: int = 8):
    """Values for the pixels ``(ys, xs)`` interpolated from the ``good`` pixels.

    Along each of the four directions the nearest good pixels on both sides
    (at most ``max_steps`` away) give a linear interpolation across the gap,
    of length ``g`` pixels, between end values ``v₊`` and ``v₋``. The
    directions are averaged with weights ``1 / (g² ((v₊ - v₋)² + V))`` (``V``
    the pixel's variance): short crossings and crossings along an isophote,
    where a straight line is nearly exact, dominate — the crossing of a
    track, and the tangent of a star's profile for a hit on a star. Pixels
    with no two-sided crossing get the Gaussian-weighted mean of
    :func:`_smooth_at`.
    """
    img_p = _padded(np.where(good, image, 0.0), max_steps, 0.0)
    good_p = _padded(good, max_steps, False)
    py, px = ys + max_steps, xs + max_steps
    pixel_var = np.maximum(variance[ys, xs], 1e-12)
    total = np.zeros(ys.size)
    weight = np.zeros(ys.size)
    steps = np.arange(1, max_steps + 1)
    for dy, dx in _DIRECTIONS:
        ends = []
        for sign in (1, -1):
            sy = py[:, None] + sign * dy * steps[None]
            sx = px[:, None] + sign * dx * steps[None]
            ok = good_p[sy, sx]
            first = np.argmax(ok, axis=1)
            found = ok[np.arange(ys.size), first]
            ends.append((first + 1, img_p[sy[np.arange(ys.size), first],
                                           sx[np.arange(ys.size), first]], found))
        (k_plus, v_plus, f_plus), (k_minus, v_minus, f_minus) = ends
        both = f_plus & f_minus
        gap = (k_plus + k_minus).astype(float)
        value = (v_plus * k_minus + v_minus * k_plus) / gap
        length2 = gap**2 * (dy**2 + dx**2)
        w = np.where(both, 1.0 / (length2 * ((v_plus - v_minus) ** 2 + pixel_var)), 0.0)
        total += w * np.where(both, value, 0.0)
        weight += w
    out = np.empty(ys.size)
    has = weight > 0
    out[has] = total[has] / weight[has]
    if (~has).any():
        out[~has] = _smooth_at(image, good, sigma, ys[~has], xs[~has])
    return out


def find_cosmic_rays(exposure: Exposure, config: CosmicRayConfig | None = None) -> CosmicRayResult:
    """Find (and by default interpolate) cosmic rays on a single exposure.

    Parameters
    ----------
    exposure : Exposure
        A single science frame with variance, mask and PSF (a difference or
        coadd would work too, but cosmic rays belong to single frames).
    config : CosmicRayConfig, optional
        Thresholds; defaults follow the module docstring.

    Returns
    -------
    CosmicRayResult

    Raises
    ------
    BadInputDataError
        No PSF, or no usable pixel.
    AlgorithmError
        More than ``max_fraction`` of the usable pixels look like cosmic rays.
    """
    config = config or CosmicRayConfig()
    if not isinstance(exposure, Exposure):
        raise BadInputDataError(
            f"find_cosmic_rays needs an Exposure, got {type(exposure).__name__}")
    if not config.enabled:
        return CosmicRayResult(exposure=exposure, mask=np.zeros(exposure.shape, dtype=bool),
                               n_pixels=0, n_cosmic_rays=0, ratios=(math.nan,) * 4)
    if exposure.psf is None:
        raise BadInputDataError(
            "the exposure has no PSF; cosmic rays are told from stars by comparing their "
            "sharpness with the PSF's (attach one, e.g. exposure.replace(psf=GaussianPsf(fwhm)))")
    image, variance, mask = (np.asarray(a) for a in exposure.compute().arrays())
    image = image.astype(float)
    variance = variance.astype(float)
    finite = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    usable = finite & ~plane_set(mask, tuple(config.ignore_planes) + ("NO_DATA",))
    if not usable.any():
        raise BadInputDataError("the exposure has no usable pixel for cosmic-ray finding "
                                f"(all non-finite or in {config.ignore_planes})")
    ny, nx = image.shape
    x0, y0 = exposure.origin
    fractions = (np.arange(config.psf_grid) + 0.5) / config.psf_grid
    positions = [(x0 + fx * nx - 0.5, y0 + fy * ny - 0.5) for fy in fractions for fx in fractions]
    ratios = psf_sharpness_ratios(exposure.psf, positions) ** (1.0 / config.psf_width_margin**2)
    fwhm = float(exposure.psf.fwhm(*exposure.center))
    interp_sigma = max(1.0, config.interpolation_sigma_fwhm * fwhm)

    signal = np.where(finite, image, 0.0)
    signal = signal - _background(signal, usable, config.background_bin_size)
    var = np.where(finite, variance, 0.0)
    cosmic = np.zeros(image.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    # Pass 1 tests every pixel; later passes only the pixels next to cosmic-ray pixels, whose
    # neighbourhood changed when the hits were replaced by their surroundings.
    ys, xs = np.nonzero(usable)
    min_sigma, sharpness = config.min_sigma, config.sharpness_sigma
    n_passes = 0
    while ys.size and n_passes < config.max_passes:
        n_passes += 1
        good = usable & ~cosmic
        hit = _sharp_at(signal, var, good, ratios, min_sigma, sharpness, ys, xs)
        ys, xs = ys[hit], xs[hit]
        hit = _little_fine_structure(signal, good, config.fine_structure_limit, ys, xs)
        ys, xs = ys[hit], xs[hit]
        if ys.size == 0:
            break
        cosmic[ys, xs] = True
        signal[ys, xs] = _fill_at(signal, var, usable & ~cosmic, interp_sigma, ys, xs)
        ring = ndimage.binary_dilation(cosmic, structure=eight) & ~cosmic & usable
        ys, xs = np.nonzero(ring)
        min_sigma = sharpness = config.grow_sigma

    n_pixels = int(cosmic.sum())
    if n_pixels > config.max_fraction * int(usable.sum()):
        raise AlgorithmError(
            f"{n_pixels} pixels ({n_pixels / usable.sum():.2%} of the usable ones) look like "
            f"cosmic rays, more than max_fraction = {config.max_fraction}: the PSF (FWHM "
            f"{fwhm:.2f} px) is probably too broad for this image or the variance plane too "
            "small", {"n_cr_pixels": n_pixels, "psf_fwhm": fwhm,
                      "sharpness_ratios": [float(r) for r in ratios]})
    n_events = int(ndimage.label(cosmic, structure=eight)[1]) if n_pixels else 0
    new_mask = np.array(mask, dtype=np.uint32)
    new_mask[cosmic] |= np.uint32(mask_value("CR"))
    planes = {"mask": new_mask}
    if config.interpolate and n_pixels:
        repaired = np.array(image, dtype=float)
        ys, xs = np.nonzero(cosmic)
        repaired[ys, xs] = _fill_at(np.where(finite, image, 0.0), var, usable & ~cosmic,
                                    interp_sigma, ys, xs)
        new_mask[cosmic] |= np.uint32(mask_value("INTRP"))
        planes["image"] = repaired.astype(exposure.dataset["image"].dtype)
    return CosmicRayResult(exposure=exposure.with_planes(**planes), mask=cosmic,
                           n_pixels=n_pixels, n_cosmic_rays=n_events,
                           ratios=tuple(float(r) for r in ratios))

