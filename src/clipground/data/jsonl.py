"""clipground's own JSONL format: one record per line.

Each line is a JSON object::

    {"image": "images/0001.jpg", "expression": "the red mug on the left",
     "box": [x1, y1, x2, y2], "image_id": "1", "ref_id": "7", "split": "val",
     "meta": {}}

* ``box`` is ``xyxy`` in pixels of the displayed image (after EXIF rotation) by default.
  A line may say ``"box_format": "xywh"`` (COCO) or ``"cxcywh"``; it is converted on read.
* ``image`` is absolute, or relative to the JSONL file's folder (or ``image_root``).
* Only ``image``, ``expression`` and ``box`` are required.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import boxes as B
from ..errors import BadAnnotationError
from ..io import atomic_write
from .records import GroundingRecord

_FORMATS = {"xyxy": lambda b: B.as_boxes(b), "xywh": B.from_xywh, "cxcywh": B.from_cxcywh}


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[GroundingRecord]:
    """Read a clipground JSONL file into records (image paths made absolute)."""
    path = Path(path)
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    out: list[GroundingRecord] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                fmt = d.pop("box_format", "xyxy")
                if fmt not in _FORMATS:
                    raise ValueError(f"unknown box_format {fmt!r} (use xyxy, xywh or cxcywh)")
                d["box"] = _FORMATS[fmt](d["box"])[0].tolist()
                rec = GroundingRecord.from_json(d)
            except (ValueError, KeyError, TypeError) as e:
                raise BadAnnotationError(f"{path}:{lineno}: malformed record ({e})") from None
            if not os.path.isabs(rec.image):
                rec.image = str(root / rec.image)
            out.append(rec)
    return out


def write_jsonl(
    records: Iterable[GroundingRecord], path: str | os.PathLike, relative_to: str | os.PathLike | None = None
) -> None:
    """Write records atomically (:func:`clipground.io.atomic_write`); image paths relative to ``relative_to``."""
    lines: list[str] = []
    for r in records:
        d = r.to_json()
        if relative_to is not None:
            d["image"] = os.path.relpath(d["image"], relative_to)
        lines.append(json.dumps(d, sort_keys=True) + "\n")
    atomic_write(path, "".join(lines))
