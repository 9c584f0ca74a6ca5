"""Visual Genome ``region_descriptions.json``.

A list with one entry per image, ``{"id": image_id, "regions": [{region_id, image_id,
phrase, x, y, width, height}, ...]}``; a region may also carry a ``segmentation`` (COCO
polygons or RLE), kept in the record's ``meta`` for what reads masks (the region-clip recipe). Images are ``{image_id}.jpg`` under ``images``; the
official download splits them over ``VG_100K/`` and ``VG_100K_2/``, which are searched
too. Each region becomes one record (split empty: VG has no official REC split).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError
from .loaders import ident, image_path, json_kind, malformed, need, objects, read_json, text
from .records import GroundingRecord

_SUBDIRS = ("", "VG_100K", "VG_100K_2")


def _locate(root: Path, image_id: int) -> str:
    """The first existing ``{id}.jpg`` in ``root`` or its VG_100K folders (else the plain path)."""
    name = f"{image_id}.jpg"
    for sub in _SUBDIRS:
        p = image_path(root / sub if sub else root, name)
        if os.path.isfile(p):
            return p
    return image_path(root, name)


def load_visual_genome(path: Path, images: Path | None = None, data: Any = None,
                       **_: Any) -> list[GroundingRecord]:
    """Read ``region_descriptions.json`` into one record per region."""
    data = read_json(path) if data is None else data
    if not isinstance(data, list):
        raise BadAnnotationError(f"{path}: expected a list of images with 'regions', got {json_kind(data)}")
    root = images if images is not None else path.parent
    out: list[GroundingRecord] = []
    what, where = "a Visual Genome region_descriptions file", ""
    try:
        for i, entry in enumerate(data):
            where = f"entry {i}"
            if not isinstance(entry, dict):
                raise ValueError(f"it is {json_kind(entry)}, expected an object with 'regions'")
            regions = objects(entry, "regions")
            if not regions:
                continue
            key = next((k for k in ("id", "image_id") if k in entry), None)
            image_id = need(entry, key, "id") if key else need(regions[0], "image_id", "id")
            file = _locate(root, image_id)
            for j, r in enumerate(regions):
                where = f"entry {i}, regions[{j}]"
                x, y, w, h = (need(r, k, "number") for k in ("x", "y", "width", "height"))
                seg = r.get("segmentation")
                out.append(GroundingRecord(
                    image=file,
                    expression=text(r["phrase"]).strip(),
                    box=[x, y, x + w, y + h],
                    image_id=str(image_id),
                    ref_id=ident(r.get("region_id", r.get("id"))),
                    split="",
                    meta={"segmentation": seg} if seg else {},
                ))
    except (KeyError, ValueError) as e:
        raise malformed(path, what, where, e) from None
    return out
