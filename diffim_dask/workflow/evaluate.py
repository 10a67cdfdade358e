"""Compare a run's DIA sources with a simulated survey's truth tables.

Matching is one-to-one within ``radius`` pixels, brightest truth first; a
moving object matches anywhere within ``radius`` of its trail segment. A DIA
source matched to nothing is a false detection; those within a few PSF widths
of a saturated star are counted apart, as the anchor's quality metrics do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["match_to_truth", "Evaluation", "evaluate_run", "SNR_BINS"]

#: Edges of the S/N bins of the completeness table.
SNR_BINS = (3.0, 5.0, 8.0, 12.0, 20.0, 50.0, 100.0, np.inf)

_CHANGING = ("transient", "variable", "moving")


def _distance_to_truth(sx, sy, truth: pd.DataFrame) -> np.ndarray:
    """Distances (sources × truth) in pixels; trails use the distance to their segment."""
    tx, ty = truth["x"].to_numpy(), truth["y"].to_numpy()
    dx = sx[:, None] - tx[None, :]
    dy = sy[:, None] - ty[None, :]
    distance = np.hypot(dx, dy)
    length = np.nan_to_num(truth.get("trail_length", pd.Series(0.0, index=truth.index)).to_numpy())
    moving = length > 0
    if moving.any():
        angle = np.radians(np.nan_to_num(truth["trail_angle"].to_numpy()))
        ux, uy = np.cos(angle), np.sin(angle)
        along = np.clip(dx * ux + dy * uy, -length / 2, length / 2)
        across = np.hypot(dx - along * ux, dy - along * uy)
        distance = np.where(moving[None, :], across, distance)
    return distance


def match_to_truth(sources: pd.DataFrame, truth: pd.DataFrame, radius: float = 2.0) -> np.ndarray:
    """Index into ``sources`` of each truth row's match (-1 when unmatched), one-to-one."""
    match = np.full(len(truth), -1, dtype=np.int64)
    if len(sources) == 0 or len(truth) == 0:
        return match
    distance = _distance_to_truth(sources["x"].to_numpy(), sources["y"].to_numpy(), truth)
    taken = np.zeros(len(sources), dtype=bool)
    order = np.argsort(-np.abs(np.nan_to_num(truth["snr"].to_numpy())))
    for t in order:
        candidates = np.where(~taken & (distance[:, t] <= radius))[0]
        if candidates.size:
            best = candidates[np.argmin(distance[candidates, t])]
            match[t] = best
            taken[best] = True
    return match


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Completeness and false detections of a run against the truth."""

    completeness: pd.DataFrame
    n_transients: int
    n_found: int
    n_false: int
    n_false_near_bright: int
    area_mpix: float
    matched: pd.DataFrame

    @property
    def false_per_mpix(self) -> float:
        return self.n_false / self.area_mpix if self.area_mpix else float("nan")

    def format(self) -> str:
        lines = ["  S/N bin     injected  found  completeness"]
        for row in self.completeness.itertuples():
            lines.append(f"  {row.bin:10s} {row.injected:8d} {row.found:6d}  {row.completeness:10.0%}")
        lines.append(f"  all        {self.n_transients:8d} {self.n_found:6d}")
        lines.append(f"False detections: {self.n_false} away from bright stars "
                     f"({self.false_per_mpix:.2f} per Mpix over {self.area_mpix:.1f} Mpix), "
                     f"{self.n_false_near_bright} next to saturated stars")
        return "\n".join(lines)


def evaluate_run(catalog: pd.DataFrame, truth_dir: Path, units: list[tuple[int, int]],
                 detector_shape: tuple[int, int], *, radius: float = 2.0,
                 bright_radius: float = 15.0) -> Evaluation:
    """Match the catalog of every processed unit to its truth table.

    Parameters
    ----------
    catalog : pandas.DataFrame
        The run's DIA sources (sky sources are ignored).
    truth_dir : path
        ``truth/`` of a simulated survey.
    units : list of (visit, detector)
        The units that were processed (done).
    detector_shape : (int, int)
        Pixels per unit, for the false-detection rate.
    radius : float
        Match radius (pixels).
    bright_radius : float
        Unmatched sources within this many pixels of a saturated star are
        counted as ``n_false_near_bright``.
    """
    rows, false, false_bright = [], 0, 0
    area = len(units) * detector_shape[0] * detector_shape[1] / 1e6
    catalog = catalog[~catalog["isSky"]]
    for visit, detector in units:
        truth = pd.read_parquet(Path(truth_dir) / f"visit={visit}" / f"detector={detector}.parquet")
        sources = catalog[(catalog["visit"] == visit) & (catalog["detector"] == detector)]
        changing = truth[truth["kind"].isin(_CHANGING) & (np.abs(np.nan_to_num(truth["snr"])) > 0)]
        changing = changing.reset_index(drop=True)
        match = match_to_truth(sources, changing, radius)
        found = changing.assign(found=match >= 0, visit=visit, detector=detector)
        rows.append(found)
        unmatched = np.ones(len(sources), dtype=bool)
        unmatched[match[match >= 0]] = False
        bright = truth[truth.get("saturated", pd.Series(False, index=truth.index)).astype(bool)]
        sx, sy = sources["x"].to_numpy()[unmatched], sources["y"].to_numpy()[unmatched]
        if len(bright) and sx.size:
            near = np.hypot(sx[:, None] - bright["x"].to_numpy()[None, :],
                            sy[:, None] - bright["y"].to_numpy()[None, :]).min(axis=1) < bright_radius
        else:
            near = np.zeros(sx.size, dtype=bool)
        false += int((~near).sum())
        false_bright += int(near.sum())
    matched = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    transients = matched[matched["kind"] == "transient"] if len(matched) else matched
    snr = np.abs(transients["snr"].to_numpy()) if len(transients) else np.array([])
    table = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        inside = (snr >= lo) & (snr < hi)
        n = int(inside.sum())
        k = int(transients["found"].to_numpy()[inside].sum()) if n else 0
        label = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
        table.append({"bin": label, "injected": n, "found": k, "completeness": k / n if n else np.nan})
    return Evaluation(pd.DataFrame(table), len(transients),
                      int(transients["found"].sum()) if len(transients) else 0,
                      false, false_bright, area, matched)
