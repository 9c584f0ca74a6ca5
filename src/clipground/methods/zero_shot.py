"""Zero-shot proposal scoring with CLIP.

Each proposal is shown to CLIP in isolation and compared with the phrase:

* ``crop``: cosine similarity of the cropped box and the phrase, the baseline of the
  design documents (also "CPT-less" ReCLIP ablations);
* ``blur``: everything outside the box blurred (ReCLIP, Subramanian et al., ACL 2022);
* ``circle``: a red ellipse drawn around the box (Red Circle, Shtedritski et al., ICCV 2023).

Views are ensembled by averaging their cosine similarities. With ``relations=True`` a
ReCLIP-style resolver (:mod:`clipground.relations`) handles left/right/top/bottom,
biggest/smallest/middle, ordinals and two-place relations with rules on box geometry,
asking CLIP only about the noun phrases.

All proposal views are encoded once in :meth:`encode_image`; a phrase then costs one
(memoized) text encoding and a matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnknownNameError
from ..imageops import VIEW_KINDS, render_views
from ..relations import parse, resolve
from .base import GroundingMethod, ImageState, MethodConfig, Ranking, register_method


def zero_shot_scores(phrase: str, boxes: torch.Tensor, size: tuple[float, float],
                     similarity: Callable[[str], torch.Tensor], temperature: float, relations: bool = True,
                     size_words: bool = True) -> tuple[torch.Tensor, bool]:
    """The zero-shot answer for one phrase: ``(scores (K,), resolved)``.

    ``similarity(text)`` gives every box's CLIP similarity to ``text``. A spatial phrase
    (with ``relations``) goes through the ReCLIP-style resolver and ``resolved`` is True
    (scores are probabilities in [0, 1]); otherwise the scores are the phrase's similarities.
    Shared by :class:`ZeroShotScorer` and the trained scorers' resolver prior, so both give
    the same answer.
    """
    parsed = parse(phrase, size_words=size_words) if relations else None
    if parsed is not None and parsed.is_spatial:
        return resolve(parsed, boxes, size, similarity, temperature=temperature), True
    return similarity(phrase), False


@dataclass
class ZeroShotConfig(MethodConfig):
    """Options of :class:`ZeroShotScorer`.

    Attributes:
        views: which isolated views to ensemble (``crop``, ``blur``, ``circle``).
        relations: resolve spatial words with geometry rules (ReCLIP-style).
        size_words: with ``relations``, read size adjectives ("the large blue square") as
            "the biggest blue square": a crop scored on its own has lost its size, and
            referring expressions use size contrastively.
        temperature: similarity scale for the resolver's probabilities; ``None`` uses the
            checkpoint's learned CLIP logit scale.
        prompt: template the phrase is put in before text encoding.
    """

    views: tuple[str, ...] = ("crop", "blur")
    relations: bool = True
    size_words: bool = True
    temperature: float | None = None
    prompt: str = "{}"


@register_method
class ZeroShotScorer(GroundingMethod):
    """Rank proposals by CLIP similarity of their isolated views to the phrase."""

    name = "zero-shot"
    Config = ZeroShotConfig

    def __init__(self, backbone, config: ZeroShotConfig | None = None):
        super().__init__(backbone, config)
        bad = set(self.config.views) - set(VIEW_KINDS)
        if bad or not self.config.views:
            raise UnknownNameError(f"views must be a non-empty subset of {VIEW_KINDS}, got {list(self.config.views)}")

    def encode_image(self, state: ImageState) -> None:
        boxes = state.proposals.boxes
        views = render_views(state.image, boxes, self.config.views)
        all_imgs = [im for k in self.config.views for im in views[k]]
        emb = self.backbone.encode_images(all_imgs).embeds if all_imgs else torch.zeros(0, self.backbone.embed_dim)
        state.features["view_embeds"] = emb.reshape(len(self.config.views), len(boxes), self.backbone.embed_dim)

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
            s, _ = zero_shot_scores(phrase, boxes, state.size, similarity, temp, self.config.relations,
                                    self.config.size_words)
            order = s.argsort(descending=True, stable=True)
            out.append(Ranking(boxes[order], s[order]))
        return out
