"""Workflow building blocks: pipeline files, manifests, the catalog writer, unit records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml

import diffim_dask as dd
from diffim_dask.schema import (
    DIA_SOURCE_COLUMNS,
    catalog_from_columns,
    column_names,
    make_dia_source_id,
)
from diffim_dask.workflow.catalog import catalog_part_path, read_catalog, write_catalog_part
from diffim_dask.workflow.manifest import load_manifest
from diffim_dask.workflow.pipeline import (
    METHODS,
    builtin_pipeline_path,
    dump_pipeline_yaml,
    load_pipeline,
    recommended_pipeline,
)
from diffim_dask.workflow.run import UnitFailure, _stage

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


# --------------------------------------------------------------------------- pipelines


def _flatten(data, prefix=""):
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _flatten(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("method", METHODS)
def test_builtin_pipeline_files_set_every_value_once(method):
    path = builtin_pipeline_path(method)
    if method == "zogy" and not path.exists():
        pytest.skip("the ZOGY pipeline ships with the ZOGY stage")
    raw = yaml.safe_load(path.read_text())
    pipeline = load_pipeline(path)
    assert pipeline.method == method and pipeline.name == method
    # Every setting of every stage is written out (nothing silently defaulted) ...
    full = yaml.safe_load(dump_pipeline_yaml(pipeline))
    assert sorted(_flatten(raw)) == sorted(_flatten(full))
    # ... and the file is exactly what the generator writes for it.
    assert path.read_text() == dump_pipeline_yaml(pipeline)
    assert pipeline == recommended_pipeline(method)


def test_pipeline_errors_name_the_bad_key(tmp_path):
    with pytest.raises(dd.ConfigurationError, match=r"detection\..*threshhold"):
        load_pipeline({"detection": {"detection": {"threshhold": 4}}})
    with pytest.raises(dd.ConfigurationError, match="unknown key.*metod"):
        load_pipeline({"metod": "zogy"})
    with pytest.raises(dd.ConfigurationError, match="'fast' is not one of"):
        load_pipeline({"method": "fast"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(dd.ConfigurationError, match="invalid YAML"):
        load_pipeline(bad)
    with pytest.raises(dd.ConfigurationError, match="does not exist"):
        load_pipeline(tmp_path / "missing.yaml")
    with pytest.raises(dd.ConfigurationError, match=r"execution.*retries.*must be >= 0"):
        load_pipeline({"execution": {"retries": -1}})


def test_pipeline_round_trip_and_overrides():
    pipeline = load_pipeline({"method": "alard-lupton-score", "execution": {"retries": 5}})
    assert pipeline.is_score_method and pipeline.execution.retries == 5
    again = load_pipeline(yaml.safe_load(dump_pipeline_yaml(pipeline)))
    assert again == pipeline
    assert load_pipeline("alard-lupton") == load_pipeline(builtin_pipeline_path("alard-lupton"))


# --------------------------------------------------------------------------- manifests


def test_manifest_yaml_and_csv(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"science": [
        {"visit": 1, "detector": 0, "path": "science.zarr"},
        {"visit": 2, "detector": 3, "path": "/abs/v2.fits", "psf": "psf.fits"},
        {"visit": 3, "detector": 0, "path": "s3://bucket/v3.fits"},
    ]}))
    entries = load_manifest(tmp_path / "m.yaml")
    assert [e.key for e in entries] == [(1, 0), (2, 3), (3, 0)]
    assert entries[0].path == str(tmp_path / "science.zarr") and entries[0].is_store
    assert entries[1].path == "/abs/v2.fits" and entries[1].psf == str(tmp_path / "psf.fits")
    assert entries[2].path == "s3://bucket/v3.fits" and not entries[2].is_store
    (tmp_path / "m.csv").write_text("visit,detector,path,psf\n1,0,a.fits,\n1,1,b.fits,p.fits\n")
    entries = load_manifest(tmp_path / "m.csv")
    assert [e.key for e in entries] == [(1, 0), (1, 1)] and entries[0].psf is None


@pytest.mark.parametrize("content, message", [
    ({"science": [{"visit": 1, "path": "a.fits"}]}, "entry 1 lacks detector"),
    ({"science": [{"visit": 1, "detector": 0, "path": "a"}, {"visit": 1, "detector": 0, "path": "b"}]},
     "duplicate"),
    ({"science": [{"visit": "x", "detector": 0, "path": "a"}]}, "must be integers"),
    ({"science": [{"visit": 1, "detector": 0, "path": "a", "colour": "red"}]}, "unknown key"),
    ({"science": []}, "lists no science"),
    ({"other": 1}, "expected a 'science:' list"),
])
def test_manifest_errors(tmp_path, content, message):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(dd.ConfigurationError, match=message):
        load_manifest(path)


# --------------------------------------------------------------------------- catalog writer


def _catalog(visit, detector, n, rng):
    columns = {
        "diaSourceId": make_dia_source_id(np.full(n, visit), np.full(n, detector), np.arange(n)),
        "visit": np.full(n, visit), "detector": np.full(n, detector), "band": np.full(n, "r"),
        "x": rng.uniform(0, 100, n), "y": rng.uniform(0, 100, n), "psfFlux": rng.normal(size=n),
    }
    for spec in DIA_SOURCE_COLUMNS:  # other integer columns (counts) are required too
        if spec.name not in columns and pa.types.is_integer(spec.type):
            columns[spec.name] = np.zeros(n, dtype=np.int64)
    return catalog_from_columns(columns, n)


def test_catalog_parts_are_atomic_deterministic_and_readable(tmp_path, rng):
    import dask.dataframe as ddf

    parts = {(1, 0): 5, (1, 1): 3, (2, 0): 4}
    for (visit, detector), n in parts.items():
        write_catalog_part(_catalog(visit, detector, n, rng), tmp_path, visit, detector)
    # A repeated (retried) task replaces its own part: no duplicated rows.
    write_catalog_part(_catalog(1, 1, 3, rng), tmp_path, 1, 1)
    assert catalog_part_path(tmp_path, 1, 1).name == "detector=1.parquet"
    # A writer killed mid-write leaves only a hidden temporary file, never read as a part.
    (catalog_part_path(tmp_path, 2, 0).parent / ".detector=9.parquet.dead.tmp").write_bytes(b"partial")
    frame = read_catalog(tmp_path)
    assert len(frame) == 12 and list(frame.columns) == column_names()
    assert frame["visit"].dtype == np.int64 and frame["diaSourceId"].is_unique
    assert sorted(frame.groupby("visit").size().to_dict().items()) == [(1, 8), (2, 4)]
    # The dataset is readable by pandas, dask.dataframe and pyarrow with Hive partitioning.
    root = tmp_path / "diaSources"
    assert len(pd.read_parquet(root)) == 12
    assert len(ddf.read_parquet(root).compute()) == 12
    assert pads.dataset(root, partitioning="hive", ignore_prefixes=[".", "_"]).count_rows() == 12


def test_catalog_writer_rejects_bad_schema(tmp_path, rng):
    bad = _catalog(1, 0, 3, rng).drop(columns=["psfFlux"])
    with pytest.raises(Exception, match="psfFlux"):
        write_catalog_part(bad, tmp_path, 1, 0)
    assert not catalog_part_path(tmp_path, 1, 0).exists()


# --------------------------------------------------------------------------- error classification


def test_stage_wrapper_classifies_errors():
    @_stage("subtract")
    def fails(kind):
        raise {"nowork": dd.NoWorkFound("no template"), "bad": dd.BadInputDataError("all NaN"),
               "algo": dd.AlgorithmError("too few stars", {"n_sources": 2}),
               "bug": KeyError("oops"), "transient": dd.TransientIOError("timeout")}[kind]

    skipped = fails("nowork")
    assert isinstance(skipped, UnitFailure) and skipped.status == "skipped"
    assert fails("bad").category == "bad_data" and fails("bad").status == "failed"
    algo = fails("algo")
    assert algo.category == "algorithm" and algo.metadata == {"n_sources": 2} and algo.stage == "subtract"
    bug = fails("bug")
    assert bug.category == "unexpected" and "Traceback" in bug.metadata["traceback"]
    with pytest.raises(dd.TransientIOError):
        fails("transient")

    @_stage("detect")
    def never_called(state):
        raise AssertionError("a failure must pass through")

    assert never_called(skipped) is skipped
    assert dataclasses.is_dataclass(skipped)
