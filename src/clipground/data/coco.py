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

from .loaders import ident, image_path, malformed, need, objects, read_json, text, xywh_to_xyxy
from .records import GroundingRecord

_TEXT_KEYS = ("caption", "expression", "phrase")
WHAT = "a COCO instances file"


def _split(path: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; other names give no split."""
    m = re.match(r"instances_(\w+)$", path.stem)
    return m.group(1) if m else ""


def coco_tables(data: Any, path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Image file names and category names of a COCO instances file, by id (one clear error if malformed)."""
    where = ""
    try:
        files: dict[int, str] = {}
        for i, im in enumerate(objects(data, "images")):
            where = f"images[{i}]"
            files[need(im, "id", "id")] = need(im, "file_name", "name")
        cats: dict[int, str] = {}
        for i, c in enumerate(objects(data, "categories", required=False)):
            where = f"categories[{i}]"
            cats[need(c, "id", "id")] = text(c.get("name"))
    except (KeyError, ValueError) as e:
        raise malformed(path, WHAT, where, e) from None
    return files, cats


def load_coco(path: Path, images: Path | None = None, data: Any = None, include_crowd: bool = False,
              **_: Any) -> list[GroundingRecord]:
    """Read a COCO instances JSON into one record per annotation (crowd boxes skipped)."""
    data = read_json(path) if data is None else data
    root = images if images is not None else path.parent
    split = _split(path)
    files, cats = coco_tables(data, path)
    where = ""
    try:
        out: list[GroundingRecord] = []
        for i, a in enumerate(objects(data, "annotations")):
            where = f"annotations[{i}]"
            if a.get("iscrowd") and not include_crowd:
                continue
            image_id = need(a, "image_id", "id")
            if image_id not in files:
                raise ValueError(f"'image_id' {image_id} is not in 'images'")
            cat = cats.get(need(a, "category_id", "id"), "") if a.get("category_id") is not None else ""
            given = next((a[k] for k in _TEXT_KEYS if a.get(k)), None)  # null/"": the category name
            out.append(GroundingRecord(
                image=image_path(root, files[image_id]),
                expression=cat if given is None else text(given),
                box=xywh_to_xyxy(a["bbox"]),
                image_id=str(image_id),
                ref_id=ident(a.get("id")),
                split=split,
                meta={"category": cat},
            ))
    except (KeyError, ValueError) as e:
        raise malformed(path, WHAT, where, e) from None
    return out
