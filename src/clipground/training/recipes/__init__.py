"""Training recipes: one config schema, one YAML reader, one way to find a method's recipe.

``clipground train --method NAME ...`` builds a :class:`TrainArgs` and calls the ``train``
function of the recipe module the method class names (``GroundingMethod.recipe``, e.g.
``"regression"`` for :mod:`clipground.training.recipes.regression`), so a method is
trainable exactly when it has a recipe. A recipe trains with the shared harness
(:mod:`clipground.training.trainer`), validates with the one evaluator
(:func:`clipground.evaluation.evaluate`) and saves a directory that
``Grounder.from_pretrained(dir)`` loads.

Every recipe's config is a :class:`RecipeConfig`: sections ``train``
(:class:`~clipground.training.TrainConfig`), ``model`` (the method's own config), ``data``
(which records, and how they become samples), ``loss`` (loss weights) and, for recipes that
train from a feature cache, ``cache``; read from YAML and ``key=value`` overrides by
:func:`load_recipe_config`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ...backbone.hub import WORLD_CLIP
from ...errors import BadAnnotationError, ConfigError, UnknownNameError
from ...options import load_config
from ..config import TrainConfig, validate_train_config

T = TypeVar("T")


# --------------------------------------------------------------------------- the schema


@dataclass
class DataConfig:
    """Which records a recipe uses.

    Attributes:
        limit: train on at most this many records (0: all), a fixed random subset.
        val_limit: validate on at most this many records (0: all), a fixed random subset.
    """

    limit: int = 0
    val_limit: int = 0


@dataclass
class LossConfig:
    """Loss weights (a recipe with its own loss terms subclasses it)."""


@dataclass
class CacheOptions:
    """Feature-cache options (the features themselves follow from the model config).

    Attributes:
        shard_size: images per cache shard (the unit of resumption).
        rebuild: rebuild a cache whose fingerprint differs instead of failing.
    """

    shard_size: int = 64
    rebuild: bool = False


@dataclass
class RecipeConfig:
    """The sections every recipe config has; recipes subclass it with their own types."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class CachedRecipeConfig(RecipeConfig):
    """A recipe that trains from a feature cache: the schema plus the ``cache`` section."""

    cache: CacheOptions = field(default_factory=CacheOptions)


def load_recipe_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = (),
                       train_defaults: Mapping[str, Any] | None = None) -> T:
    """Read a recipe config (YAML file, then ``key=value`` overrides) and check its train section.

    ``train_defaults`` are a method's own training defaults, under whatever the file sets.
    """
    cfg = load_config(cls, path, overrides, defaults={"train": dict(train_defaults or {})})
    validate_train_config(cfg.train)  # type: ignore[attr-defined]
    return cfg


# --------------------------------------------------------------------------- what a recipe gets


@dataclass
class TrainArgs:
    """What every recipe receives from the CLI.

    Attributes:
        method: registered method name.
        train: training annotations (any format `clipground eval` reads) or a world dir.
        val: validation annotations (optional; a world dir's own ``val.jsonl`` by default).
        images: image root for formats with bare file names.
        backbone: CLIP checkpoint (hub id, directory, or bundled name).
        proposals: proposal source spec (``selective-search``, ``gt:PATH``, ...).
        out: output directory (checkpoints, logs, and the final saved method in ``out/final``).
        config: optional YAML file with the recipe's config.
        overrides: ``key=value`` config overrides.
        resume: continue a killed run from its last checkpoint.
        cache: feature-cache directory (default ``OUT/cache``), holding ``train/`` and ``val/``.
    """

    method: str
    train: str
    val: str | None = None
    images: str | None = None
    backbone: str = WORLD_CLIP
    proposals: str = "selective-search"
    out: str = "runs/train"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    cache: str | None = None

    @property
    def cache_root(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "cache"


def get_recipe(method_name: str) -> Callable[[TrainArgs], Path]:
    """The ``train(args)`` function of the recipe the method class names."""
    from ...methods import get_method_class

    mcls = get_method_class(method_name)
    if mcls.recipe is None:
        from ...methods import METHODS

        trainable = sorted(n for n, c in METHODS.items() if c.recipe)
        raise UnknownNameError(f"method {method_name!r} is training-free; trainable methods: {', '.join(trainable)}")
    return importlib.import_module(f"{__name__}.{mcls.recipe}").train


# --------------------------------------------------------------------------- shared steps


def start_run(cfg: RecipeConfig, args: TrainArgs) -> None:
    """Put the run in ``--out`` and apply the CPU thread setting, before any heavy work."""
    cfg.train.output_dir = str(args.out)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)


def load_backbone(args: TrainArgs) -> Any:
    """The recipe's backbone (on the GPU when one is available)."""
    from ...backbone import ClipBackbone

    return ClipBackbone.from_pretrained(args.backbone, device="cuda" if torch.cuda.is_available() else "cpu")


def subset(records: list[Any], limit: int, seed: int = 0) -> list[Any]:
    """A fixed random subset of at most ``limit`` records, in their original order (0: all)."""
    if limit <= 0 or len(records) <= limit:
        return records
    keep = sorted(np.random.default_rng(seed).choice(len(records), size=limit, replace=False).tolist())
    return [records[i] for i in keep]


def split_paths(args: TrainArgs) -> tuple[Path, Path | None]:
    """The train and val annotation files: a world/dataset folder stands for its ``train.jsonl``
    and ``val.jsonl``; ``--val`` overrides the latter."""
    train = Path(args.train)
    val = Path(args.val) if args.val else None
    if train.is_dir() and (train / "train.jsonl").is_file():
        if val is None and (train / "val.jsonl").is_file():
            val = train / "val.jsonl"
        train = train / "train.jsonl"
    return train, val


def load_split(path: Path, images: str | None, limit: int, seed: int, what: str) -> list[Any]:
    """Records of one split whose images exist (what was dropped is printed), limited to a subset."""
    from ...data.loaders import load_records

    res = load_records(path, images=images)
    print(f"{what} data {path}: {res.summary()}", flush=True)
    if not res.records:
        raise BadAnnotationError(f"no usable {what} records in {path} ({res.summary()})")
    return subset(res.records, limit, seed)


def check_batch(n: int, cfg: TrainConfig, what: str = "training samples") -> None:
    """Refuse a training set smaller than one batch before any heavy work (with the fix to make)."""
    if n == 0:
        raise ConfigError(f"no {what}: nothing to train on")
    if n < cfg.batch_size and cfg.drop_last:
        raise ConfigError(f"only {n} {what} for batch_size {cfg.batch_size}; lower it "
                          f"(e.g. train.batch_size={n}) or set train.drop_last=false")


def build_split_caches(args: TrainArgs, cfg: CachedRecipeConfig, backbone: Any, spec: Any,
                       splits: Mapping[str, Sequence[Any]], proposals: Callable[[str], Any] | None = None
                       ) -> dict[str, Any]:
    """Build (or resume, or reuse) one feature cache per split under ``--cache`` (default
    ``OUT/cache``): ``DIR/train``, ``DIR/val``. ``proposals(split)`` gives a regions cache its
    proposal source; a split without records gets ``None``."""
    from ...cache import FeatureCache

    out: dict[str, Any] = {}
    for split, recs in splits.items():
        if not recs:
            out[split] = None
            continue
        print(f"feature cache ({split}): {args.cache_root / split}", flush=True)
        out[split] = FeatureCache.build(args.cache_root / split, recs, backbone,
                                        proposals(split) if proposals is not None else None, spec,
                                        rebuild=cfg.cache.rebuild, progress=cfg.train.progress)
    return out


def save_final(grounder: Any, out: str | os.PathLike, summary: dict[str, Any], args: TrainArgs | None = None) -> Path:
    """Save the trained grounder to ``out/final``, the run's summary to ``out/final_metrics.json``
    and, given the run's ``args``, its ``RECIPE.md`` (command, config, cost, validation) in ``final``."""
    from ...io import write_json
    from ..recipe_card import command_line, write_recipe_card

    final = Path(out) / "final"
    grounder.save_pretrained(final)
    summary = json.loads(json.dumps(summary, default=float))
    if args is not None:
        summary["command"] = command_line(args)
    write_json(Path(out) / "final_metrics.json", summary)
    if args is not None:
        write_recipe_card(final, summary, summary["command"])
    return final


__all__ = [
    "CacheOptions",
    "CachedRecipeConfig",
    "build_split_caches",
    "DataConfig",
    "LossConfig",
    "RecipeConfig",
    "TrainArgs",
    "check_batch",
    "get_recipe",
    "load_backbone",
    "load_recipe_config",
    "load_split",
    "save_final",
    "split_paths",
    "start_run",
    "subset",
]
