"""clipground's own JSONL format: one record per line.

Each line is a JSON object::

    {"image": "images/0001.jpg", "expression": "the red mug on the left",
     "box": [x1, y1, x2, y2], "image_id": "1", "ref_id": "7", "split": "val",
     "meta": {}}

* ``box`` is ``xyxy`` in pixels of the displayed image (after EXIF rotation) by default.
  A line may say ``"box_format": "xywh"`` (COCO) or ``"cxcywh"``; it is converted on read.
* ``image`` is absolute, or relative to the JSONL file's folder (or ``image_root``).
* Only ``image``, ``expression`` and ``box`` are required. An ``expression`` that is null
  or not a string is read as ``""`` (:func:`~clipground.data.loaders.load_records` counts
  such records as invalid); every other problem (a line that is not UTF-8 or not a JSON
  object, a box that is not 4 numbers, ...) raises ``BadAnnotationError("file:line: ...")``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import BadAnnotationError
from ..io import atomic_write
from .loaders import ident, json_kind, need, text
from .records import GroundingRecord

#: ``box_format`` -> conversion of 4 floats to ``xyxy`` (plain Python: exact for ``xyxy``).
_FORMATS = {
    "xyxy": lambda b: b,
    "xywh": lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]],
    "cxcywh": lambda b: [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2],
}


def _record(d: object) -> GroundingRecord:
    """One parsed line as a record; ValueError / KeyError saying what is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"the line is {json_kind(d)}, expected a JSON object "
                         '{"image": ..., "expression": ..., "box": [x1, y1, x2, y2]}')
    fmt = d.get("box_format", "xyxy")
    if not isinstance(fmt, str) or fmt not in _FORMATS:
        raise ValueError(f"unknown box_format {fmt!r} (use xyxy, xywh or cxcywh)")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' is {json_kind(meta)}, expected an object")
    if "expression" not in d:  # required, even when null
        raise KeyError("expression")
    return GroundingRecord(
        image=need(d, "image", "name"),
        expression=text(d["expression"]),
        box=_FORMATS[fmt](need(d, "box", "box")),
        image_id=ident(d.get("image_id")),
        ref_id=ident(d.get("ref_id")),
        split=text(d.get("split")),
        meta=dict(meta),
    )


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[GroundingRecord]:
    """Read a clipground JSONL file into records (image paths made absolute)."""
    path = Path(path)
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    out: list[GroundingRecord] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise BadAnnotationError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                         f"{e.start + 1}); save the file as UTF-8") from None
            if not line:
                continue
            try:
                rec = _record(json.loads(line))
            except KeyError as e:
                raise BadAnnotationError(f"{path}:{lineno}: malformed record (no {e.args[0]!r} field)") from None
            except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
                problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise BadAnnotationError(f"{path}:{lineno}: malformed record ({problem})") from None
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
