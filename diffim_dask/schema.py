"""The DiaSource catalog schema: one table of columns, units and descriptions.

Column names follow the Rubin ``DiaSource`` table (``sdm_schemas`` ``apdb.yaml``;
see ``lsst-ip_diffim.md`` §10), restricted to what :mod:`diffim_dask.detect`
measures. :data:`DIA_SOURCE_SCHEMA` is a :class:`pyarrow.Schema` whose fields
carry ``unit`` and ``description`` in their metadata, so the Parquet files
written from it are self-describing.

Units
-----
* Fluxes are in **nJy** when the exposure they were measured on has a
  ``photo_calib``; otherwise they stay in **counts** (ADU) and the detection
  metadata says so (``flux_unit``). ``psfFlux``, ``apFlux``, dipole and trail
  fluxes use the difference exposure's calibration, ``scienceFlux`` the
  science exposure's, ``templateFlux`` the matched template's.
* Positions ``x``, ``y`` are parent-frame pixels (0-based, pixel centres at
  integers); ``ra``, ``dec`` come from the science WCS (NaN without a WCS).
* Lengths (``dipoleSep``, ``trailLength``, ``bboxSize``) are in pixels and
  second moments (``ixx`` ...) in pixel²; angles are in degrees,
  counter-clockwise from the +x pixel axis.
* Float columns hold NaN where a quantity was not measured.

diaSourceId bit layout
----------------------
A positive signed 64-bit integer::

    bit  63      0 (sign)
    bits 24..62  visit     (39 bits: 0 .. 549_755_813_887)
    bits 16..23  detector  ( 8 bits: 0 .. 255)
    bits  0..15  counter   (16 bits: 0 .. 65_535) — one per source of a (visit, detector)

so ids are unique across a run as long as each (visit, detector) is
processed once (or with disjoint counter ranges via ``id_offset``), and
:func:`unpack_dia_source_id` recovers the three parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import BadInputDataError

__all__ = [
    "ColumnSpec",
    "DIA_SOURCE_COLUMNS",
    "DIA_SOURCE_SCHEMA",
    "PIXEL_FLAG_PLANES",
    "ID_VISIT_BITS",
    "ID_DETECTOR_BITS",
    "ID_COUNTER_BITS",
    "column_names",
    "empty_catalog",
    "catalog_from_columns",
    "validate_catalog",
    "make_dia_source_id",
    "unpack_dia_source_id",
]

SCHEMA_NAME = "DiaSource"
SCHEMA_VERSION = "1.0"

ID_VISIT_BITS = 39
ID_DETECTOR_BITS = 8
ID_COUNTER_BITS = 16
_DETECTOR_SHIFT = ID_COUNTER_BITS
_VISIT_SHIFT = ID_COUNTER_BITS + ID_DETECTOR_BITS


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """One catalog column: name, Arrow type, unit, description, nullability."""

    name: str
    type: pa.DataType
    unit: str
    description: str
    nullable: bool = True

    def field(self) -> pa.Field:
        """The :class:`pyarrow.Field` with ``unit`` and ``description`` metadata."""
        return pa.field(self.name, self.type, nullable=self.nullable,
                        metadata={"unit": self.unit, "description": self.description})


#: Pixel-flag column stem -> mask plane (``diffim_dask.masks``). Each gives two
#: columns: ``pixelFlags_<stem>`` (plane set anywhere in the source footprint) and
#: ``pixelFlags_<stem>Center`` (set anywhere in the 3x3 box around the centroid).
PIXEL_FLAG_PLANES: dict[str, str] = {
    "bad": "BAD",
    "cr": "CR",
    "edge": "EDGE",
    "nodata": "NO_DATA",
    "interpolated": "INTRP",
    "saturated": "SAT",
    "suspect": "SUSPECT",
    "streak": "STREAK",
    "injected": "INJECTED",
    "injected_template": "INJECTED_TEMPLATE",
    "sat_template": "SAT_TEMPLATE",
    "high_variance": "HIGH_VARIANCE",
}

#: Planes that also get a ``pixelFlags_<stem>CenterAll`` column (all 9 central pixels set).
CENTER_ALL_PLANES: tuple[str, ...] = ("interpolated", "high_variance")

_F32, _F64, _I16, _I32, _I64, _BOOL, _STR = (pa.float32(), pa.float64(), pa.int16(), pa.int32(),
                                             pa.int64(), pa.bool_(), pa.string())


def _columns() -> tuple[ColumnSpec, ...]:
    c = ColumnSpec
    cols = [
        c("diaSourceId", _I64, "", "Unique id: visit << 24 | detector << 16 | counter "
          "(see diffim_dask.schema).", False),
        c("visit", _I64, "", "Visit (exposure) identifier.", False),
        c("detector", _I16, "", "Detector identifier.", False),
        c("band", _STR, "", "Filter band.", False),
        c("midpointMjdTai", _F64, "d", "Mid-exposure time, MJD (TAI)."),
        c("ra", _F64, "deg", "Right ascension of the centroid (science WCS); NaN without a WCS."),
        c("dec", _F64, "deg", "Declination of the centroid (science WCS); NaN without a WCS."),
        c("raErr", _F32, "deg", "Uncertainty of ra (from the centroid covariance)."),
        c("decErr", _F32, "deg", "Uncertainty of dec."),
        c("ra_dec_Cov", _F32, "deg**2", "Covariance of ra and dec."),
        c("x", _F64, "pixel", "Centroid x, parent frame (dipole midpoint for dipoles)."),
        c("y", _F64, "pixel", "Centroid y, parent frame."),
        c("xErr", _F32, "pixel", "Uncertainty of x."),
        c("yErr", _F32, "pixel", "Uncertainty of y."),
        c("centroid_flag", _BOOL, "", "Centroid refinement failed; the peak position is used.",
          False),
        c("snr", _F32, "", "Detection significance |S/N| of the source's peak in the "
          "matched-filtered (or score) image; signed S/N at the position for sky sources."),
        c("psfFlux", _F32, "nJy", "PSF-fit flux on the difference image (flux change)."),
        c("psfFluxErr", _F32, "nJy", "Uncertainty of psfFlux (from the variance plane)."),
        c("psfChi2", _F32, "", "Chi-square of the PSF fit over the fit stamp."),
        c("psfNdata", _I32, "", "Number of pixels used in the PSF fit."),
        c("psfFlux_flag", _BOOL, "", "PSF fit failed (no usable pixels).", False),
        c("apFlux", _F32, "nJy", "Circular-aperture flux on the difference image."),
        c("apFluxErr", _F32, "nJy", "Uncertainty of apFlux."),
        c("apFlux_flag", _BOOL, "", "Aperture off the image or containing unusable pixels.", False),
        c("scienceFlux", _F32, "nJy",
          "Forced PSF flux on the science image at the source position."),
        c("scienceFluxErr", _F32, "nJy", "Uncertainty of scienceFlux."),
        c("forced_PsfFlux_flag", _BOOL, "", "Forced science photometry failed or was not run.",
          False),
        c("templateFlux", _F32, "nJy", "Forced PSF flux on the PSF-matched template."),
        c("templateFluxErr", _F32, "nJy", "Uncertainty of templateFlux."),
        c("forced_template_PsfFlux_flag", _BOOL, "",
          "Forced template photometry failed or was not run.", False),
        c("isNegative", _BOOL, "", "Detected only as a negative source.", False),
        c("isDipole", _BOOL, "", "Dipole fit classifies the source as a dipole.", False),
        c("dipoleFitAttempted", _BOOL, "", "A dipole fit was attempted.", False),
        c("dipoleMeanFlux", _F32, "nJy", "Mean absolute lobe flux, (|f+| + |f-|) / 2."),
        c("dipoleMeanFluxErr", _F32, "nJy", "Uncertainty of dipoleMeanFlux."),
        c("dipoleFluxDiff", _F32, "nJy", "Lobe flux difference, |f+| - |f-|."),
        c("dipoleFluxDiffErr", _F32, "nJy", "Uncertainty of dipoleFluxDiff."),
        c("dipoleSep", _F32, "pixel", "Separation of the positive and negative lobes."),
        c("dipoleAngle", _F32, "deg", "Direction from the negative to the positive lobe, "
          "counter-clockwise from +x."),
        c("dipoleChi2", _F32, "", "Reduced chi-square of the dipole model on the difference."),
        c("dipoleNdata", _I32, "", "Number of difference pixels in the dipole fit."),
        c("trailFlux", _F32, "nJy", "Total flux of the trailed-PSF (PSF x segment) fit."),
        c("trailFluxErr", _F32, "nJy", "Uncertainty of trailFlux."),
        c("trailRa", _F64, "deg", "Right ascension of the fitted segment's centre."),
        c("trailDec", _F64, "deg", "Declination of the fitted segment's centre."),
        c("trailLength", _F32, "pixel", "Length of the fitted segment."),
        c("trailAngle", _F32, "deg", "Segment direction in [0, 180), counter-clockwise from +x."),
        c("trail_flag", _BOOL, "", "Trail fit attempted and failed.", False),
        c("ixx", _F32, "pixel**2", "Adaptive second moment xx of the source."),
        c("iyy", _F32, "pixel**2", "Adaptive second moment yy."),
        c("ixy", _F32, "pixel**2", "Adaptive second moment xy."),
        c("ixxPSF", _F32, "pixel**2", "Second moment xx of the PSF at the source."),
        c("iyyPSF", _F32, "pixel**2", "Second moment yy of the PSF."),
        c("ixyPSF", _F32, "pixel**2", "Second moment xy of the PSF."),
        c("shape_flag", _BOOL, "", "Adaptive moments failed to converge.", False),
        c("extendedness", _F32, "", "1 if the source is resolved (moment area > threshold x "
          "PSF's), 0 if not, NaN when moments failed."),
        c("bboxSize", _I32, "pixel", "Side of the square box enclosing the footprint, centred "
          "on the centroid."),
        c("isSky", _BOOL, "", "Sky source placed on empty sky to calibrate noise.", False),
        c("pixelFlags_offimage", _BOOL, "", "Centroid off the image.", False),
    ]
    for stem, plane in PIXEL_FLAG_PLANES.items():
        cols.append(c(f"pixelFlags_{stem}", _BOOL, "", f"{plane} set anywhere in the footprint.",
                      False))
        cols.append(c(f"pixelFlags_{stem}Center", _BOOL, "",
                      f"{plane} set in the 3x3 pixels around the centroid.", False))
        if stem in CENTER_ALL_PLANES:
            cols.append(c(f"pixelFlags_{stem}CenterAll", _BOOL, "",
                          f"{plane} set in all 3x3 pixels around the centroid.", False))
    return tuple(cols)


#: All columns, in catalog order.
DIA_SOURCE_COLUMNS: tuple[ColumnSpec, ...] = _columns()

#: The Arrow schema of a DiaSource catalog.
DIA_SOURCE_SCHEMA: pa.Schema = pa.schema(
    [spec.field() for spec in DIA_SOURCE_COLUMNS],
    metadata={
        "name": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "diaSourceId_layout": (
            f"visit << {_VISIT_SHIFT} | detector << {_DETECTOR_SHIFT} | counter; bits "
            f"visit={ID_VISIT_BITS} detector={ID_DETECTOR_BITS} counter={ID_COUNTER_BITS}"),
    },
)

_SPECS: dict[str, ColumnSpec] = {spec.name: spec for spec in DIA_SOURCE_COLUMNS}


def column_names() -> list[str]:
    """Names of the catalog columns, in order."""
    return [spec.name for spec in DIA_SOURCE_COLUMNS]


def _numpy_dtype(tp: pa.DataType):
    if pa.types.is_string(tp):
        return "str"
    return tp.to_pandas_dtype()


def empty_catalog(kind: str = "pandas"):
    """An empty catalog with every column of the schema.

    Parameters
    ----------
    kind : {"pandas", "arrow"}
        Return a :class:`pandas.DataFrame` (numpy dtypes matching the Arrow
        types) or a :class:`pyarrow.Table`.
    """
    if kind == "arrow":
        return DIA_SOURCE_SCHEMA.empty_table()
    if kind != "pandas":
        raise ValueError(f"kind must be 'pandas' or 'arrow', got {kind!r}")
    return pd.DataFrame({spec.name: pd.Series([], dtype=_numpy_dtype(spec.type))
                         for spec in DIA_SOURCE_COLUMNS})


def catalog_from_columns(columns: Mapping[str, object], n_rows: int) -> pd.DataFrame:
    """Build a schema-ordered DataFrame from column arrays.

    Columns missing from ``columns`` are filled with the schema's "not
    measured" value: NaN for floats, False for flags; integer and string
    columns are required.

    Raises
    ------
    BadInputDataError
        If a required column is missing, a column is unknown, or a length differs.
    """
    unknown = sorted(set(columns) - set(_SPECS))
    if unknown:
        raise BadInputDataError(f"unknown DiaSource column(s): {unknown}")
    data = {}
    for spec in DIA_SOURCE_COLUMNS:
        dtype = _numpy_dtype(spec.type)
        if spec.name in columns:
            values = columns[spec.name]
            if np.ndim(values) == 0:
                values = np.full(n_rows, values)
            if len(values) != n_rows:
                raise BadInputDataError(
                    f"column {spec.name} has {len(values)} rows, expected {n_rows}")
        elif pa.types.is_floating(spec.type):
            values = np.full(n_rows, np.nan)
        elif pa.types.is_boolean(spec.type):
            values = np.zeros(n_rows, dtype=bool)
        else:
            raise BadInputDataError(f"required DiaSource column {spec.name} is missing")
        data[spec.name] = pd.Series(np.asarray(values) if dtype != "str" else list(values),
                                    dtype=dtype)
    return pd.DataFrame(data)


def _column_to_arrow(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    series = pd.Series(values)
    if series.dtype.kind in "fiub":
        # Straight from numpy: NaN stays NaN (pandas conversion would turn it into null).
        return pa.array(series.to_numpy())
    return pa.array(series, from_pandas=True)


def validate_catalog(data, *, allow_extra: bool = False) -> pa.Table:
    """Check a catalog against :data:`DIA_SOURCE_SCHEMA` and return it as Arrow.

    Parameters
    ----------
    data : pandas.DataFrame or pyarrow.Table
        The catalog.
    allow_extra : bool
        Drop (instead of rejecting) columns that are not in the schema.

    Returns
    -------
    pyarrow.Table
        The catalog with exactly the schema's columns, order, types and metadata.
        Values are cast safely (e.g. int32 → int64); lossy or impossible casts fail.

    Raises
    ------
    BadInputDataError
        Listing every missing column, unexpected column, column whose values
        cannot be cast to the schema type, null in a non-nullable column, and
        duplicate ``diaSourceId``.
    """
    if isinstance(data, pa.Table):
        names = data.column_names
        getter = data.column
    elif isinstance(data, pd.DataFrame):
        names = [str(n) for n in data.columns]
        getter = data.__getitem__
    else:
        raise BadInputDataError(
            f"catalog must be a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
    problems: list[str] = []
    missing = [name for name in _SPECS if name not in names]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    extra = [name for name in names if name not in _SPECS]
    if extra and not allow_extra:
        problems.append(f"unexpected column(s): {', '.join(extra)} (pass allow_extra=True to drop)")
    arrays = []
    for spec in DIA_SOURCE_COLUMNS:
        if spec.name not in names:
            continue
        try:
            array = _column_to_arrow(getter(spec.name)).cast(spec.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError,
                ValueError) as exc:
            problems.append(f"column {spec.name} cannot be stored as {spec.type}: "
                            f"{str(exc).splitlines()[0]}")
            continue
        if not spec.nullable and array.null_count:
            problems.append(f"column {spec.name} has {array.null_count} null value(s) but is "
                            f"not nullable")
        arrays.append(array)
    if not problems and "diaSourceId" in names:
        ids = np.asarray(arrays[0])
        n_dup = ids.size - np.unique(ids).size
        if n_dup:
            problems.append(f"diaSourceId has {n_dup} duplicate value(s)")
    if problems:
        raise BadInputDataError(
            "catalog does not follow the DiaSource schema: " + "; ".join(problems))
    return pa.Table.from_arrays(arrays, schema=DIA_SOURCE_SCHEMA)


def make_dia_source_id(visit, detector, counter):
    """Pack ``(visit, detector, counter)`` into 64-bit ``diaSourceId`` values.

    Parameters
    ----------
    visit, detector, counter : int or array_like of int
        Broadcast together. Ranges: visit < 2**39, detector < 2**8,
        counter < 2**16 (see the module docstring).

    Returns
    -------
    numpy.ndarray of int64

    Raises
    ------
    BadInputDataError
        If a part is negative or does not fit its bits (the message names it).
    """
    parts = {"visit": (visit, ID_VISIT_BITS), "detector": (detector, ID_DETECTOR_BITS),
             "counter": (counter, ID_COUNTER_BITS)}
    checked = {}
    for name, (value, bits) in parts.items():
        arr = np.asarray(value, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= (1 << bits)):
            bad = int(arr.max()) if arr.max() >= (1 << bits) else int(arr.min())
            raise BadInputDataError(
                f"diaSourceId: {name} {bad} does not fit in {bits} bits (0 .. {(1 << bits) - 1}); "
                + ("use a compact visit number" if name == "visit" else
                   "too many sources in one (visit, detector): check the subtraction"
                   if name == "counter" else "use a detector number below 256"))
        checked[name] = arr
    return ((checked["visit"] << _VISIT_SHIFT) | (checked["detector"] << _DETECTOR_SHIFT)
            | checked["counter"]).astype(np.int64)


def unpack_dia_source_id(ids):
    """Inverse of :func:`make_dia_source_id`: ``(visit, detector, counter)`` arrays."""
    ids = np.asarray(ids, dtype=np.int64)
    counter = ids & ((1 << ID_COUNTER_BITS) - 1)
    detector = (ids >> _DETECTOR_SHIFT) & ((1 << ID_DETECTOR_BITS) - 1)
    visit = ids >> _VISIT_SHIFT
    return visit, detector, counter
