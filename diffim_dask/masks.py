"""Mask bit planes: the one table every module uses.

The ``mask`` plane of an exposure is ``uint32``; each named plane is one bit.

=====================  ===  ==========================================================
plane                  bit  meaning
=====================  ===  ==========================================================
BAD                    0    permanently bad detector pixel (bad column, hot pixel)
SAT                    1    saturated in this image
INTRP                  2    value was interpolated
CR                     3    cosmic ray
EDGE                   4    too close to the image edge for a valid convolution
DETECTED               5    inside a positive detection footprint
DETECTED_NEGATIVE      6    inside a negative detection footprint
NO_DATA                7    no data (outside coverage, NaN in the input)
SUSPECT                8    value is suspect (near saturation, non-linear regime)
HIGH_VARIANCE          9    template variance far above its median
STREAK                 10   part of a long linear feature (satellite, meteor)
SAT_TEMPLATE           11   saturated in the template
INJECTED               12   a synthetic source was injected here
INJECTED_TEMPLATE      13   a synthetic source was injected in the template
=====================  ===  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import ConfigurationError

__all__ = [
    "MASK_PLANES",
    "MASK_DESCRIPTIONS",
    "mask_bit",
    "mask_value",
    "plane_set",
    "describe_mask",
]

#: (name, description) in bit order; the bit of a plane is its index here.
_PLANE_TABLE: tuple[tuple[str, str], ...] = (
    ("BAD", "permanently bad detector pixel (bad column, hot pixel)"),
    ("SAT", "saturated in this image"),
    ("INTRP", "value was interpolated"),
    ("CR", "cosmic ray"),
    ("EDGE", "too close to the image edge for a valid convolution"),
    ("DETECTED", "inside a positive detection footprint"),
    ("DETECTED_NEGATIVE", "inside a negative detection footprint"),
    ("NO_DATA", "no data (outside coverage, NaN in the input)"),
    ("SUSPECT", "value is suspect (near saturation, non-linear regime)"),
    ("HIGH_VARIANCE", "template variance far above its median"),
    ("STREAK", "part of a long linear feature (satellite, meteor)"),
    ("SAT_TEMPLATE", "saturated in the template"),
    ("INJECTED", "a synthetic source was injected here"),
    ("INJECTED_TEMPLATE", "a synthetic source was injected in the template"),
)

#: Mapping plane name -> bit number.
MASK_PLANES: dict[str, int] = {name: bit for bit, (name, _) in enumerate(_PLANE_TABLE)}
#: Mapping plane name -> description.
MASK_DESCRIPTIONS: dict[str, str] = dict(_PLANE_TABLE)

MASK_DTYPE = np.uint32


def mask_bit(name: str) -> int:
    """Return the bit number of plane ``name``.

    Raises
    ------
    ConfigurationError
        If ``name`` is not a known plane.
    """
    try:
        return MASK_PLANES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown mask plane {name!r}; known planes: {', '.join(MASK_PLANES)}"
        ) from None


def mask_value(names: str | Iterable[str]) -> int:
    """Return the OR of the bit values of one or more planes.

    Examples
    --------
    >>> mask_value(["BAD", "SAT"])
    3
    """
    if isinstance(names, str):
        names = [names]
    value = 0
    for name in names:
        value |= 1 << mask_bit(name)
    return value


def plane_set(mask, names: str | Iterable[str]):
    """Boolean array: where any of the named planes is set in ``mask``.

    Works on numpy and dask arrays alike.
    """
    return (mask & MASK_DTYPE(mask_value(names))) != 0


def describe_mask(value: int) -> list[str]:
    """Names of the planes set in a single mask value."""
    return [name for name, bit in MASK_PLANES.items() if value & (1 << bit)]
