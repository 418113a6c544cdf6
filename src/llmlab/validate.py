"""Type checks for settings read from files (checkpoint config.json, TOML): values with valid
syntax but the wrong type (`lr = "abc"`, `"n_layer": "4"`) must be one clear error at load, not a
TypeError deep inside training or model construction."""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from llmlab.errors import LlmlabError


def _allowed(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, None allowed?) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        accepted: tuple[type, ...] = ()
        for a in args:
            if a is not type(None):
                accepted += _allowed(a)[0]
        return accepted, type(None) in args
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return tuple({type(v) for v in values if v is not None}), None in values
    if isinstance(origin, type):  # dict[str, Any], list[...]: check the container only
        return (origin,), False
    if origin is not None or not isinstance(tp, type):  # anything exotic: not checked here
        return (object,), True
    if tp is Any:
        return (object,), True
    return (tp,), False


def _ok(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass: `n_layer = true` is not a number
        return bool in accepted or object in accepted
    if isinstance(value, int) and float in accepted:
        return True  # an int is a fine float (`lr = 1`)
    return isinstance(value, accepted)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """cls's resolved field types, once per class (resolving them is most of a check's cost)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: check names only
        return {}


def check_fields(cls: type, values: dict[str, Any], where: str, required: bool = False) -> dict[str, Any]:
    """Check `values` against the dataclass `cls`'s field types: unknown keys, wrong types,
    non-finite floats and (if `required`) missing fields are one LlmlabError naming `where`."""
    if not isinstance(values, dict):
        raise LlmlabError(f"{where}: expected a table of settings, got {type(values).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LlmlabError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    if required:
        missing = [n for n, f in fields.items() if n not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise LlmlabError(f"{where}: missing setting(s) {', '.join(missing)}")
    for name, value in values.items():
        accepted, nullable = _allowed(hints.get(name, Any))
        if value is None and nullable:
            continue
        if not _ok(value, accepted):
            want = " or ".join(t.__name__ for t in accepted) + (" or none" if nullable else "")
            raise LlmlabError(f"{where}: {name} must be {want}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise LlmlabError(f"{where}: {name} must be a finite number, got {value!r}")
    return values
