"""Frozen dataclasses <-> Flower run-config tables (plain Python, no Flower import).

Every part of a run's configuration is a frozen dataclass whose init fields are run-config keys:
the key is the field name with ``_`` replaced by ``-`` (``clients_per_round`` <->
``clients-per-round``).  A field's default is *the* default of its key, defined once.  This
module converts between the two spellings and coerces the values Flower hands over (TOML gives
``int``, ``float``, ``str`` and ``bool``; the command line gives strings), so each part parses
its keys the same way and every error names the key::

    @dataclass(frozen=True)
    class ClientConfig:
        batch_size: int = 32
    from_run_config(ClientConfig, {"batch-size": "16"})  # ClientConfig(batch_size=16)
    to_run_config(ClientConfig(batch_size=16))           # {"batch-size": 16}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["coerce", "field_key", "from_run_config", "keys", "to_run_config"]

T = TypeVar("T")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def field_key(name: str) -> str:
    """The run-config key of a field name."""
    return name.replace("_", "-")


def keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """Run-config key -> init field of the dataclass ``cls`` (fields starting with ``_`` and
    those marked ``metadata={"run_config": False}`` are not keys)."""
    return {field_key(f.name): f for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and f.metadata.get("run_config", True)}


def coerce(key: str, typ: Any, value: Any) -> Any:
    """``value`` as the field type ``typ`` (a type or its string annotation); ``ValueError``
    naming ``key`` when it can not be."""
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE and not isinstance(value, float):
                return text in _TRUE
            raise ValueError
        if name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if name == "str":
            return "" if value is None else str(value)
        if name.startswith("tuple[int"):
            return int_tuple(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be of type {name}, got {value!r}") from None
    return value


def int_tuple(value: Any) -> tuple[int, ...]:
    """``"10,20"`` / ``[10, 20]`` / ``10`` / ``""`` -> a tuple of ints."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace(";", ",").split(",") if v.strip())
    items = list(value) if isinstance(value, Iterable) else [value]
    if any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in items):
        raise ValueError(f"expected integers, got {value!r}")  # no silent truncation
    return tuple(int(v) for v in items)


def from_run_config(cls: type[T], run_config: Mapping[str, Any], *,
                    strict: bool = False, **overrides: Any) -> T:
    """An instance of ``cls`` from the keys of ``run_config`` it owns (``overrides``, given by
    field name, win).  ``strict``: unknown keys raise ``ValueError`` naming the key."""
    fields = keys(cls)
    kwargs: dict[str, Any] = {}
    for key, value in run_config.items():
        field = fields.get(str(key).replace("_", "-"))
        if field is None:
            if strict:
                raise ValueError(f"{key}: unknown run-config key (known: "
                                 f"{', '.join(sorted(fields))})")
            continue
        kwargs[field.name] = coerce(str(key), field.type, value)
    kwargs.update(overrides)
    return cls(**kwargs)


def replace(obj: T, changes: Mapping[str, Any]) -> T:
    """A copy of the dataclass instance ``obj`` with the run-config keys of ``changes`` that
    its class owns changed (coerced as :func:`from_run_config` does; the others are ignored),
    validated again by its ``__post_init__``; ``obj`` itself when it owns none of them."""
    fields = keys(type(obj))
    kwargs = {fields[k].name: coerce(k, fields[k].type, v)
              for k, v in ((str(k).replace("_", "-"), v) for k, v in changes.items())
              if k in fields}
    return dataclasses.replace(obj, **kwargs) if kwargs else obj  # type: ignore[type-var]


def to_run_config(obj: Any) -> dict[str, Any]:
    """The run-config table of a dataclass instance (tuples of ints as ``"a,b"`` strings)."""
    out: dict[str, Any] = {}
    for key, field in keys(type(obj)).items():
        value = getattr(obj, field.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        out[key] = value
    return out
