"""Training recipes for trainable grounding methods, registered by method name.

``clipground train --method NAME ...`` builds a :class:`TrainArgs` and calls the recipe
registered for ``NAME``. A recipe trains with the shared harness
(:mod:`clipground.training.trainer`) and saves a directory that
``Grounder.from_pretrained(dir)`` loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UnknownNameError


@dataclass
class TrainArgs:
    """What every recipe receives from the CLI.

    Attributes:
        method: registered method name.
        train: training annotations (any format `clipground eval` reads) or a world dir.
        val: validation annotations (optional).
        images: image root for formats with bare file names.
        backbone: CLIP checkpoint (hub id, directory, or bundled name).
        proposals: proposal source spec (``selective-search``, ``gt:PATH``, ...).
        out: output directory (checkpoints, logs, and the final saved method in ``out/final``).
        config: optional YAML file with the recipe's config.
        overrides: ``key=value`` config overrides.
        resume: continue a killed run from its last checkpoint.
        cache: feature-cache directory (recipes that train from cached features).
    """

    method: str
    train: str
    val: str | None = None
    images: str | None = None
    backbone: str = "clipground/world-clip"
    proposals: str = "selective-search"
    out: str = "runs/train"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    cache: str | None = None


RECIPES: dict[str, Callable[[TrainArgs], Path]] = {}


def register_recipe(method_name: str) -> Callable[[Callable[[TrainArgs], Path]], Callable[[TrainArgs], Path]]:
    """Decorator: register ``fn(args) -> saved_dir`` as the trainer of ``method_name``."""

    def deco(fn: Callable[[TrainArgs], Path]) -> Callable[[TrainArgs], Path]:
        RECIPES[method_name] = fn
        return fn

    return deco


def get_recipe(method_name: str) -> Callable[[TrainArgs], Path]:
    # Import recipe modules lazily so `clipground --help` stays fast.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    if method_name not in RECIPES:
        raise UnknownNameError(f"no training recipe for method {method_name!r}; trainable: {sorted(RECIPES)}")
    return RECIPES[method_name]
