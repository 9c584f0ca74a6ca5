"""Proposals read from files: ground-truth COCO boxes (oracle) and precomputed boxes.

Both are keyed by image file. A lookup tries the exact path, then the longest stored
relative ``file_name`` the path ends with, then the bare file name (when unambiguous).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import boxes as B
from ..errors import BadAnnotationError, BadBoxError
from .base import ProposalSource, register_proposals


class _BoxIndex:
    """Maps image file names (relative paths or base names) to boxes and scores.

    As a last resort an image is matched by the COCO image id in its name, so
    ``COCO_train2014_000000000309.jpg`` finds ``000000000309.jpg`` (COCO 2017 naming).
    """

    def __init__(self, entries: dict[str, tuple[list[list[float]], list[float]]]):
        self.entries = {k.replace("\\", "/"): v for k, v in entries.items()}
        base: dict[str, list[str]] = defaultdict(list)
        by_id: dict[int, list[str]] = defaultdict(list)
        for k in self.entries:
            base[os.path.basename(k)].append(k)
            i = _coco_id(k)
            if i is not None:
                by_id[i].append(k)
        self.by_base = base
        self.by_id = by_id

    def lookup(self, key: str) -> tuple[list[list[float]], list[float]] | None:
        key = key.replace("\\", "/")
        if key in self.entries:
            return self.entries[key]
        best = None
        for k in self.by_base.get(os.path.basename(key), []):
            if key.endswith("/" + k) or key == k:
                if best is None or len(k) > len(best):
                    best = k
        if best is not None:
            return self.entries[best]
        cands = self.by_base.get(os.path.basename(key), [])
        if len(cands) == 1:
            return self.entries[cands[0]]
        i = _coco_id(key)
        if i is not None and len(self.by_id.get(i, [])) == 1:
            return self.entries[self.by_id[i][0]]
        return None


_ID_RE = re.compile(r"(?:^|_)(\d{6,})\.(?:jpe?g|png)$", re.IGNORECASE)


def _coco_id(name: str) -> int | None:
    """The numeric COCO image id at the end of a COCO-style file name, if any."""
    m = _ID_RE.search(os.path.basename(name))
    return int(m.group(1)) if m else None


def _load_json(path: Path):
    if not path.is_file():
        raise BadAnnotationError(f"proposal file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise BadAnnotationError(f"{path} line {n} is not valid JSON ({e})") from None
                return rows
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadAnnotationError(f"{path} is not valid JSON ({e})") from None


_INDEX_CACHE: dict[tuple[str, str, float], _BoxIndex] = {}


def _check_finite(boxes: list[list[float]], path: Path, name: str) -> None:
    """Refuse NaN/infinite coordinates (they would silently vanish in filtering)."""
    if boxes and not torch.isfinite(torch.tensor(boxes)).all():
        raise BadAnnotationError(f"{path}: non-finite box coordinates for {name}")


def _coco_index(path: Path) -> _BoxIndex:
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    key = ("coco", str(path.resolve()), path.stat().st_mtime)
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    data = _load_json(path)
    try:
        names = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        entries: dict[str, tuple[list, list]] = {n: ([], []) for n in names.values()}
        for a in data["annotations"]:
            if int(a["image_id"]) not in names:
                raise ValueError(f"annotation {a.get('id')} refers to unknown image_id {a['image_id']}")
            if len(a["bbox"]) != 4:
                raise ValueError(f"annotation {a.get('id')} has bbox {a['bbox']!r}, need [x, y, w, h]")
            box = B.from_xywh(a["bbox"])[0].tolist()
            _check_finite([box], path, names[int(a["image_id"])])
            entries[names[int(a["image_id"])]][0].append(box)
            entries[names[int(a["image_id"])]][1].append(1.0)
    except (KeyError, TypeError, ValueError, AttributeError, BadBoxError) as e:
        raise BadAnnotationError(f"{path} is not a COCO instances file ({type(e).__name__}: {e})") from None
    idx = _BoxIndex(entries)
    _INDEX_CACHE[key] = idx
    return idx


@register_proposals
@dataclass
class GroundTruthBoxes(ProposalSource):
    """Every annotated object box of the image from a COCO instances file (the oracle).

    With these proposals a method's accuracy is not capped by proposal recall, which is
    how the field reports upper bounds ("ground-truth COCO boxes contain the target for
    99.6% of RefCOCOg"). Images absent from the file get no proposals.
    """

    name = "gt"
    needs_image_key = True
    path: str = ""
    nms_iou: float | None = None
    min_size: float = 1.0
    top_k: int = 1000

    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if image_key is None:
            raise BadAnnotationError("ground-truth proposals need the image's file path (pass a path, not pixels)")
        hit = _coco_index(Path(self.path)).lookup(image_key)
        if hit is None:
            return torch.zeros(0, 4), torch.zeros(0)
        return torch.tensor(hit[0], dtype=torch.float32).reshape(-1, 4), torch.tensor(hit[1])


@register_proposals
@dataclass
class PrecomputedProposals(ProposalSource):
    """Boxes from a JSON/JSONL file written by any detector.

    Format: a JSON object ``{file_name: {"boxes": [[x1,y1,x2,y2], ...], "scores": [...]}}``
    or JSONL lines ``{"image": file_name, "boxes": [...], "scores": [...],
    "box_format": "xyxy"|"xywh"}``. Scores are optional (then file order ranks).
    """

    name = "file"
    needs_image_key = True
    path: str = ""
    nms_iou: float | None = None
    #: In-memory boxes instead of a file (see :meth:`from_table`).
    table: dict[str, list[list[float]]] | None = field(default=None, repr=False)

    @classmethod
    def from_table(cls, table: dict[str, list[list[float]]], **kwargs: Any) -> "PrecomputedProposals":
        """Proposals from an in-memory ``{image path: [[x1, y1, x2, y2], ...]}`` (file order ranks)."""
        return cls(table={k: [list(map(float, b)) for b in v] for k, v in table.items()}, **kwargs)

    def config(self) -> dict[str, Any]:
        out = super().config()
        if out.pop("table", None) is not None:
            out["path"] = "<in-memory table>"
        return out

    def _index(self) -> _BoxIndex:
        if self.table is not None:
            if getattr(self, "_table_index", None) is None:
                self._table_index = _BoxIndex({k: (v, [1.0 - i / max(1, len(v)) for i in range(len(v))])
                                               for k, v in self.table.items()})
            return self._table_index
        p = Path(self.path)
        key = ("file", str(p.resolve()) if p.exists() else str(p), p.stat().st_mtime if p.exists() else 0.0)
        if key in _INDEX_CACHE:
            return _INDEX_CACHE[key]
        data = _load_json(p)
        entries = {}
        try:
            if not isinstance(data, (dict, list)):
                raise TypeError(f"top level is a {type(data).__name__}, need an object or JSONL records")
            rows = data if isinstance(data, list) else [{"image": k, **v} for k, v in data.items()]
            for r in rows:
                fmt = r.get("box_format", "xyxy")
                if fmt not in ("xyxy", "xywh"):
                    raise ValueError(f"box_format {fmt!r} for {r.get('image')}: use 'xyxy' or 'xywh'")
                bx = r["boxes"]
                bx = (B.from_xywh(bx) if fmt == "xywh" else B.as_boxes(bx)).tolist() if len(bx) else []
                _check_finite(bx, p, str(r["image"]))
                sc = r.get("scores") or [1.0 - i / max(1, len(bx)) for i in range(len(bx))]
                if len(sc) != len(bx):
                    raise ValueError(f"{len(bx)} boxes but {len(sc)} scores for {r['image']}")
                entries[str(r["image"])] = (bx, [float(s) for s in sc])
        except (KeyError, TypeError, ValueError, AttributeError, BadBoxError) as e:
            raise BadAnnotationError(f"{p}: malformed proposal record ({type(e).__name__}: {e})") from None
        idx = _BoxIndex(entries)
        _INDEX_CACHE[key] = idx
        return idx

    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if image_key is None:
            raise BadAnnotationError("precomputed proposals need the image's file path (pass a path, not pixels)")
        hit = self._index().lookup(image_key)
        if hit is None:
            return torch.zeros(0, 4), torch.zeros(0)
        return torch.tensor(hit[0], dtype=torch.float32).reshape(-1, 4), torch.tensor(hit[1])
