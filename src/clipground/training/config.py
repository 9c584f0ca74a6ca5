"""Training configuration: dataclasses loaded from YAML, overridden by ``key=value`` strings.

Every trainable method shares :class:`TrainConfig`; a method nests it (and its own
dataclasses) in a bigger config dataclass. :func:`load_config` reads a YAML file into such a
dataclass and then applies command-line overrides such as ``lr=3e-4`` or ``train.lr=3e-4``,
each value coerced to the declared field type, so a typo or a bad value fails loudly with
a one-line :class:`~clipground.errors.ClipgroundError` instead of training with a wrong
setting.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ClipgroundError


class ConfigError(ClipgroundError):
    """A configuration file or override is malformed (unknown key, bad value, bad type)."""


MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16", "auto")


@dataclass
class TrainConfig:
    """Settings shared by every training run (optimiser, schedule, logging, checkpoints).

    ``max_steps > 0`` fixes the number of optimiser steps; otherwise ``epochs`` full passes
    over the training set are made. ``batch_size`` is per process. ``mixed_precision`` is
    ``no``, ``bf16``, ``fp16`` or ``auto`` (bf16 on a GPU that supports it, else ``no``).
    ``save_every``/``eval_every``/``log_every`` count optimiser steps (0 disables; a final
    checkpoint and evaluation are always made).
    """

    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant | linear
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    keep_last: int = 2
    num_workers: int = 0
    drop_last: bool = True
    progress: bool = True


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any, key: str = "value") -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
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
    if is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML reads a bare `no` as False
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("[") or s.startswith("("):
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
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid: {', '.join(sorted(names))}")
    kwargs = {k: coerce_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (tuples as lists), e.g. for YAML/JSON."""
    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


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
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {ov!r} has an empty key")
        obj, name = _find_field(cfg, key.split("."), key)
        tp = _hints(type(obj))[name]
        raw_val: Any = raw
        if is_dataclass(tp) or typing.get_origin(tp) in (dict, Mapping):
            raw_val = yaml.safe_load(raw)
        setattr(obj, name, coerce_value(raw_val, tp, key))
    return cfg


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (optional), then apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides)


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject values that cannot work (checked before any heavy work starts)."""
    if cfg.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                          f"got {cfg.mixed_precision!r}")
    if cfg.lr_schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"lr_schedule must be cosine, constant or linear, got {cfg.lr_schedule!r}")
    for name in ("batch_size", "grad_accum_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("set max_steps > 0 or epochs > 0")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")


__all__ = [
    "ConfigError", "TrainConfig", "apply_overrides", "coerce_value", "from_dict", "load_config",
    "to_dict", "validate_train_config",
]
