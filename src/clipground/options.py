"""The one option parser: typed dataclass configs from YAML, dicts and ``key=value`` strings.

Method configs (``Grounder.load(**options)``, a saved ``grounder.json``, ``-o key=value`` on
the command line), training recipes (YAML + overrides) and the pretraining config are all
dataclasses, and every value that reaches one goes through :func:`coerce_value` against the
field's annotation: ``relations=no`` becomes ``False``, ``lr=3e-4`` a float,
``views=crop,blur`` a tuple, ``temperature=none`` ``None``. A value that does not fit, or a
key the dataclass does not have, raises :class:`~clipground.errors.ConfigError` naming the
option and what it accepts, before any model is loaded.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NONE_WORDS = ("none", "null", "~", "")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any, key: str = "value") -> Any:
    """Convert ``value`` (from YAML, JSON, Python or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: cannot convert {value!r}")
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and isinstance(a, str) and value.strip() == a):
                return a
            if isinstance(value, bool) and isinstance(a, str) and a == ("yes" if value else "no"):
                return a  # YAML reads a bare `no` as False
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS:
            return True
        if isinstance(value, str) and value.strip().lower() in FALSE_WORDS:
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false (also yes/no, on/off, 1/0), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if out != out:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool):  # YAML reads a bare `no` as False
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp in (Path, os.PathLike):
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            s = value.strip()
            if s[:1] in "[(" and s[-1:] in "])":
                s = s[1:-1]
            value = [v.strip() for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce_value(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        out = [coerce_value(v, elem, key) for v in value]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a mapping such as {{a: 1, b: 2}}, got {value!r}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if len(args) == 2:
            return {coerce_value(k, args[0], key): coerce_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    return value


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (``from __future__ import annotations`` safe)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "", what: str = "config key",
              owner: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, coercing every value and rejecting unknown keys."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    data = dict(data or {})
    hints = field_types(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(prefix + u for u in unknown)}"
                          + (f" for {owner}" if owner else "") + f"; valid: {', '.join(sorted(names))}")
    kwargs = {k: coerce_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (tuples as lists, paths as strings), for YAML/JSON."""
    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


def parse_assignments(items: Sequence[str] | None, what: str = "option") -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}`` (values stay strings; the config coerces them)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{what} {item!r} has an empty key")
        out[key] = raw
    return out


def _find_field(cfg: Any, path: list[str], full: str) -> tuple[Any, str]:
    """Resolve ``a.b.c`` to (object holding c, "c"); a bare key may name a unique nested field."""
    obj = cfg
    for part in path[:-1]:
        if not is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            raise ConfigError(f"unknown config key {full!r}")
        obj = getattr(obj, part)
    last = path[-1]
    if is_dataclass(obj) and last in {f.name for f in fields(obj)}:
        return obj, last
    if len(path) == 1:
        # Convenience: `lr=1e-3` finds `train.lr` when exactly one nested config has it.
        hits = []

        def walk(o: Any) -> None:
            for f in fields(o):
                v = getattr(o, f.name)
                if is_dataclass(v):
                    if last in {g.name for g in fields(v)}:
                        hits.append(v)
                    walk(v)
        walk(cfg)
        if len(hits) == 1:
            return hits[0], last
        if len(hits) > 1:
            raise ConfigError(f"config key {full!r} is ambiguous; qualify it (e.g. section.{last})")
    raise ConfigError(f"unknown config key {full!r}")


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dots for nesting)."""
    cfg = copy.deepcopy(cfg)
    for key, raw in parse_assignments(overrides, "override").items():
        obj, name = _find_field(cfg, key.split("."), key)
        tp = field_types(type(obj))[name]
        raw_val: Any = raw
        if is_dataclass(tp):
            raw_val = yaml.safe_load(raw)
        setattr(obj, name, coerce_value(raw_val, tp, key))
    return cfg


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (``{}`` when empty), with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return loaded


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) over ``defaults``, then apply ``key=value`` overrides.

    ``defaults`` is a nested mapping merged one level deep under the file (a section the file
    sets keeps the defaults it does not mention).
    """
    data: dict[str, Any] = {}
    for k, v in (defaults or {}).items():
        data[k] = dict(v) if isinstance(v, Mapping) else v
    for k, v in (read_yaml(path) if path is not None else {}).items():
        if v is None and isinstance(data.get(k), dict):
            continue  # an empty section keeps its defaults
        if isinstance(v, Mapping) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return apply_overrides(from_dict(cls, data), overrides)


__all__ = [
    "ConfigError",
    "apply_overrides",
    "coerce_value",
    "field_types",
    "from_dict",
    "load_config",
    "parse_assignments",
    "read_yaml",
    "to_dict",
]
