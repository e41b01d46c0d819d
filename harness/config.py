"""Typed configuration: dataclasses that refuse unknown keys.

Every trainer and generator takes one of these; `to_dict` is what goes into `runs/<id>/config.json` and
`from_dict(cls, d)` loads it back, failing with a clear message on a key the dataclass does not know (a typo in a
config must never be silently ignored, as it was with the earlier entries' global dict of string keys).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import UserError
from harness.io import read_text

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


# ------------------------------------------------------------------------------------------------ config files
# `--config FILE` reads JSON, TOML or YAML (by extension) and `--print-config --format` writes them; all three hold
# the same JSON data model (mappings, lists, strings, numbers, booleans, null), so a printed file reads back to the
# identical config. TOML has no null: a printed TOML file lists the dotted keys whose value is null under the
# top-level key `null` (null = ["loop.epochs"]), which a hand-written file may use too (e.g. to clear a preset's
# epochs). Omitting a key would not do: a file is merged over the defaults and the preset, so an omitted key takes
# their value, not None.

CONFIG_FORMATS = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}
TOML_NULL_KEY = "null"


def config_format(path: str | Path) -> str:
    fmt = CONFIG_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"config file must end in {', '.join(CONFIG_FORMATS)} (the extension names its format)",
                        path)
    return fmt


def read_config_file(path: str | Path, printed: tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping in a JSON/TOML/YAML config file (format by extension). A parse error is one line naming the file
    and line. `printed`: dotted keys that `--print-config` adds to a config (derived numbers, notes) and that are
    dropped here, so a printed file reads back."""
    path = Path(path)
    fmt = config_format(path)
    data = _parse(read_text(path, "config file"), fmt, path)
    if not isinstance(data, dict):
        raise UserError(f"config file must hold a mapping of option names to values, not a {type(data).__name__}",
                        path)
    if fmt == "toml":
        data = _toml_restore_nulls(data, path)
    grid = data.get("sweep", {}).get("grid") if isinstance(data.get("sweep"), dict) else None
    if "sweep" in printed and isinstance(grid, dict):
        # A sweep's --print-config shows each swept field as null (every cell sets its own): not a value to read.
        for dotted in grid:
            *parents, leaf = str(dotted).split(".")
            d = data
            for p in parents:
                d = d.get(p) if isinstance(d, dict) else None
            if isinstance(d, dict) and leaf in d and d[leaf] is None:
                del d[leaf]
    for dotted in printed:
        *parents, leaf = dotted.split(".")
        d: Any = data
        for p in parents:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(leaf, None)
    return data


def _parse(text: str, fmt: str, path: Path) -> Any:
    import json

    if fmt == "json":
        def no_duplicates(pairs: list) -> dict:  # json keeps the last of two equal keys; a config must not
            keys = [k for k, _ in pairs]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise UserError(f"key {dup!r} is given twice in one object", path)
            return dict(pairs)

        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", path, e.lineno) from None
    if fmt == "toml":
        import re
        import sys

        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - the tomli backport (pyproject) on 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e)
            m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
            line = getattr(e, "lineno", None) or (int(m.group(1)) if m else None)
            msg = re.sub(r"\s*\(at line \d+, column (\d+)\)", r" (column \1)", msg)
            raise UserError(f"not valid TOML: {msg}", path, line) from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_classes()[0])  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = ", ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise UserError(f"not valid YAML: {' '.join(what.split())}" + (f" (column {mark.column + 1})" if mark else ""),
                        path, mark.line + 1 if mark else None) from None


def _toml_restore_nulls(data: dict, path: Path) -> dict:
    nulls = data.pop(TOML_NULL_KEY, [])
    if not isinstance(nulls, list) or not all(isinstance(k, str) for k in nulls):
        raise UserError(f"`{TOML_NULL_KEY}` must be a list of dotted keys whose value is null, e.g. "
                        f'{TOML_NULL_KEY} = ["loop.epochs"]', path)
    for dotted in nulls:
        *parents, leaf = dotted.split(".")
        d = data
        for p in parents:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UserError(f"`{TOML_NULL_KEY}` lists {dotted!r}, but {p!r} is not a table", path)
        if leaf in d:
            raise UserError(f"`{TOML_NULL_KEY}` lists {dotted!r}, which the file also sets", path)
        d[leaf] = None
    return data


def dump_config(data: dict[str, Any], fmt: str = "json") -> str:
    """`data` (a resolved config, paths as strings) as a JSON, TOML or YAML document that `read_config_file` reads
    back to an equal mapping."""
    import json

    plain = json.loads(json.dumps(data, default=str))  # the one data model every format holds (paths -> str)
    if fmt == "json":
        return json.dumps(plain, indent=2)
    if fmt == "toml":
        import tomli_w

        if TOML_NULL_KEY in plain:
            raise UserError(f"cannot write TOML: the config has a key named {TOML_NULL_KEY!r}, which TOML files use "
                            "for the null keys; use --format json or yaml")
        nulls: list[str] = []
        body = _toml_strip_nulls(plain, (), nulls)
        header = (f"# TOML has no null: the keys listed in `{TOML_NULL_KEY}` are null (None).\n"
                  if nulls else "")
        return header + tomli_w.dumps({TOML_NULL_KEY: nulls, **body} if nulls else body)
    if fmt == "yaml":
        import yaml

        return yaml.dump(plain, Dumper=_yaml_classes()[1], sort_keys=False, allow_unicode=True, default_flow_style=False,
                         width=1000)
    raise UserError(f"unknown config format {fmt!r}; choose json, toml or yaml")


def _toml_strip_nulls(d: dict, path: tuple[str, ...], nulls: list[str]) -> dict:
    out = {}
    for k, v in d.items():
        where = (*path, k)
        if v is None:
            if any("." in part for part in where):  # a dotted name could not be told apart from nesting
                raise UserError(f"cannot write TOML: the null key {'.'.join(where)!r} has a dot in a name; use "
                                "--format json or yaml")
            nulls.append(".".join(where))
        elif isinstance(v, dict):
            out[k] = _toml_strip_nulls(v, where, nulls)
        else:
            if isinstance(v, list) and _has_none(v):
                raise UserError(f"cannot write TOML: {'.'.join(where)} is a list holding null; use --format json "
                                "or yaml")
            out[k] = v
    return out


def _has_none(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, list):
        return any(_has_none(x) for x in v)
    if isinstance(v, dict):
        return any(_has_none(x) for x in v.values())
    return False


@functools.lru_cache(maxsize=1)
def _yaml_classes():
    """A SafeLoader that reads scalars as YAML 1.2 (JSON) does: only true/false are booleans (YAML 1.1 also makes
    yes/no/on/off booleans, so `mixed_precision: no` would not be the string "no"), 1e-4 is a float (1.1 wants a
    dot), dates stay strings. The dumper quotes any string either reading would turn into something else."""
    import re

    import yaml

    bool_tag, float_tag, ts_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"
    bool_re = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    float_re = re.compile(r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
                          r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # YAML keeps the last of two equal keys; a config must not
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag not in (bool_tag, float_tag, ts_tag)]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, bool_re, list("tTfF"))
    Loader.add_implicit_resolver(float_tag, float_re, list("-+0123456789."))

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.yaml_implicit_resolvers = {ch: list(rs) for ch, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    Dumper.add_implicit_resolver(bool_tag, bool_re, list("tTfF"))
    Dumper.add_implicit_resolver(float_tag, float_re, list("-+0123456789."))
    return Loader, Dumper

