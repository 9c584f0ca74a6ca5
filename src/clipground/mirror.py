"""Mirror views: an image flipped together with the spatial words of its phrase.

A scene mirrored left-right, with "left" and "right" swapped in the phrase, describes the
mirrored object, so a mirrored (image, phrase, box) triple is as true as the original.
Training uses this to multiply data (``flips``: :func:`add_flips`, whose records name their
image ``path#h`` / ``path#v`` / ``path#hv``, a key the feature cache and
:func:`load_keyed_image` understand); inference uses it for test-time augmentation (the
fusion regressor's ``tta``): predict on each mirrored view, map the boxes back, and let the
views vote (:func:`vote_boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ClipgroundError

#: Word swaps that keep an expression true when the image is mirrored.
FLIP_WORDS: dict[str, dict[str, str]] = {
    "h": {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"},
    "v": {"top": "bottom", "bottom": "top", "topmost": "bottommost", "bottommost": "topmost", "above": "below",
          "below": "above", "upper": "lower", "lower": "upper"},
}
FLIP_KINDS = ("h", "v", "hv")


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` as a list, or a :class:`ClipgroundError` naming the unknown ones."""
    bad = [k for k in kinds if k not in FLIP_KINDS]
    if bad:
        raise ClipgroundError(f"unknown flip kind(s) {bad}; use h, v or hv")
    return list(kinds)


def flip_expression(text: str, kind: str) -> str:
    """Swap the spatial words a mirror flips (``h``: left/right, ``v``: top/bottom, ``hv``: both)."""
    words = text.split(" ")
    for k in kind:
        words = [FLIP_WORDS[k].get(w, w) for w in words]
    return " ".join(words)


def flip_box(box: Sequence[float], kind: str, width: int, height: int) -> list[float]:
    """Mirror an ``xyxy`` pixel box like the image (self-inverse)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if "h" in kind:
        x1, x2 = width - x2, width - x1
    if "v" in kind:
        y1, y2 = height - y2, height - y1
    return [x1, y1, x2, y2]


def flip_image(image: Any, kind: str) -> Any:
    """Mirror a PIL image (``h``: left-right, ``v``: top-bottom, ``hv``: both)."""
    from PIL import Image

    if "h" in kind:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "v" in kind:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def split_key(key: str) -> tuple[str, str]:
    """``path#kind`` -> ``(path, kind)``; a plain path -> ``(path, "")``."""
    path, sep, kind = key.rpartition("#")
    return (path, kind) if sep and kind in FLIP_KINDS else (key, "")


def load_keyed_image(key: str) -> Any:
    """Load ``path`` or a mirrored view ``path#h`` / ``path#v`` / ``path#hv``."""
    from .images import load_image

    path, kind = split_key(key)
    return flip_image(load_image(path), kind)


def add_flips(records: Sequence[Any], kinds: Sequence[str]) -> list[Any]:
    """``records`` plus mirrored copies (image key ``path#kind``, flipped box, swapped words)."""
    from .data.records import GroundingRecord
    from .images import load_image

    kinds = check_kinds(kinds)
    sizes: dict[str, tuple[int, int]] = {}
    out = list(records)
    for kind in kinds:
        for r in records:
            if r.image not in sizes:
                sizes[r.image] = load_image(r.image).size
            out.append(GroundingRecord(f"{r.image}#{kind}", flip_expression(r.expression, kind),
                                       flip_box(r.box, kind, *sizes[r.image]), r.image_id, r.ref_id, r.split,
                                       {**r.meta, "flip": kind}))
    return out


def vote_boxes(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One box from the answers of several views: ``boxes (V, 4)`` xyxy, ``scores (V,)`` in [0, 1].

    Each view's box is supported by the score-weighted overlap of every view's box with it;
    the best-supported box wins, and the boxes that agree with it (IoU >= ``iou_threshold``)
    are averaged, weighted by their scores. A minority that picked another object is
    outvoted instead of dragging the average between two objects. Returns ``(box (4,),
    score)``: the mean over all views of the agreeing views' scores (a dissenting view adds 0).
    """
    from torchvision.ops import box_iou

    if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(scores) or len(boxes) == 0:
        raise ClipgroundError(f"vote_boxes needs (V, 4) boxes and (V,) scores, got {tuple(boxes.shape)} "
                              f"and {tuple(scores.shape)}")
    w = scores.float().clamp(min=1e-6)
    iou = box_iou(boxes.float(), boxes.float())
    best = int((iou * w[None]).sum(1).argmax())
    agree = (iou[best] >= iou_threshold).float() * w
    box = (boxes.float() * agree[:, None]).sum(0) / agree.sum()
    return box, agree.sum() / len(boxes)
