"""Training from the feature cache vs. running the backbone at every step.

Same method (``proposal-classifier`` by default), same data, same batches, same
optimizer: one epoch reads features from the cache (:class:`clipground.cache.FeatureCache`),
the other recomputes them with the frozen CLIP for every sample (render the proposal
views, preprocess, forward; boxes come from the cache in both, so only the backbone
differs). Prints seconds per epoch and the ratio, for each backbone asked for.

    python benchmarks/bench_cache_training.py                       # tiny CLIP (+ world-clip if bundled)
    python benchmarks/bench_cache_training.py --b32 --images 16     # also a random ViT-B/32
    python benchmarks/bench_cache_training.py --data world/train.jsonl --proposals gt:world/instances_train.json

Timings are wall-clock on whatever machine runs it (informative; no test asserts on them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from clipground.backbone import BUNDLED, ClipBackbone
from clipground.cache import CacheSpec, FeatureCache
from clipground.data.records import GroundingRecord
from clipground.methods import get_method_class
from clipground.methods.trained_scorers import collate_feature_items
from clipground.proposals import get_proposals
from clipground.testing import make_clip_b32, make_tiny_clip
from clipground.training.recipes.scorers import FeatureDataset, LiveFeatures, classifier_loss, ranking_loss
from clipground.io import write_json

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (240, 220, 40)}


def synthetic_data(root: Path, n_images: int, size: int = 128, seed: int = 0) -> tuple[list[GroundingRecord], str]:
    """Images with four coloured rectangles, one expression each, and a proposals file
    (the rectangles plus 12 random boxes per image)."""
    g = torch.Generator().manual_seed(seed)
    records, props = [], {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        img = Image.new("RGB", (size, size), (40, 40, 40))
        d = ImageDraw.Draw(img)
        boxes = []
        for k, (name, rgb) in enumerate(COLOURS.items()):
            x = 4 + 30 * k + int(torch.randint(0, 6, (1,), generator=g))
            y = int(torch.randint(0, size - 30, (1,), generator=g))
            box = [float(x), float(y), float(x + 24), float(y + 26)]
            d.rectangle([x, y, x + 23, y + 25], fill=rgb)
            boxes.append(box)
            records.append(GroundingRecord(str(root / f"{i:04d}.png"), f"{name} box", box, str(i), f"{i}_{k}"))
        img.save(root / f"{i:04d}.png")
        lo = torch.rand(12, 2, generator=g) * (size - 20)
        wh = 8 + torch.rand(12, 2, generator=g) * 40
        extra = torch.cat([lo, (lo + wh).clamp(max=size)], 1).tolist()
        props[str(root / f"{i:04d}.png")] = {"boxes": boxes + extra}
    (root / "props.json").write_text(json.dumps(props))
    return records, f"file:{root / 'props.json'}"


def epoch_seconds(method: torch.nn.Module, dataset: FeatureDataset, loss_fn, batch_size: int) -> tuple[float, float]:
    """One training epoch (fixed order, drop_last=False); returns (seconds, mean loss)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_feature_items)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    method.train()
    t0 = time.perf_counter()
    total, n = 0.0, 0
    for batch in loader:
        loss, _ = loss_fn(method, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + float(loss.detach()), n + 1
    return time.perf_counter() - t0, total / max(1, n)


def bench(name: str, clip: str, records: list[GroundingRecord], proposals: str, cache_dir: Path, method_name: str,
          batch_size: int, epochs: int) -> dict:
    bb = ClipBackbone.from_pretrained(clip)
    mcls = get_method_class(method_name)
    t0 = time.perf_counter()
    cache = FeatureCache.build(cache_dir, records, bb, get_proposals(proposals), CacheSpec(views=("crop", "blur")),
                               progress=False)
    build_s = time.perf_counter() - t0
    loss_fn = classifier_loss() if method_name == "proposal-classifier" else ranking_loss
    out = {"backbone": name, "images": len(cache), "expressions": len(records), "cache_build_s": round(build_s, 3)}
    for mode in ("cache", "live"):
        torch.manual_seed(0)
        method = mcls(bb)
        src = cache if mode == "cache" else LiveFeatures(bb, cache.views, boxes_from=cache)
        ds = FeatureDataset(src, records, pos_iou=0.5)
        times = [epoch_seconds(method, ds, loss_fn, batch_size) for _ in range(epochs)]
        out[f"{mode}_epoch_s"] = round(min(t for t, _ in times), 4)
        out[f"{mode}_loss"] = round(times[-1][1], 4)
    out["speedup"] = round(out["live_epoch_s"] / out["cache_epoch_s"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="synthetic images (4 expressions each)")
    ap.add_argument("--data", default=None, help="annotation file instead of synthetic rectangles")
    ap.add_argument("--proposals", default=None, help="proposal source with --data (default selective-search)")
    ap.add_argument("--method", default="proposal-classifier", choices=["proposal-classifier", "proposal-attention"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2, help="epochs timed per mode (the fastest is reported)")
    ap.add_argument("--b32", action="store_true", help="also a randomly initialized CLIP ViT-B/32")
    ap.add_argument("--no-world", action="store_true", help="skip the bundled world CLIP")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="cg_bench_cache_"))
    if args.data:
        from clipground.data.loaders import load_records

        records = load_records(args.data, limit=args.images * 4).records
        proposals = args.proposals or "selective-search"
    else:
        records, proposals = synthetic_data(tmp / "data", args.images)
    backbones = [("tiny", str(make_tiny_clip(tmp / "tiny", max_text=77)))]
    world = BUNDLED.get("clipground/world-clip")
    if not args.no_world and world is not None and (world / "config.json").is_file():
        backbones.append(("world-clip", "clipground/world-clip"))
    if args.b32:
        backbones.append(("random ViT-B/32", str(make_clip_b32(tmp / "b32"))))
    rows = []
    print(f"{args.method}, {len(records)} expressions, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"{'backbone':<18}{'images':>7}{'build s':>9}{'cache s/ep':>12}{'live s/ep':>11}{'speedup':>9}")
    for name, path in backbones:
        r = bench(name, path, records, proposals, tmp / f"cache_{name.replace(' ', '_').replace('/', '')}", args.method,
                  args.batch_size, args.epochs)
        rows.append(r)
        print(f"{name:<18}{r['images']:>7}{r['cache_build_s']:>9.2f}{r['cache_epoch_s']:>12.4f}{r['live_epoch_s']:>11.3f}"
              f"{r['speedup']:>8.1f}x", flush=True)
    if args.json:
        write_json(args.json, rows, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
