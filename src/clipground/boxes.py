"""Boxes: one canonical format inside clipground.

Inside the library every box is ``xyxy`` in float pixels of the displayed (EXIF-corrected)
image, as a ``torch.Tensor`` of shape ``(N, 4)``. Conversions happen only at the edges:
COCO ``xywh`` pixels when reading annotations, normalized ``cxcywh`` / ``xyxy`` for
regression heads and DETR-style outputs. IoU, GIoU and NMS come from ``torchvision.ops``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou, nms

from .errors import BadBoxError

__all__ = [
    "as_boxes",
    "from_xywh",
    "to_xywh",
    "from_cxcywh",
    "to_cxcywh",
    "normalize",
    "denormalize",
    "clip_to_image",
    "validate",
    "iou",
    "giou",
    "paired_iou",
    "nms",
    "box_iou",
    "generalized_box_iou",
]


def as_boxes(boxes: torch.Tensor | Sequence) -> torch.Tensor:
    """Return ``boxes`` as a float32 ``(N, 4)`` tensor (a single box becomes ``(1, 4)``)."""
    t = torch.as_tensor(boxes, dtype=torch.float32)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[-1] != 4:
        raise BadBoxError(f"expected boxes of shape (N, 4), got {tuple(t.shape)}")
    return t


def from_xywh(boxes: torch.Tensor | Sequence) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` pixels -> canonical ``xyxy`` pixels."""
    return box_convert(as_boxes(boxes), "xywh", "xyxy")


def to_xywh(boxes: torch.Tensor | Sequence) -> torch.Tensor:
    """Canonical ``xyxy`` pixels -> COCO ``[x, y, w, h]`` pixels."""
    return box_convert(as_boxes(boxes), "xyxy", "xywh")


def from_cxcywh(boxes: torch.Tensor | Sequence) -> torch.Tensor:
    """``[cx, cy, w, h]`` -> ``xyxy`` in the same units."""
    return box_convert(as_boxes(boxes), "cxcywh", "xyxy")


def to_cxcywh(boxes: torch.Tensor | Sequence) -> torch.Tensor:
    """``xyxy`` -> ``[cx, cy, w, h]`` in the same units."""
    return box_convert(as_boxes(boxes), "xyxy", "cxcywh")


def normalize(boxes: torch.Tensor | Sequence, width: int, height: int) -> torch.Tensor:
    """``xyxy`` pixels -> ``xyxy`` in [0, 1] relative to the image size."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return as_boxes(boxes) / scale


def denormalize(boxes: torch.Tensor | Sequence, width: int, height: int) -> torch.Tensor:
    """``xyxy`` in [0, 1] -> ``xyxy`` pixels."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return as_boxes(boxes) * scale


def clip_to_image(boxes: torch.Tensor | Sequence, width: int, height: int) -> torch.Tensor:
    """Clamp ``xyxy`` pixel boxes to the image rectangle."""
    b = as_boxes(boxes).clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    return b


def validate(
    boxes: torch.Tensor | Sequence,
    width: int | None = None,
    height: int | None = None,
    *,
    clip: bool = True,
    min_size: float = 1.0,
) -> torch.Tensor:
    """Check ``xyxy`` pixel boxes and return them (clipped to the image when ``clip``).

    Raises :class:`BadBoxError` for non-finite values, boxes with ``x2 <= x1`` or
    ``y2 <= y1``, boxes entirely outside the image, or boxes smaller than ``min_size``
    pixels after clipping.
    """
    b = as_boxes(boxes)
    if not torch.isfinite(b).all():
        raise BadBoxError("box has NaN or infinite coordinates")
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        bad = b[(b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])][0].tolist()
        raise BadBoxError(f"degenerate box {bad}: need x2 > x1 and y2 > y1 (xyxy pixels)")
    if width is not None and height is not None:
        outside = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= width) | (b[:, 1] >= height)
        if outside.any():
            bad = b[outside][0].tolist()
            raise BadBoxError(f"box {bad} lies outside the {width}x{height} image")
        if clip:
            b = clip_to_image(b, width, height)
        small = ((b[:, 2] - b[:, 0]) < min_size) | ((b[:, 3] - b[:, 1]) < min_size)
        if small.any():
            bad = b[small][0].tolist()
            raise BadBoxError(f"box {bad} is smaller than {min_size} px inside the image")
    return b


def iou(a: torch.Tensor | Sequence, b: torch.Tensor | Sequence) -> torch.Tensor:
    """Pairwise IoU matrix ``(N, M)`` of two sets of ``xyxy`` boxes (torchvision)."""
    return box_iou(as_boxes(a), as_boxes(b))


def giou(a: torch.Tensor | Sequence, b: torch.Tensor | Sequence) -> torch.Tensor:
    """Pairwise generalized IoU matrix ``(N, M)`` (torchvision)."""
    return generalized_box_iou(as_boxes(a), as_boxes(b))


def paired_iou(a: torch.Tensor | Sequence, b: torch.Tensor | Sequence) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for each ``i``, shape ``(N,)`` (0 for two empty boxes).

    torchvision's pairwise matrix, its diagonal taken 1024 rows at a time so ``N`` can be large.
    """
    a, b = as_boxes(a), as_boxes(b)
    if len(a) != len(b):
        raise BadBoxError(f"paired_iou needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return torch.zeros(0)
    return torch.cat([box_iou(a[i:i + 1024], b[i:i + 1024]).diagonal() for i in range(0, len(a), 1024)]).nan_to_num(0.0)
