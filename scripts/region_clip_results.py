#!/usr/bin/env python
"""Region-aware CLIP in the synthetic world: region retrieval, grounding, cluttered scenes, cost.

    python scripts/region_clip_results.py [--world runs/world-v2] [--region clipground/world-region-clip]
        [--base clipground/world-clip-v2] [--out results/region-clip] [--limit N] [--skip-grounding]

On the world's ``test`` split:

(a) **Region retrieval**: for every expression, its region among all the objects of its scene
    (top-1 of the view embedding's cosine with the phrase; no relation rules): plain CLIP's
    ``crop``, ``blur`` and red ``circle`` views (and crop+blur), FGVP's blur outside the object's
    real mask, and the region-aware CLIP's ``alpha`` view with the box as mask and with the real mask.
(b) **Grounding Acc@0.5** with :func:`clipground.evaluation.evaluate` (the relation resolver on,
    as ``zero-shot`` runs it): plain CLIP crop+blur against the region-aware CLIP's ``alpha`` view
    (also without the resolver, and with world-SAM segments of the proposals as masks), with the
    ground-truth boxes and with selective-search proposals; FGVP (crop + blur outside the world-SAM
    segment) on the plain CLIP.
(c) the same on **cluttered scenes** only (>= 6 objects), by expression type.
(d) **cost**: ``set_image`` of a test scene with K=32 boxes, crop+blur (two forwards per box) vs
    ``alpha`` (one forward per (image, mask) pair), median of repeated runs.

Writes ``OUT/region_clip_results.json``, ``OUT/region_clip_results.md`` and the figure
``OUT/region_retrieval.png`` (retrieval top-1 by expression type, all scenes and cluttered).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from clipground.backbone import ClipBackbone
from clipground.backbone.alpha import box_masks
from clipground.backbone.features import view_embeddings
from clipground.backbone.hub import WORLD_CLIP, WORLD_REGION_CLIP
from clipground.data.jsonl import read_jsonl
from clipground.data.world import TYPES, ensure_world, rle_decode
from clipground.evaluation import evaluate
from clipground.grounder import Grounder
from clipground.images import load_image
from clipground.io import save_figure, write_json, atomic_write

CLUTTER = 6
RETRIEVAL_VIEWS = [  # (label, which backbone, views, masks)
    ("crop (plain CLIP)", "base", ("crop",), "box"),
    ("blur (plain CLIP)", "base", ("blur",), "box"),
    ("red circle (plain CLIP)", "base", ("circle",), "box"),
    ("crop+blur (plain CLIP)", "base", ("crop", "blur"), "box"),
    ("FGVP blur outside the object mask (plain CLIP)", "base", ("fgvp",), "segment"),
    ("alpha, box mask (region-aware CLIP)", "region", ("alpha",), "box"),
    ("alpha, object mask (region-aware CLIP)", "region", ("alpha",), "segment"),
]
BASELINES = ("crop (plain CLIP)", "blur (plain CLIP)", "red circle (plain CLIP)")


def scene_objects(world: Path, split: str) -> dict[str, tuple[torch.Tensor, list[Any]]]:
    """Per image id: the objects' ``xyxy`` boxes and RLE masks, in target order."""
    coco = json.loads((world / f"instances_{split}.json").read_text(encoding="utf-8"))
    out: dict[str, tuple[list[list[float]], list[Any]]] = {str(im["id"]): ([], []) for im in coco["images"]}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        x, y, w, h = a["bbox"]
        out[str(a["image_id"])][0].append([x, y, x + w, y + h])
        out[str(a["image_id"])][1].append(a["segmentation"])
    return {k: (torch.tensor(b, dtype=torch.float32).reshape(-1, 4), s) for k, (b, s) in out.items()}


def rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def breakdown(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Overall and per-type rate of ``row[key]`` (a bool), on all rows and on cluttered scenes."""
    out: dict[str, Any] = {}
    for scope, sel in (("all", rows), ("cluttered", [r for r in rows if r["objects"] >= CLUTTER])):
        d = {"count": len(sel), "top1" if key == "hit" else "acc@0.5": rate([r[key] for r in sel])}
        d["by_type"] = {t: rate([r[key] for r in sel if r["type"] == t]) for t in TYPES}
        out[scope] = d
    return out


def region_retrieval(world: Path, records: list[Any], objects: dict, backbones: dict[str, ClipBackbone]
                     ) -> dict[str, Any]:
    """(a): top-1 of each view among the scene's objects, per record."""
    from tqdm import tqdm

    by_image: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in RETRIEVAL_VIEWS}
    texts = {name: {} for name in backbones}
    for image, recs in tqdm(by_image.items(), desc="region retrieval", dynamic_ncols=True):
        img = load_image(image)
        boxes, rles = objects[recs[0].image_id]
        segs = torch.stack([torch.from_numpy(rle_decode(s).astype(bool)) for s in rles])
        cache: dict[tuple, torch.Tensor] = {}
        for label, which, views, masks in RETRIEVAL_VIEWS:
            bb = backbones[which]
            for v in views:  # each single view encoded once per image, combinations stack them
                if (which, v, masks) not in cache:
                    cache[(which, v, masks)] = view_embeddings(bb, img, boxes, (v,),
                                                               masks=segs if masks == "segment" else None)[0]
            emb = torch.stack([cache[(which, v, masks)] for v in views])  # (V, K, D)
            missing = [r.expression for r in recs if r.expression not in texts[which]]
            if missing:
                for t, e in zip(missing, bb.text_embeds(missing)):
                    texts[which][t] = e
            for r in recs:
                sims = torch.einsum("vkd,d->k", emb, texts[which][r.expression]) / emb.shape[0]
                rows[label].append({"hit": int(sims.argmax()) == int(r.meta["target"]), "type": r.meta.get("type"),
                                    "objects": len(boxes)})
    return {label: breakdown(rs, "hit") for label, rs in rows.items()}


def selective_search_table(records: list[Any], path: Path) -> dict[str, list[list[float]]]:
    """Selective-search boxes of every test image, computed once and kept in ``path`` (the runs below share them)."""
    from tqdm import tqdm

    from clipground.proposals import get_proposals

    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    ss = get_proposals("selective-search")
    table = {}
    for image in tqdm(sorted({r.image for r in records}), desc="selective search", dynamic_ncols=True):
        table[image] = ss(load_image(image), image).boxes.tolist()
    write_json(path, table)
    return table


def grounding(objects: dict, runs: list[tuple[list[Any], str, Any, list[tuple[str, dict[str, Any]]]]]
              ) -> dict[str, Any]:
    """(b), (c): Acc@0.5 through the one evaluator, overall and on cluttered scenes. Each run is
    ``(records, proposals name, make_grounder(**options), [(label, scoring options)])``: the images are
    encoded once per run and every label scores the same image states (e.g. with and without the resolver)."""
    out: dict[str, Any] = {}
    for records, pname, make, labels in runs:
        n_obj = {r.image: len(objects[r.image_id][0]) for r in records}
        t0 = time.perf_counter()
        states: dict[str, Any] = {}
        for label, opts in labels:
            g = make(**opts)
            if not states:
                images = sorted({r.image for r in records})
                for i in range(0, len(images), 16):
                    for im, st in zip(images[i : i + 16], g.image_states(images[i : i + 16])):
                        states[im] = st
            res = evaluate(g, records, progress=False, examples=0, label=label, states=states.__getitem__)
            rows = [{"iou_hit": it.iou >= 0.5, "type": it.type, "objects": n_obj[it.image]} for it in res.items]
            name = f"{label} ({pname})"
            out[name] = breakdown(rows, "iou_hit")
            out[name]["mean_proposals"] = res.metrics.get("mean_proposals")
            out[name]["records"] = len(records)
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: acc@0.5 {out[name]['all']['acc@0.5']:.3f}, cluttered {out[name]['cluttered']['acc@0.5']:.3f}"
                  f" ({out[name]['seconds']} s)", flush=True)
    return out


def cost(world: Path, records: list[Any], objects: dict, backbones: dict[str, ClipBackbone], reps: int = 5
         ) -> dict[str, Any]:
    """(d): ``set_image`` of one test scene with K=32 boxes (its objects, then shifted copies), crop+blur vs alpha."""
    from clipground.proposals.files import PrecomputedProposals

    r = records[0]
    img = load_image(r.image)
    w, h = img.size
    boxes = objects[r.image_id][0].tolist()
    g = torch.Generator().manual_seed(0)
    while len(boxes) < 32:
        b = boxes[len(boxes) % len(objects[r.image_id][0])]
        d = (torch.rand(4, generator=g) - 0.5) * 12
        boxes.append([max(0.0, b[0] + d[0].item()), max(0.0, b[1] + d[1].item()),
                      min(float(w), b[2] + d[2].item() + 4), min(float(h), b[3] + d[3].item() + 4)])
    props = PrecomputedProposals.from_table({r.image: boxes}, min_size=1.0, nms_iou=None, top_k=32)
    out = {"image": r.image, "k": len(props(img, r.image))}
    for label, which, views in (("crop+blur (plain CLIP)", "base", ("crop", "blur")),
                                ("alpha (region-aware CLIP)", "region", ("alpha",))):
        gr = Grounder.load("zero-shot", backbone=backbones[which], proposals=props, views=views)
        gr.set_image(r.image)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gr.set_image(r.image)
            times.append(time.perf_counter() - t0)
        out[label] = {"median_s": statistics.median(times), "forwards": len(props(img, r.image)) * len(views)}
    out["threads"] = torch.get_num_threads()
    return out


def shares(region: ClipBackbone) -> dict[str, Any]:
    """Trainable share of the default adapter on the ViT-B/16 architecture (CLIPVisionConfig defaults with
    16 px patches, no weights materialised) and of the region-aware world CLIP as trained."""
    from transformers import CLIPConfig, CLIPModel

    from clipground.backbone.alpha import AdapterConfig, add_lora, add_mask_channel, trainable_share

    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(vision_config=dict(patch_size=16), projection_dim=512))
    add_mask_channel(model)
    add_lora(model, AdapterConfig(rank=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj")))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "patch_embedding.alpha" in n)
    return {"ViT-B/16 (rank 16, q/k/v/out)": trainable_share(model),
            f"{region.name} (rank {region.adapter.rank}, {'/'.join(region.adapter.target_modules)})":
                region.trainable_share()}


def figure(retrieval: dict[str, Any], path: Path) -> None:
    """Grouped bars: retrieval top-1 by expression type, all scenes and cluttered ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(retrieval)
    groups = ["all"] + list(TYPES)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    for ax, scope in zip(axes, ("all", "cluttered")):
        width = 0.8 / len(labels)
        for i, lab in enumerate(labels):
            d = retrieval[lab][scope]
            vals = [d["top1"]] + [d["by_type"][t] for t in TYPES]
            ax.bar([j + i * width for j in range(len(groups))], [100 * v for v in vals], width, label=lab)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
        n = retrieval[labels[0]][scope]["count"]
        ax.set_title(f"{'all test scenes' if scope == 'all' else f'cluttered scenes (>= {CLUTTER} objects)'}, {n} phrases")
        ax.set_ylabel("region retrieval top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("World test split: pick the phrase's region among the scene's objects")
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}%"


def markdown(res: dict[str, Any], command: str) -> str:
    lines = ["# Region-aware CLIP in the synthetic world", "", f"Produced by `{command}`.", "",
             f"World `{res['world']}`, split `test` ({res['records']} expressions); cluttered: scenes with >= {CLUTTER} "
             f"objects. Plain CLIP: `{res['base']}`; region-aware CLIP: `{res['region']}`."]
    if res["retrieval"]:
        lines += ["", "## (a) Region retrieval (top-1 among the scene's objects, no relation rules)", "",
                  "| view | all | " + " | ".join(TYPES) + " | cluttered | " + " | ".join(f"cluttered {t}" for t in TYPES)
                  + " |", "|---|" + "---:|" * (2 + 2 * len(TYPES))]
    for lab, d in res["retrieval"].items():
        lines.append(f"| {lab} | {pct(d['all']['top1'])} | " + " | ".join(pct(d['all']['by_type'][t]) for t in TYPES)
                     + f" | {pct(d['cluttered']['top1'])} | "
                     + " | ".join(pct(d['cluttered']['by_type'][t]) for t in TYPES) + " |")
    if res.get("grounding"):
        lines += ["", "## (b, c) Grounding Acc@0.5 (the one evaluator; relation resolver on unless said)", "",
                  "| configuration | all | " + " | ".join(TYPES) + " | cluttered | "
                  + " | ".join(f"cluttered {t}" for t in TYPES) + " | proposals/image | expressions (cluttered) |",
                  "|---|" + "---:|" * (4 + 2 * len(TYPES))]
        for lab, d in res["grounding"].items():
            mp = d.get("mean_proposals")
            lines.append(f"| {lab} | {pct(d['all']['acc@0.5'])} | "
                         + " | ".join(pct(d['all']['by_type'][t]) for t in TYPES)
                         + f" | {pct(d['cluttered']['acc@0.5'])} | "
                         + " | ".join(pct(d['cluttered']['by_type'][t]) for t in TYPES)
                         + f" | {'-' if mp is None else f'{mp:.1f}'} | {d['all']['count']} ({d['cluttered']['count']}) |")
    lines += ["", "## Trainable share", "", "| model | trainable | of the vision tower | of the whole CLIP |",
              "|---|---:|---:|---:|"]
    for name, d in res["shares"].items():
        lines.append(f"| {name} | {int(d['trainable']):,} | {100 * d['share_of_vision']:.2f}% of "
                     f"{int(d['vision_params']):,} | {100 * d['share_of_model']:.2f}% |")
    c = res.get("cost")
    if c:
        a, b = c["crop+blur (plain CLIP)"], c["alpha (region-aware CLIP)"]
        lines += ["", f"## (d) Cost: `set_image` of one test scene with K={c['k']} boxes ({c['threads']} torch threads)",
                  "", "| views | forwards | median |", "|---|---:|---:|",
                  f"| crop+blur (plain CLIP) | {a['forwards']} | {1e3 * a['median_s']:.0f} ms |",
                  f"| alpha (region-aware CLIP) | {b['forwards']} | {1e3 * b['median_s']:.0f} ms |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, default=Path("runs/world-v2"))
    ap.add_argument("--region", default=WORLD_REGION_CLIP, help="region-aware CLIP (bundled name or directory)")
    ap.add_argument("--base", default=WORLD_CLIP, help="the plain CLIP it was made from")
    ap.add_argument("--out", type=Path, default=Path("results/region-clip"))
    ap.add_argument("--cache", type=Path, default=Path("runs/region-clip-results"),
                    help="where the selective-search boxes are kept between runs")
    ap.add_argument("--limit", type=int, default=0, help="first N test expressions only (0: all)")
    ap.add_argument("--ss-limit", type=int, default=0, help="selective-search runs on the first N of those only (0: all)")
    ap.add_argument("--ss-top-k", type=int, default=0, help="keep the top K selective-search boxes (0: all)")
    ap.add_argument("--sam", action="store_true", help="also the world-SAM mask runs (GT boxes)")
    ap.add_argument("--skip-grounding", action="store_true", help="retrieval and cost only")
    ap.add_argument("--skip-retrieval", action="store_true", help="grounding and cost only")
    args = ap.parse_args(argv)
    command = "python scripts/region_clip_results.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ensure_world(args.world, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(args.world / "test.jsonl")
    if args.limit:
        records = records[: args.limit]
    objects = scene_objects(args.world, "test")
    base = ClipBackbone.from_pretrained(args.base)
    region = ClipBackbone.from_pretrained(args.region)
    backbones = {"base": base, "region": region}
    res: dict[str, Any] = {"command": command.strip(), "world": str(args.world), "base": args.base,
                           "region": args.region, "records": len(records)}
    t0 = time.perf_counter()
    res["shares"] = shares(region)
    res["retrieval"] = {} if args.skip_retrieval else region_retrieval(args.world, records, objects, backbones)
    gt = f"gt:{args.world / 'instances_test.json'}"
    if not args.skip_grounding:
        from clipground.proposals.files import PrecomputedProposals

        ss_records = records[: args.ss_limit] if args.ss_limit else records
        table = selective_search_table(ss_records, args.cache / f"selective_search_test_{len(ss_records)}.json")
        ss = PrecomputedProposals.from_table(table, min_size=0.0, nms_iou=None, top_k=args.ss_top_k or 100_000)
        ss_name = f"selective search, top {args.ss_top_k}" if args.ss_top_k else "selective search"

        def zs(backbone: ClipBackbone, props: Any) -> Any:
            return lambda **o: Grounder.load("zero-shot", backbone=backbone, proposals=props, **o)

        alpha = {"views": ("alpha",)}
        runs = [
            (records, "GT boxes", zs(base, gt), [("crop+blur, plain CLIP", {})]),
            (records, "GT boxes", zs(region, gt), [("alpha, region-aware CLIP", alpha),
                                                   ("alpha, region-aware CLIP, no resolver",
                                                    {**alpha, "relations": False})]),
        ]
        if args.sam:
            runs += [
                (records, "GT boxes", zs(region, gt), [("alpha with world-SAM masks, region-aware CLIP",
                                                        {**alpha, "masks": "sam"})]),
                (records, "GT boxes", zs(base, gt), [("FGVP: crop + blur outside the world-SAM mask, plain CLIP",
                                                      {"views": ("crop", "fgvp"), "masks": "sam"})]),
            ]
        runs += [
            (ss_records, ss_name, zs(base, ss), [("crop+blur, plain CLIP", {})]),
            (ss_records, ss_name, zs(region, ss), [("alpha, region-aware CLIP", alpha),
                                                   ("alpha, region-aware CLIP, no resolver",
                                                    {**alpha, "relations": False})]),
        ]
        res["grounding"] = grounding(objects, runs)
        res["ss_records"] = len(ss_records)
    res["cost"] = cost(args.world, records, objects, backbones)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.out / "region_clip_results.json", res)
    atomic_write(args.out / "region_clip_results.md", markdown(res, res["command"]))
    if res["retrieval"]:
        figure(res["retrieval"], args.out / "region_retrieval.png")
    print(markdown(res, res["command"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
