"""The run report: one self-contained HTML page that shows what a survey run did.

:func:`make_report` reads a run directory written by
:func:`diffim_dask.workflow.run.run_survey` and writes ``report.html`` (all
figures embedded as base64 PNG data URIs, no external file or script):

1. **Run summary** — units done / skipped / failed, with stage, category and
   reason of every unit that did not finish, DIA-source counts per unit.
2. **Noise of the difference** — histogram of ``D / sqrt(var)`` over the
   pixels of every difference image outside sources and bad planes, against
   ``N(0, 1)``; per unit the mean, standard deviation, robust scatter
   (1.4826 MAD) and the fraction of pixels beyond 5σ.
3. **Kernel sum** — the photometric scale of the PSF-matching kernel. Unit
   records carry the kernel sum at the image centre and its minimum, maximum
   and standard deviation over a 9×9 grid of the image; the map shows the
   central kernel sum of every unit on a visit × detector grid, annotated
   with its spread. When a record also carries ``kernel_sum_grid`` (the 9×9
   values, see :func:`kernel_sum_grid`) the spatial map of each unit is drawn.
4. **Completeness** — when the run injected sources (``injected/``) or a
   simulated survey's truth is found (``truth_dir`` or the manifest's
   ``truth`` entry): completeness vs S/N with the fitted logistic curve and
   its 50 % / 90 % points, false detections per deg², flux pulls.
5. **Gallery** — science / template / difference triplets of the brightest
   positive, negative and dipole DIA sources (the template is assembled
   again from the run's template store; injected sources are re-injected
   from their truth tables and seeds so the science stamps show them).
6. **Timings** — seconds per stage and unit.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigurationError, DiffimError
from ..masks import mask_value

__all__ = ["make_report", "RunData", "load_run", "noise_statistics", "kernel_sum_grid",
           "evaluate_run_truth", "run_cutout_triplets", "add_report_arguments", "run_report_command"]

log = logging.getLogger(__name__)

#: Pixels left out of the noise histogram.
NOISE_EXCLUDE_PLANES = ("NO_DATA", "EDGE", "BAD", "SAT", "CR", "DETECTED", "DETECTED_NEGATIVE",
                        "STREAK", "SAT_TEMPLATE", "INJECTED", "INJECTED_TEMPLATE", "SUSPECT")


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class RunData:
    """What a run directory holds (records, summary, provenance, catalog, manifest)."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    provenance: dict[str, Any]
    catalog: pd.DataFrame
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for record in self.records:
            counts[record.get("status", "failed")] = counts.get(record.get("status", "failed"), 0) + 1
        return counts

    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "done"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (see :mod:`diffim_dask.workflow.run` for its layout).

    Raises
    ------
    ConfigurationError
        If ``run_dir`` holds no unit records and no run summary.
    """
    from ..workflow.catalog import read_catalog

    run_dir = Path(run_dir)
    records = [_read_json(p) for p in sorted((run_dir / "units").glob("visit=*/detector=*.json"))]
    records = [r for r in records if r]
    summary = _read_json(run_dir / "run_summary.json")
    if not records:
        records = list(summary.get("units", []))
    if not records:
        raise ConfigurationError(
            f"{run_dir} is not a diffim-dask run directory (no units/visit=*/detector=*.json and no "
            "run_summary.json); pass the --out directory of `diffim-dask run`")
    records.sort(key=lambda r: (int(r.get("visit", 0)), int(r.get("detector", 0))))
    provenance = _read_json(run_dir / "provenance.json")
    manifest: dict[str, Any] = {}
    manifest_path = provenance.get("manifest")
    if manifest_path and Path(manifest_path).is_file():
        import yaml

        try:
            manifest = yaml.safe_load(Path(manifest_path).read_text()) or {}
            manifest["_path"] = str(manifest_path)
        except yaml.YAMLError:
            manifest = {}
    return RunData(run_dir, records, summary, provenance, read_catalog(run_dir), manifest)


def _open_difference(run_dir: Path, visit: int, detector: int):
    from ..io import ExposureStore

    store = run_dir / "difference.zarr"
    if not store.exists():
        return None
    try:
        return ExposureStore(store).open(visit, detector).compute()
    except DiffimError:
        return None


def _open_science(run: RunData, record: dict[str, Any]):
    from ..io import ExposureStore, read_exposure, read_psf_fits
    from ..workflow.manifest import ManifestEntry

    path = record.get("science")
    if not path:
        return None
    entry = ManifestEntry(int(record["visit"]), int(record["detector"]), str(path))
    psf_path = None
    for row in run.manifest.get("science", []) or []:
        if int(row.get("visit", -1)) == entry.visit and int(row.get("detector", -1)) == entry.detector:
            psf_path = row.get("psf")
    if entry.is_store:
        science = ExposureStore(entry.path).open(entry.visit, entry.detector).compute()
    else:
        science = read_exposure(entry.path)
    if psf_path:
        from ..workflow.manifest import resolve_path

        science = science.replace(psf=read_psf_fits(
            resolve_path(str(psf_path), Path(run.manifest["_path"]).resolve().parent)))
    return science.replace(info=science.info.replace(visit=entry.visit, detector=entry.detector))


def _template_for(run: RunData, science):
    """Assemble the template again from the run's store with the run's template config."""
    from ..template import CoaddStore, get_template
    from ..workflow.pipeline import load_pipeline

    templates = (run.provenance.get("templates") or {}).get("path")
    if not templates or science is None:
        return None
    pipeline = load_pipeline(run.provenance.get("pipeline") or {})
    return get_template(science, CoaddStore(templates), pipeline.template).template


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def noise_statistics(difference, *, exclude_planes=NOISE_EXCLUDE_PLANES) -> tuple[np.ndarray, dict]:
    """Normalised difference ``D / sqrt(var)`` on clean pixels and its statistics.

    Returns
    -------
    (numpy.ndarray, dict)
        The values and ``n``, ``mean``, ``std``, ``robust_std`` (1.4826 MAD),
        ``frac_5sigma`` (fraction with ``|z| > 5``; 5.7e-7 for N(0, 1)).
    """
    image, variance, mask = difference.arrays()
    good = (np.isfinite(image) & np.isfinite(variance) & (variance > 0)
            & ((mask & np.uint32(mask_value(exclude_planes))) == 0))
    z = (image[good] / np.sqrt(variance[good])).astype(np.float64)
    if z.size == 0:
        return z, {"n": 0, "mean": math.nan, "std": math.nan, "robust_std": math.nan,
                   "frac_5sigma": math.nan}
    return z, {"n": int(z.size), "mean": float(z.mean()), "std": float(z.std()),
               "robust_std": float(1.4826 * np.median(np.abs(z - np.median(z)))),
               "frac_5sigma": float(np.mean(np.abs(z) > 5))}


def kernel_sum_grid(kernel, shape: tuple[int, int], origin: tuple[int, int] = (0, 0),
                    n: int = 9) -> dict[str, Any]:
    """Kernel sums on an ``n × n`` grid of the image, as plain data for a unit record.

    Parameters
    ----------
    kernel : SpatialKernel
        ``SubtractionResult.kernel``.
    shape, origin : (int, int)
        The image's ``(ny, nx)`` and parent-frame ``(x0, y0)``.

    Returns
    -------
    dict
        ``{"x": [...], "y": [...], "sum": [[...]]}`` (``sum[j][i]`` at ``(x[i], y[j])``).
    """
    ny, nx = shape
    x0, y0 = origin
    xs = np.linspace(x0, x0 + nx - 1, n)
    ys = np.linspace(y0, y0 + ny - 1, n)
    gx, gy = np.meshgrid(xs, ys)
    sums = np.asarray(kernel.kernel_sum(gx, gy), float)
    return {"x": xs.round(2).tolist(), "y": ys.round(2).tolist(), "sum": sums.round(6).tolist()}


def evaluate_run_truth(run: RunData, *, truth_dir: str | Path | None = None, radius: float = 3.0,
                       areas: dict | None = None, n_bootstrap: int = 50):
    """Completeness and purity of a run against its injections or a simulated survey's truth.

    Injections (``RUN/injected/``) take precedence; otherwise the simulated
    truth (``truth_dir``, or the ``truth`` entry of the run's manifest) is
    used: completeness on transients (S/N from the truth's ``snr``), and
    detections within ``radius`` of any transient, variable or moving object
    (anywhere along its trail) are not counted as false. When a run injected
    sources into a simulated survey, completeness is that of the injections
    and detections of the survey's own changing objects are not false either.

    Returns
    -------
    (InjectionSummary or None, str)
        The summary and a description of the truth used ("" when none).
    """
    from .completeness import (match_injections, match_survey_truth, read_survey_truth,
                               summarize_injections)
    from .injection import read_injection_truth

    done = [(int(r["visit"]), int(r["detector"])) for r in run.done()]
    catalog = run.catalog
    if len(catalog):
        keys = set(done)
        catalog = catalog[[(int(v), int(d)) in keys for v, d in zip(catalog["visit"], catalog["detector"])]]
    if truth_dir is None and run.manifest.get("truth"):
        from ..workflow.manifest import resolve_path

        truth_dir = resolve_path(str(run.manifest["truth"]), Path(run.manifest["_path"]).resolve().parent)
    truth = (read_survey_truth(Path(truth_dir), done) if truth_dir is not None and Path(truth_dir).is_dir()
             else pd.DataFrame())
    injected, _ = read_injection_truth(run.run_dir)
    if len(injected):
        injected = injected[[(int(v), int(d)) in set(done)
                             for v, d in zip(injected["visit"], injected["detector"])]]
        known = None
        if len(truth):
            # Injected into a simulated survey: its own transients, variables and moving objects
            # are real, so detections of them are not false.
            _, survey_sources = match_survey_truth(truth, catalog, radius)
            known = survey_sources.loc[survey_sources["near_truth"].to_numpy(bool),
                                       ["x", "y", "visit", "detector"]]
        matched, sources = match_injections(injected, catalog, radius, known=known)
        summary = summarize_injections(matched, sources, areas, n_bootstrap=n_bootstrap,
                                       n_images=len(done))
        extra = " (detections of the simulated survey's own changing objects are not false)" \
            if known is not None else ""
        return summary, f"{len(injected)} injected point sources (RUN/injected/){extra}"
    if len(truth) == 0:
        return None, ""
    if len(truth) == 0:
        return None, ""
    matched, sources = match_survey_truth(truth, catalog, radius)
    transients = matched[matched["kind"] == "transient"].reset_index(drop=True)
    summary = summarize_injections(transients, sources, areas, n_bootstrap=n_bootstrap,
                                   n_images=len(done))
    return summary, (f"simulated truth in {truth_dir}: {len(transients)} transients "
                     f"(detections at variables and moving objects are not false)")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from .cutouts import _pyplot

    Figure = _pyplot()
    return Figure(figsize=(width, height), dpi=90)


def _png_uri(fig) -> str:
    from .cutouts import figure_png

    return "data:image/png;base64," + base64.b64encode(figure_png(fig)).decode("ascii")


def _noise_figure(values: np.ndarray, stats: dict) -> str:
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(-8, 8, 161)
    ax.hist(np.clip(values, -8, 8), bins=bins, density=True, histtype="stepfilled", alpha=0.5,
            color="tab:blue", label="D / √var (all units)")
    grid = np.linspace(-8, 8, 400)
    ax.plot(grid, np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi), color="k", lw=1,
            label="N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 1)
    ax.set_xlabel("normalised difference D / √var")
    ax.set_ylabel("density")
    ax.set_title(f"std {stats['std']:.3f}, robust std {stats['robust_std']:.3f}, "
                 f"mean {stats['mean']:+.3f}  ({stats['n']:,} pixels)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_uri(fig)


def _kernel_figure(records: list[dict[str, Any]]) -> str | None:
    done = [r for r in records if r.get("status") == "done" and "kernel_sum" in r.get("subtraction", {})]
    if not done:
        return None
    grids = [r for r in done if (r.get("kernel_sum_grid") or r["subtraction"].get("kernel_sum_grid"))]
    if grids:
        n = len(grids)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig = _figure(2.6 * cols + 0.8, 2.4 * rows)
        values = [np.asarray((r.get("kernel_sum_grid") or r["subtraction"]["kernel_sum_grid"])["sum"])
                  for r in grids]
        vmin = min(float(v.min()) for v in values)
        vmax = max(float(v.max()) for v in values)
        image = None
        for k, (record, grid) in enumerate(zip(grids, values)):
            ax = fig.add_subplot(rows, cols, k + 1)
            spec = record.get("kernel_sum_grid") or record["subtraction"]["kernel_sum_grid"]
            extent = (spec["x"][0], spec["x"][-1], spec["y"][0], spec["y"][-1])
            image = ax.imshow(grid, origin="lower", extent=extent, cmap="viridis", vmin=vmin,
                              vmax=max(vmax, vmin + 1e-6), aspect="auto")
            # A flat map (constant kernel sum) says nothing by colour alone: print the numbers.
            ax.set_title(f"visit {record['visit']} det {record['detector']}\n"
                         f"{float(np.median(grid)):.3f}, range {float(grid.min()):.3f}–"
                         f"{float(grid.max()):.3f}", fontsize=8)
            ax.set_xlabel("x (px)", fontsize=7)
            ax.set_ylabel("y (px)", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.subplots_adjust(left=0.08, right=0.86, bottom=0.16, top=0.82, wspace=0.45, hspace=0.7)
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="kernel sum")
        return _png_uri(fig)
    visits = sorted({int(r["visit"]) for r in done})
    detectors = sorted({int(r["detector"]) for r in done})
    grid = np.full((len(detectors), len(visits)), np.nan)
    for r in done:
        row, col = detectors.index(int(r["detector"])), visits.index(int(r["visit"]))
        grid[row, col] = r["subtraction"]["kernel_sum"]
    fig = _figure(max(4.0, 0.9 * len(visits) + 2.0), max(2.4, 0.6 * len(detectors) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    for r in done:
        s = r["subtraction"]
        spread = s.get("kernel_sum_max", math.nan) - s.get("kernel_sum_min", math.nan)
        ax.text(visits.index(int(r["visit"])), detectors.index(int(r["detector"])),
                f"{s['kernel_sum']:.3f}\n±{spread / 2:.3f}", ha="center", va="center", fontsize=7,
                color="w")
    ax.set_xticks(range(len(visits)), [str(v) for v in visits], fontsize=7)
    ax.set_yticks(range(len(detectors)), [str(d) for d in detectors], fontsize=7)
    ax.set_xlabel("visit")
    ax.set_ylabel("detector")
    ax.set_title("kernel sum at the centre\n(± half its range over the image)", fontsize=8)
    fig.colorbar(image, ax=ax, label="kernel sum")
    fig.tight_layout()
    return _png_uri(fig)


def _interval_errors(table: pd.DataFrame) -> np.ndarray:
    """Error-bar lengths below / above each binned completeness (rounding can make them -1e-17)."""
    value = table["completeness"].to_numpy(float)
    return np.clip([value - table["lower"].to_numpy(float), table["upper"].to_numpy(float) - value],
                   0.0, None)


def _draw_completeness(ax, centre, table, grid, fit, marker_label) -> None:
    """Binned completeness with Wilson error bars, the fitted logistic curve on ``grid`` and
    its 50 % / 90 % points (``marker_label(x)`` is the text beside each)."""
    if len(table):
        ax.errorbar(centre, table["completeness"], yerr=_interval_errors(table), fmt="o",
                    color="tab:blue", ms=4, label="binned (68% Wilson)")
    if fit is None:
        return
    ax.plot(grid, fit(grid), color="tab:orange", label="logistic fit")
    for q, x in ((0.5, fit.x50), (0.9, fit.x90)):
        if math.isfinite(x):
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.text(x, q, f" {q:.0%} at {marker_label(x)}", fontsize=7, va="bottom")


def _magnitude_panel(ax, summary) -> None:
    """Completeness vs injected AB magnitude: 0.25-mag bins and the fitted curve."""
    from .completeness import completeness_table

    mags = summary.matched["mag"].to_numpy(float)
    found = summary.matched["found"].to_numpy(bool)
    good = np.isfinite(mags)
    lo, hi = math.floor(mags[good].min() * 4) / 4, math.ceil(mags[good].max() * 4) / 4 + 0.25
    table = completeness_table(mags[good], found[good], np.arange(lo, hi + 1e-9, 0.25))
    _draw_completeness(ax, 0.5 * (table["lo"] + table["hi"]), table, np.linspace(lo, hi, 200),
                       summary.fit_mag, lambda x: f"{x:.2f}")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("injected magnitude (AB)")
    ax.set_ylabel("completeness")
    ax.legend(fontsize=7, loc="lower left")


def _completeness_figure(summary) -> str:
    with_mag = summary.fit_mag is not None and "mag" in summary.matched
    n_panels = 3 if with_mag else 2
    fig = _figure(4.5 * n_panels, 3.4)
    ax = fig.add_subplot(1, n_panels, 1)
    table = summary.table
    grid = None
    if summary.fit is not None:
        lo = max(float(np.nanmin(summary.matched["expected_snr"])) * 0.8, 0.5)
        hi = float(np.nanmax(summary.matched["expected_snr"])) * 1.2
        grid = np.geomspace(lo, hi, 200)
    _draw_completeness(ax, table["centre"] if len(table) else None, table, grid, summary.fit,
                       lambda x: f"S/N {x:.1f}")
    ax.axvline(5.8, color="tab:red", ls="--", lw=0.8, label="anchor 50% (S/N 5.8)")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    lo_x, hi_x = ax.get_xlim()
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000) if lo_x <= t <= hi_x]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("injected S/N")
    ax.set_ylabel("completeness")
    ax.legend(fontsize=7, loc="lower right")
    if with_mag:
        _magnitude_panel(fig.add_subplot(1, n_panels, 2), summary)
    ax2 = fig.add_subplot(1, n_panels, n_panels)
    pulls = summary.matched["flux_pull"].to_numpy(float)
    strong = summary.matched["expected_snr"].to_numpy(float) >= 10
    pulls = pulls[np.isfinite(pulls) & strong]
    if pulls.size:
        ax2.hist(np.clip(pulls, -6, 6), bins=np.linspace(-6, 6, 31), density=True, alpha=0.6,
                 color="tab:green", label=f"found, S/N ≥ 10 (n={pulls.size})")
        grid = np.linspace(-6, 6, 200)
        ax2.plot(grid, np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi), "k", lw=1, label="N(0, 1)")
        ax2.legend(fontsize=7)
    ax2.set_xlabel("flux pull (f − f_true) / σ_f")
    fig.tight_layout()
    return _png_uri(fig)


def _timing_figure(records: list[dict[str, Any]]) -> tuple[str | None, pd.DataFrame]:
    rows = [dict(r.get("timings", {}), unit=f"v{r['visit']} d{r['detector']}") for r in records
            if r.get("timings")]
    if not rows:
        return None, pd.DataFrame()
    frame = pd.DataFrame(rows).set_index("unit").fillna(0.0)
    fig = _figure(7.0, max(2.2, 0.28 * len(frame) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    left = np.zeros(len(frame))
    for stage in frame.columns:
        ax.barh(range(len(frame)), frame[stage].to_numpy(), left=left, label=stage)
        left += frame[stage].to_numpy()
    ax.set_yticks(range(len(frame)), list(frame.index), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=min(6, len(frame.columns)), loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    table = pd.DataFrame({"total_s": frame.sum(), "median_s": frame.median(), "max_s": frame.max()})
    return _png_uri(fig), table


def run_cutout_triplets(run: RunData | str | Path, sources: pd.DataFrame, size: int = 31
                        ) -> tuple[dict[int, Any], list[str]]:
    """Science / template / difference triplets of DIA sources of a run (the report's gallery).

    The difference comes from the run's ``difference.zarr``, the science
    image from the manifest (with the run's injections re-rendered from their
    truth tables and seeds, so the stamps show what was subtracted) and the
    template is assembled again from the run's template store with the run's
    template config. The notebook uses the same function.

    Parameters
    ----------
    run : RunData or path
        A run (:func:`load_run`) or its directory.
    sources : pandas.DataFrame
        Rows of the run's catalog: ``visit``, ``detector``, ``x``, ``y``,
        ``diaSourceId``, ``snr`` (``kind`` optional; else from ``isDipole`` /
        ``isNegative``).
    size : int
        Stamp side (pixels, odd).

    Returns
    -------
    (dict, list of str)
        ``{diaSourceId: CutoutTriplet}`` and notes on what could not be shown
        (missing difference, science or template images).
    """
    from .cutouts import _kind, cutout_triplet
    from .injection import InjectionConfig, inject_sources, read_injection_truth

    run = run if isinstance(run, RunData) else load_run(run)
    notes: list[str] = []
    triplets: dict[int, Any] = {}
    if len(sources) == 0:
        return triplets, notes
    injected, injected_meta = read_injection_truth(run.run_dir)
    records = {(int(r["visit"]), int(r["detector"])): r for r in run.records}
    for (visit, detector), rows in sources.groupby(["visit", "detector"]):
        visit, detector = int(visit), int(detector)
        record = records.get((visit, detector), {})
        difference = _open_difference(run.run_dir, visit, detector)
        if difference is None:
            notes.append(f"visit {visit} detector {detector}: no stored difference image")
            continue
        try:
            science = _open_science(run, record)
        except (DiffimError, OSError) as exc:
            science = None
            notes.append(f"visit {visit} detector {detector}: science image unavailable ({exc})")
        template = None
        if science is not None:
            science = _repair_like_the_run(run, science, notes, visit, detector)
            unit_truth = injected[(injected["visit"] == visit) & (injected["detector"] == detector)] \
                if len(injected) else injected
            if len(unit_truth):
                meta = injected_meta.get((visit, detector), {})
                try:
                    if science.psf is None:
                        from ..psf import estimate_psf

                        science = science.replace(psf=estimate_psf(science).psf)
                    config = InjectionConfig.from_dict(meta.get("config", {}))
                    science = inject_sources(science, unit_truth, seed=int(meta.get("seed", 0)),
                                             config=config).exposure
                except (DiffimError, ValueError) as exc:
                    notes.append(f"visit {visit} detector {detector}: could not re-inject ({exc})")
            try:
                template = _template_for(run, science)
            except (DiffimError, OSError, ValueError) as exc:
                notes.append(f"visit {visit} detector {detector}: template unavailable ({exc})")
        if science is None:
            science = difference
        for _, row in rows.iterrows():
            kind = row["kind"] if "kind" in row and isinstance(row["kind"], str) else _kind(row)
            triplets[int(row["diaSourceId"])] = cutout_triplet(
                science, template, difference, float(row["x"]), float(row["y"]), size, kind=kind,
                diaSourceId=int(row["diaSourceId"]), snr=float(row["snr"]), visit=visit,
                detector=detector)
    # In the order the caller listed the sources (the gallery ranks them).
    order = [int(i) for i in sources["diaSourceId"] if int(i) in triplets]
    return {i: triplets[i] for i in order}, notes


def _repair_like_the_run(run: RunData, science, notes: list[str], visit: int, detector: int):
    """The science image as the run subtracted it: cosmic rays repaired with the run's config."""
    from ..workflow.pipeline import load_pipeline
    from ..workflow.run import repair_cosmic_rays

    try:
        pipeline = load_pipeline(run.provenance.get("pipeline") or {})
        if science.psf is None:
            from ..psf import estimate_psf

            science = science.replace(psf=estimate_psf(science).psf)
        return repair_cosmic_rays(science, pipeline)[0]
    except DiffimError as exc:
        notes.append(f"visit {visit} detector {detector}: cosmic rays not repaired ({exc})")
        return science


def _gallery(run: RunData, n_per_kind: int, size: int) -> tuple[dict[str, str], list[str]]:
    """Triplet figures per kind, and notes about what could not be shown."""
    from .cutouts import select_gallery, triplet_figure

    if len(run.catalog) == 0:
        return {}, ["the run has no DIA sources"]
    picks = select_gallery(run.catalog, n_per_kind)
    wanted = pd.concat([df for df in picks.values() if len(df)], ignore_index=True)
    if len(wanted) == 0:
        return {}, ["the run has no DIA sources"]
    triplets, notes = run_cutout_triplets(run, wanted, size)
    figures = {}
    for kind, df in picks.items():
        chosen = [triplets[int(i)] for i in df["diaSourceId"] if int(i) in triplets]
        if chosen:
            figures[kind] = _png_uri(triplet_figure(chosen))
    return figures, notes


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.done{color:#176f2c}.failed{color:#b00020}.skipped{color:#8a6d00}
.note{color:#666;font-size:12px}img{max-width:100%;height:auto}.gallery{display:flex;flex-wrap:wrap;gap:18px}
.gallery div{flex:1 1 300px}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return _esc(value)


def _table(frame: pd.DataFrame, *, left: tuple[str, ...] = (), classes: dict | None = None) -> str:
    if frame is None or len(frame) == 0:
        return "<p class='note'>(none)</p>"
    head = "".join(f"<th class='{'l' if c in left else ''}'>{_esc(c)}</th>" for c in frame.columns)
    body = []
    columns = {c: frame[c].tolist() for c in frame.columns}  # keeps ints as ints
    for i in range(len(frame)):
        cells = []
        for column in frame.columns:
            value = columns[column][i]
            css = "l" if column in left else ""
            if classes and column in classes:
                css += f" {classes[column](value)}"
            cells.append(f"<td class='{css.strip()}'>{_fmt(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    if not uri:
        return f"<p class='note'>({_esc(alt)}: not available)</p>"
    return f"<img src='{uri}' alt='{_esc(alt)}'>"


def _unit_table(run: RunData) -> pd.DataFrame:
    rows = []
    for r in run.records:
        sub = r.get("subtraction", {}) or {}
        rows.append({
            "visit": int(r.get("visit", -1)), "detector": int(r.get("detector", -1)),
            "status": r.get("status", "?"), "stage": r.get("stage", ""),
            "category": r.get("category", ""),
            "DIA sources": int(r.get("n_dia_sources", 0)), "+": int(r.get("n_positive", 0)),
            "−": int(r.get("n_negative", 0)), "dipoles": int(r.get("n_dipoles", 0)),
            "kernel sum": sub.get("kernel_sum", math.nan),
            "strategy": sub.get("strategy", ""),
            "time (s)": float(sum((r.get("timings") or {}).values())),
            "reason": (r.get("reason", "") or "")[:300],
        })
    return pd.DataFrame(rows)


def make_report(run_dir: str | Path, out_html: str | Path | None = None, *,
                truth_dir: str | Path | None = None, n_cutouts: int = 6, cutout_size: int = 31,
                match_radius: float = 3.0) -> Path:
    """Write the self-contained HTML report of a run.

    Parameters
    ----------
    run_dir : path
        The ``--out`` directory of a survey run.
    out_html : path, optional
        Where to write (default ``run_dir/report.html``).
    truth_dir : path, optional
        Truth tables of a simulated survey (``truth/visit=V/detector=D.parquet``);
        default: the ``truth`` entry of the run's manifest, if any. Injection
        truth in ``run_dir/injected/`` takes precedence.
    n_cutouts : int
        Triplets per kind (positive, negative, dipole) in the gallery.
    cutout_size : int
        Stamp side (pixels, odd).
    match_radius : float
        Match radius (pixels) for completeness.

    Returns
    -------
    pathlib.Path
        The HTML file.

    Raises
    ------
    ConfigurationError
        If ``run_dir`` is not a run directory, or matplotlib (the ``plot``
        extra) is missing.
    """
    from .completeness import exposure_area

    start = time.perf_counter()
    from .cutouts import _pyplot

    _pyplot()  # fail early, with the install hint, when matplotlib is missing
    run = load_run(run_dir)
    out_html = Path(out_html) if out_html is not None else run.run_dir / "report.html"
    counts = run.counts
    parts: list[str] = []
    title = f"diffim-dask run report — {run.run_dir.name}"
    pipeline = (run.provenance.get("pipeline") or {})
    parts.append(f"<h1>{_esc(title)}</h1>")
    parts.append(
        "<p>"
        f"<b>{counts['done']}</b> done, <b>{counts['skipped']}</b> skipped, "
        f"<b>{counts['failed']}</b> failed of {len(run.records)} units; "
        f"{len(run.catalog[~run.catalog['isSky']]) if len(run.catalog) else 0:,} DIA sources. "
        f"Pipeline <code>{_esc(pipeline.get('name', '?'))}</code> "
        f"(method <code>{_esc(pipeline.get('method', '?'))}</code>), diffim_dask "
        f"{_esc(run.provenance.get('diffim_dask_version', '?'))}, started "
        f"{_esc(run.provenance.get('started_utc', '?'))}, wall time "
        f"{_fmt(float(run.summary.get('wall_s', math.nan)), 1)} s. Run directory "
        f"<code>{_esc(run.run_dir)}</code>.</p>")

    # 1. summary
    units = _unit_table(run)
    parts.append("<h2 id='summary'>Run summary</h2>")
    parts.append(_table(units, left=("status", "stage", "category", "strategy", "reason"),
                        classes={"status": lambda s: str(s)}))

    # 2. noise
    parts.append("<h2 id='noise'>Noise of the difference images</h2>")
    all_values, noise_rows, areas = [], [], {}
    for record in run.done():
        visit, detector = int(record["visit"]), int(record["detector"])
        difference = _open_difference(run.run_dir, visit, detector)
        if difference is None:
            continue
        values, stats = noise_statistics(difference)
        areas[(visit, detector)] = exposure_area(difference)
        all_values.append(values)
        noise_rows.append({"visit": visit, "detector": detector, **stats,
                           "sky_noise_ratio": (record.get("detection") or {}).get("sky_noise_ratio",
                                                                                 math.nan)})
    if all_values:
        values = np.concatenate(all_values)
        total = {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
                 "robust_std": float(1.4826 * np.median(np.abs(values - np.median(values))))}
        parts.append(_img(_noise_figure(values, total), "noise histogram"))
        parts.append("<p class='note'>Pixels with any of "
                     f"{_esc(', '.join(NOISE_EXCLUDE_PLANES))} are left out (so the tails stop near the "
                     "detection threshold: detected pixels are masked). For N(0, 1) the "
                     "fraction beyond 5σ is 5.7e-7; sky_noise_ratio is the scatter of PSF fluxes "
                     "on empty sky over their predicted errors (≈1 when the variance plane "
                     "describes the noise on the PSF scale).</p>")
        parts.append(_table(pd.DataFrame(noise_rows)))
    else:
        parts.append("<p class='note'>No difference image is stored (no unit done, or "
                     "execution.write_difference is off).</p>")

    # 3. kernel sum
    parts.append("<h2 id='kernel'>Kernel sum</h2>")
    parts.append(_img(_kernel_figure(run.records), "kernel-sum map"))
    parts.append("<p class='note'>The kernel sum is the photometric scale between the template "
                 "and the science image. Records store it at the image centre with its min / max "
                 "/ std over a 9×9 grid; a spatial map per unit is drawn when records carry "
                 "<code>kernel_sum_grid</code>.</p>")

    # 4. completeness
    parts.append("<h2 id='completeness'>Completeness and false detections</h2>")
    try:
        summary, described = evaluate_run_truth(run, truth_dir=truth_dir, radius=match_radius,
                                                areas=areas)
    except (DiffimError, OSError, KeyError, ValueError) as exc:
        summary, described = None, ""
        parts.append(f"<p class='note'>Evaluation failed: {_esc(exc)}</p>")
    if summary is not None and summary.metrics["n_injected"] > 0:
        m = summary.metrics
        parts.append(f"<p>Truth: {_esc(described)}; match radius {match_radius:g} px, one-to-one.</p>")
        parts.append(_img(_completeness_figure(summary), "completeness curve"))
        keys = ["n_injected", "n_found", "completeness", "snr50", "snr90", "completeness_plateau",
                "mag50", "mag90", "n_sources", "n_false", "false_per_image", "false_per_deg2",
                "false_per_mpix", "n_duplicates", "n_known", "flux_bias_median", "flux_pull_median",
                "flux_pull_robust_std"]
        metric_table = pd.DataFrame({"metric": keys,
                                     "value": pd.Series([_fmt(m.get(k, math.nan)) for k in keys],
                                                        dtype=object)})
        parts.append(_table(metric_table, left=("metric",)))
        parts.append("<h3>Per visit</h3>" + _table(summary.per_visit))
        parts.append("<h3>Per image</h3>" + _table(summary.per_image))
        parts.append("<h3>Completeness per S/N bin</h3>" + _table(summary.table))
    else:
        parts.append("<p class='note'>No truth available: the run injected no sources and no "
                     "simulated truth was found (pass truth_dir / --truth).</p>")

    # 5. gallery
    parts.append("<h2 id='gallery'>Cutouts</h2>")
    parts.append("<p class='note'>Science, template and difference on a common asinh stretch "
                 f"({cutout_size}×{cutout_size} px); the brightest positive, negative and dipole "
                 "DIA sources.</p>")
    try:
        figures, notes = (_gallery(run, n_cutouts, cutout_size) if n_cutouts > 0
                          else ({}, ["gallery not requested (n_cutouts = 0)"]))
    except (DiffimError, OSError) as exc:
        figures, notes = {}, [f"gallery failed: {exc}"]
    parts.append("<div class='gallery'>")
    for kind in ("positive", "negative", "dipole"):
        parts.append(f"<div><h3>{kind}s</h3>")
        parts.append(_img(figures.get(kind), f"{kind} cutouts") if kind in figures
                     else f"<p class='note'>(no {kind} DIA sources)</p>")
        parts.append("</div>")
    parts.append("</div>")
    for note in notes:
        parts.append(f"<p class='note'>{_esc(note)}</p>")

    # 6. timings
    parts.append("<h2 id='timings'>Timings per stage</h2>")
    timing_uri, timing_table = _timing_figure(run.records)
    parts.append(_img(timing_uri, "timings"))
    if len(timing_table):
        parts.append(_table(timing_table.reset_index().rename(columns={"index": "stage"}),
                            left=("stage",)))
    parts.append(f"<p class='note'>Report generated in {time.perf_counter() - start:.1f} s.</p>")
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_output_path

    with atomic_output_path(out_html, overwrite=True) as temporary:
        Path(temporary).write_text(page, encoding="utf-8")
    return out_html


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_report_arguments(parser) -> None:
    """Arguments of ``diffim-dask report`` (add them to an argparse sub-parser)."""
    parser.add_argument("run_dir", type=Path, help="output directory of `diffim-dask run`")
    parser.add_argument("--out", type=Path, default=None,
                        help="HTML file to write (default RUN_DIR/report.html)")
    parser.add_argument("--truth", type=Path, default=None,
                        help="truth/ folder of a simulated survey (default: from the run's manifest)")
    parser.add_argument("--cutouts", type=int, default=6,
                        help="cutout triplets per kind in the gallery (default %(default)s)")


def run_report_command(args) -> int:
    """Implementation of ``diffim-dask report``."""
    path = make_report(args.run_dir, args.out, truth_dir=args.truth,
                       n_cutouts=getattr(args, "cutouts", 6))
    print(f"Report written to {path}")
    return 0
