#!/usr/bin/env python
"""How well do a CLIP's own patch tokens point at the phrase's object? (dense-method diagnostic)

For attribute expressions of a world split, takes the argmax over the patch grid of the
cosine between each projected patch token and the phrase embedding, and counts how often
that patch cell touches the target box; prints the rate next to the rate of a patch drawn
uniformly at random, for the plain grid and for the tiled grid the dense methods can use.

    python scripts/patch_text_probe.py [--world runs/world] [--split val] [--n 150] [--backbone clipground/world-clip]
        [--windows 8] [--input-size 256]

With ``--input-size S`` it also probes the grid of the whole image encoded at ``S`` px with
interpolated position embeddings (the dense methods' ``input_size`` option), for both
``dense`` choices: the last layer's patch tokens (``final``) and the MaskCLIP-style value path
(``value``).

With ``--windows G`` it also scores a ``G x G`` grid of overlapping windows (each twice a
cell's side, centred on the cell) by their *pooled* CLIP embedding, the representation the
checkpoint was trained to align with text: what a dense method could read instead.

The dense methods (fusion-regressor, locator, heatmap-segment) read these patch tokens; a
rate near chance says the checkpoint was not trained to make them text-aligned (the bundled
world CLIP was pretrained on pooled region embeddings only).
"""

from __future__ import annotations

import argparse

from clipground.backbone import ClipBackbone
from clipground.backbone.features import DenseView
from clipground.data.loaders import load_records
from clipground.evaluation.probes import patch_hits
from clipground.images import load_image


def cell_touches(box: list[float], i: int, j: int, gh: int, gw: int, side: float) -> bool:
    """Whether grid cell ``(i, j)`` of a ``gh x gw`` grid over the padded ``side``-px square overlaps ``box``."""
    cw, ch = side / gw, side / gh
    return j * cw < box[2] and (j + 1) * cw > box[0] and i * ch < box[3] and (i + 1) * ch > box[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="runs/world")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--backbone", default="clipground/world-clip")
    ap.add_argument("--tiles", default="1,2")
    ap.add_argument("--windows", type=int, default=0, help="also probe a G x G grid of pooled window embeddings")
    ap.add_argument("--input-size", type=int, default=0, help="also probe the whole image encoded at this side")
    args = ap.parse_args()
    bb = ClipBackbone.from_pretrained(args.backbone)
    recs = [r for r in load_records(f"{args.world}/{args.split}.jsonl").records
            if r.meta.get("type") == "attribute"][: args.n]
    views = {f"tiles={t}": {"tiles": int(t)} for t in args.tiles.split(",")}
    if args.input_size:
        for dense in ("final", "value"):
            views[f"input_size={args.input_size}, dense={dense}"] = {"input_size": args.input_size, "dense": dense}
    res = {t: patch_hits(bb, recs, DenseView(**view)) for t, view in views.items()}
    win_hits, win_chance = 0, 0.0
    for r in recs if args.windows else []:
        im = load_image(r.image)
        side = float(max(im.size))
        g = args.windows
        cell = side / g
        crops = [im.crop((round((j + 0.5) * cell - cell), round((i + 0.5) * cell - cell),
                          round((j + 0.5) * cell + cell), round((i + 0.5) * cell + cell)))
                 for i in range(g) for j in range(g)]
        k = int((bb.encode_images(crops).embeds.float() @ bb.text_embeds([r.expression])[0].float()).argmax())
        win_hits += cell_touches(r.box, k // g, k % g, g, g, side)
        win_chance += sum(cell_touches(r.box, i, j, g, g, side) for i in range(g) for j in range(g)) / (g * g)
    n = max(len(recs), 1)
    print(f"{args.backbone}: {n} attribute expressions of {args.world}/{args.split}")
    for t, r in res.items():
        print(f"{t}: argmax patch touches the target {r['patch_hit']:.1%} (a random patch: {r['chance']:.1%})")
    if args.windows:
        print(f"windows {args.windows}x{args.windows}: argmax window touches the target {win_hits / n:.1%} "
              f"(a random window: {win_chance / n:.1%})")


if __name__ == "__main__":
    main()
