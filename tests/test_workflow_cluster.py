"""Survey-run integration tests on a LocalCluster (processes, 2 workers)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest

from _workflow_fixtures import assert_same_catalog

from diffim_dask.simulate import SurveyConfig
from diffim_dask.workflow.catalog import catalog_part_path, read_catalog
from diffim_dask.workflow.manifest import load_manifest
from diffim_dask.workflow.pipeline import METHODS, builtin_pipeline_path, load_pipeline
from diffim_dask.workflow.run import run_survey, unit_record_path
from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_VISITS, N_DETECTORS, SIZE = 4, 2, 256


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey")
    simulate_survey_to_disk(SurveyConfig(seed=21, n_visits=N_VISITS, n_detectors=N_DETECTORS,
                                         detector_shape=(SIZE, SIZE)), out)
    return out


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def _available_methods():
    return [m for m in METHODS if builtin_pipeline_path(m).exists()]


@pytest.mark.parametrize("method", _available_methods())
def test_pipeline_on_cluster_equals_synchronous_run(survey_dir, cluster_client, tmp_path, method):
    pipeline = load_pipeline(method)
    entries = load_manifest(survey_dir / "manifest.yaml")
    assert len(entries) == N_VISITS * N_DETECTORS
    templates = str(survey_dir / "templates.zarr")
    sync = run_survey(pipeline, entries, templates, tmp_path / "sync", client=False)
    dist = run_survey(pipeline, entries, templates, tmp_path / "dist", client=cluster_client)
    assert sync.ok and dist.ok, [r.get("reason") for r in sync.records + dist.records]
    assert sync.counts["done"] == dist.counts["done"] == len(entries)
    catalog = read_catalog(tmp_path / "dist")
    assert len(catalog) > 0 and catalog["diaSourceId"].is_unique
    assert_same_catalog(read_catalog(tmp_path / "sync"), catalog)
    summary = json.loads((tmp_path / "dist" / "run_summary.json").read_text())
    assert summary["counts"] == {"done": len(entries), "skipped": 0, "failed": 0}
    provenance = json.loads((tmp_path / "dist" / "provenance.json").read_text())
    assert provenance["pipeline"]["method"] == method and provenance["inputs"]
    if pipeline.is_score_method:
        assert (tmp_path / "dist" / "score.zarr").is_dir()


def test_killed_worker_still_gives_complete_catalog(survey_dir, cluster_client, tmp_path):
    pipeline = load_pipeline("alard-lupton")
    entries = load_manifest(survey_dir / "manifest.yaml")
    templates = str(survey_dir / "templates.zarr")
    run_survey(pipeline, entries, templates, tmp_path / "reference", client=False)
    killed = []

    pids = cluster_client.run(os.getpid)

    def kill_one_worker(done, total, record):
        if done == 1 and not killed:
            worker, pid = sorted(pids.items())[0]
            killed.append(worker)
            # SIGKILL: no clean-up at all, like a node lost mid-run; the nanny starts a new worker.
            os.kill(pid, signal.SIGKILL)

    result = run_survey(pipeline, entries, templates, tmp_path / "run", client=cluster_client,
                        progress=kill_one_worker)
    assert killed and result.ok and result.counts["done"] == len(entries)
    catalog = read_catalog(tmp_path / "run")
    assert catalog["diaSourceId"].is_unique
    assert_same_catalog(read_catalog(tmp_path / "reference"), catalog)


class _Interrupt(Exception):
    pass


def test_resume_completes_interrupted_run_without_recomputing(survey_dir, tmp_path):
    pipeline = load_pipeline("alard-lupton")
    entries = load_manifest(survey_dir / "manifest.yaml")
    templates = str(survey_dir / "templates.zarr")
    out = tmp_path / "run"

    def interrupt(done, total, record):
        if done == 3:
            raise _Interrupt  # like Ctrl-C or a killed runner pod

    with pytest.raises(_Interrupt):
        run_survey(pipeline, entries, templates, out, progress=interrupt, client=False)
    finished = [e for e in entries if unit_record_path(out, e.visit, e.detector).exists()]
    assert len(finished) == 3
    stamps = {e.key: catalog_part_path(out, e.visit, e.detector).stat().st_mtime_ns for e in finished}
    result = run_survey(pipeline, entries, templates, out, resume=True, client=False)
    assert result.ok and result.counts["done"] == len(entries)
    resumed = {(r["visit"], r["detector"]) for r in result.records if r.get("resumed")}
    assert resumed == set(stamps)
    for key, stamp in stamps.items():  # finished parts were not rewritten
        assert catalog_part_path(out, *key).stat().st_mtime_ns == stamp
    fresh = run_survey(pipeline, entries, templates, tmp_path / "fresh", client=False)
    assert_same_catalog(read_catalog(fresh.out), read_catalog(out))


def _worker_has_no_client(dask_worker):
    # A task that calls compute() on a worker opens a client to the scheduler there.
    return dask_worker._client is None


def _strict_worker(threshold: str):
    """Make a worker turn warnings into errors and flag graphs above ``threshold``."""
    import warnings

    import dask

    dask.config.set({"distributed.admin.large-graph-warning-threshold": threshold})
    warnings.simplefilter("error")


def test_file_url_run_keeps_pixels_out_of_the_graph(survey_dir, tmp_path):
    """A run to a file:// URL on the current cluster: same catalog; no nested or large graphs.

    Every Dask computation inside a unit or a simulation task (lazy Zarr reads, Zarr
    writes) runs in the task's thread: a worker never opens a client and sends graphs
    (with pixels) to the scheduler, which is what made ``diffim-dask demo`` warn
    "Sending large graph". Warnings are errors on the workers and in this process, with
    the large-graph threshold lowered to 64 kB.
    """
    import warnings

    import dask
    from distributed import Client, LocalCluster

    pipeline = load_pipeline("alard-lupton")
    entries = [dataclasses.replace(e, path=f"file://{e.path}")
               for e in load_manifest(survey_dir / "manifest.yaml")][:4]
    templates = str(survey_dir / "templates.zarr")
    reference = run_survey(pipeline, entries, templates, tmp_path / "sync", client=False)
    out = f"file://{tmp_path}/url-run"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(_strict_worker, "64kB")  # each unit's pixels are ~0.8 MB at 256x256
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "64kB"}), \
                warnings.catch_warnings():
            warnings.simplefilter("error")
            # No client given: the run uses the current one (this test's cluster).
            result = run_survey(pipeline, entries, templates, out)
            simulate_survey_to_disk(SurveyConfig(seed=3, n_visits=1, n_detectors=2, detector_shape=(SIZE, SIZE)),
                                    tmp_path / "simulated", client=client)
        assert result.ok and result.counts["done"] == len(entries), [r.get("reason") for r in result.records]
        assert all(client.run(_worker_has_no_client).values())
    assert result.out == tmp_path / "url-run"
    # On a worker each task runs one FFT thread (the worker's threads are the parallelism);
    # the synchronous run in this process keeps the automatic setting.
    assert {r["subtraction"]["fft_workers"] for r in result.records} == {1}
    assert_same_catalog(read_catalog(reference.out), read_catalog(out))
