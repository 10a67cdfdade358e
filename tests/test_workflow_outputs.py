"""Survey runs on fsspec locations: outputs on an object store (memory://), inputs as URLs.

The memory:// file system lives in this process, so these runs are synchronous;
the LocalCluster run on a file:// URL is in test_workflow_cluster.py.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pytest
import yaml

from _workflow_fixtures import assert_same_catalog

from diffim_dask.io import ExposureStore, write_exposure_fits
from diffim_dask.simulate import SurveyConfig
from diffim_dask.workflow.catalog import catalog_part_name, read_catalog, write_catalog_part
from diffim_dask.workflow.manifest import ManifestEntry, load_manifest, resolve_path
from diffim_dask.workflow.outputs import OutputTree
from diffim_dask.workflow.pipeline import load_pipeline
from diffim_dask.workflow.run import load_unit_record, run_survey, unit_record_name
from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk

SIZE = 256


@pytest.fixture(scope="module")
def small_survey(tmp_path_factory):
    """Two visits x one detector on local disk."""
    out = tmp_path_factory.mktemp("survey")
    simulate_survey_to_disk(SurveyConfig(seed=8, n_visits=2, n_detectors=1, detector_shape=(SIZE, SIZE)), out)
    return out


@pytest.fixture
def bucket():
    """A fresh memory:// 'bucket', removed afterwards (the file system is process-global)."""
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _objects(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def _upload_inputs(survey, bucket: str) -> list[ManifestEntry]:
    """Science inputs as URLs: visit 0 in a Zarr store, visit 1 as FITS with a separate PSF file."""
    from diffim_dask.io import write_psf_fits

    fs, root = fsspec.core.url_to_fs(bucket)
    fs.put(str(survey / "science.zarr"), f"{root}/inputs/science.zarr", recursive=True)
    exposure = ExposureStore(survey / "science.zarr").open(1, 0).compute()
    write_exposure_fits(exposure, survey / "v1.fits", overwrite=True)
    write_psf_fits(exposure.psf, survey / "v1_psf.fits", overwrite=True)
    fs.put_file(str(survey / "v1.fits"), f"{root}/inputs/raw/v1.fits")
    fs.put_file(str(survey / "v1_psf.fits"), f"{root}/inputs/raw/v1_psf.fits")
    manifest = {"science": [{"visit": 0, "detector": 0, "path": "science.zarr"},
                            {"visit": 1, "detector": 0, "path": "raw/v1.fits", "psf": "raw/v1_psf.fits"}]}
    fs.pipe_file(f"{root}/inputs/manifest.yaml", yaml.safe_dump(manifest).encode())
    return load_manifest(f"{bucket}/inputs/manifest.yaml")


def test_manifest_from_a_url_resolves_relative_paths(bucket):
    fs, root = fsspec.core.url_to_fs(bucket)
    fs.pipe_file(f"{root}/m/manifest.csv", b"visit,detector,path\n3,1,../data/a.fits\n4,0,/abs/b.zarr\n")
    entries = load_manifest(f"{bucket}/m/manifest.csv")
    assert [e.path for e in entries] == [f"{bucket}/data/a.fits", "/abs/b.zarr"]
    assert not entries[0].is_store and entries[1].is_store
    assert resolve_path("x/y.fits", "s3://b/survey") == "s3://b/survey/x/y.fits"
    from diffim_dask.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="does not exist"):
        load_manifest(f"{bucket}/missing.yaml")


def test_run_with_url_inputs_and_object_store_outputs_equals_local_run(small_survey, bucket, tmp_path):
    pipeline = load_pipeline("alard-lupton")
    templates = str(small_survey / "templates.zarr")
    local_entries = load_manifest(small_survey / "manifest.yaml")
    reference = run_survey(pipeline, local_entries, templates, tmp_path / "local", client=False)
    assert reference.ok and reference.counts["done"] == 2

    entries = _upload_inputs(small_survey, bucket)
    assert entries[0].path == f"{bucket}/inputs/science.zarr" and entries[0].is_store
    assert entries[1].path == f"{bucket}/inputs/raw/v1.fits" and entries[1].psf.endswith("v1_psf.fits")
    out = f"{bucket}/run"
    result = run_survey(pipeline, entries, templates, out, client=False)
    assert result.ok and result.counts["done"] == 2, [r.get("reason") for r in result.records]
    assert result.out == out

    # The catalog, read back from the object store, equals the local run's.
    catalog = read_catalog(out)
    assert len(catalog) > 0 and catalog["diaSourceId"].is_unique
    assert_same_catalog(read_catalog(tmp_path / "local"), catalog)
    # Every output is where a local run puts it, and nothing else (no temporary objects).
    objects = _objects(out)
    local = sorted(p.relative_to(tmp_path / "local").as_posix()
                   for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert objects == local
    assert not any(".tmp" in name or name.rsplit("/", 1)[-1].startswith(".") for name in objects)
    summary = json.loads(fsspec.open(f"{out}/run_summary.json").open().read())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    provenance = json.loads(fsspec.open(f"{out}/provenance.json").open().read())
    fingerprints = {item["path"]: item for item in provenance["inputs"]}
    assert fingerprints[f"{bucket}/inputs/raw/v1.fits"]["size"] > 0
    # The difference images read back from the object store equal the local ones.
    for visit in (0, 1):
        remote = ExposureStore(f"{out}/difference.zarr").open(visit, 0).arrays()
        here = ExposureStore(tmp_path / "local" / "difference.zarr").open(visit, 0).arrays()
        for a, b in zip(remote, here):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resume_reads_records_from_the_object_store(small_survey, bucket):
    pipeline = load_pipeline("alard-lupton")
    templates = str(small_survey / "templates.zarr")
    entries = _upload_inputs(small_survey, bucket)
    out = f"{bucket}/run"
    assert run_survey(pipeline, entries, templates, out, client=False).ok
    fs, root = fsspec.core.url_to_fs(out)
    kept = fs.info(f"{root}/{catalog_part_name(0, 0)}")["created"]
    # Lose visit 1's completion record (as if the runner died before writing it).
    fs.rm_file(f"{root}/{unit_record_name(1, 0)}")
    assert load_unit_record(out, 0, 0)["status"] == "done" and load_unit_record(out, 1, 0) is None
    result = run_survey(pipeline, entries, templates, out, resume=True, client=False)
    assert result.ok
    assert {(r["visit"], bool(r.get("resumed"))) for r in result.records} == {(0, True), (1, False)}
    assert fs.info(f"{root}/{catalog_part_name(0, 0)}")["created"] == kept  # not rewritten
    assert read_catalog(out)["diaSourceId"].is_unique


def test_missing_url_input_is_recorded_as_bad_data(small_survey, bucket):
    entry = ManifestEntry(7, 0, f"{bucket}/inputs/nowhere.fits")
    result = run_survey(load_pipeline("alard-lupton"), [entry], str(small_survey / "templates.zarr"),
                        f"{bucket}/run", client=False)
    (record,) = result.records
    assert record["status"] == "failed" and record["category"] == "bad_data" and record["stage"] == "load"
    assert f"{bucket}/inputs/nowhere.fits" in record["reason"]
    assert not result.ok


def test_object_store_writes_are_single_puts_with_the_zarr_marker_last(small_survey, bucket, rng):
    tree = OutputTree(f"{bucket}/run")
    assert not tree.is_local and tree.url("a/b.json") == f"{bucket}/run/a/b.json"
    calls = []
    original_put, original_pipe = tree.fs.put_file, tree.fs.pipe_file

    def put_file(local, remote, *args, **kwargs):
        calls.append(("put", remote))
        return original_put(local, remote, *args, **kwargs)

    def pipe_file(remote, data, *args, **kwargs):
        calls.append(("pipe", remote))
        return original_pipe(remote, data, *args, **kwargs)

    tree.fs.put_file, tree.fs.pipe_file = put_file, pipe_file
    try:
        exposure = ExposureStore(small_survey / "science.zarr").open(0, 0).compute()
        group = tree.write_exposure("difference.zarr", exposure, chunk_size=128)
        puts = [remote for kind, remote in calls]
        assert puts[-1] == tree.path(f"difference.zarr/{group}/zarr.json")
        assert len(puts) == len(set(puts)) and any("/image/c/" in p for p in puts)
        # Rewriting (a retried task) removes the old marker before uploading anything.
        calls.clear()
        removed = []
        original_rm = tree.fs.rm_file
        tree.fs.rm_file = lambda path, *a, **k: (removed.append((len(calls), path)), original_rm(path, *a, **k))
        tree.write_exposure("difference.zarr", exposure, chunk_size=128)
        assert removed == [(0, tree.path(f"difference.zarr/{group}/zarr.json"))]
        np.testing.assert_array_equal(ExposureStore(tree.url("difference.zarr")).open(0, 0).arrays()[0],
                                      exposure.arrays()[0])
        # A catalog part is one object, written with one put under its deterministic name.
        from diffim_dask.schema import empty_catalog

        calls.clear()
        written = write_catalog_part(empty_catalog("pandas"), tree, 3, 1)
        assert written == tree.url(catalog_part_name(3, 1))
        assert calls == [("pipe", tree.path(catalog_part_name(3, 1)))]
        assert len(read_catalog(tree)) == 0
    finally:
        tree.fs.put_file, tree.fs.pipe_file = original_put, original_pipe


def test_output_tree_refuses_names_outside_the_root(tmp_path):
    tree = OutputTree(tmp_path / "out")
    for bad in ("../x.json", "/etc/x", "a/../../b", "a//b", "./a"):
        with pytest.raises(ValueError, match="relative path"):
            tree.path(bad)
    tree.write_json("units/a.json", {"v": np.int64(3), "f": np.float32(0.5)})
    assert tree.read_json("units/a.json") == {"v": 3, "f": 0.5}
    assert tree.read_json("units/none.json") is None and tree.is_local
    assert OutputTree(f"file://{tmp_path}/out").is_local


def test_cli_refuses_a_process_local_memory_output(tmp_path, capsys):
    from diffim_dask.cli import main

    assert main(["run", "alard-lupton", "--manifest", str(tmp_path / "m.yaml"), "--templates",
                 str(tmp_path / "t.zarr"), "--out", "memory://run"]) == 2
    assert "memory:// location lives inside one process" in capsys.readouterr().err


@pytest.mark.parametrize("error, retried", [(ConnectionResetError("peer reset"), True),
                                            (PermissionError("read-only bucket"), False)])
def test_output_errors_are_retried_only_when_transient(tmp_path, monkeypatch, error, retried):
    from types import SimpleNamespace

    from diffim_dask.errors import TransientIOError
    from diffim_dask.workflow.run import _finish_unit

    def failing_write(self, store, exposure, *, chunk_size):
        raise error

    monkeypatch.setattr(OutputTree, "write_exposure", failing_write)
    state = {"detection": SimpleNamespace(difference=None, score=None), "subtraction": None}
    entry = ManifestEntry(5, 2, str(tmp_path / "science.fits"))
    out = str(tmp_path / "run")
    if retried:
        with pytest.raises(TransientIOError, match="visit 5 detector 2.*peer reset"):
            _finish_unit(state, entry, load_pipeline("alard-lupton"), out)
        assert load_unit_record(out, 5, 2) is None
    else:
        record = _finish_unit(state, entry, load_pipeline("alard-lupton"), out)
        assert record["status"] == "failed" and record["stage"] == "write" and "read-only" in record["reason"]
        assert json.loads((tmp_path / "run" / unit_record_name(5, 2)).read_text())["status"] == "failed"
