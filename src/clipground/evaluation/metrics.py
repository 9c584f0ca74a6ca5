"""Grounding metrics as pure functions on tensors.

All boxes are ``xyxy`` pixels and every hit test uses plain **IoU** (torchvision's
``box_iou``), not GIoU. Rates are fractions in ``[0, 1]``.

* ``acc@0.5`` (THE number of the field, also called precision@1 / top-1 accuracy) and
  ``acc@0.75``: share of expressions whose single predicted box has IoU >= threshold;
* ``miou``: mean IoU of the predicted boxes;
* ``p@k``: share of expressions with a hit (IoU >= 0.5) among the method's top-k ranked
  candidates (MDETR-style, but with IoU);
* ``proposal_recall@0.5``: share of targets covered by any proposal at IoU >= 0.5, the
  upper bound of every method that picks one of those proposals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from ..boxes import as_boxes

#: Expression-length buckets in words, in display order.
LENGTH_BINS = ("1-2", "3-4", "5-8", "9+")

#: Candidate ranks reported as P@k.
TOP_K = (1, 5, 10)


def candidate_ious(candidates: torch.Tensor | Sequence, target: torch.Tensor | Sequence) -> torch.Tensor:
    """IoU of each ranked candidate ``(K, 4)`` with one target box, shape ``(K,)``."""
    c = torch.as_tensor(candidates, dtype=torch.float32).reshape(-1, 4)
    if len(c) == 0:
        return torch.zeros(0)
    return box_iou(c, as_boxes(target)).flatten().nan_to_num(0.0)


def best_iou(boxes: torch.Tensor | Sequence, target: torch.Tensor | Sequence) -> float:
    """Highest IoU of any box in ``boxes`` with ``target`` (0 when there are none)."""
    ious = candidate_ious(boxes, target)
    return float(ious.max()) if len(ious) else 0.0


def accuracy(ious: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of IoUs at or above ``threshold`` (0 for an empty set)."""
    ious = torch.as_tensor(ious, dtype=torch.float32)
    return float((ious >= threshold).float().mean()) if len(ious) else 0.0


def mean_iou(ious: torch.Tensor) -> float:
    """Mean IoU (0 for an empty set)."""
    ious = torch.as_tensor(ious, dtype=torch.float32)
    return float(ious.mean()) if len(ious) else 0.0


def topk_hits(ranked_ious: Sequence[torch.Tensor], k: int, threshold: float = 0.5) -> torch.Tensor:
    """Per expression: whether any of its top-``k`` candidates has IoU >= ``threshold``.

    ``ranked_ious[i]`` are the IoUs of expression ``i``'s candidates, best-ranked first
    (any length, possibly empty).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return torch.tensor([bool(len(r)) and bool((torch.as_tensor(r)[:k] >= threshold).any()) for r in ranked_ious],
                        dtype=torch.bool)


def precision_at_k(ranked_ious: Sequence[torch.Tensor], k: int, threshold: float = 0.5) -> float:
    """P@k: share of expressions with a hit among their top-``k`` candidates (IoU, not GIoU)."""
    hits = topk_hits(ranked_ious, k, threshold)
    return float(hits.float().mean()) if len(hits) else 0.0


def proposal_recall(best_proposal_ious: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of targets whose best proposal reaches IoU >= ``threshold``."""
    return accuracy(best_proposal_ious, threshold)


def length_bin(expression: str) -> str:
    """Length bucket of an expression, in words: ``1-2``, ``3-4``, ``5-8`` or ``9+``."""
    n = len(expression.split())
    if n <= 2:
        return "1-2"
    if n <= 4:
        return "3-4"
    if n <= 8:
        return "5-8"
    return "9+"


def summarize(ious: torch.Tensor, best_proposal_ious: torch.Tensor | None = None) -> dict[str, float]:
    """Core numbers of one set of expressions: count, Acc@0.5, Acc@0.75, mean IoU[, proposal recall]."""
    ious = torch.as_tensor(ious, dtype=torch.float32)
    out: dict[str, float] = {
        "count": int(len(ious)),
        "acc@0.5": accuracy(ious, 0.5),
        "acc@0.75": accuracy(ious, 0.75),
        "miou": mean_iou(ious),
    }
    if best_proposal_ious is not None:
        out["proposal_recall@0.5"] = proposal_recall(best_proposal_ious, 0.5)
    return out


def grouped(keys: Sequence[str], ious: torch.Tensor, best_proposal_ious: torch.Tensor | None = None,
            order: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """:func:`summarize` per bucket; ``keys[i]`` is expression ``i``'s bucket.

    Buckets come in ``order`` when given (empty buckets of it are skipped), else sorted.
    """
    ious = torch.as_tensor(ious, dtype=torch.float32)
    names = [k for k in order if k in set(keys)] if order is not None else sorted(set(keys))
    names += sorted(set(keys) - set(names))
    out = {}
    for name in names:
        idx = torch.tensor([i for i, k in enumerate(keys) if k == name], dtype=torch.long)
        bp = best_proposal_ious[idx] if best_proposal_ious is not None else None
        out[name] = summarize(ious[idx], bp)
    return out
