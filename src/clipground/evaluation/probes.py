"""Probes of a backbone's dense features: do its patch tokens point at the phrase's object?

Every method that reads the whole image (the locator, the fusion regressor, heatmap + segmenter,
single-pass region features) stands on one property of the backbone: the patch whose joint-space
embedding is most similar to a phrase lies on the phrase's object. :func:`patch_hits` measures it
directly, with the same dense features the methods read (:func:`~clipground.backbone.features.dense_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backbone.features import DenseView, dense_features
from ..images import load_image


def _cells(geom: Any, gh: int, gw: int) -> torch.Tensor:
    """``(gh * gw, 4)`` pixel boxes of the grid cells (row-major) of a dense feature map."""
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    norm = torch.stack([xs / gw, ys / gh, (xs + 1) / gw, (ys + 1) / gh], -1).reshape(-1, 4)
    return geom.to_pixels(norm, clip=False)


def _touches(cells: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """Which cells overlap ``box`` (positive area)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (cells[:, 0] < x2) & (cells[:, 2] > x1) & (cells[:, 1] < y2) & (cells[:, 3] > y1)


@torch.inference_mode()
def patch_hits(backbone: Any, records: Sequence[Any], view: DenseView = DenseView()) -> dict[str, float]:
    """Share of ``records`` whose most phrase-similar patch touches the target box, and the share a
    random patch would reach (``chance``): ``{"patch_hit": ..., "chance": ..., "count": ...}``."""
    hits, chance, images = 0.0, 0.0, {}
    for r in records:
        if r.image not in images:
            images = {r.image: dense_features(backbone, [load_image(r.image)], view)}
        f = images[r.image]
        gh, gw = f["grid"]
        cells = _cells(f["geometry"][0], gh, gw)
        text = backbone.encode_texts([r.expression]).embeds[0].float()
        k = int((f["patch_embeds"][0].float() @ text).argmax())
        on = _touches(cells, r.box)
        hits += float(on[k])
        chance += float(on.float().mean())
    n = max(len(records), 1)
    return {"patch_hit": hits / n, "chance": chance / n, "count": float(len(records))}


__all__ = ["patch_hits"]
