"""The DIA-source catalog writer: one atomic Parquet part per (visit, detector).

Layout (a Hive-partitioned Parquet dataset)::

    diaSources/visit=<visit>/detector=<detector>.parquet

The ``visit`` column lives in the directory name (Hive partitioning) and not in
the files, which is what pyarrow, pandas and dask.dataframe expect. Each part is
published atomically under a name that depends only on (visit, detector): a
retried or repeated task replaces its own part and can never duplicate or
half-write rows. In a local directory the part is written to a temporary file
in the same folder and renamed into place; on an object store (any fsspec URL,
e.g. ``s3://bucket/run``) it is serialised in memory and uploaded with one PUT,
which is atomic (:class:`~diffim_dask.workflow.outputs.OutputTree`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..schema import column_names, empty_catalog, validate_catalog
from .outputs import OutputTree

__all__ = ["catalog_part_name", "catalog_part_path", "write_catalog_part", "read_catalog", "CATALOG_DIR"]

CATALOG_DIR = "diaSources"


def catalog_part_name(visit: int, detector: int) -> str:
    """Deterministic name of one detector's part, relative to the run's output root."""
    return f"{CATALOG_DIR}/visit={int(visit)}/detector={int(detector)}.parquet"


def catalog_part_path(out: str | os.PathLike, visit: int, detector: int) -> Path:
    """Deterministic path of one detector's part in a local output directory."""
    return Path(out) / catalog_part_name(visit, detector)


def _tree(out) -> OutputTree:
    return out if isinstance(out, OutputTree) else OutputTree(out)


def write_catalog_part(catalog: pd.DataFrame, out, visit: int, detector: int) -> Path | str:
    """Validate ``catalog`` against the DiaSource schema and publish it atomically.

    Parameters
    ----------
    catalog : pandas.DataFrame
        The detector's DIA sources (DiaSource schema, ``visit`` included).
    out : path, URL or OutputTree
        The run's output root (local directory or fsspec URL).
    visit, detector : int
        The unit.

    Returns
    -------
    pathlib.Path or str
        The part's path (local) or URL (object store).
    """
    table = validate_catalog(catalog)
    table = table.drop_columns(["visit"])
    # Serialised whole before publishing: an upload is one PUT, a local write one rename.
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    tree = _tree(out)
    written = tree.write_bytes(catalog_part_name(visit, detector), buffer.getvalue())
    return Path(written) if tree.is_local else written


def read_catalog(out) -> pd.DataFrame:
    """Read the whole DIA-source catalog of a run (``visit`` restored as int64).

    ``out`` is the run's output directory or URL. Rows are sorted by
    ``diaSourceId`` so two runs can be compared directly.
    """
    tree = _tree(out)
    root = tree.path(CATALOG_DIR)
    columns = column_names()
    if not tree.fs.isdir(root):
        return empty_catalog("pandas")
    partitioning = pads.partitioning(pa.schema([("visit", pa.int64())]), flavor="hive")
    # Hidden temporary files (".name.tmp") of a writer in flight are not parts.
    dataset = pads.dataset(root, format="parquet", partitioning=partitioning,
                           filesystem=None if tree.is_local else tree.fs,
                           exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    frame = dataset.to_table().to_pandas()
    return frame[columns].sort_values("diaSourceId", ignore_index=True)
