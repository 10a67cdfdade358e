"""``diffim-dask run``: the survey run from the command line."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .manifest import load_manifest
from .pipeline import load_pipeline
from .run import RunResult, run_survey

__all__ = ["run_run_command", "print_run_summary", "cluster_client", "progress_printer"]


@contextlib.contextmanager
def cluster_client(scheduler: str | None, workers: int):
    """A client on the given scheduler, ``$DASK_SCHEDULER_ADDRESS``, or a new local cluster.

    Only this CLI layer creates clusters; the library accepts a client.
    """
    from distributed import Client, LocalCluster

    # distributed configures its loggers at INFO on import; a CLI user wants warnings only.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def progress_printer(total_label: str = "units"):
    """A text progress callback: one line per finished unit."""

    def progress(done: int, total: int, record: dict[str, Any]) -> None:
        status = record["status"]
        if status == "done":
            what = f"done, {record.get('n_dia_sources', 0)} DIA sources"
            if record.get("resumed"):
                what += " (already done)"
        else:
            what = f"{status} at {record.get('stage', '?')}: {record.get('reason', '')}"
        bar = "#" * int(20 * done / max(total, 1))
        print(f"[{bar:<20s}] {done}/{total} {total_label} | visit {record['visit']} detector "
              f"{record['detector']}: {what}", flush=True)

    return progress


def print_run_summary(result: RunResult) -> None:
    """Print the per-unit table and the totals."""
    print()
    print("visit detector status    sources  +/-      dipoles  time   note")
    for r in result.records:
        t = sum(r.get("timings", {}).values())
        note = r.get("reason", "")[:70] if r["status"] != "done" else ("resumed" if r.get("resumed") else "")
        pn = f"{r.get('n_positive', 0)}/{r.get('n_negative', 0)}" if r["status"] == "done" else "-"
        print(f"{r['visit']:5d} {r['detector']:8d} {r['status']:8s} {r.get('n_dia_sources', 0):8d}  "
              f"{pn:8s} {r.get('n_dipoles', 0):7d} {t:5.1f}s  {note}")
    counts = result.counts
    print(f"\n{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
          f"in {result.wall_s:.1f} s; outputs in {result.out}/")


def run_run_command(args) -> int:
    """Implementation of ``diffim-dask run``."""
    if str(args.out).startswith("memory://"):
        # Each Dask worker process has its own memory:// file system: the outputs would be lost.
        raise ConfigurationError(f"--out {args.out}: a memory:// location lives inside one process; give a "
                                 f"directory or a shared store URL (s3://, gs://, file://)")
    pipeline = load_pipeline(args.pipeline)
    if args.inject is not None:
        pipeline = pipeline.replace(injection=pipeline.injection.replace(n_sources=args.inject))
    entries = load_manifest(args.manifest)
    with cluster_client(args.scheduler, args.workers) as client:
        print(f"Pipeline {pipeline.name!r} ({pipeline.method}) on {len(entries)} units; "
              f"Dask dashboard: {client.dashboard_link}", flush=True)
        result = run_survey(pipeline, entries, args.templates, args.out, client=client,
                            resume=args.resume, progress=progress_printer(),
                            manifest_path=str(args.manifest))
    print_run_summary(result)
    if pipeline.injection.n_sources and not isinstance(result.out, Path):
        print(f"\nThe completeness report reads a local run directory; copy {result.out} locally and "
              f"run `diffim-dask report` on it.")
    elif pipeline.injection.n_sources:
        from ..qa.report import evaluate_run_truth, load_run

        summary, what = evaluate_run_truth(load_run(args.out))
        print(f"\nAgainst the {what}:")
        print(summary.format())
    return 0 if result.ok else 1
