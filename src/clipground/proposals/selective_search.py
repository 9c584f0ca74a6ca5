"""Selective search (Uijlings et al., IJCV 2013) via OpenCV contrib: weight-free, offline."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from .base import ProposalSource, register_proposals


@register_proposals
@dataclass
class SelectiveSearch(ProposalSource):
    """Hierarchical grouping proposals. Objectness is rank-based (earlier = larger score).

    The image is resized so its longer side is ``max_side`` before the search (speed),
    and boxes are scaled back. ``mode`` is ``fast`` or ``quality`` (OpenCV's strategies).
    """

    name = "selective-search"
    max_side: int = 500
    mode: str = "fast"
    max_aspect: float = 6.0

    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = image.size
        scale = min(1.0, self.max_side / max(w, h))
        small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR) if scale < 1 else image
        bgr = cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2BGR)
        cv2.setNumThreads(1)
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        if self.mode == "quality":
            ss.switchToSelectiveSearchQuality()
        else:
            ss.switchToSelectiveSearchFast()
        rects = ss.process()  # (N, 4) x, y, w, h in ranked order
        if len(rects) == 0:
            return torch.zeros(0, 4), torch.zeros(0)
        r = torch.as_tensor(np.asarray(rects), dtype=torch.float32) / scale
        aspect = torch.maximum(r[:, 2] / r[:, 3].clamp(min=1), r[:, 3] / r[:, 2].clamp(min=1))
        r = r[aspect <= self.max_aspect]
        boxes = torch.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], dim=1)
        scores = 1.0 - torch.arange(len(boxes), dtype=torch.float32) / max(1, len(boxes))
        return boxes, scores
