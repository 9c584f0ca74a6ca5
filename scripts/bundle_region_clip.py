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
import shutil
from pathlib import Path

from clipground.backbone.hub import WORLD_REGION_CLIP
from clipground.io import atomic_dir, write_json
from clipground.training.recipe_card import recipe_card


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
        meta = {**meta, "backbone": WORLD_REGION_CLIP, "proposals": {"name": "selective-search"}}
        write_json(tmp / "grounder.json", meta)
        write_json(tmp / "recipe.json", {"command": args.command, **summary})
        card = recipe_card(final, summary, args.command, meta)
        card += (f"\nThe folder is also a region-aware backbone: `ClipBackbone.from_pretrained(\"{WORLD_REGION_CLIP}\")` "
                 "(e.g. `--backbone` with `-o views=[alpha]`), on the base CLIP named in `region_clip.json`.\n")
        (tmp / "RECIPE.md").write_text(card, encoding="utf-8")
        curve = args.run / "learning_curve.png"
        if curve.is_file():
            shutil.copy2(curve, tmp / "learning_curve.png")
    print(f"bundled {args.run} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
