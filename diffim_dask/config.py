"""Configuration dataclasses: documented fields, validated choices, YAML loading.

Every algorithm has a frozen dataclass config deriving from :class:`ConfigBase`.
Fields are declared with :func:`config_field`, which records the field's
documentation, its allowed choices and its numeric bounds; validation runs in
``__post_init__`` so an invalid config can never exist.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class ExampleConfig(ConfigBase):
...     mode: str = config_field("a", "How to run.", choices=("a", "b"))
...     size: int = config_field(3, "Stamp size in pixels.", minimum=1)
>>> ExampleConfig.from_dict({"mode": "b"}).mode
'b'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = ["ConfigBase", "config_field", "describe_config"]

_MISSING = dataclasses.MISSING


def config_field(
    default: Any = _MISSING,
    doc: str = "",
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    default_factory: Any = _MISSING,
) -> Any:
    """Declare a documented, validated config field.

    Parameters
    ----------
    default : object
        Default value (immutable; use ``default_factory`` for others).
    doc : str
        One or two sentences saying what the field controls, with units.
    choices : tuple, optional
        Allowed values.
    minimum, maximum : float, optional
        Inclusive bounds for numeric fields (applied element-wise to tuples).
    exclusive_minimum : bool
        Make ``minimum`` exclusive.
    default_factory : callable, optional
        Factory for mutable defaults (e.g. a nested config).
    """
    if not doc:
        raise TypeError("every config field needs a doc string")
    metadata = {
        "doc": doc,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, ConfigBase)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/JSON value to the annotated type (tuples, nested configs)."""
    origin = typing.get_origin(tp)
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{where}: expected a mapping, got {value!r}")
        return tp.from_dict(value, _prefix=where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], where)
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigurationError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base class of all configs: validation, ``from_dict``, ``to_dict``, ``replace``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            where = f"{type(self).__name__}.{field.name}"
            tp = hints.get(field.name, Any)
            if not _check_type(value, tp):
                raise ConfigurationError(f"{where} = {value!r} is not of type {tp}")
            meta = field.metadata
            choices = meta.get("choices")
            if choices is not None:
                items = value if isinstance(value, tuple) else (value,)
                for item in items:
                    if item not in choices:
                        raise ConfigurationError(
                            f"{where} = {item!r} is not one of {list(choices)}"
                        )
            self._check_bounds(where, value, meta)
        self.validate()

    @staticmethod
    def _check_bounds(where: str, value: Any, meta: Mapping[str, Any]) -> None:
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if lo is None and hi is None:
            return
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if item is None or not isinstance(item, (int, float)):
                continue
            if lo is not None:
                bad = item <= lo if meta.get("exclusive_minimum") else item < lo
                if bad:
                    rel = ">" if meta.get("exclusive_minimum") else ">="
                    raise ConfigurationError(f"{where} = {item!r} must be {rel} {lo}")
            if hi is not None and item > hi:
                raise ConfigurationError(f"{where} = {item!r} must be <= {hi}")

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ConfigurationError."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, _prefix: str = "") -> "ConfigBase":
        """Build a config from a mapping (e.g. parsed YAML), naming any bad key.

        Raises
        ------
        ConfigurationError
            On an unknown key, a wrong type or a value outside its choices.
        """
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigurationError(
                f"unknown key(s) {', '.join(_prefix + k for k in unknown)} in "
                f"{cls.__name__}; valid keys: {', '.join(sorted(names))}"
            )
        kwargs = {
            key: _coerce(value, hints.get(key, Any), _prefix + key)
            for key, value in data.items()
        }
        try:
            return cls(**kwargs)
        except ConfigurationError as exc:
            if _prefix:
                raise ConfigurationError(f"{_prefix.rstrip('.')}: {exc}") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """Plain-data representation (lists for tuples), suitable for YAML/JSON."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    def replace(self, **changes: Any) -> "ConfigBase":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def describe_config(cls: type[ConfigBase]) -> str:
    """Human-readable table of a config class's fields, defaults and docs."""
    lines = [cls.__name__]
    for field in dataclasses.fields(cls):
        if field.default is not _MISSING:
            default = repr(field.default)
        elif field.default_factory is not _MISSING:
            default = f"{field.default_factory.__name__}()"
        else:
            default = "(required)"
        meta = field.metadata
        extra = f" choices={list(meta['choices'])}" if meta.get("choices") else ""
        lines.append(f"  {field.name} = {default}{extra}\n      {meta.get('doc', '')}")
    return "\n".join(lines)
