"""Sky sources: circular footprints on empty sky.

A position is usable when no pixel of the disc of ``radius`` around it lies
in the avoided planes (DETECTED, DETECTED_NEGATIVE, BAD, NO_DATA, EDGE by
default) or off the image. Candidate positions are drawn uniformly with a
seeded generator, their discs checked against the mask (cost proportional to
the number of candidates, not to the image area), and accepted greedily when
at least ``2 * radius`` from those already accepted (looked up in a grid of
cells), so footprints do not overlap.
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
    # The greedy spacing test runs once per free candidate (tens of thousands on a crowded
    # image): accepted positions are binned in cells of side >= 2 radius, so only the 3 x 3
    # neighbouring cells can hold one closer than 2 radius.
    cell = max(int(np.ceil(2 * radius)), 1)
    occupied: dict[tuple[int, int], list[tuple[int, int]]] = {}
    accepted_y: list[int] = []
    accepted_x: list[int] = []
    min_dist2 = (2 * radius) ** 2
    for _ in range(max_rounds):
        ys = rng.integers(r, ny - r, size=30 * n_sources)
        xs = rng.integers(r, nx - r, size=30 * n_sources)
        discs = mask[ys[:, None] + dy[None, :], xs[:, None] + dx[None, :]]
        free = ~((discs & bits) != 0).any(axis=1)
        for y, x in zip(ys[free].tolist(), xs[free].tolist()):
            cy, cx = y // cell, x // cell
            if any((y - ay) ** 2 + (x - ax) ** 2 < min_dist2
                   for ky in (cy - 1, cy, cy + 1) for kx in (cx - 1, cx, cx + 1)
                   for ay, ax in occupied.get((ky, kx), ())):
                continue
            occupied.setdefault((cy, cx), []).append((y, x))
            accepted_y.append(y)
            accepted_x.append(x)
            if len(accepted_y) == n_sources:
                break
        if len(accepted_y) == n_sources:
            break
    return np.asarray(accepted_y, dtype=np.int64), np.asarray(accepted_x, dtype=np.int64)
