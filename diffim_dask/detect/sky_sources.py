"""Sky sources: circular footprints on empty sky.

A position is usable when no pixel of the disc of ``radius`` around it lies
in the avoided planes (DETECTED, DETECTED_NEGATIVE, BAD, NO_DATA, EDGE by
default) or off the image. Candidate positions are drawn uniformly with a
seeded generator, their discs checked against the mask (cost proportional to
the number of candidates, not to the image area), and accepted greedily when
at least ``2 * radius`` from those already accepted, so footprints do not
overlap.
"""

from __future__ import annotations

import numpy as np
from ..masks import mask_value
from .footprints import disk_offsets

__all__ = ["place_sky_sources"]


def place_sky_sources(mask: np.ndarray, *, n_sources: int, radius: float, avoid_planes,
                      rng: np.random.Generator, max_rounds: int = 6):
    """Integer pixel positions ``(y, x)`` of up to ``n_sources`` sky sources.

    Parameters
    ----------
    mask : numpy.ndarray
        Mask plane (local frame).
    n_sources : int
        Wanted number (fewer are returned when empty sky is scarce).
    radius : float
        Footprint radius in pixels.
    avoid_planes : sequence of str
        Planes the footprints avoid.
    rng : numpy.random.Generator
        Seeded generator.
    max_rounds : int
        Rounds of ``30 * n_sources`` random draws.
    """
    ny, nx = mask.shape
    r = int(np.ceil(radius))
    if n_sources <= 0 or ny <= 2 * r or nx <= 2 * r:
        return np.zeros(0, int), np.zeros(0, int)
    bits = np.uint32(mask_value(avoid_planes)) if avoid_planes else np.uint32(0)
    dy, dx = disk_offsets(radius)
    accepted_y: list[int] = []
    accepted_x: list[int] = []
    min_dist2 = (2 * radius) ** 2
    for _ in range(max_rounds):
        ys = rng.integers(r, ny - r, size=30 * n_sources)
        xs = rng.integers(r, nx - r, size=30 * n_sources)
        discs = mask[ys[:, None] + dy[None, :], xs[:, None] + dx[None, :]]
        free = ~((discs & bits) != 0).any(axis=1)
        for y, x in zip(ys[free], xs[free]):
            if accepted_y:
                d2 = (np.asarray(accepted_y) - y) ** 2 + (np.asarray(accepted_x) - x) ** 2
                if d2.min() < min_dist2:
                    continue
            accepted_y.append(int(y))
            accepted_x.append(int(x))
            if len(accepted_y) == n_sources:
                return np.asarray(accepted_y), np.asarray(accepted_x)
    return np.asarray(accepted_y, dtype=int), np.asarray(accepted_x, dtype=int)
