"""The DIA-source catalog writer: one atomic Parquet part per (visit, detector).

Layout (a Hive-partitioned Parquet dataset)::

    diaSources/visit=<visit>/detector=<detector>.parquet

The ``visit`` column lives in the directory name (Hive partitioning) and not in
the files, which is what pyarrow, pandas and dask.dataframe expect. Each part is
written to a temporary file in the same folder and renamed into place, under a
name that depends only on (visit, detector): a retried or repeated task replaces
its own part and can never duplicate or half-write rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..io import atomic_output_path
from ..schema import column_names, empty_catalog, validate_catalog

__all__ = ["catalog_part_path", "write_catalog_part", "read_catalog", "CATALOG_DIR"]

CATALOG_DIR = "diaSources"


def catalog_part_path(out: Path, visit: int, detector: int) -> Path:
    """Deterministic path of one detector's part."""
    return Path(out) / CATALOG_DIR / f"visit={int(visit)}" / f"detector={int(detector)}.parquet"


def write_catalog_part(catalog: pd.DataFrame, out: Path, visit: int, detector: int) -> Path:
    """Validate ``catalog`` against the DiaSource schema and write it atomically.

    Returns
    -------
    pathlib.Path
        The part's path.
    """
    table = validate_catalog(catalog)
    table = table.drop_columns(["visit"])
    path = catalog_part_path(out, visit, detector)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(path, overwrite=True) as temporary:
        pq.write_table(table, temporary)
    return path


def read_catalog(out: Path) -> pd.DataFrame:
    """Read the whole DIA-source catalog of a run (``visit`` restored as int64).

    Rows are sorted by ``diaSourceId`` so two runs can be compared directly.
    """
    root = Path(out) / CATALOG_DIR
    columns = column_names()
    if not root.is_dir():
        return empty_catalog("pandas")
    partitioning = pads.partitioning(pa.schema([("visit", pa.int64())]), flavor="hive")
    # Hidden temporary files (".name.tmp") of a writer in flight are not parts.
    dataset = pads.dataset(root, format="parquet", partitioning=partitioning,
                           exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    frame = dataset.to_table().to_pandas()
    return frame[columns].sort_values("diaSourceId", ignore_index=True)
