"""Workflow benchmark: units per minute with 1 and 2 workers; building a 10,000-unit graph.

Usage::

    .venv/bin/python benchmarks/bench_workflow.py [--size 2048] [--visits 4] [--detectors 2]
                                                  [--graph-units 10000] [--skip-throughput]

Throughput: a simulated survey of VISITS x DETECTORS detectors of SIZE² pixels is
processed by the default pipeline on a LocalCluster with 1 worker and with 2
workers (one thread each); reports units per minute and the 2/1 scaling.
Graph: builds the lazy graphs of GRAPH_UNITS (visit, detector) pairs without
computing and reports the time, the traced memory and the task count.
Results go to ``benchmarks/results/workflow.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import save  # noqa: E402


def graph_build(n_units: int) -> dict:
    from diffim_dask.workflow.manifest import ManifestEntry
    from diffim_dask.workflow.pipeline import load_pipeline
    from diffim_dask.workflow.run import build_unit_graph, pipeline_node

    pipeline = load_pipeline("alard-lupton")
    entries = [ManifestEntry(v, d, f"/data/science/visit{v}.zarr") for v in range(n_units // 100)
               for d in range(100)]
    # Time without tracemalloc (it slows allocation-heavy Python several-fold), then memory.
    start = time.perf_counter()
    shared = pipeline_node(pipeline)
    graphs = [build_unit_graph(e, shared, "/data/templates.zarr", "/data/out") for e in entries]
    built = time.perf_counter() - start
    del graphs, shared
    tracemalloc.start()
    shared = pipeline_node(pipeline)
    graphs = [build_unit_graph(e, shared, "/data/templates.zarr", "/data/out") for e in entries]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n_tasks = sum(len(g.__dask_graph__()) for g in graphs[:100]) * len(graphs) / 100
    return {"units": len(entries), "build_s": built, "traced_peak_mb": peak / 2**20, "tasks": int(n_tasks)}


def throughput(size: int, visits: int, detectors: int, workdir: Path) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from diffim_dask.simulate import SurveyConfig
    from diffim_dask.workflow.manifest import load_manifest
    from diffim_dask.workflow.pipeline import load_pipeline
    from diffim_dask.workflow.run import run_survey
    from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk

    logging.getLogger("distributed").setLevel(logging.WARNING)
    survey = workdir / "survey"
    simulate_survey_to_disk(SurveyConfig(seed=5, n_visits=visits, n_detectors=detectors,
                                         detector_shape=(size, size)), survey)
    entries = load_manifest(survey / "manifest.yaml")
    pipeline = load_pipeline("alard-lupton")
    results = {}
    for n_workers in (1, 2):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            start = time.perf_counter()
            run = run_survey(pipeline, entries, str(survey / "templates.zarr"), workdir / f"run{n_workers}",
                             client=client)
            wall = time.perf_counter() - start
        results[n_workers] = {"wall_s": wall, "units": len(entries), "counts": run.counts,
                              "units_per_minute": 60 * len(entries) / wall}
        print(f"{n_workers} worker(s): {len(entries)} units of {size}² in {wall:.1f} s "
              f"= {results[n_workers]['units_per_minute']:.1f} units/min ({run.counts})", flush=True)
    results["scaling_2_over_1"] = results[2]["units_per_minute"] / results[1]["units_per_minute"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--visits", type=int, default=4)
    parser.add_argument("--detectors", type=int, default=2)
    parser.add_argument("--graph-units", type=int, default=10_000)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    results = {"graph": graph_build(args.graph_units)}
    g = results["graph"]
    print(f"graph: {g['units']} units, {g['tasks']} tasks built in {g['build_s']:.2f} s, "
          f"traced peak {g['traced_peak_mb']:.0f} MB", flush=True)
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            results["throughput"] = throughput(args.size, args.visits, args.detectors, Path(tmp))
        print(f"scaling 2 workers / 1 worker: {results['throughput']['scaling_2_over_1']:.2f}x")
    print(f"saved {save('workflow', results)}")


if __name__ == "__main__":
    main()
