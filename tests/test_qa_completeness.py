"""Matching, completeness fits and summaries on synthetic match tables with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.sparse import csgraph

from diffim_dask.errors import ConfigurationError
from diffim_dask.qa.completeness import (
    completeness_table,
    fit_completeness,
    flux_statistics,
    match_injections,
    match_positions,
    summarize_injections,
)
from diffim_dask.schema import empty_catalog


def _logistic_outcomes(rng, snr, snr50, width, c_max):
    """Bernoulli outcomes of the curve c_max / (1 + exp(-(log10 s - t0)/w)) with C(snr50) = 0.5."""
    t0 = math.log10(snr50) + width * math.log(c_max / 0.5 - 1)
    p = c_max / (1 + np.exp(-(np.log10(snr) - t0) / width))
    return rng.uniform(size=snr.size) < p, t0


def test_fit_recovers_a_known_curve():
    rng = np.random.default_rng(42)
    snr = np.exp(rng.uniform(math.log(2.0), math.log(60.0), 800))
    found, t0 = _logistic_outcomes(rng, snr, snr50=5.8, width=0.06, c_max=0.97)
    fit = fit_completeness(snr, found, n_bootstrap=40, seed=1)
    true90 = 10 ** (t0 - 0.06 * math.log(0.97 / 0.9 - 1))
    assert fit.converged
    assert fit.x50 == pytest.approx(5.8, rel=0.05)
    assert fit.x90 == pytest.approx(true90, rel=0.1)
    assert fit.c_max == pytest.approx(0.97, abs=0.03)
    assert fit.width == pytest.approx(0.06, rel=0.35)
    lo, hi = fit.x50_err
    assert lo < fit.x50 < hi and hi - lo < 1.0
    assert lo - 0.3 < 5.8 < hi + 0.3
    # The fitted curve passes through its own points and tends to c_max.
    assert fit(fit.x50) == pytest.approx(0.5) and fit(fit.x90) == pytest.approx(0.9)
    assert fit(1e4) == pytest.approx(fit.c_max, abs=1e-3)


def test_fit_does_not_invent_unreached_levels():
    rng = np.random.default_rng(3)
    snr = np.exp(rng.uniform(math.log(2.0), math.log(60.0), 500))
    found, _ = _logistic_outcomes(rng, snr, snr50=8.0, width=0.05, c_max=0.8)
    fit = fit_completeness(snr, found, n_bootstrap=0)
    assert fit.x50 == pytest.approx(8.0, rel=0.08)
    assert math.isnan(fit.x90)  # the plateau (0.8) never reaches 90 %
    assert fit.c_max == pytest.approx(0.8, abs=0.05)
    # A transition below the sampled range is not extrapolated.
    high = snr[snr > 20]
    assert math.isnan(fit_completeness(high, np.r_[False, np.ones(high.size - 1, bool)],
                                       n_bootstrap=0).x50)
    with pytest.raises(ConfigurationError, match="both outcomes"):
        fit_completeness(snr, np.ones(snr.size, bool))
    with pytest.raises(ConfigurationError, match="at least 5"):
        fit_completeness([3.0, 4.0], [True, False])


def test_fit_in_magnitudes():
    rng = np.random.default_rng(5)
    mag = rng.uniform(20.0, 26.0, 600)
    m50, width = 24.2, -0.25
    p = 0.95 / (1 + np.exp(-(mag - (m50 + width * math.log(0.95 / 0.5 - 1))) / width))
    fit = fit_completeness(mag, rng.uniform(size=mag.size) < p, variable="mag", n_bootstrap=0)
    assert fit.width < 0 and fit.x50 == pytest.approx(24.2, abs=0.12)
    assert fit.x90 < fit.x50


def test_completeness_table_counts_and_intervals():
    values = np.array([3.5, 3.6, 4.5, 5.5, 5.6, 5.7, 5.8, 12.0])
    found = np.array([False, False, True, True, True, False, True, True])
    table = completeness_table(values, found, bins=(3, 4, 5, 6, 20))
    assert table["n"].tolist() == [2, 1, 4, 1]
    assert table["found"].tolist() == [0, 1, 3, 1]
    assert table["completeness"].tolist() == [0.0, 1.0, 0.75, 1.0]
    assert (table["lower"] <= table["completeness"]).all()
    assert (table["upper"] >= table["completeness"]).all()
    assert table.loc[0, "upper"] > 0 and table.loc[1, "lower"] < 1  # Wilson, not Wald


def test_matching_is_one_to_one_and_maximal():
    # Greedy nearest-pair-first would match truth 1 to source 0 and lose truth 0.
    idx, dist = match_positions([0, 2], [0, 0], [1.1, 3.5], [0, 0], radius=1.6)
    assert idx.tolist() == [0, 1] and dist.tolist() == pytest.approx([1.1, 1.5])
    rng = np.random.default_rng(0)
    for _ in range(30):
        tx, ty = rng.uniform(0, 12, (2, 7))
        sx, sy = rng.uniform(0, 12, (2, 6))
        idx, dist = match_positions(tx, ty, sx, sy, radius=2.5)
        used = idx[idx >= 0]
        assert used.size == np.unique(used).size  # one-to-one
        assert np.all(np.hypot(tx[idx >= 0] - sx[used], ty[idx >= 0] - sy[used]) <= 2.5)
        # As many pairs as a maximum bipartite matching allows ...
        d = np.hypot(tx[:, None] - sx[None, :], ty[:, None] - sy[None, :])
        graph = sparse.csr_matrix(d <= 2.5)
        best = int((csgraph.maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
        assert used.size == best
        # ... and the least total distance among those (brute force over assignments).
        if best:
            totals = []
            for perm in itertools.permutations(range(7), 6):  # source s -> truth perm[s]
                pairs = [(t, s) for s, t in enumerate(perm) if d[t, s] <= 2.5]
                if len(pairs) == best:
                    totals.append(sum(d[t, s] for t, s in pairs))
            assert np.nansum(dist) == pytest.approx(min(totals))


def _catalog(rows):
    base = empty_catalog("pandas")
    frame = pd.DataFrame(rows)
    for column in base.columns:
        default = False if base[column].dtype == bool else 0
        frame[column] = frame[column].fillna(default) if column in frame else default
        frame[column] = frame[column].astype(base[column].dtype)
    return frame[base.columns]


def test_match_injections_signs_sky_and_flux():
    truth = pd.DataFrame({"injection_id": [0, 1, 2, 3], "visit": 1, "detector": 0,
                          "x": [10.0, 50.0, 90.0, 130.0], "y": [10.0, 50.0, 90.0, 130.0],
                          "flux_njy": [1000.0, 2000.0, 3000.0, 4000.0], "expected_snr": [5, 10, 20, 40]})
    catalog = _catalog([
        {"diaSourceId": 11, "visit": 1, "detector": 0, "x": 10.5, "y": 10.2, "psfFlux": 1100.0,
         "psfFluxErr": 200.0, "snr": 5.5},
        # A negative-only detection never takes a positive injection ...
        {"diaSourceId": 12, "visit": 1, "detector": 0, "x": 50.2, "y": 50.1, "psfFlux": -500.0,
         "psfFluxErr": 100.0, "snr": 5.0, "isNegative": True},
        # ... nor does a sky source.
        {"diaSourceId": 13, "visit": 1, "detector": 0, "x": 90.0, "y": 90.0, "psfFlux": 3000.0,
         "psfFluxErr": 100.0, "isSky": True},
        {"diaSourceId": 14, "visit": 1, "detector": 0, "x": 131.0, "y": 130.0, "psfFlux": 3800.0,
         "psfFluxErr": 100.0, "snr": 40.0, "isDipole": True},
        {"diaSourceId": 15, "visit": 1, "detector": 0, "x": 200.0, "y": 20.0, "psfFlux": 900.0,
         "psfFluxErr": 180.0, "snr": 5.0},
        # The same position in another visit is not a match.
        {"diaSourceId": 16, "visit": 2, "detector": 0, "x": 90.0, "y": 90.0, "psfFlux": 3000.0,
         "psfFluxErr": 100.0, "snr": 30.0},
    ])
    matched, sources = match_injections(truth, catalog, radius=2.0)
    assert matched["found"].tolist() == [True, False, False, True]
    assert matched["diaSourceId"].tolist() == [11, -1, -1, 14]
    assert matched.loc[0, "flux_bias"] == pytest.approx(0.1)
    assert matched.loc[3, "flux_pull"] == pytest.approx(-2.0)
    assert matched.loc[3, "isDipole"]
    assert len(sources) == 5  # sky source dropped
    false = sources[~sources["near_truth"]]["diaSourceId"].tolist()
    assert false == [15, 16]  # the negative one sits on an injection: not false, not matched
    areas = {(1, 0): {"area_deg2": 0.01, "area_mpix": 0.05}, (2, 0): {"area_deg2": 0.01,
                                                                       "area_mpix": 0.05}}
    summary = summarize_injections(matched, sources, areas, n_bootstrap=0)
    m = summary.metrics
    assert m["n_injected"] == 4 and m["n_found"] == 2 and m["completeness"] == 0.5
    assert m["n_false"] == 2 and m["false_per_deg2"] == pytest.approx(100.0)
    assert m["false_per_mpix"] == pytest.approx(20.0) and m["false_per_image"] == 1.0
    per = summary.per_image.set_index("visit")
    assert per.loc[1, "n_found"] == 2 and per.loc[1, "n_false"] == 1 and per.loc[2, "n_false"] == 1
    visits = summary.per_visit.set_index("visit")
    assert visits.loc[1, "n_injected"] == 4 and visits.loc[2, "n_injected"] == 0
    assert visits.loc[2, "false_per_deg2"] == pytest.approx(100.0)
    stats = flux_statistics(matched)
    assert stats["n"] == 2 and stats["pull_median"] == pytest.approx(-0.75)
    assert "completeness" in summary.format()
    # Known real positions (e.g. a variable) are not false detections either.
    _, sources = match_injections(truth, catalog, radius=2.0,
                                  known=pd.DataFrame({"x": [200.0], "y": [21.0], "visit": [1],
                                                      "detector": [0]}))
    assert sources[~sources["near_truth"]]["diaSourceId"].tolist() == [16]
