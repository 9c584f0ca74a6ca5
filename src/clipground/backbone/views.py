"""Isolated-proposal views: how a box is shown to CLIP.

* ``crop``: the box region alone (the design documents' baseline; ReCLIP's "crop").
* ``blur``: the whole image with everything outside the box Gaussian-blurred, so CLIP
  still sees context and absolute size (ReCLIP, Subramanian et al., ACL 2022).
* ``circle``: the whole image with a red ellipse drawn around the box (Red Circle,
  Shtedritski et al., ICCV 2023).

* ``alpha`` (a *mask* view): the whole image with the proposal's mask (its box, or a segment
  of it) as a fourth input channel of a region-aware CLIP (Alpha-CLIP, Sun et al., CVPR 2024;
  :mod:`clipground.backbone.alpha`): one forward per (image, mask) pair.
* ``fgvp`` (a *mask* view): the whole image blurred outside the proposal's mask (FGVP's
  blur-reverse-mask prompt, Yang et al., NeurIPS 2023); with box masks it equals ``blur``.

* ``roi`` (a *pooled* view, rendered by no one): the whole image is encoded once and each
  box's embedding is pooled from the patch embeddings it covers
  (:func:`clipground.backbone.features.roi_embeddings`), so its cost does not grow with the
  number of boxes. Only the zero-shot view scorers accept it.

The backbone owns them: zero-shot scoring, the trained scorers, the feature cache and
pretraining all render views here, so a model pretrained on these views is scored with
exactly the same views.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

VIEW_KINDS = ("crop", "blur", "circle")
#: Views pooled from one whole-image encoding instead of rendered per box.
POOLED_VIEW_KINDS = ("roi",)
#: Views of a proposal's mask (its box, or a segment from a promptable segmenter).
MASK_VIEW_KINDS = ("alpha", "fgvp")


def _int_box(box: Sequence[float], w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, y1 = max(0, int(round(x1))), max(0, int(round(y1)))
    x2, y2 = min(w, max(x1 + 1, int(round(x2)))), min(h, max(y1 + 1, int(round(y2))))
    return x1, y1, x2, y2


def crop_view(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The box region alone."""
    return image.crop(_int_box(box, *image.size))


def blur_view(image: Image.Image, box: Sequence[float], radius: float | None = None,
              blurred: Image.Image | None = None) -> Image.Image:
    """Whole image, blurred outside ``box``. Pass ``blurred`` to reuse one blur for many boxes."""
    if blurred is None:
        blurred = blur_image(image, radius)
    out = blurred.copy()
    b = _int_box(box, *image.size)
    out.paste(image.crop(b), b[:2])
    return out


def blur_image(image: Image.Image, radius: float | None = None) -> Image.Image:
    """The Gaussian-blurred background used by :func:`blur_view` (radius scales with size)."""
    if radius is None:
        radius = max(2.0, 0.02 * max(image.size))
    return image.filter(ImageFilter.GaussianBlur(radius))


def circle_view(image: Image.Image, box: Sequence[float], width: int | None = None) -> Image.Image:
    """Whole image with a red ellipse around ``box``."""
    out = image.copy()
    w, h = image.size
    if width is None:
        width = max(1, int(round(0.01 * max(w, h))))
    x1, y1, x2, y2 = (float(v) for v in box)
    # Enlarge slightly so the outline does not cover the object itself.
    dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    ImageDraw.Draw(out).ellipse([x1 - dx, y1 - dy, x2 + dx, y2 + dy], outline=(255, 0, 0), width=width)
    return out


def fgvp_view(image: Image.Image, mask: Any, blurred: Image.Image | None = None) -> Image.Image:
    """Whole image, blurred outside ``mask`` (``(H, W)`` bool; FGVP's blur-reverse-mask prompt)."""
    if blurred is None:
        blurred = blur_image(image)
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return Image.composite(image, blurred, Image.fromarray(m.astype(bool).astype(np.uint8) * 255, "L"))


def render_view(kind: str, image: Image.Image, box: Sequence[float], blurred: Image.Image | None = None) -> Image.Image:
    """One view of ``box`` (``blurred``: a precomputed :func:`blur_image` to reuse)."""
    if kind == "crop":
        return crop_view(image, box)
    if kind == "blur":
        return blur_view(image, box, blurred=blurred)
    if kind == "circle":
        return circle_view(image, box)
    raise ValueError(f"unknown view kind {kind!r}; choose from {VIEW_KINDS}")


def check_view_kinds(kinds: Sequence[str], pooled: bool = False, masked: Sequence[str] = ()) -> tuple[str, ...]:
    """``kinds`` as a tuple of distinct known view kinds, or a :class:`~clipground.errors.ConfigError`
    (``pooled``: the caller also accepts :data:`POOLED_VIEW_KINDS`; ``masked``: the mask views it accepts)."""
    from ..errors import ConfigError

    kinds = tuple(kinds)
    known = VIEW_KINDS + (POOLED_VIEW_KINDS if pooled else ()) + tuple(k for k in MASK_VIEW_KINDS if k in masked)
    bad = sorted(set(kinds) - set(known))
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(f"views must be distinct kinds from {', '.join(known)}, got {list(kinds)}")
    return kinds


def iter_views(image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[float]],
               kinds: Sequence[str] = VIEW_KINDS) -> Iterator[Image.Image]:
    """Every box's view of each of ``kinds`` (kind by kind, boxes in order), rendered one at a time.

    Consumed in encoder batches, only a batch of views is ever held (a blur view is a
    full-size copy of the image); the blur is computed once per image.
    """
    unknown = set(kinds) - set(VIEW_KINDS)
    if unknown:
        raise ValueError(f"unknown view kind(s) {sorted(unknown)}; choose from {VIEW_KINDS}")
    boxes = [list(map(float, b)) for b in (boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes)]
    blurred = blur_image(image) if "blur" in kinds and boxes else None
    for k in kinds:
        for b in boxes:
            yield render_view(k, image, b, blurred)


def render_views(image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[float]],
                 kinds: Sequence[str] = VIEW_KINDS) -> dict[str, list[Image.Image]]:
    """Render each of ``kinds`` for every box (all held at once: :func:`iter_views` streams them)."""
    views = iter_views(image, boxes, kinds)
    n = len(boxes)
    return {k: [next(views) for _ in range(n)] for k in kinds}
