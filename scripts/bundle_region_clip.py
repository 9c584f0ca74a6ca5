#!/usr/bin/env python
"""Bundle a finished ``clipground train --method region-clip`` run as the shipped world checkpoint.

    python scripts/bundle_region_clip.py --run runs/region-clip --out src/clipground/assets/world-region-clip \
        --command "clipground train --method region-clip ..."

The folder is both a region-aware backbone (``region_clip.json``, ``mask_channel.safetensors``,
``adapter/``: ``ClipBackbone.from_pretrained("clipground/world-region-clip")``) and a trained
grounder (``grounder.json``: ``Grounder.from_pretrained("clipground/world-region-clip")``,
``clipground demo --method region-clip``), with ``RECIPE.md`` (command, config, wall time,
validation figures), ``recipe.json`` and the learning curve. The base CLIP is named, not copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

import torch
import yaml

from clipground.backbone.hub import WORLD_REGION_CLIP
from clipground.io import atomic_dir, write_json


def recipe_md(summary: dict, command: str) -> str:
    share = summary["trainable"]
    lines = [
        "# world-region-clip: how this checkpoint was made",
        "",
        "The bundled world CLIP v2 (`clipground/world-clip-v2`, not copied: named in `region_clip.json`) made",
        "region-aware: a zero-initialised mask (alpha) convolution beside its patch embedding and peft LoRA",
        "adapters on its vision attention, trained by `clipground train --method region-clip` with the",
        "region-text contrastive loss on the synthetic world's **train** split (see",
        "`clipground.training.recipes.region_clip`). Load it as a backbone",
        "(`ClipBackbone.from_pretrained(\"clipground/world-region-clip\")`, e.g. `--backbone` with",
        "`-o views=[alpha]`) or as a grounder (`Grounder.from_pretrained(\"clipground/world-region-clip\")`,",
        "`clipground demo --method region-clip`).",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"- trainable parameters: {int(share['trainable']):,} = {100 * share['share_of_vision']:.2f}% of the vision "
        f"tower ({int(share['vision_params']):,}), {100 * share['share_of_model']:.2f}% of the whole CLIP",
        f"- training data: {summary['train']['images']} scenes, {summary['train']['regions']} regions "
        f"({summary['train']['regions_with_phrases']} described, {summary['train']['phrases']} phrases)",
        f"- optimiser steps: {summary['steps']} x {summary['config']['train']['batch_size']} scenes",
        f"- training wall time: {summary['train_seconds'] / 60:.1f} min on {platform.machine()} ({os.cpu_count()} CPU "
        f"threads, torch {torch.__version__}); main-process CPU time {summary['cpu_seconds'] / 60:.1f} min (wall time "
        "grows when other jobs share the CPU)",
        "",
        "## Validation metrics (final)",
        "",
        "The one evaluator on the world's `val` split (a fixed random subset of "
        f"{summary['config']['data']['val_limit'] or 'all'} expressions), the ground-truth "
        "boxes as candidates, the `alpha` view and the relation resolver:",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in sorted(summary["val"].items()):
        lines.append(f"| {k} | {v:.4f} |")
    lines += ["", "## Full config", "", "```yaml", yaml.safe_dump(summary["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the --out of the training run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", required=True, help="the training command, as run")
    args = ap.parse_args(argv)
    final = args.run / "final"
    summary = json.loads((args.run / "final_metrics.json").read_text())
    meta = json.loads((final / "grounder.json").read_text())
    with atomic_dir(args.out) as tmp:
        for f in (final / "backbone").iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_json(tmp / "grounder.json", {**meta, "backbone": WORLD_REGION_CLIP,
                                           "proposals": {"name": "selective-search"}})
        write_json(tmp / "recipe.json", {"command": args.command, **summary})
        (tmp / "RECIPE.md").write_text(recipe_md(summary, args.command), encoding="utf-8")
        curve = args.run / "learning_curve.png"
        if curve.is_file():
            shutil.copy2(curve, tmp / "learning_curve.png")
    print(f"bundled {args.run} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
