"""Where a method goes wrong on the synthetic world: accuracy by relation word and by number of
candidates, and what each miss landed on.

The world knows every object in a scene (``instances_{split}.json``) and, for every expression,
its subject ("large star") and reference object. A miss is then one of: *another candidate* (an
object matching the subject: the phrase's spatial or ordinal part was misread), *the reference
object*, *a non-candidate object* (the subject was misread), or *no object*. With ``--words`` it
also prints how alike a backbone's final text-token states are for opposite spatial words.

    python scripts/world_errors.py results/world/ENTRY/test/predictions.jsonl --world runs/world
    python scripts/world_errors.py PRED.jsonl --world runs/world --words clipground/world-clip
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torchvision.ops import box_iou

#: Opposite words whose token states ``--words`` compares (as in "the leftmost hexagon").
OPPOSITES = [("leftmost", "rightmost"), ("topmost", "bottommost"), ("left", "right"), ("biggest", "smallest")]


def matches(description: str, attributes: dict[str, str]) -> bool:
    """Whether an object with ``attributes`` fits a world noun phrase such as "large star"."""
    return all(w in attributes.values() for w in description.split())


def load_scenes(world: Path, split: str) -> dict[str, list[tuple[list[float], dict[str, str]]]]:
    """Per image id: every object's ``xyxy`` pixel box and attributes."""
    inst = json.loads((world / f"instances_{split}.json").read_text())
    scenes: dict[str, list[tuple[list[float], dict[str, str]]]] = defaultdict(list)
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        scenes[str(a["image_id"])].append(([x, y, x + w, y + h], a["attributes"]))
    return scenes


def analyse(predictions: list[dict], records: list[dict], scenes: dict) -> dict[str, dict]:
    """``{"relation": {(type, relation): [hits, n]}, "candidates": {(type, n): [hits, n]},
    "misses": {(type, kind): count}}`` for predictions with ``index`` (the record's line in the
    split file; ``ref_id`` is shared by the expressions of one object) and ``box``."""
    by_rel: dict = defaultdict(lambda: [0, 0])
    by_n: dict = defaultdict(lambda: [0, 0])
    misses: Counter = Counter()
    for p in predictions:
        r = records[p["index"]]
        if r["expression"] != p["expression"]:
            raise SystemExit(f"prediction {p['index']} is not of this split file: {p['expression']!r}")
        meta, objs = r["meta"], scenes[str(r["image_id"])]
        kind = meta["type"]
        hit = float(box_iou(torch.tensor([p["box"]]), torch.tensor([r["box"]]))[0, 0]) >= 0.5
        n = sum(matches(meta["subject"], a) for _, a in objs)
        for table, key in ((by_rel, (kind, meta["relation"] or "-")), (by_n, (kind, min(n, 5)))):
            table[key][0] += hit
            table[key][1] += 1
        if hit:
            continue
        ious = box_iou(torch.tensor([p["box"]]), torch.tensor([b for b, _ in objs]))[0]
        j = int(ious.argmax())
        if ious[j] < 0.5:
            misses[(kind, "no object")] += 1
        elif meta["object"] and matches(meta["object"], objs[j][1]):
            misses[(kind, "the reference object")] += 1
        elif matches(meta["subject"], objs[j][1]):
            misses[(kind, "another candidate")] += 1
        else:
            misses[(kind, "a non-candidate object")] += 1
    return {"relation": dict(by_rel), "candidates": dict(by_n), "misses": dict(misses)}


def word_similarity(backbone_name: str, noun: str = "hexagon") -> list[tuple[str, str, float]]:
    """Cosine of the final token state of each pair of :data:`OPPOSITES` in "the WORD NOUN"."""
    from clipground.backbone import ClipBackbone

    bb = ClipBackbone.from_pretrained(backbone_name)
    out = []
    for a, b in OPPOSITES:
        f = bb.encode_texts([f"the {a} {noun}", f"the {b} {noun}"])
        # Token 2 is the word after the start token and "the" (every world word is one token).
        out.append((a, b, float(torch.nn.functional.cosine_similarity(f.tokens[0, 2], f.tokens[1, 2], dim=0))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", type=Path, help="predictions.jsonl written by `clipground eval --out DIR`")
    ap.add_argument("--world", type=Path, default=Path("runs/world"), help="the world folder evaluated")
    ap.add_argument("--split", default="test")
    ap.add_argument("--words", metavar="BACKBONE", help="also compare final token states of opposite words")
    args = ap.parse_args(argv)
    preds = [json.loads(x) for x in args.predictions.read_text().splitlines() if x.strip()]
    records = [json.loads(x) for x in (args.world / f"{args.split}.jsonl").read_text().splitlines() if x.strip()]
    res = analyse(preds, records, load_scenes(args.world, args.split))
    for title, key in (("Acc@0.5 by relation", "relation"), ("Acc@0.5 by candidates (objects fitting the subject)",
                                                              "candidates")):
        print(f"{title}:")
        for k, (hit, n) in sorted(res[key].items(), key=lambda kv: tuple(map(str, kv[0]))):
            print(f"  {k[0]:<11} {str(k[1]):<24} {100 * hit / n:5.1f}%  ({hit}/{n})")
    print("Misses by what the box landed on:")
    for (kind, what), n in sorted(res["misses"].items()):
        print(f"  {kind:<11} {what:<24} {n}")
    if args.words:
        print(f"Final token-state cosine of opposite words ({args.words}):")
        for a, b, c in word_similarity(args.words):
            print(f"  {a} / {b}: {c:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
