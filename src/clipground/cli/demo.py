"""``clipground demo``: the offline main job on a fresh machine.

Generates a few scenes of the synthetic world, grounds their referring expressions with
the bundled world CLIP and the zero-shot method, and writes annotated PNGs and a JSON of
boxes and scores.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .common import quiet_transformers

BUNDLED = "clipground/world-clip"


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder."),
    scenes: int = typer.Option(4, "--scenes", help="Number of scenes to ground."),
    seed: int = typer.Option(0, "--seed", help="World seed."),
    proposals: str = typer.Option("selective-search", "--proposals", "-p", help="Proposal source (selective-search or gt)."),
    backbone: str = typer.Option(BUNDLED, "--backbone", "-b", help="CLIP checkpoint (default: the bundled world CLIP)."),
) -> None:
    """Ground phrases on generated scenes with the bundled model; write PNGs and JSON."""
    from .. import boxes as B
    from ..data.jsonl import read_jsonl
    from ..data.world import WorldConfig, ensure_world
    from ..grounder import Grounder
    from ..io import save_image, write_json
    from ..viz import draw_prediction

    quiet_transformers()
    console = Console()
    t0 = time.perf_counter()
    world = out / "world"
    cfg = WorldConfig.v1(seed=seed, n_train=0, n_val=0, n_test=max(1, scenes), n_compositional=0)
    ensure_world(world, cfg, progress=False)
    records = read_jsonl(world / "test.jsonl")
    by_image: dict[str, list] = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    spec = f"gt:{world / 'instances_test.json'}" if proposals == "gt" else proposals
    g = Grounder.load("zero-shot", backbone=backbone, proposals=spec)
    t_load = time.perf_counter()

    table = Table(title=f"clipground demo: zero-shot, {backbone}, {proposals} proposals")
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
    write_json(out / "predictions.json", {"backbone": backbone, "method": "zero-shot", "proposals": proposals,
                                          "predictions": results}, sort_keys=False)
    console.print(table)
    console.print(f"{hits}/{len(results)} phrases grounded with IoU >= 0.5 "
                  f"(model load {t_load - t0:.1f} s, total {time.perf_counter() - t0:.1f} s)")
    console.print(f"annotated images (red: prediction, green: truth): {', '.join(str(p) for p in written)}")
    console.print(f"boxes and scores: {out / 'predictions.json'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
