#!/usr/bin/env python
"""Dump what saved grounders answer on an annotation file, and compare two dumps exactly.

Used to show that a refactor changes no method's answers: dump with the old code, dump with
the new code, compare.

    python scripts/prediction_dump.py dump OUT.json ANNOTATIONS DIR [DIR ...] [--limit N] [--option DIR:key=value]
    python scripts/prediction_dump.py compare OLD.json NEW.json

``dump`` loads each DIR with ``Grounder.from_pretrained`` and records, per expression, the box,
the score and the top-5 candidates and their scores. ``compare`` prints how many answers are
identical per grounder (boxes, scores, candidates) and the largest box difference, and exits 1
when a top box differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipground.data.loaders import load_records
from clipground.grounder import Grounder


def dump(out: Path, annotations: str, dirs: list[str], limit: int, options: list[str]) -> None:
    import clipground

    records = load_records(annotations, limit=limit or None).records
    by_image: dict[str, list[str]] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r.expression)
    result: dict[str, object] = {"clipground": clipground.__file__, "annotations": annotations}
    cases: list[tuple[str, str, dict[str, str]]] = [(d, d, {}) for d in dirs]
    for o in options:  # DIR:key=value, one case each
        d, _, kv = o.rpartition(":")
        k, _, v = kv.partition("=")
        cases.append((f"{d} {k}={v}", d, {k: v}))
    for name, d, opts in cases:
        g = Grounder.from_pretrained(d, options=opts)
        rows = []
        for image, phrases in by_image.items():
            g.set_image(image)
            rows += [[p.phrase, p.box, p.score, p.boxes[:5].tolist(), p.scores[:5].tolist()]
                     for p in g.predict_batch(phrases)]
        result[name] = rows
        print(f"{name}: {len(rows)} answers", flush=True)
    try:
        from clipground.io import write_json
    except ImportError:  # a clipground from before clipground.io (dumping the old code's answers)
        out.write_text(json.dumps(result))
        return
    write_json(out, result)


def compare(old: Path, new: Path) -> int:
    a, b = (json.loads(p.read_text()) for p in (old, new))
    moved = 0
    for k, ra in a.items():
        if not isinstance(ra, list):
            continue
        rb = b.get(k)
        if rb is None or len(rb) != len(ra):
            print(f"{k}: missing or of another length in {new}")
            moved += 1
            continue
        same = sum(x == y for x, y in zip(ra, rb))
        top = sum(x[1] == y[1] for x, y in zip(ra, rb))
        diff = max((max(abs(p - q) for p, q in zip(x[1], y[1])) for x, y in zip(ra, rb)), default=0.0)
        print(f"{k}: {top}/{len(ra)} identical boxes, {same}/{len(ra)} identical in every number "
              f"(box, score, top-5 candidates); largest box difference {diff:.2e} px")
        moved += top != len(ra)
    return 1 if moved else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out", type=Path)
    d.add_argument("annotations")
    d.add_argument("dirs", nargs="+")
    d.add_argument("--limit", type=int, default=0)
    d.add_argument("--option", action="append", default=[], help="DIR:key=value, an extra case with an inference option")
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    args = p.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.annotations, args.dirs, args.limit, args.option)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
