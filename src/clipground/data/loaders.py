"""Format registry, auto-detection and the one entry point :func:`load_records`.

Every format module (``refer``, ``resc``, ``mdetr``, ``coco``, ``visual_genome`` and our
``jsonl``) turns a user's annotation file into :class:`GroundingRecord` s with absolute
image paths and canonical ``xyxy`` pixel boxes. :func:`load_records` then filters by
split, drops records with a degenerate box or a missing, non-string or empty expression
(counted as ``invalid``), keeps the records whose image exists on disk (the rest counted
as ``dropped``), checks each box against its image's displayed size (read from the file
header: records whose box lies entirely outside are dropped as ``outside``, boxes sticking
out are clipped to the image, see :func:`fit_boxes_to_images`), and applies ``limit``.

A file whose structure is wrong (a JSONL line that is not an object, ``images`` that is
not a list of objects, a box that is not 4 numbers, ...) raises
:class:`~clipground.errors.BadAnnotationError` naming the file (and line, for JSONL), the
entry and what is wrong with it.

Format modules are imported only when used, so ``import clipground.data`` stays light.

The helpers at the bottom (:func:`image_path`, :func:`split_from_name`, ...) are shared by
the format modules.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
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
        kept: records kept before ``limit`` (image exists, box valid and not outside it).
        dropped: records dropped because their image file is missing.
        invalid: records dropped for a degenerate/non-finite box or a missing, non-string
            or empty expression.
        total: records in the file for the requested split.
        format: the format the file was read as.
        path: the annotation file.
        split: the split asked for (``None``: all).
        missing_example: one missing image path (to show the user where we looked).
        splits: records per split in the whole file.
        outside: records dropped because their box lies entirely outside their image.
        clipped: kept records whose box stuck out of the image by 1 px or more and was
            clipped to it (smaller overhangs are clipped without counting).
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
    outside: int = 0
    clipped: int = 0

    def summary(self) -> str:
        """One line for the user: ``kept 4 items, dropped 4892 whose image is missing``."""
        s = f"kept {self.kept} items, dropped {self.dropped} whose image is missing"
        if self.invalid:
            s += f", {self.invalid} with an invalid box or a missing/empty expression"
        if self.outside:
            s += f", {self.outside} whose box lies outside its image"
        if self.clipped:
            s += f"; clipped {self.clipped} boxes that stuck out of their image"
        if len(self.records) < self.kept:
            s += f" (evaluating the first {len(self.records)})"
        return s

    def to_json(self) -> dict[str, Any]:
        """Counts and provenance, for ``metrics.json``."""
        return {"path": self.path, "format": self.format, "split": self.split, "total": self.total,
                "kept": self.kept, "dropped": self.dropped, "invalid": self.invalid, "outside": self.outside,
                "clipped": self.clipped, "used": len(self.records)}


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
        images = data["images"]  # not a list of objects: the COCO loader says what is wrong
        if isinstance(images, list) and images and isinstance(images[0], dict) and "caption" in images[0]:
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
        require_images: drop records whose image file is missing (counted in ``dropped``)
            and fit boxes to their image (``outside``, ``clipped``); without it neither.
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
    outside = clipped = 0
    if require_images:
        kept, dropped = keep_existing(valid)
    else:
        kept, dropped = valid, 0
    missing = None
    if dropped:
        present = {id(r) for r in kept}
        missing = next((r.image for r in valid if id(r) not in present), None)
    if require_images:
        kept, outside, clipped = fit_boxes_to_images(kept)
    used = kept[:limit] if limit is not None else kept
    return LoadResult(used, len(kept), dropped, invalid, total, fmt, str(p), split, missing, splits, outside, clipped)


def _is_valid(r: GroundingRecord) -> bool:
    b = r.box
    return (
        isinstance(r.expression, str)
        and bool(r.expression.strip())
        and len(b) == 4
        and all(math.isfinite(v) for v in b)
        and b[2] > b[0]
        and b[3] > b[1]
    )


#: Boxes sticking out of their image by less than this many pixels are clipped without
#: being counted: COCO boxes often end at ``x + w = width + 0.01`` from float rounding.
CLIP_TOLERANCE_PX = 1.0


def displayed_size(path: str) -> tuple[int, int] | None:
    """``(width, height)`` of an image as displayed (EXIF orientations 5-8 swap them), or None.

    Reads the file header only (PIL decodes no pixels until asked). EXIF stored after the
    pixel data of a PNG is not seen (reading it would mean decoding the image); None when
    the header cannot be read (the evaluator reports undecodable images itself).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            # The base-class getexif reads what the header gave; PNG's own would decode the pixels.
            orientation = Image.Image.getexif(im).get(0x0112, 1)
    except Exception:  # unreadable header: leave the record to the evaluator
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def fit_boxes_to_images(records: list[GroundingRecord]) -> tuple[list[GroundingRecord], int, int]:
    """Check boxes against their image's displayed size; return ``(kept, outside, clipped)``.

    A box with no area inside its image is dropped (``outside``); one sticking out is
    clipped to the image (in place), and counted in ``clipped`` when it stuck out by
    :data:`CLIP_TOLERANCE_PX` or more. Sizes are read once per image path; a record whose
    image header cannot be read is kept as it is.
    """
    sizes: dict[str, tuple[int, int] | None] = {}
    kept: list[GroundingRecord] = []
    outside = clipped = 0
    for r in records:
        if r.image not in sizes:
            sizes[r.image] = displayed_size(r.image)
        size = sizes[r.image]
        if size is None:
            kept.append(r)
            continue
        w, h = size
        x1, y1, x2, y2 = r.box
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            outside += 1
            continue
        over = max(-x1, -y1, x2 - w, y2 - h)
        if over > 0:
            r.box = [max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))]
            clipped += over >= CLIP_TOLERANCE_PX
        kept.append(r)
    return kept, outside, clipped


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
        with path.open("r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadAnnotationError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise BadAnnotationError(f"{path} is not an annotation file: its JSON is nested too deeply") from None


def json_kind(x: Any) -> str:
    """What ``x`` is, in JSON's words, for error messages: ``an object``, ``a list of 3 items``, ``null``..."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"{str(x).lower()} (a boolean)"
    if isinstance(x, numbers.Number):
        return f"a number ({x!r})"
    if isinstance(x, str):
        return f"a string ({x[:40]!r})"
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, (list, tuple)):
        return f"a list of {len(x)} items"
    return f"a {type(x).__name__}"


def objects(container: Any, key: str, required: bool = True) -> list[dict]:
    """``container[key]`` checked to be a list of objects (``[]`` when absent and not ``required``).

    Raises ValueError saying what the container or value is instead (see :func:`malformed`).
    """
    if not isinstance(container, dict):
        raise ValueError(f"the top level is {json_kind(container)}, expected an object with {key!r}")
    if key not in container:
        if required:
            raise ValueError(f"it has no {key!r} list")
        return []
    items = container[key]
    if not isinstance(items, list):
        raise ValueError(f"{key!r} is {json_kind(items)}, expected a list of objects")
    for i, v in enumerate(items):
        if not isinstance(v, dict):
            raise ValueError(f"{key}[{i}] is {json_kind(v)}, expected an object")
    return items


def need(d: dict, key: str, kind: str) -> Any:
    """``d[key]`` checked by :func:`checked` (KeyError when absent)."""
    return checked(d[key], kind, key)


def checked(v: Any, kind: str, name: str) -> Any:
    """``v`` (the field ``name``) checked to be of ``kind``: ``id`` (an integer, or digits),
    ``name`` (a non-empty string), ``number`` or ``box`` (4 numbers); ValueError saying
    what it is otherwise."""
    if kind == "id":
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        if _is_number(v) and float(v).is_integer():
            return int(v)
        raise ValueError(f"{name!r} is {json_kind(v)}, expected an integer id")
    if kind == "name":
        if isinstance(v, str) and v:
            return v
        raise ValueError(f"{name!r} is {json_kind(v)}, expected a file name")
    if kind == "number":
        if _is_number(v):
            return float(v)
        raise ValueError(f"{name!r} is {json_kind(v)}, expected a number")
    if kind == "box":
        if isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_number(x) for x in v):
            return [float(x) for x in v]
        raise ValueError(f"{name!r} is {json_kind(v)}, expected 4 numbers")
    raise AssertionError(f"unknown kind {kind!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def text(v: Any) -> str:
    """An expression as read: the string itself, ``""`` for null or a non-string (counted invalid)."""
    return v if isinstance(v, str) else ""


def ident(v: Any) -> str:
    """An id as a string (``""`` for null: never the text ``"None"``)."""
    return "" if v is None else str(v)


def malformed(path: Path, what: str, where: str, e: Exception) -> BadAnnotationError:
    """The one error for a malformed entry: ``{path} is not {what}: {where}: {problem}``."""
    problem = f"it has no {e.args[0]!r} field" if isinstance(e, KeyError) else str(e)
    return BadAnnotationError(f"{path} is not {what}: {where + ': ' if where else ''}{problem}")


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
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` floats (plain Python, for speed on big files).

    Raises ValueError when ``b`` is not 4 numbers.
    """
    if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)):
        raise ValueError(f"'bbox' is {json_kind(b)}, expected 4 numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


_COCO_ID_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def image_id_from_name(name: str) -> str:
    """Numeric image id at the end of a file name (``COCO_train2014_000000000309.jpg`` -> ``309``)."""
    m = _COCO_ID_RE.search(os.path.basename(name))
    return str(int(m.group(1))) if m else ""
