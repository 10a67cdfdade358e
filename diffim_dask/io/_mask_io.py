"""Mask conversions at the I/O boundary: stored bit tables, foreign masks, JWST DQ.

How foreign masks map onto :mod:`diffim_dask.masks`:

* **A mask that documents its planes** with ``MP_<NAME> = <bit>`` cards (our
  MEF files, LSST ``calexp`` files, :func:`mask_plane_cards` output): every
  plane whose name we know keeps its meaning (bits are re-numbered if the
  file's numbering differs); unknown planes are dropped, with a log line.
* **Any other mask** (boolean, 0/1, or an integer bit mask with no table,
  e.g. a DECam bad-pixel mask): every nonzero pixel becomes ``BAD``.
* **JWST DQ** arrays use :data:`JWST_DQ_PLANES` (bit → our plane).

Image values that cannot be used become ``NO_DATA`` (:func:`invalid_pixels`):
NaN, ±inf and magnitudes ≥ 1e30 (float fill values such as the ``-FLT_MAX``
found in some ZTF reference stamps).
"""

from __future__ import annotations

import logging

import numpy as np
from astropy.io import fits

from ..masks import MASK_DESCRIPTIONS, MASK_DTYPE, MASK_PLANES, mask_value

__all__ = [
    "FILL_VALUE_LIMIT",
    "JWST_DQ_PLANES",
    "invalid_pixels",
    "mask_plane_cards",
    "stored_mask_planes",
    "remap_mask",
    "mask_from_foreign",
    "mask_from_jwst_dq",
    "as_mask_dtype",
]

logger = logging.getLogger("diffim_dask.io")

#: |value| at or above this is a fill value, not data.
FILL_VALUE_LIMIT = 1e30

_MASK_CARD_PREFIX = "MP_"

#: JWST DQ bit → our plane (None: informational, ignored). Bits from the JWST
#: pipeline's data-quality flag table.
JWST_DQ_PLANES: dict[int, str | None] = {
    0: "BAD",            # DO_NOT_USE
    1: "SAT",            # SATURATED
    2: None,             # JUMP_DET: a ramp jump that ramp fitting already handled
    3: "NO_DATA",        # DROPOUT
    4: "CR",             # OUTLIER
    5: "SUSPECT",        # PERSISTENCE
    6: "SUSPECT",        # AD_FLOOR
    7: "SUSPECT",        # CHARGELOSS
    8: "SUSPECT",        # UNRELIABLE_ERROR
    9: "NO_DATA",        # NON_SCIENCE
    10: "BAD",           # DEAD
    11: "BAD",           # HOT
    12: "SUSPECT",       # WARM
    13: "SUSPECT",       # LOW_QE
    14: "SUSPECT",       # RC
    15: "SUSPECT",       # TELEGRAPH
    16: "SUSPECT",       # NONLINEAR
    17: "SUSPECT",       # BAD_REF_PIXEL
    18: "SUSPECT",       # NO_FLAT_FIELD
    19: "SUSPECT",       # NO_GAIN_VALUE
    20: "SUSPECT",       # NO_LIN_CORR
    21: "SUSPECT",       # NO_SAT_CHECK
    22: "SUSPECT",       # UNRELIABLE_BIAS
    23: "SUSPECT",       # UNRELIABLE_DARK
    24: "SUSPECT",       # UNRELIABLE_SLOPE
    25: "SUSPECT",       # UNRELIABLE_FLAT
    26: "BAD",           # OPEN
    27: "SUSPECT",       # ADJ_OPEN
    28: "SUSPECT",       # FLUX_ESTIMATED
    29: "BAD",           # MSA_FAILED_OPEN
    30: "BAD",           # OTHER_BAD_PIXEL
    31: "NO_DATA",       # REFERENCE_PIXEL
}


def invalid_pixels(image):
    """Boolean array: NaN, ±inf or ``|value| ≥ 1e30`` (works on numpy and dask)."""
    with np.errstate(invalid="ignore"):
        return ~(np.abs(image) < FILL_VALUE_LIMIT)


def as_mask_dtype(data):
    """Integer mask data (any signedness, any byte order) as native uint32 bits.

    Signed 32-bit values are re-interpreted bit for bit (FITS has no unsigned
    32-bit type, so we store masks as int32).
    """
    if data.dtype.kind == "i":
        return (data.astype(np.int64) & 0xFFFFFFFF).astype(MASK_DTYPE)
    return data.astype(MASK_DTYPE)


def _truncated_card(keyword: str, value, comment: str) -> fits.Card:
    """A card whose comment is cut to fit 80 characters (astropy would warn otherwise)."""
    name = f"HIERARCH {keyword}" if len(keyword) > 8 else keyword
    bare = fits.Card(name, value)
    room = 80 - len(bare.image.rstrip()) - 3
    return fits.Card(name, value, comment[:room] if room > 0 else "")


def mask_plane_cards() -> list[fits.Card]:
    """``MP_<NAME> = <bit> / <description>`` cards documenting our bit table.

    Keywords longer than 8 characters are written as explicit ``HIERARCH``
    cards and comments are cut to fit, so astropy emits no VerifyWarning.
    """
    return [_truncated_card(_MASK_CARD_PREFIX + name, bit, MASK_DESCRIPTIONS[name])
            for name, bit in MASK_PLANES.items()]


def stored_mask_planes(header: fits.Header) -> dict[str, int] | None:
    """The ``MP_*`` plane table documented in a header, or None."""
    planes = {}
    for keyword, value in header.items():
        if keyword.startswith(_MASK_CARD_PREFIX) and isinstance(value, int) and 0 <= value < 32:
            planes[keyword[len(_MASK_CARD_PREFIX):]] = int(value)
    return planes or None


def _bit_mapping(stored: dict[str, int], source: str) -> list[tuple[int, int]]:
    mapping = []
    unknown = []
    for name, bit in stored.items():
        if name in MASK_PLANES:
            mapping.append((bit, MASK_PLANES[name]))
        else:
            unknown.append(name)
    if unknown:
        logger.info("%s: mask planes %s are not in our table and are dropped", source, sorted(unknown))
    return mapping


def remap_mask(mask, stored: dict[str, int], source: str):
    """Re-number the bits of a mask documented by ``stored`` to our table.

    Works element-wise on numpy or dask arrays; returns the input unchanged
    when the tables agree.
    """
    mapping = _bit_mapping(stored, source)
    if all(src == dst for src, dst in mapping) and len(mapping) == len(stored):
        return mask
    out = mask & MASK_DTYPE(0)
    for src, dst in mapping:
        out = out | (((mask >> MASK_DTYPE(src)) & MASK_DTYPE(1)) << MASK_DTYPE(dst))
    return out


def mask_from_foreign(data: np.ndarray, header: fits.Header, source: str) -> np.ndarray:
    """Our mask from a mask file.

    An integer mask whose header documents its planes (``MP_*`` cards) keeps
    them by name (:func:`remap_mask`); any other mask — boolean, float, or an
    undocumented integer bit mask — sets ``BAD`` wherever it is nonzero (NaN
    counts as nonzero).
    """
    stored = stored_mask_planes(header)
    if stored is not None and data.dtype.kind in "iu":
        return remap_mask(as_mask_dtype(data), stored, source)
    flagged = data != 0
    return np.where(flagged, MASK_DTYPE(mask_value("BAD")), MASK_DTYPE(0)).astype(MASK_DTYPE)


def mask_from_jwst_dq(dq: np.ndarray) -> np.ndarray:
    """Our mask from a JWST DQ array (:data:`JWST_DQ_PLANES`)."""
    dq = as_mask_dtype(np.asarray(dq))
    out = np.zeros(dq.shape, dtype=MASK_DTYPE)
    for bit, plane in JWST_DQ_PLANES.items():
        if plane is not None:
            out |= np.where(dq & MASK_DTYPE(1 << bit), MASK_DTYPE(mask_value(plane)), MASK_DTYPE(0))
    return out
