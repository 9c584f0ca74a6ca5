"""A user's own boxes in COCO instances format.

Each non-crowd annotation becomes one record. Its expression is the annotation's own
``caption`` (or ``expression`` / ``phrase``) when present, which is how users add
referring expressions to COCO files they already have; otherwise the category name
(then the task is "find a <category>", ambiguous when the image has several).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError
from .loaders import image_path, read_json, xywh_to_xyxy
from .records import GroundingRecord

_TEXT_KEYS = ("caption", "expression", "phrase")


def _split(path: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; other names give no split."""
    m = re.match(r"instances_(\w+)$", path.stem)
    return m.group(1) if m else ""


def load_coco(path: Path, images: Path | None = None, data: Any = None, include_crowd: bool = False,
              **_: Any) -> list[GroundingRecord]:
    """Read a COCO instances JSON into one record per annotation (crowd boxes skipped)."""
    data = read_json(path) if data is None else data
    root = images if images is not None else path.parent
    split = _split(path)
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        out: list[GroundingRecord] = []
        for a in data["annotations"]:
            if a.get("iscrowd") and not include_crowd:
                continue
            image_id = int(a["image_id"])
            cat = cats.get(int(a.get("category_id", -1)), "")
            text = next((str(a[k]) for k in _TEXT_KEYS if a.get(k)), cat)
            out.append(GroundingRecord(
                image=image_path(root, files[image_id]),
                expression=text,
                box=xywh_to_xyxy(a["bbox"]),
                image_id=str(image_id),
                ref_id=str(a.get("id", "")),
                split=split,
                meta={"category": cat},
            ))
    except (KeyError, TypeError, ValueError) as e:
        raise BadAnnotationError(f"{path} is not a COCO instances file ({type(e).__name__}: {e})") from None
    return out
