"""Sky map: ring/tract/patch geometry, look-ups across RA = 0/360 and the poles, serialisation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from diffim_dask.errors import BadInputDataError, ConfigurationError
from diffim_dask.simulate.geometry import tangent_wcs
from diffim_dask.template import RingsSkyMap, SkyMapConfig, skymap_from_dict

#: A map with small tracts (~0.05 deg, 3 x 3 patches of 400 px) so detectors cross tracts.
SMALL = SkyMapConfig(n_rings=3600, patch_inner_size=400, patch_border=50,
                     tract_overlap=20.0 / 3600.0)


@pytest.fixture(scope="module")
def skymap():
    return RingsSkyMap()


@pytest.fixture(scope="module")
def small_skymap():
    return RingsSkyMap(SMALL)


def _random_sky(rng, n):
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def test_config_is_validated_and_round_trips(skymap):
    with pytest.raises(ConfigurationError, match="tract_overlap"):
        SkyMapConfig(n_rings=10, tract_overlap=20.0)
    with pytest.raises(ConfigurationError, match="n_ringz"):
        SkyMapConfig.from_dict({"n_ringz": 3})
    for text, load in ((skymap.to_yaml(), RingsSkyMap.from_yaml),
                       (skymap.to_json(), RingsSkyMap.from_json)):
        again = load(text)
        assert again == skymap and again.tract(777).wcs.wcs.compare(skymap.tract(777).wcs.wcs)
    assert pickle.loads(pickle.dumps(skymap)) == skymap
    assert RingsSkyMap(SMALL) != skymap
    with pytest.raises(ConfigurationError, match="sky map type"):
        skymap_from_dict({"type": "healpix"})
    with pytest.raises(ConfigurationError, match="version"):
        skymap_from_dict({**skymap.to_dict(), "version": 99})


def test_ring_layout_counts_and_caps(skymap):
    h = skymap.config.ring_height
    assert skymap.n_tracts == 18936  # 120 rings of ~1.49 deg plus two caps
    south, north = skymap.tract(0), skymap.tract(skymap.n_tracts - 1)
    assert south.ra_range is None and south.dec_range == (-90.0, -90.0 + h / 2)
    assert north.ra_range is None and north.dec_range == (90.0 - h / 2, 90.0)
    equatorial = skymap.tract(skymap.find_tract(0.0, 0.1))
    width = equatorial.ra_range[1] - equatorial.ra_range[0]
    assert width <= h + 1e-9 and width > 0.99 * h
    assert equatorial.shape[0] % skymap.config.patch_inner_size == 0
    # Tracts are square-ish in pixels and hold their region plus the overlap.
    ny, nx = equatorial.shape
    assert ny * 0.2 / 3600 >= h + 2 * skymap.config.tract_overlap
    assert abs(nx - ny) <= skymap.config.patch_inner_size


def test_home_tract_contains_position_everywhere(skymap, small_skymap, rng):
    ra, dec = _random_sky(rng, 400)
    ra = np.concatenate([ra, [0.0, 359.9999999, 0.0, 180.0, 12.0, 12.0]])
    dec = np.concatenate([dec, [0.0, -0.5, 90.0, -90.0, 89.9999, -89.9999]])
    for sky_map in (skymap, small_skymap):
        tracts = sky_map.find_tract(ra, dec)
        for r, d, t in zip(ra, dec, tracts):
            tract = sky_map.tract(int(t))
            assert tract.contains(r, d), (r, d, t)
            x, y = tract.sky_to_pixel(r, d)
            ny, nx = tract.shape
            assert 0 <= x < nx - 1 and 0 <= y < ny - 1
            # The neighbouring tracts of the ring do not claim it.
            for other in (int(t) - 1, int(t) + 1):
                if 0 <= other < sky_map.n_tracts and sky_map.tract(other).ring == tract.ring:
                    assert not sky_map.tract(other).contains(r, d)


def test_patches_tile_the_tract(small_skymap):
    tract = small_skymap.tract(small_skymap.find_tract(150.0, 2.0))
    n_x, n_y = tract.n_patches
    covered = np.zeros(tract.shape, dtype=int)
    for patch in tract.patches():
        x0, y0, nx, ny = patch.inner_bbox
        covered[y0:y0 + ny, x0:x0 + nx] += 1
        ox, oy, onx, ony = patch.outer_bbox
        assert (ox, oy, onx, ony) == (x0 - 50, y0 - 50, nx + 100, ny + 100)
        assert tract.patch(patch.index) == patch and patch.id == patch.index[1] * n_x + patch.index[0]
    assert np.all(covered == 1)
    with pytest.raises(ConfigurationError, match="patch"):
        tract.patch(n_x * n_y)
    with pytest.raises(ConfigurationError, match="outside"):
        tract.patch((n_x, 0))


def _brute_force_check(sky_map, wcs, shape, border, found):
    """Every sampled detector point is in a returned patch of its home tract; no spurious patch."""
    ny, nx = shape
    step = 8.0
    xs = np.arange(-0.5 - border, nx - 0.5 + border + step, step)
    ys = np.arange(-0.5 - border, ny - 0.5 + border + step, step)
    gx, gy = np.meshgrid(np.clip(xs, -0.5 - border, nx - 0.5 + border),
                         np.clip(ys, -0.5 - border, ny - 0.5 + border))
    ra, dec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    keys = {p.key for p in found}
    homes = sky_map.find_tract(ra, dec)
    for tract_id in np.unique(homes):
        tract = sky_map.tract(int(tract_id))
        mine = homes == tract_id
        tx, ty = tract.sky_to_pixel(ra[mine], dec[mine])
        size = tract.patch_inner_size
        ix = np.floor((tx + 0.5) / size).astype(int)
        iy = np.floor((ty + 0.5) / size).astype(int)
        for pair in set(zip(ix.tolist(), iy.tolist())):
            assert (int(tract_id), tract.patch(pair).id) in keys, (tract_id, pair)
    for patch in found:
        tract = sky_map.tract(patch.tract)
        tx, ty = tract.sky_to_pixel(ra, dec)
        x0, y0, pnx, pny = patch.outer_bbox
        slack = step + 1.0  # sample spacing (pixels of equal scale in both frames)
        inside = ((tx > x0 - 0.5 - slack) & (tx < x0 + pnx - 0.5 + slack)
                  & (ty > y0 - 0.5 - slack) & (ty < y0 + pny - 0.5 + slack))
        assert inside.any(), patch


@pytest.mark.parametrize("ra, dec, rotation, which", [
    (150.0, 2.0, 30.0, "default"),
    (0.0005, 0.2, 10.0, "default"),       # straddles RA = 0/360
    (359.9999, -44.0, 0.0, "default"),
    (10.0, 89.97, 45.0, "default"),        # contains the north pole
    (200.0, -89.9, 0.0, "default"),        # beside the south pole, in the cap
    (45.0, 89.2, 0.0, "default"),          # ring tracts and the cap
    (150.0, 2.0, 30.0, "small"),
    (0.0, 0.0, 20.0, "small"),
    (10.0, 89.995, 0.0, "small"),
])
def test_patches_overlapping_matches_brute_force(skymap, small_skymap, ra, dec, rotation, which):
    sky_map = skymap if which == "default" else small_skymap
    shape = (4096, 4096) if which == "default" else (512, 512)
    wcs = tangent_wcs(ra, dec, 0.2, ((shape[1] - 1) / 2, (shape[0] - 1) / 2), rotation=rotation)
    found = sky_map.patches_overlapping(wcs, shape, border=20)
    assert found and found == sorted(found, key=lambda p: p.key)
    _brute_force_check(sky_map, wcs, shape, 20, found)


def test_wrap_and_pole_cases_find_both_sides(skymap):
    wcs = tangent_wcs(0.0, 0.3, 0.2, (2047.5, 2047.5))
    tracts = {p.tract for p in skymap.patches_overlapping(wcs, (4096, 4096))}
    ras = sorted(skymap.tract(t).ra_range for t in tracts)
    assert ras[0][0] == 0.0 and math.isclose(ras[-1][1], 360.0)
    polar = tangent_wcs(123.0, 89.99, 0.2, (2047.5, 2047.5))
    tracts = {p.tract for p in skymap.patches_overlapping(polar, (4096, 4096))}
    assert skymap.n_tracts - 1 in tracts


def test_offset_origin_and_missing_wcs(small_skymap):
    wcs = tangent_wcs(150.0, 2.0, 0.2, (255.5, 255.5))
    whole = small_skymap.patches_overlapping(wcs, (512, 512))
    corner = small_skymap.patches_overlapping(wcs, (100, 100), origin=(412, 412))
    assert set(corner) <= set(whole) and len(corner) < len(whole)
    with pytest.raises(BadInputDataError, match="without a WCS"):
        small_skymap.patches_overlapping(None, (10, 10))
