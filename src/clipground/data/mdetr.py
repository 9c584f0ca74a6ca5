"""MDETR's pre-processed annotations: ``finetune_refcocog_{split}.json`` (and refcoco/+).

COCO-style JSON with one *image entry per expression*: each entry has the COCO
``file_name``, the ``caption`` (the expression) and ``original_id`` (the COCO image id);
its annotation(s) carry ``bbox [x, y, w, h]`` and ``original_id`` (the COCO annotation id).
For referring expressions every entry has exactly one annotation; when an entry has
several (phrase-grounding files), each annotation becomes a record whose expression is
the caption text its ``tokens_positive`` spans cover.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .loaders import ident, image_path, malformed, need, objects, read_json, split_from_name, text, xywh_to_xyxy
from .records import GroundingRecord


def _span_text(caption: str, spans: Any) -> str:
    try:
        return " ".join(caption[int(a):int(b)] for a, b in spans).strip()
    except (TypeError, ValueError):
        return ""


def load_mdetr(path: Path, images: Path | None = None, data: Any = None, **_: Any) -> list[GroundingRecord]:
    """Read an MDETR ``finetune_*_{split}.json``; the split comes from the file name."""
    data = read_json(path) if data is None else data
    root = images if images is not None else path.parent
    split = split_from_name(path)
    what, where = "an MDETR annotation file", ""
    try:
        by_image: dict[int, list[tuple[dict, list[float]]]] = defaultdict(list)
        for i, a in enumerate(objects(data, "annotations")):
            where = f"annotations[{i}]"
            by_image[need(a, "image_id", "id")].append((a, xywh_to_xyxy(a["bbox"])))
        out: list[GroundingRecord] = []
        for i, im in enumerate(objects(data, "images")):
            where = f"images[{i}]"
            caption = text(im["caption"])
            file_name = need(im, "file_name", "name")
            anns = by_image.get(need(im, "id", "id"), [])
            for a, box in anns:
                expr = caption
                if len(anns) > 1 and a.get("tokens_positive"):
                    expr = _span_text(caption, a["tokens_positive"]) or caption
                out.append(GroundingRecord(
                    image=image_path(root, file_name),
                    expression=expr,
                    box=box,
                    image_id=ident(im.get("original_id", im.get("original_img_id", im["id"]))),
                    ref_id=ident(a.get("original_id", a.get("id"))),
                    split=split,
                    meta={"entry_id": im["id"], "category_id": a.get("category_id"),
                          "dataset": text(im.get("dataset_name"))},
                ))
    except (KeyError, ValueError) as e:
        raise malformed(path, what, where, e) from None
    return out
