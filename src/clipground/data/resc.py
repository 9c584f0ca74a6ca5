"""ReSC / TransVG / CLIP-VG / HiVG split files: ``{dataset}_{split}.pth``.

A legacy torch pickle holding a list of tuples. The RefCOCO family
(``unc``, ``unc+``, ``gref``, ``gref_umd``) stores ``(image_file, mask_file, bbox, expression,
parse)`` with ``bbox = [x, y, w, h]``; ReferItGame stores ``(image_file, mask_file, bbox,
expression, ...)`` and Flickr30k Entities ``(image_file, bbox, phrase)``, both with
``bbox = [x1, y1, x2, y2]`` (that is how those codebases read them). Fields are found by
type (the first string is the image, the first 4-number sequence the box, the first
string after the box the expression), so 3-, 4- and 5-field variants all load.

Both the legacy torch pickle (how the published files are written) and torch's zip format
are read with the restricted ``weights_only`` unpickler (:func:`clipground.io.load_torch_data`):
a file that would run code is refused with :class:`~clipground.errors.UnsafeFileError`.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError, UnsafeFileError
from ..io import load_torch_data
from .loaders import image_id_from_name, image_path, split_from_name, xywh_to_xyxy
from .records import GroundingRecord

#: File-name prefixes whose boxes are already ``xyxy`` (ReSC/TransVG read them as such).
XYXY_PREFIXES = ("referit", "flickr")


def _as_box(x: Any) -> list[float] | None:
    """A 4-number sequence (list, tuple, numpy array or tensor) as floats, else None."""
    if isinstance(x, (str, bytes, dict)):
        return None
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (list, tuple)) and len(x) == 4 and all(isinstance(v, numbers.Real) for v in x):
        return [float(v) for v in x]
    return None


def box_format_for(path: Path) -> str:
    """``xyxy`` for ReferItGame/Flickr split files, ``xywh`` (COCO) for the RefCOCO family."""
    return "xyxy" if path.name.lower().startswith(XYXY_PREFIXES) else "xywh"


def parse_item(item: Any) -> tuple[str, list[float], str, str]:
    """Split one item into ``(image_file, bbox, expression, mask_file)`` by field type."""
    if not isinstance(item, (list, tuple)) or len(item) < 3:
        raise ValueError(f"expected a tuple of 3-5 fields, got {type(item).__name__}")
    box_i = next((i for i, v in enumerate(item) if _as_box(v) is not None), None)
    if box_i is None:
        raise ValueError("no [x, y, w, h] box among the fields")
    strings_before = [v for v in item[:box_i] if isinstance(v, str)]
    if not strings_before:
        raise ValueError("no image file name before the box")
    expr = next((v for v in item[box_i + 1:] if isinstance(v, str)), None)
    if expr is None:
        raise ValueError("no expression after the box")
    mask = strings_before[1] if len(strings_before) > 1 else ""
    return strings_before[0], _as_box(item[box_i]), expr, mask  # type: ignore[return-value]


def read_torch_pickle(path: Path) -> Any:
    """Read a split file as plain data only, turning failures into one clear error."""
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    try:
        return load_torch_data(path, what="split file")
    except UnsafeFileError:
        raise
    except Exception as e:  # corrupt/unknown pickles raise many types
        raise BadAnnotationError(f"{path} is not a readable torch/pickle file ({type(e).__name__}: {e})") from None


def load_resc(path: Path, images: Path | None = None, box_format: str | None = None,
              **_: Any) -> list[GroundingRecord]:
    """Read a ReSC-style ``.pth`` split file.

    Args:
        path: e.g. ``gref_umd_val.pth`` (the split, ``val``, comes from the name).
        images: folder of the image files (default: the file's folder).
        box_format: ``xywh`` or ``xyxy``; default from the file name (see module docstring).
    """
    data = read_torch_pickle(path)
    if not isinstance(data, (list, tuple)):
        raise BadAnnotationError(f"{path}: expected a list of (image, ..., bbox, expression) items, "
                                 f"got {type(data).__name__} (is this a corpus/vocabulary file?)")
    fmt = box_format or box_format_for(path)
    if fmt not in ("xywh", "xyxy"):
        raise BadAnnotationError(f"box_format must be xywh or xyxy, got {fmt!r}")
    root = images if images is not None else path.parent
    split = split_from_name(path)
    out: list[GroundingRecord] = []
    for i, item in enumerate(data):
        try:
            image_file, box, expr, mask = parse_item(item)
        except ValueError as e:
            raise BadAnnotationError(f"{path}: item #{i} is malformed ({e})") from None
        out.append(GroundingRecord(
            image=image_path(root, image_file),
            expression=expr,
            box=xywh_to_xyxy(box) if fmt == "xywh" else box,
            image_id=image_id_from_name(image_file),
            ref_id=Path(mask).stem if mask else "",
            split=split,
            meta={"index": i},
        ))
    return out
