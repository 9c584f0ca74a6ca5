"""The refer API layout (lichengunc/refer): ``refs(umd).p`` + ``instances.json``.

``refs(<splitBy>).p`` is a pickle of refs ``{ref_id, ann_id, image_id, split,
sentences: [{sent, tokens, ...}], category_id}``; the COCO ``instances.json`` next to it
gives each ``ann_id`` its ``bbox [x, y, w, h]`` and each image its ``file_name``. Every
sentence becomes one record (RefCOCOg umd val: 4,896 sentences on 2,573 refs).

The pickles were written by Python 2; strings that are not ASCII are read as latin-1
bytes and repaired to UTF-8. Only load pickles you trust (pickle can run code).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError
from .loaders import image_path, read_json, xywh_to_xyxy
from .records import GroundingRecord


def _repair(x: Any) -> Any:
    """Undo latin-1 decoding of Python 2 UTF-8 byte strings, recursively."""
    if isinstance(x, str):
        try:
            return x.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return x
    if isinstance(x, list):
        return [_repair(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_repair(v) for v in x)
    if isinstance(x, dict):
        return {_repair(k): _repair(v) for k, v in x.items()}
    return x


def read_pickle(path: Path) -> Any:
    """Read a (possibly Python 2) pickle, with one clear error for anything unreadable."""
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    try:
        try:
            with path.open("rb") as f:
                return pickle.load(f)
        except UnicodeDecodeError:
            with path.open("rb") as f:
                return _repair(pickle.load(f, encoding="latin-1"))
    except Exception as e:  # pickle raises many types for a corrupt file
        raise BadAnnotationError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


def _find_refs(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("refs(*).p"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadAnnotationError(f"no refs(*).p file in {path}")
    raise BadAnnotationError(f"{path} has several refs files ({', '.join(f.name for f in found)}); name one")


def load_refer(path: Path, images: Path | None = None, instances: str | Path | None = None,
               **_: Any) -> list[GroundingRecord]:
    """Read ``refs(*).p`` (file or its folder) and the ``instances.json`` beside it.

    Args:
        path: the refs pickle, or the folder holding exactly one.
        images: folder of the COCO images (default: the refs file's folder).
        instances: the COCO instances file (default: ``instances.json`` beside the refs).
    """
    refs_path = _find_refs(path)
    inst_path = Path(instances) if instances is not None else refs_path.parent / "instances.json"
    if not inst_path.is_file():
        raise BadAnnotationError(f"refer format needs instances.json beside {refs_path.name} (looked for {inst_path})")
    refs = read_pickle(refs_path)
    if not isinstance(refs, list):
        raise BadAnnotationError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    inst = read_json(inst_path)
    root = images if images is not None else refs_path.parent
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
        cats = {int(c["id"]): str(c["name"]) for c in inst.get("categories", [])}
    except (KeyError, TypeError, ValueError) as e:
        raise BadAnnotationError(f"{inst_path} is not a COCO instances file ({type(e).__name__}: {e})") from None
    out: list[GroundingRecord] = []
    for i, ref in enumerate(refs):
        try:
            ann = anns[int(ref["ann_id"])]
            image_id = int(ref["image_id"])
            file_name = files[image_id]
            box = xywh_to_xyxy(ann["bbox"])
            cat = cats.get(int(ref.get("category_id", ann.get("category_id", -1))), "")
            for s in ref["sentences"]:
                out.append(GroundingRecord(
                    image=image_path(root, file_name),
                    expression=str(s.get("sent", s.get("raw", ""))),
                    box=box,
                    image_id=str(image_id),
                    ref_id=str(ref.get("ref_id", "")),
                    split=str(ref.get("split", "")),
                    meta={"category": cat, "ann_id": int(ref["ann_id"]), "sent_id": s.get("sent_id")},
                ))
        except (KeyError, TypeError, ValueError) as e:
            raise BadAnnotationError(f"{refs_path}: ref #{i} is malformed or not in {inst_path.name} ({type(e).__name__}: {e})") from None
    return out
