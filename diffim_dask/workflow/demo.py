"""``diffim-dask demo``: the built-in default run, end to end on a local Dask cluster.

1. simulate a mini-survey (template coadd patches on a sky map, several visits x 2
   detectors with transients, variables and, optionally, moving objects);
2. run the default pipeline (``workflows/alard-lupton.yaml``) over it on a
   LocalCluster: template assembly, Alard-Lupton subtraction, detection and
   measurement, Parquet catalog;
3. match the DIA sources to the truth with the QA matcher (optimal one-to-one,
   :func:`diffim_dask.qa.completeness.match_survey_truth`) and print completeness by
   S/N, the fitted 50 % / 90 % points and the false detections.
"""

from __future__ import annotations

from pathlib import Path

from .catalog import read_catalog
from .evaluate import evaluate_run
from .manifest import load_manifest
from .pipeline import load_pipeline
from .run import run_survey
from .simulated_survey import _print_summary, simulate_survey_to_disk, simulation_progress
from .survey_cli import cluster_client, print_run_summary, progress_printer

__all__ = ["run_demo_command"]


def run_demo_command(args) -> int:
    """Implementation of ``diffim-dask demo``."""
    from ..simulate import SurveyConfig

    out = Path(args.out)
    config = SurveyConfig(seed=args.seed, n_visits=args.visits, n_detectors=args.detectors,
                          detector_shape=(args.size, args.size))
    pipeline = load_pipeline(args.pipeline)
    print(f"diffim-dask demo: {args.visits} visits x {args.detectors} detectors of "
          f"{args.size}x{args.size} px, "
          f"pipeline {pipeline.name!r}, {args.workers} local workers; output in {out}/", flush=True)
    with cluster_client(None, args.workers) as client:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        print("\n1/3 Simulating the survey ...", flush=True)
        summary = simulate_survey_to_disk(config, out / "survey", client=client, overwrite=True,
                                          progress=simulation_progress("  "))
        _print_summary(summary, out / "survey", None)
        print(f"\n2/3 Running pipeline {pipeline.name!r} ...", flush=True)
        entries = load_manifest(out / "survey" / "manifest.yaml")
        result = run_survey(pipeline, entries, str(out / "survey" / "templates.zarr"), out / "run",
                            client=client, progress=progress_printer(),
                            manifest_path=str(out / "survey" / "manifest.yaml"))
    print_run_summary(result)
    done = [(r["visit"], r["detector"]) for r in result.records if r["status"] == "done"]
    print("\n3/3 Against the truth (transients matched one-to-one within 2 px):")
    evaluation = evaluate_run(read_catalog(out / "run"), out / "survey" / "truth", done,
                              config.detector_shape)
    print(evaluation.format())
    print(f"\nDIA sources: {out / 'run' / 'diaSources'}/ (Parquet, partitioned by visit); "
          f"difference images: {out / 'run' / 'difference.zarr'}; run summary: "
          f"{out / 'run' / 'run_summary.json'}")
    return 0 if result.ok else 1
