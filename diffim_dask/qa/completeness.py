"""Matching detections to injected (or simulated) truth; completeness, purity and photometry.

Matching
    :func:`match_positions` pairs truth rows with detections one-to-one
    within a radius, maximising first the number of pairs and then
    minimising their summed distance (an optimal assignment per connected
    group of candidate pairs, :func:`scipy.optimize.linear_sum_assignment`),
    so a detection is never claimed twice and a close pair of injections
    does not steal each other's match the way greedy matching can.

Completeness
    :func:`fit_completeness` fits the logistic curve

    .. math::

        C(t) = \\frac{C_\\max}{1 + \\exp(-(t - t_0)/w)},

    with ``t = log10(S/N)`` (or ``t = mag`` with ``w < 0``), by maximum
    likelihood on the unbinned found / missed outcomes (Bernoulli), and
    reports the points where ``C = 0.5`` and ``C = 0.9``:
    ``t_q = t_0 - w ln(C_max/q - 1)`` (undefined when ``C_max ≤ q``), with
    bootstrap uncertainties. :func:`completeness_table` bins the outcomes
    with Wilson score intervals.

Purity and photometry
    Detections matched to nothing (and farther than the radius from every
    truth position) are false detections; their rate is given per square
    degree and per megapixel of searched area. For matched sources the flux
    bias ``(f − f_true)/f_true`` and the pull ``(f − f_true)/σ_f`` of the
    difference-image PSF flux are summarised (median, robust scatter).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from ..errors import ConfigurationError

__all__ = [
    "match_positions",
    "match_injections",
    "match_survey_truth",
    "read_survey_truth",
    "CHANGING_KINDS",
    "CompletenessFit",
    "fit_completeness",
    "completeness_table",
    "flux_statistics",
    "InjectionSummary",
    "summarize_injections",
    "exposure_area",
    "SNR_BINS",
]

#: Kinds of simulated-survey truth rows whose flux differs between science and template.
CHANGING_KINDS = ("transient", "variable", "moving")

#: Default S/N bin edges of completeness tables.
SNR_BINS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0, 100.0)


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def match_positions(truth_x, truth_y, source_x, source_y, radius: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching within ``radius`` with the most pairs and least total distance.

    Parameters
    ----------
    truth_x, truth_y, source_x, source_y : array_like
        Positions (same frame, pixels).
    radius : float
        Largest match distance.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        For each truth row the index of its source (-1 when unmatched) and
        the distance (NaN when unmatched).

    Examples
    --------
    Greedy nearest-pair-first matching would pair truth 1 with the source at
    1.1 and leave truth 0 unmatched; the optimal assignment matches both:

    >>> idx, d = match_positions([0, 2], [0, 0], [1.1, 3.5], [0, 0], radius=1.6)
    >>> idx.tolist()
    [0, 1]
    """
    tx, ty = np.asarray(truth_x, float).ravel(), np.asarray(truth_y, float).ravel()
    sx, sy = np.asarray(source_x, float).ravel(), np.asarray(source_y, float).ravel()
    nt, ns = tx.size, sx.size
    match = np.full(nt, -1, dtype=np.int64)
    distance = np.full(nt, np.nan)
    if nt == 0 or ns == 0:
        return match, distance
    pairs = cKDTree(np.column_stack([tx, ty])).sparse_distance_matrix(
        cKDTree(np.column_stack([sx, sy])), radius, output_type="coo_matrix")
    if pairs.nnz == 0:
        return match, distance
    rows, cols, dist = pairs.row, pairs.col, pairs.data
    # Connected groups of the bipartite candidate graph (truth nodes 0..nt-1, sources nt..).
    graph = sparse.coo_matrix((np.ones(rows.size), (rows, cols + nt)), shape=(nt + ns, nt + ns))
    _, labels = csgraph.connected_components(graph, directed=False)
    group = labels[rows]
    order = np.argsort(group, kind="stable")
    rows, cols, dist, group = rows[order], cols[order], dist[order], group[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], group.size]
    # Cost of a non-pair: more than any set of real pairs, so the count of pairs is maximised first.
    for a, b in zip(starts, ends):
        r, c, d = rows[a:b], cols[a:b], dist[a:b]
        if b - a == 1:
            match[r[0]], distance[r[0]] = c[0], d[0]
            continue
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        big = radius * (len(ur) + len(uc) + 1) + 1.0
        cost = np.full((ur.size, uc.size), big)
        cost[ri, ci] = d
        assigned_r, assigned_c = optimize.linear_sum_assignment(cost)
        real = cost[assigned_r, assigned_c] < big
        match[ur[assigned_r[real]]] = uc[assigned_c[real]]
        distance[ur[assigned_r[real]]] = cost[assigned_r[real], assigned_c[real]]
    return match, distance


def _true_flux(truth: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Injected flux in the catalog's unit: nJy when known (photo_calib), else counts."""
    if "flux_njy" in truth and np.isfinite(truth["flux_njy"].to_numpy(float)).all() and len(truth):
        return truth["flux_njy"].to_numpy(float), "nJy"
    if "flux_counts" in truth:
        return truth["flux_counts"].to_numpy(float), "count"
    if "delta_flux" in truth:  # simulated survey truth (nJy)
        return truth["delta_flux"].to_numpy(float), "nJy"
    return np.full(len(truth), np.nan), ""


def match_injections(truth: pd.DataFrame, catalog: pd.DataFrame, radius: float = 3.0, *,
                     by: tuple[str, ...] = ("visit", "detector"),
                     known: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match injected sources to DIA sources, one-to-one, per (visit, detector).

    Parameters
    ----------
    truth : pandas.DataFrame
        Injection truth (:data:`~diffim_dask.qa.injection.INJECTION_TRUTH_COLUMNS`)
        or any table with ``x``, ``y`` and a flux (``flux_njy``,
        ``flux_counts`` or ``delta_flux``).
    catalog : pandas.DataFrame
        DIA sources (:mod:`diffim_dask.schema` columns); sky sources are
        ignored, and a source can match a truth row only when the sign of its
        detection agrees with the sign of the injected flux (a positive
        injection is never credited to a negative-only detection).
    radius : float
        Match radius, pixels.
    by : tuple of str
        Columns that split both tables into images (those present in both).
    known : pandas.DataFrame, optional
        Other real positions (``x``, ``y`` and the ``by`` columns), e.g. known
        variables or points along a moving object's trail: detections within
        ``radius`` of them are not false (``near_truth``) but are never matched.

    Returns
    -------
    (matched, sources)
        ``matched`` is the truth with ``found``, ``diaSourceId``,
        ``match_distance``, ``measured_flux`` (``psfFlux``), ``measured_flux_err``,
        ``detection_snr`` (catalog ``snr``), ``isDipole``, ``flux_bias`` and
        ``flux_pull``. ``sources`` is the non-sky catalog with
        ``matched`` (to an injection), ``near_truth`` (within ``radius``
        of any truth or known position, matched or not) and ``near_known``
        (unmatched, within ``radius`` of a known position).
    """
    if not {"x", "y"} <= set(truth.columns):
        raise ConfigurationError(f"truth needs x and y columns; it has {list(truth.columns)}")
    truth = truth.reset_index(drop=True)
    sky = catalog["isSky"].to_numpy(bool) if "isSky" in catalog else np.zeros(len(catalog), bool)
    sources = catalog[~sky].reset_index(drop=True)
    keys = [k for k in by if k in truth.columns and k in sources.columns]
    true_flux, _ = _true_flux(truth)
    n = len(truth)
    found = np.zeros(n, bool)
    source_row = np.full(n, -1, np.int64)
    distance = np.full(n, np.nan)
    matched_source = np.zeros(len(sources), bool)
    near = np.zeros(len(sources), bool)
    if keys:
        truth_groups = truth.groupby(keys, sort=False).indices
        source_groups = sources.groupby(keys, sort=False).indices if len(sources) else {}
    else:
        truth_groups = {(): np.arange(n)}
        source_groups = {(): np.arange(len(sources))}
    negative = (sources["isNegative"].to_numpy(bool) if "isNegative" in sources
                else np.zeros(len(sources), bool))
    for key, t_idx in truth_groups.items():
        s_idx = source_groups.get(key, np.zeros(0, np.int64))
        if s_idx.size == 0:
            continue
        sx = sources["x"].to_numpy(float)[s_idx]
        sy = sources["y"].to_numpy(float)[s_idx]
        tx = truth["x"].to_numpy(float)[t_idx]
        ty = truth["y"].to_numpy(float)[t_idx]
        for sign in (1, -1):
            t_sel = t_idx[(np.sign(true_flux[t_idx]) >= 0) == (sign > 0)]
            s_sel = s_idx[negative[s_idx] == (sign < 0)]
            if t_sel.size == 0 or s_sel.size == 0:
                continue
            m, d = match_positions(truth["x"].to_numpy(float)[t_sel], truth["y"].to_numpy(float)[t_sel],
                                   sources["x"].to_numpy(float)[s_sel],
                                   sources["y"].to_numpy(float)[s_sel], radius)
            ok = m >= 0
            found[t_sel[ok]] = True
            source_row[t_sel[ok]] = s_sel[m[ok]]
            distance[t_sel[ok]] = d[ok]
            matched_source[s_sel[m[ok]]] = True
        if tx.size:
            nearest, _ = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([sx, sy]))
            near[s_idx] = nearest <= radius
    take = np.where(found, source_row, 0)

    def column(name, default=np.nan):
        if len(sources) == 0 or name not in sources:
            return np.full(n, default)
        values = sources[name].to_numpy()[take]
        return np.where(found, values, default)

    flux = column("psfFlux").astype(float)
    flux_err = column("psfFluxErr").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        bias = (flux - true_flux) / true_flux
        pull = (flux - true_flux) / flux_err
    matched = truth.assign(
        found=found,
        diaSourceId=np.where(found, column("diaSourceId", -1), -1).astype(np.int64),
        match_distance=distance,
        measured_flux=flux, measured_flux_err=flux_err,
        detection_snr=column("snr").astype(float),
        isDipole=np.where(found, column("isDipole", False), False).astype(bool),
        flux_bias=bias, flux_pull=pull,
    )
    near_known = np.zeros(len(sources), bool)
    if known is not None and len(known) and len(sources):
        near_known = _near_known(sources, known, keys, radius)
    sources = sources.assign(matched=matched_source, near_truth=near | near_known | matched_source,
                             near_known=near_known & ~matched_source)
    return matched, sources


def _near_known(sources: pd.DataFrame, known: pd.DataFrame, keys: list[str], radius: float) -> np.ndarray:
    near = np.zeros(len(sources), bool)
    keys = [k for k in keys if k in known.columns]
    source_groups = sources.groupby(keys, sort=False).indices if keys else {(): np.arange(len(sources))}
    known_groups = known.groupby(keys, sort=False).indices if keys else {(): np.arange(len(known))}
    for key, s_idx in source_groups.items():
        k_idx = known_groups.get(key)
        if k_idx is None or len(k_idx) == 0:
            continue
        tree = cKDTree(known[["x", "y"]].to_numpy(float)[k_idx])
        distance, _ = tree.query(sources[["x", "y"]].to_numpy(float)[s_idx])
        near[s_idx] = distance <= radius
    return near


def read_survey_truth(truth_dir, units) -> pd.DataFrame:
    """The simulated survey's truth tables of ``units`` in one frame.

    Parameters
    ----------
    truth_dir : path
        ``truth/`` of a simulated survey (``visit=V/detector=D.parquet``).
    units : iterable of (visit, detector)

    Returns
    -------
    pandas.DataFrame
        All truth rows with ``visit`` and ``detector`` set from the unit
        (empty when no table exists).
    """
    from pathlib import Path

    frames = []
    for visit, detector in units:
        path = Path(truth_dir) / f"visit={int(visit)}" / f"detector={int(detector)}.parquet"
        if path.is_file():
            frames.append(pd.read_parquet(path).assign(visit=int(visit), detector=int(detector)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _trail_points(truth: pd.DataFrame) -> pd.DataFrame:
    """Points every pixel along moving objects' trails (with their visit / detector)."""
    rows = []
    for row in truth.itertuples():
        length = float(getattr(row, "trail_length", 0.0) or 0.0)
        if not length > 0:
            continue
        angle = math.radians(float(getattr(row, "trail_angle", 0.0) or 0.0))
        for s in np.linspace(-length / 2, length / 2, max(2, int(length) + 1)):
            rows.append({"x": row.x + s * math.cos(angle), "y": row.y + s * math.sin(angle),
                         "visit": getattr(row, "visit", 0), "detector": getattr(row, "detector", 0)})
    return pd.DataFrame(rows, columns=["x", "y", "visit", "detector"])


def match_survey_truth(truth: pd.DataFrame, catalog: pd.DataFrame, radius: float = 3.0, *,
                       kinds: tuple[str, ...] = CHANGING_KINDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match DIA sources to a simulated survey's changing objects with :func:`match_injections`.

    Every truth row of ``kinds`` with a non-zero ``snr`` is a candidate
    (``flux_njy`` = ``delta_flux``, ``expected_snr`` = ``|snr|``); the matching
    is the same optimal, sign-aware one-to-one matching as for injections.
    Detections anywhere within ``radius`` of a moving object's trail are real
    (``near_truth``) but not matched.

    Parameters
    ----------
    truth : pandas.DataFrame
        Truth rows (:func:`read_survey_truth`), with ``kind``, ``x``, ``y``,
        ``delta_flux``, ``snr``, ``visit``, ``detector`` and, for moving
        objects, ``trail_length`` / ``trail_angle``.
    catalog : pandas.DataFrame
        DIA sources.
    radius : float
        Match radius, pixels.
    kinds : tuple of str
        Truth kinds to match.

    Returns
    -------
    (matched, sources)
        As :func:`match_injections`; ``matched`` holds every changing object
        (select ``kind == "transient"`` for a completeness of transients).
    """
    if len(truth):
        snr = np.nan_to_num(truth["snr"].to_numpy(float))
        changing = truth[truth["kind"].isin(kinds).to_numpy() & (np.abs(snr) > 0)].reset_index(drop=True)
    else:
        changing = pd.DataFrame(columns=["kind", "x", "y", "delta_flux", "snr", "visit", "detector"])
    changing = changing.assign(flux_njy=changing["delta_flux"].to_numpy(float),
                               expected_snr=np.abs(changing["snr"].to_numpy(float)))
    trail = _trail_points(changing)
    return match_injections(changing, catalog, radius, known=trail if len(trail) else None)


# ----------------------------------------------------------------------------------------------
# Completeness curve
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompletenessFit:
    """A fitted logistic completeness curve.

    Attributes
    ----------
    variable : str
        ``"snr"`` (the curve is fitted in ``log10(S/N)``) or ``"mag"``.
    t0, width, c_max : float
        Curve parameters (``t`` in log10 S/N or magnitudes; ``width < 0`` for
        magnitudes, whose completeness falls with ``t``).
    x50, x90 : float
        Where the curve reaches 50 % and 90 % (S/N or mag); NaN when the
        curve never gets there (``c_max`` at or below the level) or gets there
        outside the sampled range (an extrapolation).
    x50_err, x90_err : (float, float)
        16th and 84th bootstrap percentiles (NaN without bootstrap).
    n, n_found : int
        Sources in the fit, and how many were found.
    converged : bool
        Whether the optimiser converged.
    """

    variable: str
    t0: float
    width: float
    c_max: float
    x50: float
    x90: float
    x50_err: tuple[float, float]
    x90_err: tuple[float, float]
    n: int
    n_found: int
    converged: bool

    def _to_t(self, x):
        x = np.asarray(x, float)
        if self.variable == "snr":
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log10(x)
        return x

    def __call__(self, x) -> np.ndarray:
        """Completeness at ``x`` (S/N or magnitude)."""
        return _logistic(self._to_t(x), self.t0, self.width, self.c_max)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _logistic(t, t0, width, c_max):
    z = np.clip(-(np.asarray(t, float) - t0) / width, -500, 500)
    return c_max / (1.0 + np.exp(z))


def _level(t0, width, c_max, q):
    if not c_max > q:
        return math.nan
    return t0 - width * math.log(c_max / q - 1.0)


def _fit_once(t, k, increasing: bool):
    """Maximum-likelihood (t0, width, c_max) for outcomes ``k`` at ``t``."""
    span = float(np.ptp(t)) or 1.0
    sign = 1.0 if increasing else -1.0
    # Start: where the running completeness crosses one half.
    order = np.argsort(t)
    ts, ks = t[order], k[order].astype(float)
    window = max(5, t.size // 10)
    running = np.convolve(ks, np.ones(window) / window, mode="same")
    c_top = float(np.clip(np.mean(ks[-window:]) if increasing else np.mean(ks[:window]), 0.3, 0.999))
    crossing = np.flatnonzero(np.diff(np.sign(running - c_top / 2)))
    t_start = float(ts[crossing[0]]) if crossing.size else float(np.median(t))

    def negative_log_likelihood(p):
        # Value and analytic gradient in (t0, log|w|, logit c_max).
        t0, log_w, logit_c = p
        width = sign * math.exp(log_w)
        c_max = 1.0 / (1.0 + math.exp(-logit_c))
        z = np.clip((t - t0) / width, -500, 500)
        s = 1.0 / (1.0 + np.exp(-z))
        model = np.clip(c_max * s, 1e-12, 1 - 1e-12)
        value = -float(np.sum(k * np.log(model) + (1 - k) * np.log1p(-model)))
        d_model = -(k / model - (1 - k) / (1 - model))
        d_z = d_model * c_max * s * (1 - s)
        gradient = np.array([float(np.sum(d_z * (-1.0 / width))),
                             float(np.sum(d_z * (-z))),
                             float(np.sum(d_model * s * c_max * (1 - c_max)))])
        return value, gradient

    start = np.array([t_start, math.log(span / 10), math.log(c_top / (1 - c_top))])
    # Transitions outside (or wider than) the sampled range are not constrained by the data.
    bounds = [(float(t.min()) - 0.25 * span, float(t.max()) + 0.25 * span),
              (math.log(span * 1e-3), math.log(span * 0.5)), (-3.0, 12.0)]
    result = optimize.minimize(negative_log_likelihood, start, jac=True, method="L-BFGS-B",
                               bounds=bounds)
    t0, log_w, logit_c = result.x
    return float(t0), float(sign * math.exp(log_w)), float(1 / (1 + math.exp(-logit_c))), bool(result.success)


def fit_completeness(values, found, *, variable: str = "snr", n_bootstrap: int = 50,
                     seed: int = 0) -> CompletenessFit:
    """Fit a logistic completeness curve to found / missed outcomes.

    Parameters
    ----------
    values : array_like
        Injected S/N (``variable="snr"``, fitted in log10) or AB magnitude
        (``variable="mag"``).
    found : array_like of bool
        Whether each source was detected.
    variable : {"snr", "mag"}
    n_bootstrap : int
        Bootstrap resamples for the uncertainties of the 50 % / 90 % points
        (0: none).
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    CompletenessFit

    Raises
    ------
    ConfigurationError
        Unknown ``variable`` or fewer than 5 finite values.
    """
    if variable not in ("snr", "mag"):
        raise ConfigurationError(f"fit_completeness: variable must be 'snr' or 'mag', got {variable!r}")
    values = np.asarray(values, float)
    found = np.asarray(found, bool)
    good = np.isfinite(values) & ((values > 0) if variable == "snr" else True)
    values, found = values[good], found[good]
    if values.size < 5:
        raise ConfigurationError(
            f"fit_completeness: need at least 5 sources with finite {variable}, got {values.size}")
    if found.all() or not found.any():
        raise ConfigurationError(
            f"fit_completeness: all {values.size} sources were {'found' if found.all() else 'missed'};"
            " a completeness curve needs both outcomes")
    t = np.log10(values) if variable == "snr" else values
    increasing = variable == "snr"
    k = found.astype(float)

    def back(tq):
        return 10 ** tq if (variable == "snr" and math.isfinite(tq)) else tq

    t_lo, t_hi = float(t.min()), float(t.max())

    def level(t0_, width_, c_max_, q):
        # Extrapolation beyond the sampled range is not a measurement: NaN.
        tq = _level(t0_, width_, c_max_, q)
        return back(tq) if t_lo <= tq <= t_hi else math.nan

    t0, width, c_max, ok = _fit_once(t, k, increasing)
    x50, x90 = level(t0, width, c_max, 0.5), level(t0, width, c_max, 0.9)
    errors = {0.5: (math.nan, math.nan), 0.9: (math.nan, math.nan)}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = {0.5: [], 0.9: []}
        for _ in range(n_bootstrap):
            pick = rng.integers(0, t.size, t.size)
            bt0, bw, bc, _ = _fit_once(t[pick], k[pick], increasing)
            for q in samples:
                samples[q].append(level(bt0, bw, bc, q))
        for q, s in samples.items():
            s = np.asarray(s, float)
            s = s[np.isfinite(s)]
            # Only meaningful when most resamples reach the level.
            if s.size >= 0.8 * n_bootstrap:
                errors[q] = (float(np.percentile(s, 16)), float(np.percentile(s, 84)))
    return CompletenessFit(variable, t0, width, c_max, float(x50), float(x90), errors[0.5],
                           errors[0.9], int(t.size), int(found.sum()), ok)


def _wilson(k: int, n: int, z: float = 1.0) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def completeness_table(values, found, bins=SNR_BINS) -> pd.DataFrame:
    """Binned completeness with 68 % Wilson score intervals.

    Returns
    -------
    pandas.DataFrame
        ``lo``, ``hi``, ``centre`` (geometric mean for positive edges), ``n``,
        ``found``, ``completeness``, ``lower``, ``upper``; empty bins are dropped.
    """
    values = np.asarray(values, float)
    found = np.asarray(found, bool)
    rows = []
    edges = np.asarray(bins, float)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (values >= lo) & (values < hi)
        n = int(inside.sum())
        if n == 0:
            continue
        k = int(found[inside].sum())
        lower, upper = _wilson(k, n)
        centre = math.sqrt(lo * hi) if lo > 0 and hi > 0 else 0.5 * (lo + hi)
        rows.append({"lo": lo, "hi": hi, "centre": centre, "n": n, "found": k,
                     "completeness": k / n, "lower": lower, "upper": upper})
    return pd.DataFrame(rows, columns=["lo", "hi", "centre", "n", "found", "completeness", "lower",
                                       "upper"])


def flux_statistics(matched: pd.DataFrame, *, min_snr: float = 0.0) -> dict[str, float]:
    """Flux bias and pull of the found sources (optionally only above ``min_snr`` injected S/N).

    Returns
    -------
    dict
        ``n``, ``bias_median`` (median of (f − f_true)/f_true),
        ``bias_robust_std``, ``pull_mean``, ``pull_std``, ``pull_median``,
        ``pull_robust_std`` (1.4826 MAD; 1 when the errors are right).
    """
    sel = matched["found"].to_numpy(bool).copy()
    if min_snr > 0 and "expected_snr" in matched:
        sel &= np.abs(matched["expected_snr"].to_numpy(float)) >= min_snr
    bias = matched["flux_bias"].to_numpy(float)[sel]
    pull = matched["flux_pull"].to_numpy(float)[sel]
    bias, pull = bias[np.isfinite(bias)], pull[np.isfinite(pull)]

    def robust(v):
        return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else math.nan

    return {"n": int(sel.sum()),
            "bias_median": float(np.median(bias)) if bias.size else math.nan,
            "bias_robust_std": robust(bias),
            "pull_mean": float(np.mean(pull)) if pull.size else math.nan,
            "pull_std": float(np.std(pull, ddof=1)) if pull.size > 1 else math.nan,
            "pull_median": float(np.median(pull)) if pull.size else math.nan,
            "pull_robust_std": robust(pull)}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def exposure_area(exposure, *, exclude_planes=("NO_DATA", "EDGE")) -> dict[str, float]:
    """Searched area of an exposure: pixels without ``exclude_planes``, in Mpix and deg².

    Returns ``{"n_pixels", "area_mpix", "area_deg2"}`` (``area_deg2`` NaN without a WCS).
    """
    from ..masks import mask_value

    _, variance, mask = exposure.arrays()
    good = (np.asarray(mask) & np.uint32(mask_value(exclude_planes))) == 0
    good &= np.asarray(variance) > 0
    n_pixels = int(good.sum())
    deg2 = math.nan
    if exposure.wcs is not None:
        from astropy.wcs.utils import proj_plane_pixel_area

        deg2 = n_pixels * float(proj_plane_pixel_area(exposure.wcs.celestial))
    return {"n_pixels": n_pixels, "area_mpix": n_pixels / 1e6, "area_deg2": deg2}


@dataclasses.dataclass(frozen=True, eq=False)
class InjectionSummary:
    """Completeness, purity and photometry of matched injections.

    Attributes
    ----------
    matched : pandas.DataFrame
        Truth with the match columns (:func:`match_injections`).
    sources : pandas.DataFrame
        The non-sky DIA sources with ``matched`` / ``near_truth``.
    table : pandas.DataFrame
        Binned completeness vs injected S/N (:func:`completeness_table`).
    fit : CompletenessFit or None
        Logistic fit vs S/N (None when too few sources).
    fit_mag : CompletenessFit or None
        Logistic fit vs AB magnitude (None without magnitudes).
    per_image : pandas.DataFrame
        Per (visit, detector): ``n_injected``, ``n_found``, ``completeness``,
        ``snr50`` (from a per-image fit, NaN when it fails), ``n_false``,
        ``false_per_deg2``, ``area_deg2``.
    per_visit : pandas.DataFrame
        The same per visit (all its detectors together).
    metrics : dict
        Run totals: ``n_injected``, ``n_found``, ``completeness``, ``snr50``,
        ``snr90`` (and errors), ``mag50``, ``mag90``, ``n_sources``,
        ``n_false`` (unmatched and farther than the radius from every
        injection), ``n_duplicates`` (unmatched but within the radius of an
        injection), ``n_known`` (unmatched detections of ``known`` real
        sources), ``false_per_image``, ``false_per_deg2``, ``false_per_mpix``,
        ``area_deg2``, ``area_mpix`` and the flux statistics (``flux_*``).
    """

    matched: pd.DataFrame
    sources: pd.DataFrame
    table: pd.DataFrame
    fit: CompletenessFit | None
    fit_mag: CompletenessFit | None
    per_image: pd.DataFrame
    per_visit: pd.DataFrame
    metrics: dict[str, Any]

    def format(self) -> str:
        """A short text report."""
        m = self.metrics
        lines = ["  S/N bin       injected  found  completeness"]
        for row in self.table.itertuples():
            lines.append(f"  {row.lo:5.1f}-{row.hi:<6.1f} {row.n:8d} {row.found:6d}  "
                         f"{row.completeness:10.0%}")
        lines.append(f"  all          {m['n_injected']:8d} {m['n_found']:6d}  {m['completeness']:10.0%}")
        if self.fit is not None:
            lines.append(f"50% completeness at S/N {m['snr50']:.2f} "
                         f"[{m['snr50_err'][0]:.2f}, {m['snr50_err'][1]:.2f}], 90% at S/N "
                         f"{m['snr90']:.2f}; plateau {self.fit.c_max:.1%}")
        lines.append(f"False detections: {m['n_false']} ({m['false_per_image']:.1f} per image, "
                     f"{m['false_per_deg2']:.0f} per deg², {m['false_per_mpix']:.1f} per Mpix); "
                     f"{m['n_duplicates']} extra detections next to injections"
                     + (f", {m['n_known']} of known real sources" if m.get("n_known") else ""))
        lines.append(f"Flux: median bias {m['flux_bias_median']:+.3f}, pull median "
                     f"{m['flux_pull_median']:+.2f}, pull robust std {m['flux_pull_robust_std']:.2f} "
                     f"(n={m['flux_n']}, injected S/N ≥ 10)")
        return "\n".join(lines)


def summarize_injections(matched: pd.DataFrame, sources: pd.DataFrame, areas: dict | None = None, *,
                         snr_column: str = "expected_snr", bins=SNR_BINS, n_bootstrap: int = 50,
                         seed: int = 0, n_images: int | None = None) -> InjectionSummary:
    """Completeness, false detections and flux accuracy from :func:`match_injections` output.

    Parameters
    ----------
    matched, sources : pandas.DataFrame
        The two tables returned by :func:`match_injections`.
    areas : dict, optional
        ``{(visit, detector): exposure_area(...)}`` of the searched images
        (for rates per deg² / Mpix; NaN rates without).
    snr_column : str
        Truth column with the injected S/N (``expected_snr`` for injections,
        ``snr`` for simulated-survey truth).
    bins : sequence of float
        S/N bin edges.
    n_bootstrap, seed : int
        Bootstrap of the completeness fit.
    n_images : int, optional
        Images searched (default: the number of ``areas`` or of distinct
        (visit, detector) in ``matched``).
    """
    snr = np.abs(matched[snr_column].to_numpy(float)) if len(matched) else np.zeros(0)
    found = matched["found"].to_numpy(bool) if len(matched) else np.zeros(0, bool)
    table = completeness_table(snr, found, bins)
    fit = _try_fit(snr, found, "snr", n_bootstrap, seed)
    mags = matched["mag"].to_numpy(float) if "mag" in matched else np.full(len(matched), np.nan)
    fit_mag = _try_fit(mags, found, "mag", n_bootstrap, seed) if np.isfinite(mags).sum() >= 5 else None
    areas = dict(areas or {})
    false = ~sources["near_truth"].to_numpy(bool) if len(sources) else np.zeros(0, bool)
    near_known = (sources["near_known"].to_numpy(bool) if "near_known" in sources
                  else np.zeros(len(sources), bool))
    duplicates = (sources["near_truth"].to_numpy(bool) & ~sources["matched"].to_numpy(bool)
                  & ~near_known if len(sources) else np.zeros(0, bool))
    keys = set()
    for frame in (matched, sources):
        if len(frame) and {"visit", "detector"} <= set(frame.columns):
            keys |= set(zip(frame["visit"].astype(int), frame["detector"].astype(int)))
    keys |= set(areas)
    rows = []
    for visit, detector in sorted(keys):
        t_sel = ((matched["visit"].to_numpy() == visit) & (matched["detector"].to_numpy() == detector)
                 if len(matched) else np.zeros(0, bool))
        s_sel = ((sources["visit"].to_numpy() == visit) & (sources["detector"].to_numpy() == detector)
                 if len(sources) else np.zeros(0, bool))
        area = areas.get((visit, detector), {})
        n_t, n_f = int(t_sel.sum()), int(found[t_sel].sum()) if t_sel.size else 0
        image_fit = _try_fit(snr[t_sel], found[t_sel], "snr", 0, seed) if n_t >= 10 else None
        n_false = int(false[s_sel].sum()) if s_sel.size else 0
        deg2 = area.get("area_deg2", math.nan)
        rows.append({"visit": visit, "detector": detector, "n_injected": n_t, "n_found": n_f,
                     "completeness": n_f / n_t if n_t else math.nan,
                     "snr50": image_fit.x50 if image_fit is not None else math.nan,
                     "n_false": n_false, "false_per_deg2": n_false / deg2 if deg2 else math.nan,
                     "area_deg2": deg2})
    per_image = pd.DataFrame(rows, columns=["visit", "detector", "n_injected", "n_found",
                                            "completeness", "snr50", "n_false", "false_per_deg2",
                                            "area_deg2"])
    def area_total(key):
        return float(np.nansum([a.get(key, math.nan) for a in areas.values()])) if areas else math.nan

    total_deg2, total_mpix = area_total("area_deg2"), area_total("area_mpix")
    n_images = n_images if n_images is not None else max(len(areas), len(keys), 1)
    n_false = int(false.sum())
    flux = flux_statistics(matched, min_snr=10.0) if len(matched) else flux_statistics(
        pd.DataFrame({"found": [], "flux_bias": [], "flux_pull": []}))
    metrics = {
        "n_injected": int(len(matched)), "n_found": int(found.sum()),
        "completeness": float(found.mean()) if found.size else math.nan,
        "snr50": fit.x50 if fit else math.nan, "snr90": fit.x90 if fit else math.nan,
        "snr50_err": list(fit.x50_err) if fit else [math.nan, math.nan],
        "snr90_err": list(fit.x90_err) if fit else [math.nan, math.nan],
        "completeness_plateau": fit.c_max if fit else math.nan,
        "mag50": fit_mag.x50 if fit_mag else math.nan, "mag90": fit_mag.x90 if fit_mag else math.nan,
        "n_sources": int(len(sources)), "n_false": n_false,
        "n_duplicates": int(duplicates.sum()), "n_known": int(near_known.sum()),
        "false_per_image": n_false / n_images,
        "false_per_deg2": n_false / total_deg2 if total_deg2 else math.nan,
        "false_per_mpix": n_false / total_mpix if total_mpix else math.nan,
        "area_deg2": total_deg2, "area_mpix": total_mpix, "n_images": n_images,
        **{f"flux_{k}": v for k, v in flux.items()},
    }
    return InjectionSummary(matched, sources, table, fit, fit_mag, per_image,
                            _per_visit(per_image, matched, snr, found, seed), metrics)


def _per_visit(per_image: pd.DataFrame, matched: pd.DataFrame, snr, found, seed) -> pd.DataFrame:
    rows = []
    for visit, group in per_image.groupby("visit"):
        sel = (matched["visit"].to_numpy() == visit) if len(matched) and "visit" in matched \
            else np.zeros(len(matched), bool)
        fit = _try_fit(snr[sel], found[sel], "snr", 0, seed) if sel.sum() >= 10 else None
        n_t, n_f = int(group["n_injected"].sum()), int(group["n_found"].sum())
        deg2 = float(group["area_deg2"].sum())
        n_false = int(group["n_false"].sum())
        rows.append({"visit": int(visit), "n_detectors": len(group), "n_injected": n_t, "n_found": n_f,
                     "completeness": n_f / n_t if n_t else math.nan,
                     "snr50": fit.x50 if fit is not None else math.nan, "n_false": n_false,
                     "false_per_deg2": n_false / deg2 if deg2 > 0 else math.nan})
    return pd.DataFrame(rows, columns=["visit", "n_detectors", "n_injected", "n_found", "completeness",
                                       "snr50", "n_false", "false_per_deg2"])


def _try_fit(values, found, variable, n_bootstrap, seed) -> CompletenessFit | None:
    values = np.asarray(values, float)
    if np.isfinite(values).sum() < 5 or np.asarray(found).sum() == 0:
        return None
    try:
        return fit_completeness(values, found, variable=variable, n_bootstrap=n_bootstrap, seed=seed)
    except ConfigurationError:
        return None
