"""Format registry, auto-detection and the one entry point :func:`load_records`.

Every format module (``refer``, ``resc``, ``mdetr``, ``coco``, ``visual_genome`` and our
``jsonl``) turns a user's annotation file into :class:`GroundingRecord` s with absolute
image paths and canonical ``xyxy`` pixel boxes. :func:`load_records` then filters by
split, drops records with a degenerate box or an empty expression (counted as
``invalid``), keeps the records whose image exists on disk (the rest counted as
``dropped``), and applies ``limit``.

Format modules are imported only when used, so ``import clipground.data`` stays light.

The helpers at the bottom (:func:`image_path`, :func:`split_from_name`, ...) are shared by
the format modules.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError, UnknownNameError
from .records import GroundingRecord, keep_existing


@dataclass(frozen=True)
class FormatSpec:
    """One annotation format: its name, where its loader lives, and a one-line description."""

    name: str
    loader: str  # "module:function" inside clipground.data, imported on first use
    description: str
    extensions: tuple[str, ...] = ()

    def load_fn(self) -> Callable[..., list[GroundingRecord]]:
        mod, fn = self.loader.split(":")
        return getattr(importlib.import_module(f"clipground.data.{mod}"), fn)


#: The formats :func:`load_records` understands, by name.
FORMATS: dict[str, FormatSpec] = {
    s.name: s
    for s in [
        FormatSpec("jsonl", "loaders:_load_jsonl", "clipground JSONL: one {image, expression, box} per line", (".jsonl",)),
        FormatSpec("refer", "refer:load_refer", "refer API (lichengunc/refer): refs(umd).p + instances.json", (".p", ".pkl", ".pickle")),
        FormatSpec("resc", "resc:load_resc", "ReSC / TransVG / CLIP-VG split file (*.pth, legacy torch pickle)", (".pth", ".pt")),
        FormatSpec("mdetr", "mdetr:load_mdetr", "MDETR finetune_refcocog_{split}.json (COCO-style, one image entry per expression)", (".json",)),
        FormatSpec("coco", "coco:load_coco", "COCO instances JSON: each box is a record, expression = caption or category name", (".json",)),
        FormatSpec("visual-genome", "visual_genome:load_visual_genome", "Visual Genome region_descriptions.json", (".json",)),
    ]
}


@dataclass
class LoadResult:
    """Records ready to evaluate or train on, and what was left out.

    Attributes:
        records: the records kept (image present, valid box and expression, after ``limit``).
        kept: records whose image exists (before ``limit``).
        dropped: records dropped because their image file is missing.
        invalid: records dropped for a degenerate/non-finite box or an empty expression.
        total: records in the file for the requested split.
        format: the format the file was read as.
        path: the annotation file.
        split: the split asked for (``None``: all).
        missing_example: one missing image path (to show the user where we looked).
    """

    records: list[GroundingRecord]
    kept: int
    dropped: int
    invalid: int = 0
    total: int = 0
    format: str = ""
    path: str = ""
    split: str | None = None
    missing_example: str | None = None
    splits: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the user: ``kept 4 items, dropped 4892 whose image is missing``."""
        s = f"kept {self.kept} items, dropped {self.dropped} whose image is missing"
        if self.invalid:
            s += f", {self.invalid} with an invalid box or empty expression"
        if len(self.records) < self.kept:
            s += f" (evaluating the first {len(self.records)})"
        return s

    def to_json(self) -> dict[str, Any]:
        """Counts and provenance, for ``metrics.json``."""
        return {"path": self.path, "format": self.format, "split": self.split, "total": self.total,
                "kept": self.kept, "dropped": self.dropped, "invalid": self.invalid, "used": len(self.records)}


def detect_format(path: str | os.PathLike, data: Any = None) -> str:
    """Guess a file's format from its extension and, for JSON, its content.

    ``data`` is the already-parsed JSON content when the caller has it.
    """
    p = Path(path)
    if p.is_dir():
        if any(p.glob("refs(*).p")):
            return "refer"
        raise BadAnnotationError(f"{p} is a folder; give an annotation file (or a refer folder with refs(*).p)")
    suffix = p.suffix.lower()
    for spec in FORMATS.values():
        if suffix in spec.extensions and suffix != ".json":
            return spec.name
    if suffix != ".json":
        known = sorted({e for s in FORMATS.values() for e in s.extensions})
        raise BadAnnotationError(f"cannot tell the format of {p} from its extension (known: {', '.join(known)}); pass --format")
    if data is None:
        data = read_json(p)
    return _detect_json(p, data)


def _detect_json(p: Path, data: Any) -> str:
    if isinstance(data, list):
        if not data or (isinstance(data[0], dict) and "regions" in data[0]):
            return "visual-genome"
        raise BadAnnotationError(f"{p}: a JSON list whose items have no 'regions': not region_descriptions.json")
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        images = data["images"]
        if images and isinstance(images[0], dict) and "caption" in images[0]:
            return "mdetr"
        return "coco"
    raise BadAnnotationError(f"{p}: JSON is neither COCO/MDETR (images + annotations) nor Visual Genome regions; pass --format")


def load_records(
    path: str | os.PathLike,
    format: str = "auto",
    images: str | os.PathLike | None = None,
    split: str | None = None,
    limit: int | None = None,
    *,
    require_images: bool = True,
    **options: Any,
) -> LoadResult:
    """Read an annotation file of any supported format.

    Args:
        path: the annotation file (or a refer folder).
        format: a name from :data:`FORMATS` or ``auto``.
        images: folder the file's image names are relative to (default: the file's folder;
            for ``jsonl`` the JSONL's own relative-path rule applies).
        split: keep only records of this split (the file's own split field, or the one in
            its name, e.g. ``gref_umd_val.pth`` -> ``val``).
        limit: keep at most this many records (after the other filters).
        require_images: drop records whose image file is missing (counted in ``dropped``).
        options: format-specific options (e.g. ``box_format="xyxy"`` for ``resc``).
    """
    p = Path(path)
    if not p.exists():
        raise BadAnnotationError(f"annotation file not found: {p}")
    if limit is not None and limit < 0:
        raise BadAnnotationError(f"limit must be >= 0, got {limit}")
    fmt = format.lower().replace("_", "-") if format else "auto"
    data = None
    if fmt == "auto":
        if p.is_file() and p.suffix.lower() == ".json":
            data = read_json(p)
        fmt = detect_format(p, data)
    if fmt not in FORMATS:
        raise UnknownNameError(f"unknown annotation format {format!r}; choose from auto, {', '.join(FORMATS)}")
    fn = FORMATS[fmt].load_fn()
    kwargs = dict(options)
    if data is not None:
        kwargs["data"] = data
    records = fn(p, Path(images) if images is not None else None, **kwargs)

    splits: dict[str, int] = {}
    for r in records:
        splits[r.split] = splits.get(r.split, 0) + 1
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            present = ", ".join(f"{k or '(none)'} ({v})" for k, v in sorted(splits.items())) or "none"
            raise BadAnnotationError(f"no records of split {split!r} in {p}; splits present: {present}")
    total = len(records)
    valid = [r for r in records if _is_valid(r)]
    invalid = total - len(valid)
    if require_images:
        kept, dropped = keep_existing(valid)
    else:
        kept, dropped = valid, 0
    missing = None
    if dropped:
        present = {id(r) for r in kept}
        missing = next((r.image for r in valid if id(r) not in present), None)
    used = kept[:limit] if limit is not None else kept
    return LoadResult(used, len(kept), dropped, invalid, total, fmt, str(p), split, missing, splits)


def _is_valid(r: GroundingRecord) -> bool:
    b = r.box
    return (
        bool(r.expression and r.expression.strip())
        and len(b) == 4
        and all(math.isfinite(v) for v in b)
        and b[2] > b[0]
        and b[3] > b[1]
    )


def _load_jsonl(path: Path, images: Path | None, **_: Any) -> list[GroundingRecord]:
    from .jsonl import read_jsonl

    if path.is_dir():
        raise BadAnnotationError(f"{path} is a folder, not a JSONL file")
    return read_jsonl(path, image_root=images)


# --------------------------------------------------------------------------- helpers for format modules
def read_json(path: Path) -> Any:
    """Parse a JSON file, turning decode errors into :class:`BadAnnotationError`."""
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadAnnotationError(f"{path} is not valid JSON ({e})") from None


def image_path(root: Path, file_name: str) -> str:
    """Absolute path of ``file_name`` under ``root`` (an absolute ``file_name`` stays as is)."""
    f = str(file_name).replace("\\", "/")
    return os.path.abspath(f if os.path.isabs(f) else os.path.join(root, f))


_SPLIT_RE = re.compile(r"_([A-Za-z0-9]+)$")


def split_from_name(path: Path) -> str:
    """Split named at the end of a file name: ``gref_umd_val.pth`` -> ``val``, ``unc_testA.pth`` -> ``testA``."""
    m = _SPLIT_RE.search(path.stem)
    return m.group(1) if m else ""


def xywh_to_xyxy(b: Any) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` floats (plain Python, for speed on big files)."""
    x, y, w, h = (float(v) for v in list(b)[:4])
    return [x, y, x + w, y + h]


_COCO_ID_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def image_id_from_name(name: str) -> str:
    """Numeric image id at the end of a file name (``COCO_train2014_000000000309.jpg`` -> ``309``)."""
    m = _COCO_ID_RE.search(os.path.basename(name))
    return str(int(m.group(1))) if m else ""
