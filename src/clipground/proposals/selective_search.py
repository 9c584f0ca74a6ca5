"""Selective search (Uijlings et al., IJCV 2013) via OpenCV contrib: weight-free, offline.

OpenCV returns its boxes in a randomized order (its ranking multiplies the hierarchy
level by a random number from an internal generator we cannot seed), so taking "the
first K" would give different proposals on every call. We therefore re-rank the unique
boxes with a deterministic objectness cue: the colour contrast between a box and the
ring around it (Alexe et al., "Measuring the objectness of image windows", TPAMI 2012),
computed for all boxes at once with integral colour histograms, times the square root of
the box's share of the image (contrast alone favours tiny boxes), followed by NMS at 0.7.
``scripts/proposal_recall.py`` measures the recall this ranking keeps (results in the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from .base import ProposalSource, register_proposals


def color_contrast(image: np.ndarray, boxes: np.ndarray, bins: int = 4, ring: float = 0.25) -> np.ndarray:
    """Chi-square distance between the colour histogram inside each box and in its ring.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        boxes: ``(N, 4)`` integer xyxy boxes inside the image.
        bins: histogram bins per channel (``bins**3`` colours).
        ring: ring width as a fraction of the box size on each side.
    """
    h, w = image.shape[:2]
    q = (image.astype(np.int32) * bins // 256).clip(0, bins - 1)
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    integ = np.empty((h + 1, w + 1, bins**3), dtype=np.float64)
    for b in range(bins**3):  # one summed-area table per colour bin
        integ[..., b] = cv2.integral((idx == b).astype(np.uint8), sdepth=cv2.CV_64F)

    def hist(x1, y1, x2, y2):
        return integ[y2, x2] - integ[y1, x2] - integ[y2, x1] + integ[y1, x1]

    x1, y1, x2, y2 = (boxes[:, i].astype(np.int64) for i in range(4))
    dw = np.maximum(1, ((x2 - x1) * ring).astype(np.int64))
    dh = np.maximum(1, ((y2 - y1) * ring).astype(np.int64))
    ox1, oy1 = np.maximum(0, x1 - dw), np.maximum(0, y1 - dh)
    ox2, oy2 = np.minimum(w, x2 + dw), np.minimum(h, y2 + dh)
    inner = hist(x1, y1, x2, y2)
    outer = hist(ox1, oy1, ox2, oy2) - inner
    inner = inner / np.maximum(inner.sum(1, keepdims=True), 1)
    outer_n = outer.sum(1, keepdims=True)
    outer = outer / np.maximum(outer_n, 1)
    chi = 0.5 * ((inner - outer) ** 2 / np.maximum(inner + outer, 1e-9)).sum(1)
    chi[outer_n[:, 0] == 0] = 0.0  # the whole image has no ring: no evidence
    return chi


@register_proposals
@dataclass
class SelectiveSearch(ProposalSource):
    """Hierarchical grouping proposals, ranked by colour contrast with their surroundings.

    The image is resized so its longer side is ``max_side`` before the search (speed),
    and boxes are scaled back. ``mode`` is ``fast`` or ``quality`` (OpenCV's strategies).
    """

    name = "selective-search"
    top_k: int = 100
    nms_iou: float | None = 0.7
    max_side: int = 500
    mode: str = "fast"
    max_aspect: float = 6.0

    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = image.size
        scale = min(1.0, self.max_side / max(w, h))
        small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR) if scale < 1 else image
        rgb = np.asarray(small)
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if self.mode == "quality":
            ss.switchToSelectiveSearchQuality()
        else:
            ss.switchToSelectiveSearchFast()
        rects = np.asarray(ss.process()).reshape(-1, 4)
        if len(rects) == 0:
            return torch.zeros(0, 4), torch.zeros(0)
        rects = np.unique(rects, axis=0)  # canonical order, independent of OpenCV's RNG
        aspect = np.maximum(rects[:, 2] / np.maximum(rects[:, 3], 1), rects[:, 3] / np.maximum(rects[:, 2], 1))
        rects = rects[aspect <= self.max_aspect]
        xyxy = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]], 1)
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) / float(rgb.shape[0] * rgb.shape[1])
        scores = color_contrast(rgb, xyxy) * np.sqrt(area)
        boxes = torch.as_tensor(xyxy, dtype=torch.float32) / scale
        return boxes, torch.as_tensor(scores, dtype=torch.float32)
