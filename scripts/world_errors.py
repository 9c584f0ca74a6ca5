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

from clipground.data.world import SceneObject, load_scene_objects, parse_expression

#: Opposite words whose token states ``--words`` compares (as in "the leftmost hexagon").
OPPOSITES = [("leftmost", "rightmost"), ("topmost", "bottommost"), ("left", "right"), ("biggest", "smallest")]


def analyse(predictions: list[dict], records: list[dict], scenes: dict[str, list[SceneObject]]) -> dict[str, dict]:
    """``{"relation": {(type, relation): [hits, n]}, "candidates": {(type, n): [hits, n]},
    "misses": {(type, kind): count}}`` for predictions with ``index`` (the record's line in the
    split file; ``ref_id`` is shared by the expressions of one object) and ``box``; ``scenes``
    from :func:`~clipground.data.world.load_scene_objects`."""
    by_rel: dict = defaultdict(lambda: [0, 0])
    by_n: dict = defaultdict(lambda: [0, 0])
    misses: Counter = Counter()
    for p in predictions:
        r = records[p["index"]]
        if r["expression"] != p["expression"]:
            raise SystemExit(f"prediction {p['index']} is not of this split file: {p['expression']!r}")
        meta, objs = r["meta"], scenes[str(r["image_id"])]
        kind = meta["type"]
        parsed = parse_expression(r["expression"])
        if parsed is None:
            raise SystemExit(f"not an expression of the world's grammar: {r['expression']!r}")
        hit = float(box_iou(torch.tensor([p["box"]]), torch.tensor([r["box"]]))[0, 0]) >= 0.5
        n = sum(parsed.subject.matches(o) for o in objs)
        for table, key in ((by_rel, (kind, meta["relation"] or "-")), (by_n, (kind, min(n, 5)))):
            table[key][0] += hit
            table[key][1] += 1
        if hit:
            continue
        ious = box_iou(torch.tensor([p["box"]]), torch.tensor([o.box for o in objs]))[0]
        j = int(ious.argmax())
        if ious[j] < 0.5:
            misses[(kind, "no object")] += 1
        elif parsed.object is not None and parsed.object.matches(objs[j]):
            misses[(kind, "the reference object")] += 1
        elif parsed.subject.matches(objs[j]):
            misses[(kind, "another candidate")] += 1
        else:
            misses[(kind, "a non-candidate object")] += 1
    return {"relation": dict(by_rel), "candidates": dict(by_n), "misses": dict(misses)}


def word_similarity(backbone_name: str, pairs: list[tuple[str, str]] = OPPOSITES,
                    noun: str = "hexagon") -> list[tuple[str, str, float]]:
    """Cosine of the final token state of each word pair in "the WORD NOUN"."""
    from clipground.backbone import ClipBackbone

    bb = ClipBackbone.from_pretrained(backbone_name)
    out = []
    for a, b in pairs:
        texts = [f"the {a} {noun}", f"the {b} {noun}"]
        f, ids = bb.encode_texts(texts), bb.tokenize(texts)["input_ids"]
        # The first token where the two words' ids differ (the word's only token for a world
        # word); for one word twice, its first token (after the start token and "the").
        diff = (ids[0] != ids[1]).nonzero()
        i = int(diff[0]) if len(diff) else 2
        out.append((a, b, float(torch.nn.functional.cosine_similarity(f.tokens[0, i], f.tokens[1, i], dim=0))))
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
    res = analyse(preds, records, load_scene_objects(args.world, args.split))
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
