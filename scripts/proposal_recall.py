"""Selective-search proposal recall against COCO ground truth.

Zero-shot grounding can only be right when some proposal covers the target, so recall
at IoU >= 0.5 of the top-K proposals caps a method's accuracy. This script measures it
on every ground-truth box of a COCO instances file (COCO128 by default), for several K,
with the same :class:`~clipground.proposals.SelectiveSearch` source the grounder uses.

Usage::

    python scripts/proposal_recall.py [--mode fast|quality] [--max-side 500] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from clipground import boxes as B
from clipground.errors import ClipgroundError
from clipground.images import load_image
from clipground.proposals import SelectiveSearch
from clipground.io import write_json

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco128"
ALL = 10**9  # "every proposal" as a K
SIZES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}  # COCO area ranges


def load_coco(path: Path, include_crowd: bool) -> dict[str, list[tuple[list[float], float]]]:
    """``file_name -> [(xyxy box, area), ...]`` for every image in a COCO instances file."""
    try:
        data = json.loads(path.read_text())
        names = {int(im["id"]): im["file_name"] for im in data["images"]}
        out: dict[str, list] = {n: [] for n in names.values()}
        for a in data["annotations"]:
            if a.get("iscrowd", 0) and not include_crowd:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            out[names[int(a["image_id"])]].append(([x, y, x + w, y + h], w * h))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ClipgroundError(f"cannot read COCO annotations {path}: {type(e).__name__}: {e}") from None
    return out


def size_of(area: float) -> str:
    return next(k for k, (lo, hi) in SIZES.items() if lo <= area < hi)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotations", type=Path, default=DATA / "annotations" / "instances_train2017.json")
    ap.add_argument("--images", type=Path, default=DATA / "train2017")
    ap.add_argument("--top-k", default="32,64,100,200,all", help="comma-separated K values ('all': every proposal)")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU for a box to count as recalled")
    ap.add_argument("--mode", choices=["fast", "quality"], default="fast")
    ap.add_argument("--max-side", type=int, default=500, help="selective search runs on the image resized to this")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    ap.add_argument("--include-crowd", action=argparse.BooleanOptionalAction, default=True,
                    help="count iscrowd boxes as targets (default: yes, every ground-truth box)")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON here")
    args = ap.parse_args(argv)
    try:
        ks = sorted({ALL if k.strip() == "all" else int(k) for k in args.top_k.split(",")})
    except ValueError:
        ap.error(f"--top-k must be integers or 'all', got {args.top_k!r}")

    if not args.annotations.is_file() or not args.images.is_dir():
        print(f"error: need {args.annotations} and {args.images} (pass --annotations/--images)", file=sys.stderr)
        return 2
    gt = load_coco(args.annotations, args.include_crowd)
    files = sorted(gt)[: args.limit]
    # top_k unbounded: we need the full ranked list to count proposals and slice every K.
    source = SelectiveSearch(top_k=ALL, mode=args.mode, max_side=args.max_side)

    hits = {k: defaultdict(int) for k in ks}  # k -> size -> recalled boxes
    total = defaultdict(int)  # size -> boxes
    best_iou_sum = {k: 0.0 for k in ks}
    n_props, seconds, skipped = [], [], []
    for name in tqdm(files, desc=f"selective search ({args.mode})", file=sys.stderr):
        path = args.images / name
        try:
            image = load_image(path)
        except ClipgroundError as e:
            skipped.append(f"{name}: {e}")
            continue
        t0 = time.perf_counter()
        props = source(image, str(path))
        seconds.append(time.perf_counter() - t0)
        n_props.append(len(props))
        targets = gt[name]
        if not targets:
            continue
        tboxes = torch.tensor([b for b, _ in targets], dtype=torch.float32)
        sizes = [size_of(a) for _, a in targets]
        for s in sizes:
            total[s] += 1
        for k in ks:
            top = props.boxes[:k]
            best = B.iou(tboxes, top).max(1).values if len(top) else torch.zeros(len(tboxes))
            best_iou_sum[k] += float(best.sum())
            for s, v in zip(sizes, best.tolist()):
                hits[k][s] += int(v >= args.iou)

    n_gt = sum(total.values())
    if not n_props or n_gt == 0:
        print("error: no images with ground-truth boxes were processed", file=sys.stderr)
        return 2
    rows = []
    for k in ks:
        rec = sum(hits[k].values()) / n_gt
        by_size = {s: (hits[k][s] / total[s] if total[s] else None) for s in SIZES}
        used = sum(min(k, n) for n in n_props) / len(n_props)
        rows.append({"k": "all" if k == ALL else k, "recall": rec, "recall_by_size": by_size, "mean_best_iou": best_iou_sum[k] / n_gt,
                     "mean_proposals_used": used})
    res = {
        "annotations": str(args.annotations),
        "images": len(n_props),
        "gt_boxes": n_gt,
        "gt_boxes_by_size": dict(total),
        "include_crowd": args.include_crowd,
        "iou": args.iou,
        "mode": args.mode,
        "max_side": args.max_side,
        "mean_proposals_per_image": sum(n_props) / len(n_props),
        "min_proposals_per_image": min(n_props),
        "seconds_per_image": sum(seconds) / len(seconds),
        "skipped": skipped,
        "results": rows,
    }

    print(f"{len(n_props)} images, {n_gt} ground-truth boxes ({', '.join(f'{s} {total[s]}' for s in SIZES)}); "
          f"selective search mode={args.mode} max_side={args.max_side}")
    print(f"proposals per image after NMS/min-size: mean {res['mean_proposals_per_image']:.0f}, min {min(n_props)}; "
          f"{res['seconds_per_image']:.2f} s/image")
    print(f"{'top-K':>6}{'recall@' + str(args.iou):>12}{'small':>8}{'medium':>8}{'large':>8}{'mean best IoU':>15}{'props used':>12}")
    for r in rows:
        bs = r["recall_by_size"]
        cells = "".join(f"{(bs[s] if bs[s] is not None else float('nan')):>8.3f}" for s in SIZES)
        print(f"{r['k']:>6}{r['recall']:>12.3f}{cells}{r['mean_best_iou']:>15.3f}{r['mean_proposals_used']:>12.1f}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {skipped[:3]}")
    if args.json:
        write_json(args.json, res, sort_keys=False)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
