"""RECIPE.md beside every trained method: the command that made it, its config, cost and validation.

A saved grounder directory (``OUT/final``) is what users load and what the package bundles as
``clipground/world-<method>``; the card travels with it, so a shipped checkpoint always says how
to re-create it and what it scored on validation when it was trained.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write


def command_line(args: Any) -> str:
    """The ``clipground train`` command equivalent to a :class:`~clipground.training.recipes.TrainArgs`."""
    parts = ["clipground", "train", "--method", args.method, "--train", str(args.train)]
    for flag, value in (("--val", args.val), ("--images", args.images), ("--backbone", args.backbone),
                        ("--proposals", args.proposals), ("--out", args.out), ("--cache", args.cache),
                        ("--config", args.config)):
        if value:
            parts += [flag, str(value)]
    parts += [str(o) for o in args.overrides]
    return " ".join(shlex.quote(p) for p in parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def recipe_card(final: Path, summary: dict[str, Any], command: str, meta: dict[str, Any] | None = None) -> str:
    """The RECIPE.md text of a saved grounder directory ``final`` trained by ``command`` (``meta``:
    its ``grounder.json`` as shipped, when a bundling step rewrote it)."""
    meta = meta or json.loads((final / "grounder.json").read_text(encoding="utf-8"))
    seconds = summary.get("train_seconds", summary.get("wall_time_s"))
    steps = summary.get("steps", summary.get("step"))
    val = summary.get("val") or {}
    lines = [
        f"# {meta['method']}, trained by clipground",
        "",
        f"Load with `Grounder.from_pretrained(DIR)` (bundled copies: `clipground/world-{meta['method']}`). "
        f"Backbone `{meta['backbone']}`"
        + (f", proposals `{meta['proposals'].get('name', meta['proposals'])}`" if meta.get("proposals") else "") + ".",
        "",
        "## Command",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Steps: {steps}; training time: {_fmt(round(float(seconds) / 60, 1)) + ' min' if seconds is not None else '-'}"
        + (f"; feature cache built in {_fmt(round(float(summary['cache_seconds']) / 60, 1))} min"
           if summary.get("cache_seconds") else "") + " (this machine's CPU when it was trained).",
        "",
    ]
    facts = {k: v for k, v in (summary.get("train") or {}).items() if isinstance(v, (int, float, str))}
    facts.update({f"trainable {k}": v for k, v in (summary.get("trainable") or {}).items()
                  if isinstance(v, (int, float))})
    if facts:
        lines += ["## Training data", ""] + [f"- {k}: {_fmt(v)}" for k, v in facts.items()] + [""]
    lines += [
        "## Validation at the end of training",
        "",
    ]
    if val:
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(val.items())
                                                           if isinstance(v, (int, float))]
    else:
        lines.append("No validation split was given.")
    train_cfg = final.parent / "train_config.yaml"
    lines += ["", "## Method config", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```"]
    if train_cfg.is_file():
        lines += ["", "## Training config", "", "```yaml", train_cfg.read_text(encoding="utf-8").rstrip(), "```"]
    if any((d / "learning_curve.png").is_file() for d in (final, final.parent)):  # write_recipe_card copies it in
        lines += ["", "![learning curve](learning_curve.png)"]
    return "\n".join(lines) + "\n"


def write_recipe_card(final: str | Path, summary: dict[str, Any], command: str) -> Path:
    """Copy the run's learning curve into ``final`` and write its ``RECIPE.md``."""
    final = Path(final)
    curve = final.parent / "learning_curve.png"
    if curve.is_file():
        atomic_write(final / "learning_curve.png", curve.read_bytes())
    return atomic_write(final / "RECIPE.md", recipe_card(final, summary, command))
