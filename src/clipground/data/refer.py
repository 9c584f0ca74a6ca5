"""The refer API layout (lichengunc/refer): ``refs(umd).p`` + ``instances.json``.

``refs(<splitBy>).p`` is a pickle of refs ``{ref_id, ann_id, image_id, split,
sentences: [{sent, tokens, ...}], category_id}``; the COCO ``instances.json`` next to it
gives each ``ann_id`` its ``bbox [x, y, w, h]`` and each image its ``file_name``. Every
sentence becomes one record (RefCOCOg umd val: 4,896 sentences on 2,573 refs).

The pickles were written by Python 2; strings that are not ASCII are read as latin-1
bytes and repaired to UTF-8. They are read with a restricted unpickler that builds plain
containers, strings and numbers only (:func:`clipground.io.load_pickle_data`): a pickle that
would run code is refused with :class:`~clipground.errors.UnsafeFileError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BadAnnotationError, UnsafeFileError
from ..io import load_pickle_data
from .coco import WHAT as COCO_WHAT, coco_tables
from .loaders import checked, ident, image_path, json_kind, malformed, need, objects, read_json, text, xywh_to_xyxy
from .records import GroundingRecord


def read_pickle(path: Path) -> Any:
    """Read a (possibly Python 2) pickle, with one clear error for anything unreadable."""
    if not path.is_file():
        raise BadAnnotationError(f"annotation file not found: {path}")
    try:
        return load_pickle_data(path, what="refs file")
    except UnsafeFileError:
        raise
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
        raise BadAnnotationError(f"{refs_path}: expected a list of refs, got {json_kind(refs)}")
    inst = read_json(inst_path)
    root = images if images is not None else refs_path.parent
    files, cats = coco_tables(inst, inst_path)
    where = ""
    try:
        anns: dict[int, tuple[dict, list[float]]] = {}
        for i, a in enumerate(objects(inst, "annotations")):
            where = f"annotations[{i}]"
            anns[need(a, "id", "id")] = a, xywh_to_xyxy(a["bbox"])
    except (KeyError, ValueError) as e:
        raise malformed(inst_path, COCO_WHAT, where, e) from None
    out: list[GroundingRecord] = []
    for i, ref in enumerate(refs):
        try:
            if not isinstance(ref, dict):
                raise ValueError(f"it is {json_kind(ref)}, expected a dict")
            ann_id = need(ref, "ann_id", "id")
            if ann_id not in anns:
                raise ValueError(f"its ann_id {ann_id} is not in {inst_path.name}")
            ann, box = anns[ann_id]
            image_id = need(ref, "image_id", "id")
            if image_id not in files:
                raise ValueError(f"its image_id {image_id} is not in {inst_path.name}")
            cat_id = ref.get("category_id", ann.get("category_id"))
            cat = cats.get(checked(cat_id, "id", "category_id"), "") if cat_id is not None else ""
            sentences = ref["sentences"]
            if not isinstance(sentences, list):
                raise ValueError(f"'sentences' is {json_kind(sentences)}, expected a list")
            for j, s in enumerate(sentences):
                if not isinstance(s, dict):
                    raise ValueError(f"sentences[{j}] is {json_kind(s)}, expected a dict")
                out.append(GroundingRecord(
                    image=image_path(root, files[image_id]),
                    expression=text(s.get("sent", s.get("raw"))),
                    box=box,
                    image_id=str(image_id),
                    ref_id=ident(ref.get("ref_id")),
                    split=text(ref.get("split")),
                    meta={"category": cat, "ann_id": ann_id, "sent_id": s.get("sent_id")},
                ))
        except (KeyError, ValueError) as e:
            raise malformed(refs_path, "a refer refs file", f"ref #{i}", e) from None
    return out
