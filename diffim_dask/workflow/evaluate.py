"""Compare a run's DIA sources with a simulated survey's truth tables (step 3 of ``demo``).

Matching is the QA matcher, :func:`diffim_dask.qa.completeness.match_survey_truth`:
one-to-one within ``radius`` pixels with the most pairs and the least total
distance (:func:`~diffim_dask.qa.completeness.match_positions`), a detection
matching only a truth row of the same sign; detections along a moving object's
trail are real but unmatched. Completeness is that of the transients, with the
logistic fit of :func:`~diffim_dask.qa.completeness.summarize_injections`. A
DIA source farther than ``radius`` from every changing object is a false
detection; those within ``bright_radius`` of a saturated star are counted
apart, as the anchor's quality metrics do.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..qa.completeness import (InjectionSummary, completeness_table, match_survey_truth,
                               read_survey_truth, summarize_injections)

__all__ = ["Evaluation", "evaluate_run", "SNR_BINS"]

#: Edges of the S/N bins of the printed completeness table.
SNR_BINS = (3.0, 5.0, 8.0, 12.0, 20.0, 50.0, 100.0, np.inf)


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    """Completeness of the transients and false detections of a run against the truth.

    Attributes
    ----------
    summary : InjectionSummary
        Transients matched (``summary.matched``), their fitted completeness
        curve (``summary.fit``, ``summary.metrics["snr50"]``) and the DIA
        sources (``summary.sources``, with ``near_truth``).
    completeness : pandas.DataFrame
        Per S/N bin (:data:`SNR_BINS`): ``bin``, ``injected``, ``found``,
        ``completeness``.
    n_false, n_false_near_bright : int
        False detections away from / within ``bright_radius`` of saturated stars.
    area_mpix : float
        Pixels searched (units × detector pixels), in Mpix.
    """

    summary: InjectionSummary
    completeness: pd.DataFrame
    n_false: int
    n_false_near_bright: int
    area_mpix: float

    @property
    def matched(self) -> pd.DataFrame:
        """The transients with ``found`` and the match columns."""
        return self.summary.matched

    @property
    def n_transients(self) -> int:
        return int(self.summary.metrics["n_injected"])

    @property
    def n_found(self) -> int:
        return int(self.summary.metrics["n_found"])

    @property
    def false_per_mpix(self) -> float:
        return self.n_false / self.area_mpix if self.area_mpix else float("nan")

    def format(self) -> str:
        lines = ["  S/N bin     injected  found  completeness"]
        for row in self.completeness.itertuples():
            lines.append(f"  {row.bin:10s} {row.injected:8d} {row.found:6d}  {row.completeness:10.0%}")
        lines.append(f"  all        {self.n_transients:8d} {self.n_found:6d}")
        m = self.summary.metrics
        if math.isfinite(m["snr50"]):
            ninety = f", 90 % at S/N {m['snr90']:.1f}" if math.isfinite(m["snr90"]) else ""
            lines.append(f"Fitted completeness: 50 % at S/N {m['snr50']:.1f}{ninety}; plateau "
                         f"{m['completeness_plateau']:.0%}")
        lines.append(f"False detections: {self.n_false} away from bright stars "
                     f"({self.false_per_mpix:.2f} per Mpix over {self.area_mpix:.1f} Mpix), "
                     f"{self.n_false_near_bright} next to saturated stars")
        return "\n".join(lines)


def _binned(matched: pd.DataFrame) -> pd.DataFrame:
    snr = np.abs(matched["expected_snr"].to_numpy(float)) if len(matched) else np.zeros(0)
    found = matched["found"].to_numpy(bool) if len(matched) else np.zeros(0, bool)
    table = completeness_table(snr, found, SNR_BINS).set_index("lo")
    rows = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        n = int(table.at[lo, "n"]) if lo in table.index else 0
        k = int(table.at[lo, "found"]) if lo in table.index else 0
        label = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
        rows.append({"bin": label, "injected": n, "found": k, "completeness": k / n if n else np.nan})
    return pd.DataFrame(rows)


def evaluate_run(catalog: pd.DataFrame, truth_dir: Path, units: list[tuple[int, int]],
                 detector_shape: tuple[int, int], *, radius: float = 2.0,
                 bright_radius: float = 15.0, n_bootstrap: int = 0) -> Evaluation:
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
    n_bootstrap : int
        Bootstrap resamples of the completeness fit.
    """
    keys = {(int(v), int(d)) for v, d in units}
    if len(catalog):
        in_units = [(int(v), int(d)) in keys for v, d in zip(catalog["visit"], catalog["detector"])]
        catalog = catalog[np.asarray(in_units, bool)]
    truth = read_survey_truth(truth_dir, sorted(keys))
    matched, sources = match_survey_truth(truth, catalog, radius)
    transients = matched[matched["kind"] == "transient"].reset_index(drop=True)
    area_mpix = len(keys) * detector_shape[0] * detector_shape[1] / 1e6
    areas = {key: {"area_mpix": detector_shape[0] * detector_shape[1] / 1e6} for key in keys}
    summary = summarize_injections(transients, sources, areas, n_bootstrap=n_bootstrap,
                                   n_images=len(keys))
    false = sources[~sources["near_truth"].to_numpy(bool)] if len(sources) else sources
    near = np.zeros(len(false), bool)
    if len(false) and len(truth) and "saturated" in truth:
        bright = truth[truth["saturated"].fillna(False).astype(bool)]
        for (visit, detector), group in false.groupby(["visit", "detector"]):
            stars = bright[(bright["visit"] == visit) & (bright["detector"] == detector)]
            if len(stars) == 0:
                continue
            distance = np.hypot(group["x"].to_numpy(float)[:, None] - stars["x"].to_numpy(float),
                                group["y"].to_numpy(float)[:, None] - stars["y"].to_numpy(float))
            near[false.index.get_indexer(group.index)] = distance.min(axis=1) < bright_radius
    return Evaluation(summary, _binned(transients), int((~near).sum()), int(near.sum()), area_mpix)
