"""Tests of the DiaSource catalog schema and the diaSourceId layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffim_dask.errors import BadInputDataError
from diffim_dask.schema import (
    DIA_SOURCE_COLUMNS,
    DIA_SOURCE_SCHEMA,
    ID_COUNTER_BITS,
    ID_DETECTOR_BITS,
    ID_VISIT_BITS,
    catalog_from_columns,
    column_names,
    empty_catalog,
    make_dia_source_id,
    unpack_dia_source_id,
    validate_catalog,
)

REQUIRED = [
    "diaSourceId", "visit", "detector", "band", "midpointMjdTai", "ra", "dec", "raErr", "decErr",
    "x", "y", "xErr", "yErr", "psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "snr",
    "scienceFlux", "scienceFluxErr", "templateFlux", "templateFluxErr", "dipoleMeanFlux",
    "dipoleFluxDiff", "dipoleSep", "dipoleAngle", "dipoleChi2", "isDipole", "trailFlux",
    "trailLength", "trailAngle", "ixx", "iyy", "ixy", "extendedness", "isNegative", "isSky",
    "pixelFlags_bad", "pixelFlags_badCenter", "pixelFlags_edge", "pixelFlags_saturated",
    "pixelFlags_saturatedCenter", "pixelFlags_sat_template", "pixelFlags_interpolated",
    "pixelFlags_cr", "pixelFlags_nodata", "pixelFlags_suspect", "pixelFlags_streak",
    "pixelFlags_offimage",
]


def _one_row(**overrides) -> pd.DataFrame:
    columns = {"diaSourceId": np.array([make_dia_source_id(5, 7, 0)]).ravel(),
               "visit": np.array([5]), "detector": np.array([7], dtype=np.int16),
               "band": ["r"], "x": np.array([10.5]), "y": np.array([3.25]),
               "psfFlux": np.array([12.0]), "psfNdata": np.array([49], dtype=np.int32),
               "dipoleNdata": np.array([0], dtype=np.int32),
               "bboxSize": np.array([13], dtype=np.int32)}
    columns.update(overrides)
    return catalog_from_columns(columns, 1)


def test_schema_has_required_columns_units_and_descriptions():
    names = column_names()
    for name in REQUIRED:
        assert name in names, name
    assert len(set(names)) == len(names)
    for field in DIA_SOURCE_SCHEMA:
        meta = field.metadata
        assert meta[b"description"], field.name
        assert b"unit" in meta
    units = {f.name: f.metadata[b"unit"].decode() for f in DIA_SOURCE_SCHEMA}
    assert units["psfFlux"] == units["scienceFlux"] == units["templateFlux"] == "nJy"
    assert units["ra"] == units["dec"] == "deg"
    assert units["dipoleAngle"] == units["trailAngle"] == "deg"
    assert units["x"] == "pixel" and units["ixx"] == "pixel**2"
    assert DIA_SOURCE_SCHEMA.field("diaSourceId").type == pa.int64()
    assert not DIA_SOURCE_SCHEMA.field("diaSourceId").nullable
    assert b"diaSourceId_layout" in DIA_SOURCE_SCHEMA.metadata


def test_empty_catalog_validates_in_both_forms():
    df = empty_catalog()
    assert list(df.columns) == column_names() and len(df) == 0
    table = validate_catalog(df)
    assert table.schema.equals(DIA_SOURCE_SCHEMA, check_metadata=True)
    assert validate_catalog(empty_catalog("arrow")).num_rows == 0
    with pytest.raises(ValueError, match="kind"):
        empty_catalog("polars")


def test_catalog_round_trips_through_parquet(tmp_path):
    df = _one_row()
    table = validate_catalog(df)
    assert np.isnan(table.column("ra")[0].as_py())   # NaN stays NaN, not null
    path = tmp_path / "dia.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    assert back.schema.field("psfFlux").metadata[b"unit"] == b"nJy"
    validate_catalog(back)
    assert back.column("psfFlux")[0].as_py() == 12.0


def test_validation_names_every_problem():
    df = _one_row().drop(columns=["psfFluxErr", "isSky"])
    df["extra_column"] = 1
    df["snr"] = "high"
    with pytest.raises(BadInputDataError) as info:
        validate_catalog(df)
    message = str(info.value)
    assert "psfFluxErr" in message and "isSky" in message
    assert "extra_column" in message
    assert "snr" in message and "float" in message
    # Extra columns can be dropped on request.
    ok = _one_row()
    ok["note"] = "x"
    assert "note" not in validate_catalog(ok, allow_extra=True).column_names


def test_validation_rejects_nulls_lossy_casts_and_duplicate_ids():
    df = pd.concat([_one_row(), _one_row()], ignore_index=True)
    with pytest.raises(BadInputDataError, match="duplicate"):
        validate_catalog(df)
    df = _one_row()
    df["visit"] = np.array([np.nan])
    with pytest.raises(BadInputDataError, match="visit"):
        validate_catalog(df)
    df = _one_row()
    df["isDipole"] = pd.Series([None], dtype=object)
    with pytest.raises(BadInputDataError, match="isDipole"):
        validate_catalog(df)
    df = _one_row()
    df["psfNdata"] = np.array([2.5])      # not an integer
    with pytest.raises(BadInputDataError, match="psfNdata"):
        validate_catalog(df)
    with pytest.raises(BadInputDataError, match="DataFrame"):
        validate_catalog({"a": 1})


def test_catalog_from_columns_defaults_and_errors():
    df = _one_row()
    assert np.isnan(df.loc[0, "psfFluxErr"]) and not df.loc[0, "isDipole"]
    assert df["detector"].dtype == np.int16 and df["psfFlux"].dtype == np.float32
    with pytest.raises(BadInputDataError, match="unknown"):
        catalog_from_columns({"nope": [1]}, 1)
    with pytest.raises(BadInputDataError, match="diaSourceId"):
        catalog_from_columns({"visit": [1]}, 1)
    with pytest.raises(BadInputDataError, match="rows"):
        _one_row(x=np.array([1.0, 2.0]))


def test_dia_source_id_layout_round_trip_and_uniqueness():
    assert ID_VISIT_BITS + ID_DETECTOR_BITS + ID_COUNTER_BITS == 63
    visits = np.array([0, 1, 2024120100123 // 10, (1 << ID_VISIT_BITS) - 1])
    detectors = np.array([0, 255, 17, 204])
    counters = np.array([0, 65535, 12, 999])
    ids = make_dia_source_id(visits, detectors, counters)
    assert ids.dtype == np.int64 and (ids >= 0).all()
    v, d, c = unpack_dia_source_id(ids)
    np.testing.assert_array_equal(v, visits)
    np.testing.assert_array_equal(d, detectors)
    np.testing.assert_array_equal(c, counters)
    # Explicit layout: visit << 24 | detector << 16 | counter.
    assert make_dia_source_id(3, 2, 1) == (3 << 24) | (2 << 16) | 1
    # Unique across a run of many (visit, detector) units.
    grid_v, grid_d, grid_c = np.meshgrid(np.arange(50), np.arange(20), np.arange(100),
                                         indexing="ij")
    all_ids = make_dia_source_id(grid_v.ravel(), grid_d.ravel(), grid_c.ravel())
    assert np.unique(all_ids).size == all_ids.size


@pytest.mark.parametrize("visit, detector, counter, name", [
    (1 << ID_VISIT_BITS, 0, 0, "visit"),
    (1, 256, 0, "detector"),
    (1, 0, 1 << ID_COUNTER_BITS, "counter"),
    (-1, 0, 0, "visit"),
])
def test_dia_source_id_out_of_range(visit, detector, counter, name):
    with pytest.raises(BadInputDataError, match=name):
        make_dia_source_id(visit, detector, counter)


def test_every_column_spec_is_consistent():
    for spec in DIA_SOURCE_COLUMNS:
        if spec.name.startswith("pixelFlags") or spec.name.endswith("_flag"):
            assert spec.type == pa.bool_() and not spec.nullable
