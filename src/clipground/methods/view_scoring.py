"""Scoring proposals by CLIP similarity of their isolated views: the base of ``zero-shot`` and ``flyp``.

Each proposal is shown to CLIP in isolation (:mod:`clipground.backbone.views`: ``crop``,
``blur``, ``circle``), or pooled from one whole-image encoding (``roi``), and compared with
the phrase; views are ensembled by averaging their
cosine similarities. With ``relations`` a ReCLIP-style resolver
(:func:`clipground.relations.score_expression`) answers left/right/top/bottom,
biggest/smallest/middle, ordinals and two-place relations with rules on box geometry, asking
CLIP only about the noun phrases.

All proposal views are encoded once in :meth:`ViewScorer.encode_image`; a phrase then costs
one (memoized) text encoding and a matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbone.features import view_embeddings_batch
from ..backbone.views import check_view_kinds
from ..relations import score_expression
from .base import GroundingMethod, ImageState, Ranking, RegionViewConfig


@dataclass
class ViewScorerConfig(RegionViewConfig):
    """Options of a view scorer (``views``, ``roi_size``, ``roi_dense``: see :class:`RegionViewConfig`).

    Attributes:
        relations: resolve spatial words with geometry rules (ReCLIP-style).
        size_words: with ``relations``, read size adjectives ("the large blue square") as
            "the biggest blue square": a crop scored on its own has lost its size, and
            referring expressions use size contrastively.
        temperature: similarity scale for the resolver's probabilities; ``None`` uses the
            checkpoint's learned CLIP logit scale.
        prompt: template the phrase is put in before text encoding.
    """

    relations: bool = True
    size_words: bool = True
    temperature: float | None = None
    prompt: str = "{}"


class ViewScorer(GroundingMethod):
    """Rank proposals by CLIP similarity of their isolated views to the phrase (not registered)."""

    Config = ViewScorerConfig

    def __init__(self, backbone: Any, config: ViewScorerConfig | None = None):
        super().__init__(backbone, config)
        check_view_kinds(self.config.views, pooled=True)
        self.roi = self.config.roi

    def feature_key(self) -> dict[str, Any]:
        key = {"kind": "views", "views": list(self.config.views), "backbone": self.backbone.name}
        if "roi" in self.config.views:
            key["roi"] = self.roi.to_dict()
        return key

    def encode_image(self, state: ImageState) -> None:
        self.encode_images([state])

    def encode_images(self, states: list[ImageState]) -> None:
        """All views of all ``states`` encoded in shared batches (streamed, see ``encode_images``)."""
        embs = view_embeddings_batch(self.backbone, [s.image for s in states], [s.proposals.boxes for s in states],
                                     self.config.views, self.roi)
        for s, e in zip(states, embs):
            s.features["view_embeds"] = e

    def similarity(self, state: ImageState, texts: list[str]) -> torch.Tensor:
        """``(len(texts), K)`` mean cosine similarity over views."""
        t = self.backbone.text_embeds([self.config.prompt.format(x) for x in texts])
        v = state.features["view_embeds"]  # (V, K, D)
        return torch.einsum("vkd,td->tk", v, t) / v.shape[0]

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        boxes = state.proposals.boxes
        if len(boxes) == 0:
            return [Ranking(boxes, torch.zeros(0)) for _ in phrases]
        sims = dict(zip(phrases, self.similarity(state, phrases)))  # whole phrases in one batch
        temp = float(self.config.temperature or self.backbone.logit_scale)

        def similarity(text: str) -> torch.Tensor:
            return sims[text] if text in sims else self.similarity(state, [text])[0]

        out = []
        for phrase in phrases:
            s, _ = score_expression(phrase, boxes, state.size, similarity, temp, self.config.relations,
                                    self.config.size_words)
            order = s.argsort(descending=True, stable=True)
            out.append(Ranking(boxes[order], s[order]))
        return out
