"""The survey run: a lazy Dask graph of the three stages for every (visit, detector).

For each manifest entry the graph chains four tasks::

    load science -> assemble template -> subtract -> detect, measure and write

Building the graph reads no pixels. Each task passes a :class:`UnitFailure`
through untouched, so the first failing stage of a unit decides its record;
errors are classified (:mod:`diffim_dask.errors`):

* ``NoWorkFound`` → status ``skipped`` with the reason;
* bad input data, algorithm and configuration errors, and unexpected
  exceptions → status ``failed`` with the category, message and metadata,
  never retried;
* ``TransientIOError`` is raised out of the task so Dask retries it
  (``execution.retries`` times); a lost worker is handled by the scheduler,
  which recomputes the lost tasks.

Inside a task, any Dask computation of the stage (lazy Zarr reads, chunked
filters, Zarr writes) runs on the synchronous scheduler in the task's own
thread, and automatic thread counts (FFT workers, ZOGY tiles, detection) are
one per task on a Dask worker (:func:`diffim_dask._parallel.default_threads`):
the cluster's parallelism is its worker threads. Without this a worker would ship every nested computation, pixels
included, back through the scheduler ("Sending large graph" warnings) and a
single-threaded worker would use every core of its machine.

Outputs under ``out`` -- a local directory or any fsspec URL
(:class:`~diffim_dask.workflow.outputs.OutputTree`; every file is published
atomically under a name that depends only on the unit, so retried or repeated
tasks never duplicate rows)::

    diaSources/visit=V/detector=D.parquet   DIA sources (Hive-partitioned by visit)
    difference.zarr, score.zarr             difference (and score) images
    units/visit=V/detector=D.json           the unit's summary record (written last)
    run_summary.json, provenance.json       the run's summary and provenance
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigurationError, DiffimError, TransientIOError, classify_error
from .catalog import catalog_part_name, write_catalog_part
from .manifest import ManifestEntry, is_url
from .outputs import OutputTree
from .pipeline import PipelineConfig

__all__ = ["UnitFailure", "build_unit_graph", "pipeline_node", "run_survey", "unit_record_path", "load_unit_record",
           "unit_record_name", "RunResult", "in_task_scheduler", "subtract_exposures",
           "read_fits_input"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UnitFailure:
    """A unit that stopped early: skipped (no work) or failed, with why and where."""

    stage: str
    category: str
    message: str
    metadata: dict[str, Any]

    @property
    def status(self) -> str:
        return "skipped" if self.category == "skipped" else "failed"


def _stage(name: str):
    """Wrap a stage: pass failures through, classify exceptions, time the work."""

    def decorate(func):
        def wrapper(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                if isinstance(value, UnitFailure):
                    return value
            start = time.perf_counter()
            try:
                with in_task_scheduler():
                    result = func(*args, **kwargs)
            except TransientIOError:
                raise  # the only kind Dask retries
            except DiffimError as exc:
                return UnitFailure(name, classify_error(exc), str(exc), dict(getattr(exc, "metadata", {})))
            except Exception as exc:  # a bug: record it with its traceback, do not retry
                return UnitFailure(name, "unexpected", f"{type(exc).__name__}: {exc}",
                                   {"traceback": traceback.format_exc(limit=8)})
            if isinstance(result, dict):
                result.setdefault("timings", {})[name] = round(time.perf_counter() - start, 3)
            return result

        wrapper.__name__ = func.__name__
        wrapper.__qualname__ = func.__qualname__
        return wrapper

    return decorate


@contextlib.contextmanager
def in_task_scheduler():
    """Run the Dask computations made inside a stage in this thread.

    On a distributed worker the default scheduler is the cluster itself: a
    stage's nested ``compute`` (lazy Zarr reads, chunked filters, Zarr writes)
    would send its graph -- numpy planes embedded -- to the scheduler, secede
    from the worker's thread pool and fan its chunks out over the cluster,
    moving pixels between workers. A unit is the unit of parallelism here, so
    its inner work stays in its own thread.
    """
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


# --------------------------------------------------------------------------------------------
# Stages (they run on workers; each returns a dict so later stages can add to it)
# --------------------------------------------------------------------------------------------


def _read_remote_fits(url: str, reader):
    """Read a FITS file given by an fsspec URL: copy it to a local temporary file, then read.

    The FITS readers need a seekable local file; the copy lives in a private
    temporary directory removed afterwards. A missing object is bad input (not
    retried); other I/O errors are transient (retried by Dask).
    """
    import tempfile

    import fsspec

    from ..io import MissingInputError

    name = url.rstrip("/").rsplit("/", 1)[-1] or "input.fits"
    with tempfile.TemporaryDirectory(prefix="diffim-dask-input-") as staging:
        local = os.path.join(staging, name)
        try:
            fs, path = fsspec.core.url_to_fs(url)
            fs.get_file(path, local)
        except FileNotFoundError:
            raise MissingInputError(f"{url}: no such file") from None
        except (ImportError, ValueError) as exc:
            raise ConfigurationError(f"{url}: cannot open this URL ({exc})") from None
        except OSError as exc:
            raise TransientIOError(f"{url}: download failed ({type(exc).__name__}: {exc})") from exc
        try:
            return reader(local)
        except DiffimError as exc:
            # Name the URL the user gave, not the temporary copy.
            exc.args = tuple(a.replace(local, url) if isinstance(a, str) else a for a in exc.args)
            raise


def read_fits_input(path: str, reader):
    """``reader(path)`` for a local path; for an fsspec URL, ``reader`` on a local temporary copy."""
    return _read_remote_fits(path, reader) if is_url(path) else reader(path)


@_stage("load")
def _load_science(entry: ManifestEntry, pipeline: PipelineConfig) -> dict[str, Any]:
    from ..io import ExposureStore, read_exposure, read_psf_fits

    if entry.is_store:
        science = ExposureStore(entry.path).open(entry.visit, entry.detector).compute()
    else:
        science = read_fits_input(entry.path, read_exposure)
    if entry.psf:
        science = science.replace(psf=read_fits_input(entry.psf, read_psf_fits))
    # Units are keyed by the manifest, whatever the header said.
    science = science.replace(info=science.info.replace(visit=entry.visit, detector=entry.detector))
    if science.psf is None:
        from ..psf import estimate_psf

        science = science.replace(psf=estimate_psf(science).psf)
    science, cosmic_rays = repair_cosmic_rays(science, pipeline)
    if pipeline.injection.n_sources:
        from ..qa import inject_unit

        injection = inject_unit(science, pipeline.injection, entry.visit, entry.detector)
        return {"science": injection.exposure, "injection": injection, "cosmic_rays": cosmic_rays}
    return {"science": science, "cosmic_rays": cosmic_rays}


def repair_cosmic_rays(science, pipeline: PipelineConfig):
    """Find and repair cosmic rays on a science exposure (the pipeline's ``cosmic_rays`` block).

    Returns the repaired exposure and a small dict of counts for the unit record
    (``None`` when the step is off).
    """
    if not pipeline.cosmic_rays.enabled:
        return science, None
    from ..cosmic_rays import find_cosmic_rays

    found = find_cosmic_rays(science, pipeline.cosmic_rays)
    return found.exposure, {"n_cosmic_rays": int(found.n_cosmic_rays),
                            "n_cosmic_ray_pixels": int(found.n_pixels)}


@_stage("template")
def _assemble_template(state: dict[str, Any], templates: str, pipeline: PipelineConfig) -> dict[str, Any]:
    from ..template import CoaddStore, get_template

    result = get_template(state["science"], CoaddStore(templates), pipeline.template)
    return {**state, "template": result.template, "template_patches": list(result.patches),
            "template_valid_fraction": result.valid_fraction}


@_stage("subtract")
def _subtract(state: dict[str, Any], pipeline: PipelineConfig) -> dict[str, Any]:
    result = subtract_exposures(state["science"], state["template"], pipeline)
    return {"science": state["science"], "subtraction": result, "timings": state.get("timings", {}),
            "injection": state.get("injection"), "cosmic_rays": state.get("cosmic_rays")}


@_stage("detect")
def _detect_and_write(state: dict[str, Any], pipeline: PipelineConfig, out: str) -> dict[str, Any]:
    from ..detect import detect_and_measure

    subtraction = state["subtraction"]
    detection = detect_and_measure(subtraction.difference, science=state["science"],
                                   matched_template=subtraction.matched_image,
                                   score=subtraction.score, config=pipeline.detection)
    return {"science": state["science"], "subtraction": subtraction, "detection": detection,
            "timings": state.get("timings", {}), "injection": state.get("injection"),
            "cosmic_rays": state.get("cosmic_rays")}


def subtract_exposures(science, template, pipeline: PipelineConfig):
    """Run the pipeline's subtraction method on two exposures on one pixel grid."""
    if pipeline.method == "alard-lupton":
        from ..subtract import subtract_alard_lupton

        return subtract_alard_lupton(science, template, pipeline.alard_lupton)
    if pipeline.method == "alard-lupton-score":
        from ..subtract import subtract_alard_lupton_preconvolved

        return subtract_alard_lupton_preconvolved(science, template, pipeline.alard_lupton)
    from ..zogy import subtract_zogy

    return subtract_zogy(science, template, pipeline.stage_config("zogy"))


def unit_record_name(visit: int, detector: int) -> str:
    """Name of a unit's summary record relative to the output root."""
    return f"units/visit={int(visit)}/detector={int(detector)}.json"


def unit_record_path(out: str | os.PathLike, visit: int, detector: int) -> Path:
    """Where a unit's summary record is written (its completion marker) in a local directory."""
    return Path(out) / unit_record_name(visit, detector)


def _scalar_metrics(metadata: dict[str, Any]) -> dict[str, Any]:
    """Keep the JSON-friendly scalars of a stage's metadata."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            out[key] = value.item()
    return out


def _finish_unit(result: dict[str, Any] | UnitFailure, entry: ManifestEntry, pipeline: PipelineConfig,
                 out: str) -> dict[str, Any]:
    """Write a unit's outputs (catalog part, images) and its record; runs on a worker."""
    tree = OutputTree(out)
    record: dict[str, Any] = {"visit": entry.visit, "detector": entry.detector,
                              "science": entry.path}
    if isinstance(result, UnitFailure):
        record.update(status=result.status, stage=result.stage, category=result.category,
                      reason=result.message, metadata=_scalar_metrics(result.metadata))
        if "traceback" in result.metadata:
            record["traceback"] = result.metadata["traceback"]
    else:
        try:
            with in_task_scheduler():
                record.update(_write_unit_outputs(result, entry, pipeline, tree))
        except TransientIOError:
            raise
        except (DiffimError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            record.update(status="failed", stage="write", category=classify_error(exc),
                          reason=f"{type(exc).__name__}: {exc}")
        except OSError as exc:  # the output store is unreachable or failed a request: retry the task
            raise TransientIOError(f"writing the outputs of visit {entry.visit} detector {entry.detector} "
                                   f"to {tree.location} failed ({type(exc).__name__}: {exc})") from exc
        except Exception as exc:  # a write that fails for good is recorded, like a stage failure
            record.update(status="failed", stage="write", category=classify_error(exc),
                          reason=f"{type(exc).__name__}: {exc}")
    tree.write_json(unit_record_name(entry.visit, entry.detector), record)
    return record


def _write_injection_truth(injection, tree: OutputTree, visit: int, detector: int) -> None:
    from ..qa import write_injection_truth

    if tree.is_local:
        write_injection_truth(injection, tree.local_path(), visit, detector)
        return
    import tempfile

    # The QA writer writes files; stage its file locally, then upload it with one put.
    with tempfile.TemporaryDirectory(prefix="diffim-dask-stage-") as staging:
        written = write_injection_truth(injection, staging, visit, detector)
        tree.upload_file(written, Path(written).relative_to(staging).as_posix())


def _write_unit_outputs(result: dict[str, Any], entry: ManifestEntry, pipeline: PipelineConfig,
                        tree: OutputTree) -> dict[str, Any]:
    start = time.perf_counter()
    detection, subtraction = result["detection"], result["subtraction"]
    chunk = pipeline.execution.chunk_size
    if pipeline.execution.write_difference:
        tree.write_exposure("difference.zarr", detection.difference, chunk_size=chunk)
    if pipeline.execution.write_score and detection.score is not None:
        tree.write_exposure("score.zarr", detection.score, chunk_size=chunk)
    write_catalog_part(detection.catalog, tree, entry.visit, entry.detector)
    extra: dict[str, Any] = {}
    if result.get("injection") is not None:
        _write_injection_truth(result["injection"], tree, entry.visit, entry.detector)
        extra["n_injected"] = int(len(result["injection"].truth))
    if result.get("cosmic_rays") is not None:
        extra["cosmic_rays"] = result["cosmic_rays"]
    if hasattr(subtraction.kernel, "kernel_sum"):
        from ..qa.report import kernel_sum_grid

        science = result["science"]
        extra["kernel_sum_grid"] = kernel_sum_grid(subtraction.kernel, science.shape, science.origin)
    timings = dict(result.get("timings", {}))
    timings["write"] = round(time.perf_counter() - start, 3)
    catalog = detection.catalog
    real = catalog[~catalog["isSky"]]
    return {
        "status": "done",
        "n_dia_sources": int(len(real)),
        "n_positive": int((~real["isNegative"]).sum()),
        "n_negative": int(real["isNegative"].sum()),
        "n_dipoles": int(real["isDipole"].sum()),
        "n_sky_sources": int(catalog["isSky"].sum()),
        "timings": timings,
        "subtraction": _scalar_metrics(subtraction.metadata),
        "detection": _scalar_metrics(detection.metadata),
        "catalog_part": catalog_part_name(entry.visit, entry.detector),
        **extra,
    }


def pipeline_node(pipeline: PipelineConfig):
    """The pipeline as one shared graph node.

    Passing the config object itself to every task would make Dask walk its
    nested dataclasses once per task; one node referenced by all units keeps
    graph construction at a few microseconds per task.
    """
    import dask
    from dask.base import tokenize

    return dask.delayed(pipeline, name=f"pipeline-{tokenize(pipeline.to_dict())}", traverse=False)


def build_unit_graph(entry: ManifestEntry, pipeline, templates: str, out: str):
    """The lazy graph of one unit (a ``dask.delayed`` object yielding its record).

    ``pipeline`` is a :class:`PipelineConfig` or, when building many units, the
    shared node from :func:`pipeline_node`. Nothing is read or computed until
    the graph runs.
    """
    import dask

    if isinstance(pipeline, PipelineConfig):
        pipeline = pipeline_node(pipeline)
    tag = f"v{entry.visit}-d{entry.detector}"
    unit = dask.delayed(entry, name=f"entry-{tag}", traverse=False)
    load = dask.delayed(_load_science)(unit, pipeline, dask_key_name=f"load-{tag}")
    template = dask.delayed(_assemble_template)(load, templates, pipeline, dask_key_name=f"template-{tag}")
    subtract = dask.delayed(_subtract)(template, pipeline, dask_key_name=f"subtract-{tag}")
    detect = dask.delayed(_detect_and_write)(subtract, pipeline, out, dask_key_name=f"detect-{tag}")
    return dask.delayed(_finish_unit)(detect, unit, pipeline, out, dask_key_name=f"write-{tag}")


def load_unit_record(out, visit: int, detector: int) -> dict[str, Any] | None:
    """A unit's record if it finished (done or skipped), else None.

    ``out`` is the run's output directory, URL or :class:`OutputTree`.
    """
    tree = out if isinstance(out, OutputTree) else OutputTree(out)
    record = tree.read_json(unit_record_name(visit, detector))
    if not isinstance(record, dict):
        return None
    if record.get("status") == "done" and not tree.exists(catalog_part_name(visit, detector)):
        return None
    return record if record.get("status") in ("done", "skipped") else None


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a survey run did: one record per unit, and the run's wall time."""

    records: list[dict[str, Any]]
    wall_s: float
    out: Path | str  # local directory, or the URL of an object-store location

    @property
    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for record in self.records:
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        """True when no unit failed."""
        return self.counts["failed"] == 0


def _input_fingerprint(path: str) -> dict[str, Any]:
    if is_url(path):
        try:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(path)
            info = fs.info(fs_path)
        except Exception:  # unreachable, or no backend installed here: the URL alone
            return {"path": path}
        keys = ("size", "ETag", "etag", "LastModified", "mtime", "created", "md5Hash", "generation")
        return {"path": path, **{k: info[k] for k in keys if info.get(k) is not None}}
    try:
        stat = os.stat(path)
    except OSError:
        return {"path": path, "missing": True}
    return {"path": path, "size": stat.st_size, "mtime": stat.st_mtime}


def _provenance(pipeline: PipelineConfig, entries: list[ManifestEntry], templates: str,
                manifest_path: str | None) -> dict[str, Any]:
    import dask
    import numpy

    inputs = sorted({e.path for e in entries} | {e.psf for e in entries if e.psf})
    return {
        "diffim_dask_version": __version__,
        "python": platform.python_version(),
        "dask": dask.__version__,
        "numpy": numpy.__version__,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "pipeline": pipeline.to_dict(),
        "manifest": manifest_path,
        "templates": _input_fingerprint(templates),
        "inputs": [_input_fingerprint(p) for p in inputs],
    }


def run_survey(pipeline: PipelineConfig, entries: list[ManifestEntry], templates: str, out: str | Path,
               *, client=None, resume: bool = False, progress=None,
               manifest_path: str | None = None) -> RunResult:
    """Process every manifest entry and write the run's outputs under ``out``.

    Parameters
    ----------
    pipeline : PipelineConfig
        The pipeline (method and stage configs).
    entries : list of ManifestEntry
        The science exposures.
    templates : str
        The template coadd store.
    out : path or str
        Output directory, or an fsspec URL (``s3://bucket/run``; objects are
        published with one PUT each, see :mod:`diffim_dask.workflow.outputs`).
    client : distributed.Client, None or False
        Compute on this client's cluster (retries as configured). ``None``
        (default): the current client (the one most recently created in this
        process) if there is one, else the synchronous scheduler in this
        process. ``False``: always the synchronous scheduler in this process.
        Library code never creates a cluster.
    resume : bool
        Skip units whose record says done (with their catalog part) or skipped.
    progress : callable, optional
        ``progress(n_finished, n_total, record)`` after each unit.

    Returns
    -------
    RunResult
    """
    tree = OutputTree(out)
    tree.makedirs()
    out = tree.local_path() if tree.is_local else tree.location
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    todo = []
    for entry in entries:
        previous = load_unit_record(tree, entry.visit, entry.detector) if resume else None
        if previous is not None:
            records.append({**previous, "resumed": True})
        else:
            todo.append(entry)
    tree.write_json("provenance.json", _provenance(pipeline, entries, templates, manifest_path))
    shared = pipeline_node(pipeline)
    graphs = [build_unit_graph(e, shared, str(templates), tree.location) for e in todo]
    total = len(entries)
    for record in records:
        if progress:
            progress(len(records), total, record)
    if client is None:
        client = _current_client()
    if not client:
        import dask

        for entry, graph in zip(todo, graphs):
            records.append(_collect(lambda g=graph: dask.compute(g, scheduler="synchronous")[0], entry, tree))
            if progress:
                progress(len(records), total, records[-1])
    else:
        from distributed import as_completed

        futures = client.compute(graphs, retries=pipeline.execution.retries)
        by_key = {f.key: e for f, e in zip(futures, todo)}
        for future in as_completed(futures):
            records.append(_collect(future.result, by_key[future.key], tree))
            if progress:
                progress(len(records), total, records[-1])
    records.sort(key=lambda r: (r["visit"], r["detector"]))
    result = RunResult(records, time.perf_counter() - start, out)
    tree.write_json("run_summary.json", {"counts": result.counts, "wall_s": round(result.wall_s, 3),
                                         "units": records})
    return result


def _current_client():
    """The process's current ``distributed.Client``, or False when there is none."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return False


def _collect(get, entry: ManifestEntry, tree: OutputTree) -> dict[str, Any]:
    """Fetch a unit's record; an error escaping the graph (retries exhausted) is recorded."""
    try:
        return get()
    except Exception as exc:
        record = {"visit": entry.visit, "detector": entry.detector, "science": entry.path,
                  "status": "failed", "stage": "scheduler", "category": classify_error(exc),
                  "reason": f"{type(exc).__name__}: {exc}"}
        tree.write_json(unit_record_name(entry.visit, entry.detector), record)
        return record

