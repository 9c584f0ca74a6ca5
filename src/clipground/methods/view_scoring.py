"""Scoring proposals by CLIP similarity of their isolated views: the base of ``zero-shot`` and ``flyp``.

Each proposal is shown to CLIP in isolation (:mod:`clipground.backbone.views`: ``crop``,
``blur``, ``circle``), or pooled from one whole-image encoding (``roi``), or as the whole image
with the proposal's mask (``alpha`` through a region-aware backbone, ``fgvp`` blurred outside the
mask; masks are the boxes, or segments of them from a promptable segmenter), and compared with
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

from ..backbone.alpha import check_alpha_views
from ..backbone.features import view_embeddings_batch
from ..backbone.hub import BUNDLED, companion_checkpoint
from ..backbone.views import MASK_VIEW_KINDS, check_view_kinds
from ..errors import ConfigError
from ..relations import score_expression
from ..segmenters import make_segmenter, segment_boxes
from .base import GroundingMethod, ImageState, Ranking, RegionViewConfig


@dataclass
class ViewScorerConfig(RegionViewConfig):
    """Options of a view scorer (``views``, ``roi_size``, ``roi_dense``: see :class:`RegionViewConfig`).

    Attributes:
        views: besides :class:`RegionViewConfig`'s kinds, ``alpha`` (the whole image with the
            proposal's mask, needs a region-aware backbone) and ``fgvp`` (the whole image blurred
            outside the proposal's mask); see ``masks``.
        relations: resolve spatial words with geometry rules (ReCLIP-style).
        size_words: with ``relations``, read size adjectives ("the large blue square") as
            "the biggest blue square": a crop scored on its own has lost its size, and
            referring expressions use size contrastively.
        temperature: similarity scale for the resolver's probabilities; ``None`` uses the
            checkpoint's learned CLIP logit scale.
        prompt: template the phrase is put in before text encoding.
        masks: mask views (``alpha``, ``fgvp``): ``box`` (each proposal's rectangle) or ``sam``
            (a segment of each proposal from SAM prompted with its box, computed once per image).
        sam_model: SAM checkpoint of ``masks=sam``; ``auto``: the bundled world SAM beside a
            bundled world CLIP (or a region-aware CLIP made from one), the hub SAM otherwise.
    """

    relations: bool = True
    size_words: bool = True
    temperature: float | None = None
    prompt: str = "{}"
    masks: str = "box"
    sam_model: str = "auto"


MASK_SOURCES = ("box", "sam")


class ViewScorer(GroundingMethod):
    """Rank proposals by CLIP similarity of their isolated views to the phrase (not registered)."""

    Config = ViewScorerConfig

    def __init__(self, backbone: Any, config: ViewScorerConfig | None = None):
        super().__init__(backbone, config)
        c = self.config
        check_view_kinds(c.views, pooled=True, masked=MASK_VIEW_KINDS)
        self.roi = c.roi
        if c.masks not in MASK_SOURCES:
            raise ConfigError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {c.masks!r}")
        check_alpha_views(c.views, backbone)
        self._segmenter: Any = None

    @property
    def mask_views(self) -> bool:
        """Whether a view reads the proposals' masks."""
        return any(v in MASK_VIEW_KINDS for v in self.config.views)

    def feature_key(self) -> dict[str, Any]:
        key = {"kind": "views", "views": list(self.config.views), "backbone": self.backbone.name}
        if "roi" in self.config.views:
            key["roi"] = self.roi.to_dict()
        if self.mask_views:
            key["masks"] = self.config.masks if self.config.masks == "box" else f"sam:{self.sam_checkpoint()}"
        return key

    def sam_checkpoint(self) -> str:
        """The SAM of ``masks=sam`` (``auto`` resolved beside the backbone)."""
        if self.config.sam_model != "auto":
            return self.config.sam_model
        return companion_checkpoint("sam", getattr(self.backbone, "base", self.backbone.name)
                                    if self.backbone.name not in BUNDLED else self.backbone.name)

    def proposal_masks(self, state: ImageState) -> torch.Tensor | None:
        """The masks the mask views read: ``None`` (the boxes) or SAM's segment of every proposal."""
        if not self.mask_views or self.config.masks == "box":
            return None
        if self._segmenter is None:
            self._segmenter = make_segmenter("sam", sam_model=self.sam_checkpoint(), sam_prompt="box")
        return segment_boxes(self._segmenter, state.image, state.proposals.boxes)

    def encode_image(self, state: ImageState) -> None:
        self.encode_images([state])

    def encode_images(self, states: list[ImageState]) -> None:
        """All views of all ``states`` encoded in shared batches (streamed, see ``encode_images``)."""
        masks = [self.proposal_masks(s) for s in states] if self.mask_views else None
        embs = view_embeddings_batch(self.backbone, [s.image for s in states], [s.proposals.boxes for s in states],
                                     self.config.views, self.roi, masks)
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
