"""Validation during training: the one evaluator, run on the method being trained.

Every recipe (scorers, fusion regressor, locator, world-CLIP pretraining) validates by
calling :func:`clipground.evaluation.evaluate` on a :class:`~clipground.Grounder` wrapping the
method being trained, with the same protocol as ``clipground eval`` (Acc@0.5 by IoU, refused
phrases counted as misses). Frozen-backbone methods read each validation image's state from
the validation feature cache (``states``); methods whose backbone is being fine-tuned encode
each image live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..evaluation import EvalResult, evaluate


def summary(res: EvalResult, prefix: str = "") -> dict[str, float]:
    """The numbers a learning curve shows: Acc@0.5, mean IoU, proposal recall and Acc@0.5 per type."""
    m = res.metrics
    out = {f"{prefix}acc@0.5": m["acc@0.5"], f"{prefix}miou": m["miou"], f"{prefix}count": float(m["count"])}
    if "proposal_recall@0.5" in m:
        out[f"{prefix}proposal_recall@0.5"] = m["proposal_recall@0.5"]
    for t, v in res.breakdown.get("type", {}).items():
        out[f"{prefix}acc@0.5/{t}"] = v["acc@0.5"]
    return out


def validation_fn(grounder: Any, records: Sequence[Any], states: Callable[[str], Any] | None = None,
                  prefix: str = "") -> Callable[[nn.Module], dict[str, float]]:
    """``eval_fn(model)`` for the :class:`~clipground.training.Trainer`: evaluate ``grounder`` on ``records``.

    The trainer passes the module it trains (a part of ``grounder.method``, or the method
    itself), already in eval mode; the grounder sees the same weights.
    """
    records = list(records)

    def eval_fn(_model: nn.Module) -> dict[str, float]:
        method = grounder.method
        was_training = method.training
        method.eval()
        try:
            return summary(evaluate(grounder, records, progress=False, examples=0, states=states), prefix)
        finally:
            method.train(was_training)
            grounder.reset_image()

    return eval_fn


__all__ = ["summary", "validation_fn"]
