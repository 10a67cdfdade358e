"""Write a simulated survey to disk with Dask: the ``demo`` and ``simulate`` commands.

Output layout under ``out``::

    science.zarr/             ExposureStore, one group per visit/detector
    templates.zarr/           CoaddStore: deep template patches on a rings sky map
    truth/visit=<v>/detector=<d>.parquet   truth table of each science image
    truth/templates.parquet   truth of the template patches
    manifest.yaml             the visit manifest (``diffim-dask run`` input) and the survey config
    summary.json              per-image timings and counts

Every image is one task: the worker simulates it and writes it, so the client
never holds pixels. The Zarr write inside a task runs on the synchronous
scheduler (:func:`~diffim_dask.workflow.run.in_task_scheduler`), so a worker
never sends the pixels back through the scheduler as a graph. Writes are atomic (the store and the FITS writer publish
complete files only), so a rerun after a crash rewrites only what is missing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigurationError

__all__ = ["simulate_survey_to_disk", "run_simulate_command"]

log = logging.getLogger(__name__)


def _write_parquet_atomic(frame, path: Path) -> None:
    from ..io import atomic_output_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(path, overwrite=True) as temporary:
        frame.to_parquet(temporary, index=False)


def _science_task(config_dict: dict[str, Any], visit: int, detector: int, out: str) -> dict[str, Any]:
    """Simulate one science image and write it; runs on a worker."""
    from ..io import ExposureStore
    from ..simulate import Survey, SurveyConfig

    from .run import in_task_scheduler

    start = time.perf_counter()
    survey = Survey(SurveyConfig.from_dict(config_dict))
    image = survey.simulate_visit(visit, detector)
    simulated = time.perf_counter()
    with in_task_scheduler():
        ExposureStore(Path(out) / "science.zarr").write(image.exposure, overwrite=True)
    _write_parquet_atomic(image.truth, Path(out) / "truth" / f"visit={visit}" / f"detector={detector}.parquet")
    kinds = image.truth["kind"].value_counts().to_dict()
    return {
        "kind": "science", "visit": visit, "detector": detector,
        "psf_fwhm": round(float(image.exposure.psf.fwhm(*image.exposure.center)), 3),
        "n_transients": int(kinds.get("transient", 0)), "n_variables": int(kinds.get("variable", 0)),
        "n_moving": int(kinds.get("moving", 0)), "n_stars": int(kinds.get("star", 0)),
        "simulate_s": round(simulated - start, 3), "write_s": round(time.perf_counter() - simulated, 3),
    }


def survey_skymap(config):
    """The sky map of a simulated survey's templates: same pixel scale, patches sized to the detectors."""
    from ..template import RingsSkyMap, SkyMapConfig

    side = max(512, min(4000, 2 * max(config.detector_shape)))
    return RingsSkyMap(SkyMapConfig(pixel_scale=config.pixel_scale, patch_inner_size=side,
                                    patch_border=100))


def _template_task(config_dict: dict[str, Any], tract: int, patch: int, out: str) -> dict[str, Any]:
    """Simulate one template coadd patch and write it to the coadd store; runs on a worker."""
    from ..simulate import Survey, SurveyConfig
    from ..template import CoaddStore
    from .run import in_task_scheduler

    start = time.perf_counter()
    config = SurveyConfig.from_dict(config_dict)
    survey = Survey(config)
    store = CoaddStore(Path(out) / "templates.zarr", survey_skymap(config))
    info = store.skymap.tract(tract).patch(patch)
    image = survey.simulate_template(info.wcs, info.shape, info.origin, noise_key=tract * 100_000 + patch)
    simulated = time.perf_counter()
    with in_task_scheduler():
        store.write(image.exposure, config.band, tract, patch, overwrite=True)
    truth = image.truth.assign(tract=tract, patch=patch)
    return {
        "kind": "template", "tract": tract, "patch": patch, "shape": list(image.exposure.shape),
        "simulate_s": round(simulated - start, 3), "write_s": round(time.perf_counter() - simulated, 3),
        "truth": truth,
    }


def simulate_survey_to_disk(config, out: Path, *, client=None, overwrite: bool = False,
                            progress=None) -> dict[str, Any]:
    """Simulate a survey and write it under ``out``.

    Parameters
    ----------
    config : diffim_dask.simulate.SurveyConfig
        The survey.
    out : pathlib.Path
        Output directory (created).
    client : distributed.Client, optional
        Run the per-image tasks on this client's cluster; without one they run
        in this process, one after another.
    overwrite : bool
        Allow writing into a directory that already holds a simulated survey.
    progress : callable, optional
        Called as ``progress(done, total, record)`` after each image.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    ConfigurationError
        If ``out`` already holds a survey and ``overwrite`` is false.
    """
    from ..simulate import Survey

    out = Path(out)
    if (out / "manifest.yaml").exists() and not overwrite:
        raise ConfigurationError(f"{out} already holds a simulated survey; pass --overwrite to replace it")
    if overwrite:
        for name in ("science.zarr", "templates.zarr", "truth"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    survey = Survey(config)
    config_dict = config.to_dict()
    skymap = survey_skymap(config)
    from ..template import CoaddStore

    CoaddStore(out / "templates.zarr", skymap)  # create it (with its sky map) before the workers write
    border = 20 + 10  # GetTemplate's default border plus the interpolation margin
    patch_keys = sorted({p.key for visit, det in survey.visits
                         for p in skymap.patches_overlapping(survey.wcs(visit, det), config.detector_shape,
                                                             border=border)})
    jobs = [(_science_task, (config_dict, v, d, str(out))) for v, d in survey.visits]
    jobs += [(_template_task, (config_dict, t, p, str(out))) for t, p in patch_keys]

    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    if client is None:
        for func, args in jobs:
            records.append(func(*args))
            if progress:
                progress(len(records), len(jobs), records[-1])
    else:
        from distributed import as_completed

        futures = [client.submit(func, *args, pure=False) for func, args in jobs]
        for future in as_completed(futures):
            records.append(future.result())
            if progress:
                progress(len(records), len(jobs), records[-1])
    wall = time.perf_counter() - start

    import pandas as pd

    template_truth = [r.pop("truth") for r in records if r["kind"] == "template"]
    if template_truth:
        _write_parquet_atomic(pd.concat(template_truth, ignore_index=True), out / "truth" / "templates.parquet")
    science = sorted((r for r in records if r["kind"] == "science"), key=lambda r: (r["visit"], r["detector"]))
    templates = sorted((r for r in records if r["kind"] == "template"), key=lambda r: (r["tract"], r["patch"]))
    summary = {
        "wall_s": round(wall, 3),
        "n_science": len(science),
        "n_templates": len(templates),
        "n_transients": sum(r["n_transients"] for r in science),
        "n_moving": sum(r["n_moving"] for r in science),
        "science": science,
        "templates": templates,
    }
    manifest = {
        "science": [{"visit": r["visit"], "detector": r["detector"], "path": "science.zarr"}
                    for r in science],
        "templates": "templates.zarr",
        "truth": "truth",
        "survey": config_dict,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return summary


def _print_summary(summary: dict[str, Any], out: Path, dashboard: str | None) -> None:
    print()
    print(f"Simulated survey written to {out}/ in {summary['wall_s']:.1f} s"
          + (f" (dashboard was {dashboard})" if dashboard else ""))
    print(f"  science images : {summary['n_science']}  (science.zarr)")
    print(f"  template patches: {summary['n_templates']}  (templates.zarr)")
    print(f"  transients     : {summary['n_transients']}, moving objects: {summary['n_moving']}"
          f"  (truth/)")
    print()
    print("  visit detector  PSF FWHM  transients  variables  simulate  write")
    for r in summary["science"]:
        print(f"  {r['visit']:5d} {r['detector']:8d}  {r['psf_fwhm']:7.2f}px  {r['n_transients']:10d}"
              f"  {r['n_variables']:9d}  {r['simulate_s']:6.2f}s  {r['write_s']:5.2f}s")


def simulation_progress(indent: str = ""):
    """A text progress callback for :func:`simulate_survey_to_disk`: one line per image."""

    def progress(done, total, record):
        what = (f"visit {record['visit']} detector {record['detector']}" if record["kind"] == "science"
                else f"template tract {record['tract']} patch {record['patch']}")
        print(f"{indent}[{done:3d}/{total}] {what} ({record['simulate_s']:.2f} s)", flush=True)

    return progress


def run_simulate_command(args, *, demo: bool) -> int:
    """Implementation of ``diffim-dask demo`` and ``diffim-dask simulate``."""
    from ..simulate import SurveyConfig

    config = SurveyConfig(seed=args.seed, n_visits=args.visits, n_detectors=args.detectors,
                          detector_shape=(args.size, args.size))
    out = Path(args.out)
    if demo and (out / "manifest.yaml").exists():
        args.overwrite = True  # the demo is re-runnable in place
    n_images = args.visits * args.detectors

    print(f"Simulating {n_images} science images ({args.visits} visits x {args.detectors} detectors, "
          f"{args.size}x{args.size} px) and their template patches on a local Dask cluster "
          f"with {args.workers} workers ...", flush=True)
    from .survey_cli import cluster_client

    with cluster_client(None, args.workers) as client:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        summary = simulate_survey_to_disk(config, out, client=client, overwrite=args.overwrite,
                                          progress=simulation_progress())
        dashboard = client.dashboard_link
    _print_summary(summary, out, dashboard)
    return 0
