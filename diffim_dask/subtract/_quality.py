"""Footprint residual ratio (``lsst-ip_diffim.md`` §9.1) of a difference image."""

from __future__ import annotations

import numpy as np

__all__ = []


def footprint_residual_ratios(abs_diff_stamps: np.ndarray, abs_science_stamps: np.ndarray,
                              footprints: np.ndarray, noise_level) -> np.ndarray:
    """Per-star ratio ``r = |mean|D| − noise| / mean|S|`` over the footprint pixels.

    Parameters
    ----------
    abs_diff_stamps, abs_science_stamps : numpy.ndarray
        ``(n, s, s)`` cut-outs of ``|D|`` and ``|S|`` (background-subtracted
        science) centred on the stars.
    footprints : numpy.ndarray of bool
        ``(n, s, s)`` footprint of each star (like a detection footprint: the
        pixels above the detection threshold in the PSF-smoothed S/N map).
    noise_level : float or numpy.ndarray
        What ``|D|`` would be for a perfect subtraction: the anchor uses the
        typical sky ``|D|``; here the expected ``sqrt(2/π) σ`` of each pixel
        (``(n, s, s)``), so that the extra Poisson noise at a star does not
        count as a residual.
    """
    count = footprints.sum(axis=(1, 2))
    noise = np.broadcast_to(noise_level, abs_diff_stamps.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_d = (abs_diff_stamps * footprints).sum(axis=(1, 2)) / count
        mean_n = (noise * footprints).sum(axis=(1, 2)) / count
        mean_s = (abs_science_stamps * footprints).sum(axis=(1, 2)) / count
        return np.abs(mean_d - mean_n) / mean_s


def disc(radius: float) -> np.ndarray:
    """Boolean disc of the given radius on an odd square grid."""
    half = max(1, int(np.ceil(radius)))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    return xx**2 + yy**2 <= radius**2
