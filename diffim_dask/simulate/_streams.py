"""Derived random streams: one independent generator per (purpose, visit, detector, ...).

``numpy.random.SeedSequence(seed, spawn_key=(stream, *keys))`` gives
statistically independent generators for different keys, so any image can be
simulated alone, in any order, on any worker, with bit-identical results.
"""

from __future__ import annotations

import numpy as np

#: Stream identifiers (never renumber: they define the simulated data).
SKY = 1
VISIT = 2
IMAGE_NOISE = 3
INJECTIONS = 4
DETECTOR = 5
PATCH_NOISE = 6
PAIR = 7


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """Generator of stream ``stream`` keyed by non-negative integers ``keys``."""
    key = (int(stream),) + tuple(int(k) for k in keys)
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=key))
