"""``clipground demo``: the offline main job on a fresh machine.

Generates a few scenes of the synthetic world, grounds their referring expressions with a
method (``--method``, default zero-shot) on the bundled world models, and writes annotated
PNGs and a JSON of boxes and scores. A trained method runs from the world checkpoint shipped
with the package (``clipground/world-<method>``) or from any ``--checkpoint`` directory.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..backbone.hub import WORLD_CLIP
from .common import quiet_transformers


def demo_grounder(method: str, backbone: str, proposals: str | None, checkpoint: str | None) -> tuple[Any, str]:
    """The grounder the demo runs and where it came from: a saved directory, the bundled trained
    world checkpoint of a trainable method, or a training-free method on ``backbone``."""
    from ..grounder import Grounder, trained_source

    source = checkpoint or trained_source(method, backbone)
    if source is None:  # training-free
        return Grounder.load(method, backbone=backbone, proposals=proposals or "selective-search"), backbone
    return Grounder.from_pretrained(source, proposals=proposals), source


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder."),
    method: str = typer.Option("proposal-attention", "--method", "-m",
                               help="Registered method (see `clipground methods`); trained ones run from their "
                               "bundled world checkpoint (default: the best one without ground-truth boxes)."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="A saved grounder directory to run instead."),
    scenes: int = typer.Option(4, "--scenes", help="Number of scenes to ground."),
    seed: int = typer.Option(0, "--seed", help="World seed."),
    proposals: str | None = typer.Option(None, "--proposals", "-p", help="Proposal source (selective-search or gt; "
                                         "default: selective-search, or what a trained method was trained with)."),
    backbone: str = typer.Option(WORLD_CLIP, "--backbone", "-b", help="CLIP checkpoint (default: the bundled world CLIP)."),
) -> None:
    """Ground phrases on generated scenes with the bundled model; write PNGs and JSON."""
    from .. import boxes as B
    from ..data.jsonl import read_jsonl
    from ..data.world import WorldConfig, ensure_world
    from ..io import save_image, write_json
    from ..viz import draw_prediction

    quiet_transformers()
    console = Console()
    t0 = time.perf_counter()
    world = out / "world"
    cfg = WorldConfig(seed=seed, n_train=0, n_val=0, n_test=max(1, scenes), n_compositional=0, n_new_look=0)
    ensure_world(world, cfg, progress=False)
    records = read_jsonl(world / "test.jsonl")
    by_image: dict[str, list] = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    spec = f"gt:{world / 'instances_test.json'}" if proposals == "gt" else proposals
    g, source = demo_grounder(method, backbone, spec, checkpoint)
    t_load = time.perf_counter()
    name = g.method.name
    used = "no" if g.proposals is None else (proposals or getattr(g.proposals, "name", "default"))
    table = Table(title=f"clipground demo: {name}, {source}, {used} proposals")
    for col in ("scene", "phrase", "box (x1, y1, x2, y2)", "score", "IoU with truth"):
        table.add_column(col)
    results, written, hits = [], [], 0
    for image, recs in list(by_image.items())[:scenes]:
        g.set_image(image)
        preds = g.predict_batch([r.expression for r in recs])
        zoom = 3  # scenes are small: draw on an enlarged copy so labels stay readable
        canvas = g.state.image.resize((g.state.size[0] * zoom, g.state.size[1] * zoom))
        for r, p in zip(recs, preds):
            iou = float(B.paired_iou([p.box], [r.box])[0])
            hits += iou >= 0.5
            canvas = draw_prediction(canvas, [v * zoom for v in p.box], p.phrase, gt_box=[v * zoom for v in r.box])
            table.add_row(Path(image).stem, p.phrase, ", ".join(f"{v:.0f}" for v in p.box), f"{p.score:.3f}", f"{iou:.2f}")
            results.append({"image": image, **p.to_dict(top_k=3), "target": r.box, "iou": round(iou, 4), "type": r.meta.get("type")})
        png = out / f"scene_{Path(image).stem}.png"
        save_image(canvas, png)
        written.append(png)
    write_json(out / "predictions.json", {"backbone": g.method.backbone.name, "method": name, "checkpoint": source,
                                          "proposals": used, "predictions": results}, sort_keys=False)
    console.print(table)
    console.print(f"{hits}/{len(results)} phrases grounded with IoU >= 0.5 "
                  f"(model load {t_load - t0:.1f} s, total {time.perf_counter() - t0:.1f} s)")
    console.print(f"annotated images (red: prediction, green: truth): {', '.join(str(p) for p in written)}")
    console.print(f"boxes and scores: {out / 'predictions.json'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
