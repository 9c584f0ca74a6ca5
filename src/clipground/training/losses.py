"""Losses shared by the recipes: boxes (Smooth L1 + GIoU), maps (BCE + Dice), multi-positive ranking.

One place for each, so the fusion regressor, the locator and the proposal scorers are
trained with the same definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Logit of padding proposals: finite, so softmax and BCE stay NaN-free.
PAD_LOGIT = -1e4


def box_losses(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth L1 and GIoU loss of normalized ``xyxy`` boxes ``(..., 4)``.

    Plain means without ``weights``; with ``weights`` (the boxes' leading shape, e.g. ``(B, P)``
    summing to 1 over the last axis) each row's weighted sum, averaged over rows.
    """
    from torchvision.ops import generalized_box_iou_loss

    if weights is None:
        return (F.smooth_l1_loss(pred, target, beta=0.05, reduction="mean"),
                generalized_box_iou_loss(pred, target, reduction="mean"))
    l1 = F.smooth_l1_loss(pred, target, beta=0.05, reduction="none").mean(-1)
    giou = generalized_box_iou_loss(pred.reshape(-1, 4), target.reshape(-1, 4), reduction="none").view(weights.shape)
    return (l1 * weights).sum(-1).mean(), (giou * weights).sum(-1).mean()


def box_coverage(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of each cell of an ``h x w`` grid over ``[0, 1]^2`` covered by each box: ``(B, h, w)``."""
    ex = torch.linspace(0, 1, w + 1, device=boxes.device, dtype=boxes.dtype)
    ey = torch.linspace(0, 1, h + 1, device=boxes.device, dtype=boxes.dtype)
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    cx = (torch.minimum(x2, ex[1:]) - torch.maximum(x1, ex[:-1])).clamp(min=0) * w
    cy = (torch.minimum(y2, ey[1:]) - torch.maximum(y1, ey[:-1])).clamp(min=0) * h
    return cy[:, :, None] * cx[:, None, :]


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean soft Dice loss over the batch of ``(B, H, W)`` maps."""
    inter = (prob * target).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def map_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice of map logits against soft targets."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits.sigmoid(), target)


def multi_positive_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with several positives: ``-log sum_{pos} softmax(logits)``, per row."""
    logits = logits.masked_fill(~mask, PAD_LOGIT)
    pos = logits.masked_fill(~(labels > 0) | ~mask, PAD_LOGIT)
    return torch.logsumexp(logits, dim=-1) - torch.logsumexp(pos, dim=-1)


__all__ = ["PAD_LOGIT", "box_coverage", "box_losses", "dice_loss", "map_loss", "multi_positive_ce"]
