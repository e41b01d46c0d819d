"""Typed configuration: dataclasses that refuse unknown keys.

Every trainer and generator takes one of these; `to_dict` is what goes into `runs/<id>/config.json` and
`from_dict(cls, d)` loads it back, failing with a clear message on a key the dataclass does not know (a typo in a
config must never be silently ignored, as it was with the earlier entries' global dict of string keys).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import UserError

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain JSON-able dict (Paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, where)
            except (UserError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise UserError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        conv = [_convert(inner, v, where) for v in value]
        return tuple(conv) if origin is tuple else conv
    if origin is dict:
        return dict(value)
    if tp is Path:
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; unknown keys are an error."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def replace(cfg: T, **changes: Any) -> T:
    """dataclasses.replace that ignores None values (CLI options left unset keep the config's value)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
