"""Trained proposal scorers: four ways to learn "which proposal does this phrase mean".

All four rank the proposals of one image, like the zero-shot scorer, and see images only
through :mod:`clipground.backbone` (views from :mod:`clipground.backbone.views`, features
from :func:`clipground.backbone.features.region_features`, the same function that fills the
feature cache, so cached training and live inference see identical numbers).

* ``proposal-classifier``: an MLP on frozen CLIP features of each proposal (crop and blur
  view embeddings, their products with the phrase embedding and their cosines), the
  proposal's normalized box geometry and the phrase embedding, trained with binary
  cross-entropy ("is this the target"); the best-scoring proposal wins. The design
  documents' student project.
* ``clip-finetune``: the last N blocks of CLIP's vision and text towers unfrozen under a
  ranking head over the image's proposals (softmax cross-entropy, target = positive
  proposal). Kept stable with the usual habits: tiny learning rate, LayerNorms and the
  embeddings frozen, the backbone always in eval mode (no dropout). Saves the backbone.
* ``flyp``: "Finetune Like You Pretrain" (Goyal et al., CVPR 2023): the target proposal's
  crop and the phrase are a positive pair, the image's other proposals and the batch's
  other phrases are negatives, under CLIP's own symmetric contrastive loss with its
  learned temperature. Scores exactly like ``zero-shot`` at inference (including the
  relation resolver). Saves the backbone.
* ``proposal-attention``: the phrase's token states, its pooled embedding and all the
  image's proposals (each its view embeddings plus an embedding of its box geometry)
  attend to each other in a small Transformer encoder; a per-proposal logit picks one
  (softmax cross-entropy over proposals). Seeing every proposal's geometry and the words
  at once lets it learn "second from the left" or "left of the blue square", which
  isolated-proposal scorers cannot.

Training code lives in :mod:`clipground.training.recipes.scorers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbone import ClipBackbone
from ..backbone.alpha import check_alpha_views
from ..backbone.features import region_feature_key, region_features
from ..backbone.views import check_view_kinds
from ..errors import ConfigError
from ..relations import parse, score_expression
from .base import GroundingMethod, ImageState, MethodConfig, Ranking, RegionViewConfig, register_method
from .view_scoring import ViewScorer, ViewScorerConfig

#: Columns of :func:`box_geometry`.
GEOMETRY_DIM = 7
_NEG = -1e4  # logit of padding proposals (finite: keeps softmax/BCE NaN-free)


def box_geometry(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(K, 7)`` normalized geometry: ``x1, y1, x2, y2`` / image side, ``w, h`` / side, area / image area."""
    w, h = float(size[0]), float(size[1])
    b = boxes.float().reshape(-1, 4)
    bw, bh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
    return torch.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, bw, bh, bw * bh], dim=1)


def noun_phrases(expression: str) -> tuple[str, str | None]:
    """``(subject, object)`` noun phrases of an expression (the relation resolver's grammar).

    "the red circle left of the blue square" -> ("red circle", "blue square");
    "the second star from the left" -> ("star", None); "the red circle" -> ("red circle", None).
    """
    p = parse(expression)
    return p.subject, p.object


def resolver_prior(expression: str, views: torch.Tensor, geom: torch.Tensor, text: torch.Tensor,
                   nps: torch.Tensor, np_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(K,)`` the zero-shot scorer's answer for one phrase (:func:`~clipground.relations.score_expression`),
    scaled to a maximum of 1.

    Computed from the frozen features a scorer already has (view embeddings ``(K, V, D)``,
    normalized geometry ``(K, 7)``, the phrase embedding and its subject/object embeddings),
    with size words kept in the noun phrase, as the cached noun phrases are parsed.
    Similarities become ``exp(T (s - max s))``; resolver probabilities are divided by their max.
    """
    p = parse(expression)
    by_text = {expression: text, p.subject: nps[0]}
    if p.object and bool(np_mask[1]):
        by_text.setdefault(p.object, nps[1])

    def sim(t: str) -> torch.Tensor:
        return torch.einsum("kvd,d->k", views, by_text.get(t, text)) / views.shape[1]

    s, resolved = score_expression(expression, geom[:, :4], (1.0, 1.0), sim, temperature, size_words=False)
    if resolved:
        return s / s.max().clamp(min=1e-12)
    return torch.exp(temperature * (s - s.max()))


# --------------------------------------------------------------------------- batches


def collate_feature_items(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad per-sample feature dicts into a batch.

    Each item has ``views (K, V, D)``, ``geom (K, 7)``, ``text (D,)``, ``tokens (L, Dt)``,
    ``image (D,)``, optionally ``labels (K,)`` (1 = positive) and optionally ``nps (2, D)``
    with ``np_mask (2,)`` (subject/object noun-phrase embeddings). The batch has the same
    keys padded to the largest ``K``/``L`` plus ``mask (B, K)`` and ``tmask (B, L)``.
    """
    b = len(items)
    kmax = max(1, max(int(it["views"].shape[0]) for it in items))
    lmax = max(1, max(int(it["tokens"].shape[0]) for it in items))
    v, d = items[0]["views"].shape[1:]
    dt = items[0]["tokens"].shape[1]
    views = torch.zeros(b, kmax, v, d)
    geom = torch.zeros(b, kmax, GEOMETRY_DIM)
    mask = torch.zeros(b, kmax, dtype=torch.bool)
    tokens = torch.zeros(b, lmax, dt)
    tmask = torch.zeros(b, lmax, dtype=torch.bool)
    labels = torch.zeros(b, kmax)
    for i, it in enumerate(items):
        k, n = int(it["views"].shape[0]), int(it["tokens"].shape[0])
        views[i, :k] = it["views"]
        geom[i, :k] = it["geom"]
        mask[i, :k] = True
        tokens[i, :n] = it["tokens"]
        tmask[i, :n] = True
        if "labels" in it:
            labels[i, :k] = it["labels"]
    out = {"views": views, "geom": geom, "mask": mask, "tokens": tokens, "tmask": tmask, "labels": labels,
           "text": torch.stack([it["text"] for it in items]), "image": torch.stack([it["image"] for it in items])}
    if all("prior" in it for it in items):
        prior = torch.zeros(b, kmax)
        for i, it in enumerate(items):
            prior[i, : int(it["views"].shape[0])] = it["prior"]
        out["prior"] = prior
    if all("nps" in it for it in items):
        out["nps"] = torch.stack([it["nps"] for it in items])
        out["np_mask"] = torch.stack([it["np_mask"] for it in items])
    else:
        out["nps"] = torch.zeros(b, 2, d)
        out["np_mask"] = torch.zeros(b, 2, dtype=torch.bool)
    return out


# --------------------------------------------------------------------------- frozen-feature base



class _FrozenFeatureScorer(GroundingMethod):
    """Shared plumbing of methods that score frozen CLIP features of proposals."""

    uses_proposals = True
    recipe = "scorers"
    saves_backbone = False
    needs_tokens = False

    def feature_key(self) -> dict[str, Any]:
        return region_feature_key(self.backbone, self.config.views, self.config.roi)

    def encode_image(self, state: ImageState) -> None:
        state.features.update(region_features(self.backbone, state.image, state.proposals.boxes, self.config.views,
                                              roi=self.config.roi))

    def feature_items(self, state: ImageState, phrases: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Per-phrase feature dicts of the current image (the inputs of :meth:`forward`)."""
        views = state.features["view_embeds"].transpose(0, 1)  # (K, V, D)
        geom = box_geometry(state.proposals.boxes, state.size)
        image = state.features["image_embed"]
        if self.needs_tokens:
            f = self.backbone.encode_texts(list(phrases))
            lengths = f.mask.sum(1).tolist()
            texts = f.embeds
            toks = [f.tokens[i, : int(n)] for i, n in enumerate(lengths)]
        else:
            texts = self.backbone.text_embeds(list(phrases))
            toks = [torch.zeros(0, self.backbone.text_width) for _ in phrases]
        items = [{"views": views, "geom": geom, "text": t, "tokens": tk, "image": image} for t, tk in zip(texts, toks)]
        if getattr(self.config, "noun_phrases", False):
            for it, phrase in zip(items, phrases):
                it["nps"], it["np_mask"] = self.noun_phrase_embeds(phrase, self.backbone.text_embeds)
        if getattr(self.config, "resolver_prior", False):
            temp = float(self.backbone.logit_scale)
            for it, phrase in zip(items, phrases):
                it["prior"] = resolver_prior(phrase, views, geom, it["text"], it["nps"], it["np_mask"], temp)
        return items

    def noun_phrase_embeds(self, phrase: str, embed: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2, D)`` subject/object embeddings and their ``(2,)`` presence mask; ``embed(texts) -> (N, D)``."""
        subj, obj = noun_phrases(phrase)
        texts = [subj] + ([obj] if obj else [])
        e = embed(texts)
        out = torch.zeros(2, e.shape[-1])
        out[: len(texts)] = e
        return out, torch.tensor([True, obj is not None])

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        boxes = state.proposals.boxes
        if len(boxes) == 0:
            return [Ranking(boxes, torch.zeros(0)) for _ in phrases]
        batch = collate_feature_items(self.feature_items(state, phrases))
        logits = self.forward(batch)[:, : len(boxes)]
        out = []
        for s in logits:
            order = s.argsort(descending=True, stable=True)
            out.append(Ranking(boxes[order], s[order]))
        return out

    def train(self, mode: bool = True) -> "_FrozenFeatureScorer":
        super().train(mode)
        self.backbone.model.eval()  # the frozen backbone never drops out
        return self


def _np_features(views: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per proposal: cosine of each view with the subject and object phrases ``(B, K, 2V)``,
    and the presence flags of the two phrases ``(B, K, 2)``."""
    b, k, v, _ = views.shape
    cos = torch.einsum("bkvd,bnd->bkvn", views, batch["nps"]) * batch["np_mask"][:, None, None, :]
    flags = batch["np_mask"].float()[:, None, :].expand(b, k, 2)
    return [cos.reshape(b, k, 2 * v), flags]


# --------------------------------------------------------------------------- a. proposal classifier


@dataclass
class ProposalClassifierConfig(RegionViewConfig):
    """Options of :class:`ProposalClassifier`.

    Attributes:
        views, roi_size, roi_dense: the CLIP views describing a proposal (:class:`RegionViewConfig`;
            ``alpha`` with a region-aware backbone: the whole image with the proposal's box as the mask channel).
        hidden: MLP width.
        depth: hidden layers of the MLP.
        dropout: dropout between MLP layers.
        interactions: add the view-phrase elementwise products and cosines to the input
            (lets a small MLP compare phrase and proposal without learning a bilinear form).
        noun_phrases: also give each proposal its cosine with the expression's subject and
            object noun phrases (parsed with the relation resolver's grammar).
    """

    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1
    interactions: bool = True
    noun_phrases: bool = False


@register_method
class ProposalClassifier(_FrozenFeatureScorer):
    """MLP on frozen CLIP proposal features + box geometry + phrase: is this the target (BCE)."""

    name = "proposal-classifier"
    Config = ProposalClassifierConfig

    def __init__(self, backbone: ClipBackbone, config: ProposalClassifierConfig | None = None):
        super().__init__(backbone, config)
        c = self.config
        check_view_kinds(c.views, pooled=True, masked=("alpha",))
        check_alpha_views(c.views, backbone)
        v, d = len(c.views), backbone.embed_dim
        in_dim = v * d + GEOMETRY_DIM + d + (v * d + v if c.interactions else 0) + (2 * v + 2 if c.noun_phrases else 0)
        layers: list[nn.Module] = []
        for i in range(c.depth):
            layers += [nn.Linear(in_dim if i == 0 else c.hidden, c.hidden), nn.GELU(), nn.Dropout(c.dropout)]
        layers.append(nn.Linear(c.hidden if c.depth else in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K)`` target logits (padding proposals get a large negative value)."""
        views, text = batch["views"], batch["text"]
        b, k, v, d = views.shape
        t = text[:, None, :].expand(b, k, d)
        parts = [views.reshape(b, k, v * d), batch["geom"], t]
        if self.config.interactions:
            prod = views * text[:, None, None, :]
            parts += [prod.reshape(b, k, v * d), prod.sum(-1)]
        if self.config.noun_phrases:
            parts += _np_features(views, batch)
        logits = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        return logits.masked_fill(~batch["mask"], _NEG)


# --------------------------------------------------------------------------- d. proposal attention


@dataclass
class ProposalAttentionConfig(RegionViewConfig):
    """Options of :class:`ProposalAttention`.

    Attributes:
        views, roi_size, roi_dense: the CLIP views describing a proposal (:class:`RegionViewConfig`;
            ``alpha`` with a region-aware backbone: the whole image with the proposal's box as the mask channel).
        d_model: width of the Transformer.
        heads: attention heads.
        layers: encoder layers.
        dropout: dropout inside the encoder.
        text_tokens: feed the phrase's token states (not only its pooled embedding).
        interactions: add view-phrase products and cosines to each proposal token.
        image_token: add the pooled whole-image embedding as a context token.
        noun_phrases: parse the expression into subject and object noun phrases (the
            relation resolver's grammar), add both as tokens and give every proposal its
            cosine with each: what ReCLIP asks CLIP, while the Transformer learns the
            spatial logic from data instead of rules.
        ranked_similarity: give each proposal, for the phrase and its noun phrases, its
            view-averaged similarity relative to the image's best proposal (scaled by a learned
            temperature) and its softmax over the image's proposals: "is this the best match
            here", which raw cosines of a frozen CLIP only say in tiny differences.
        relative_geometry: add a learned per-head attention bias between every two
            proposals from their relative geometry (centre offsets, size ratios, IoU), so
            "left of", "closest to" and "second from the left" are one attention hop away.
        resolver_prior: give each proposal the zero-shot scorer's (relation resolver's) score
            (:func:`resolver_prior`) as an input and add its log to the output logit through a
            learned weight: the network starts from the zero-shot answer and learns where
            to overrule it. Needs ``noun_phrases``.
    """

    d_model: int = 128
    heads: int = 4
    layers: int = 3
    dropout: float = 0.1
    text_tokens: bool = True
    interactions: bool = True
    image_token: bool = True
    noun_phrases: bool = True
    relative_geometry: bool = True
    ranked_similarity: bool = True
    resolver_prior: bool = False


#: Columns of :func:`pairwise_geometry`.
PAIR_DIM = 7


def pairwise_geometry(g: torch.Tensor) -> torch.Tensor:
    """``(B, K, K, 7)`` relation of proposal ``j`` to proposal ``i`` from normalized geometry ``(B, K, 7)``:
    centre offsets ``dx, dy`` (image units), their signs, log width/height ratios and IoU."""
    x1, y1, x2, y2 = g[..., 0], g[..., 1], g[..., 2], g[..., 3]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = (x2 - x1).clamp(min=1e-4), (y2 - y1).clamp(min=1e-4)
    dx = cx[:, None, :] - cx[:, :, None]
    dy = cy[:, None, :] - cy[:, :, None]
    lw = torch.log(w[:, None, :] / w[:, :, None])
    lh = torch.log(h[:, None, :] / h[:, :, None])
    iw = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = iw * ih
    iou = inter / (w[:, :, None] * h[:, :, None] + w[:, None, :] * h[:, None, :] - inter).clamp(min=1e-8)
    return torch.stack([dx, dy, torch.tanh(20 * dx), torch.tanh(20 * dy), lw, lh, iou], dim=-1)


class _GeometryEmbedding(nn.Module):
    """Box geometry -> ``d`` features: Fourier features of the 7 numbers plus centres, then an MLP."""

    def __init__(self, d: int, freqs: int = 6):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(freqs)) * math.pi, persistent=False)
        n = GEOMETRY_DIM + 2
        self.mlp = nn.Sequential(nn.Linear(n + 2 * n * freqs, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        cx, cy = (g[..., 0] + g[..., 2]) / 2, (g[..., 1] + g[..., 3]) / 2
        x = torch.cat([g, cx[..., None], cy[..., None]], dim=-1)
        ang = x[..., None] * self.freqs
        return self.mlp(torch.cat([x, ang.sin().flatten(-2), ang.cos().flatten(-2)], dim=-1))


@register_method
class ProposalAttention(_FrozenFeatureScorer):
    """Phrase tokens and all proposals (views + geometry) attend to each other; softmax over proposals."""

    name = "proposal-attention"
    Config = ProposalAttentionConfig

    def __init__(self, backbone: ClipBackbone, config: ProposalAttentionConfig | None = None):
        super().__init__(backbone, config)
        c = self.config
        check_view_kinds(c.views, pooled=True, masked=("alpha",))
        check_alpha_views(c.views, backbone)
        self.needs_tokens = bool(c.text_tokens)
        v, d, dm = len(c.views), backbone.embed_dim, c.d_model
        prop_in = v * d + (v * d + v if c.interactions else 0) + (2 * v + 2 if c.noun_phrases else 0)
        prop_in += 6 if c.ranked_similarity else 0
        if c.resolver_prior:
            if not c.noun_phrases:
                raise ConfigError("resolver_prior needs noun_phrases=True")
            prop_in += 1
            self.prior_weight = nn.Parameter(torch.tensor(1.0))
        self.log_temp = nn.Parameter(torch.tensor(float(backbone.model.logit_scale.detach())))
        self.prop_proj = nn.Sequential(nn.Linear(prop_in, dm), nn.LayerNorm(dm))
        self.geom = _GeometryEmbedding(dm)
        self.text_proj = nn.Sequential(nn.Linear(d, dm), nn.LayerNorm(dm))
        self.token_proj = nn.Sequential(nn.Linear(backbone.text_width, dm), nn.LayerNorm(dm))
        self.image_proj = nn.Sequential(nn.Linear(d, dm), nn.LayerNorm(dm))
        self.max_tokens = backbone.max_text_tokens
        self.token_pos = nn.Parameter(torch.zeros(self.max_tokens, dm))
        if c.noun_phrases:
            self.np_proj = nn.Sequential(nn.Linear(d, dm), nn.LayerNorm(dm))
        self.type_emb = nn.Parameter(torch.zeros(6, dm))  # proposal, pooled text, token, image, subject, object
        nn.init.normal_(self.token_pos, std=0.02)
        nn.init.normal_(self.type_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(dm, c.heads, 4 * dm, c.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dm)
        self.head = nn.Sequential(nn.Linear(dm, dm), nn.GELU(), nn.Linear(dm, 1))
        if c.relative_geometry:
            self.rel_bias = nn.Sequential(nn.Linear(PAIR_DIM, 64), nn.GELU(), nn.Linear(64, c.heads))

    def _ranked_similarity(self, views: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K, 6)``: for phrase, subject and object, ``T (s_k - max_j s_j)`` and ``softmax_k(T s)``."""
        mask = batch["mask"]
        texts = torch.cat([batch["text"][:, None], batch["nps"]], 1)  # (B, 3, D)
        present = torch.cat([torch.ones_like(batch["np_mask"][:, :1]), batch["np_mask"]], 1)  # (B, 3)
        sim = torch.einsum("bkvd,bnd->bkn", views, texts) / views.shape[2]
        z = self.log_temp.exp().clamp(max=100.0) * sim
        z = z.masked_fill(~mask[..., None], -1e4)
        rel = (z - z.max(1, keepdim=True).values).clamp(min=-20.0) / 20.0 + 1.0
        prob = z.softmax(1)
        out = torch.cat([rel, prob], -1) * torch.cat([present, present], -1)[:, None, :].float()
        return out.masked_fill(~mask[..., None], 0.0)

    def _attention_mask(self, geom: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        """Float attention mask ``(B*H, S, S)``: relative-geometry bias among proposals, -inf on padding keys."""
        b, s = valid.shape
        h = self.config.heads
        bias = geom.new_zeros(b, h, s, s)
        if self.config.relative_geometry and k:
            bias[:, :, :k, :k] = self.rel_bias(pairwise_geometry(geom)).permute(0, 3, 1, 2)
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        return bias.reshape(b * h, s, s)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K)`` logits over the proposals of each (image, phrase) pair."""
        c = self.config
        views, text, mask = batch["views"], batch["text"], batch["mask"]
        b, k, v, d = views.shape
        parts = [views.reshape(b, k, v * d)]
        if c.interactions:
            prod = views * text[:, None, None, :]
            parts += [prod.reshape(b, k, v * d), prod.sum(-1)]
        if c.noun_phrases:
            parts += _np_features(views, batch)
        if c.ranked_similarity:
            parts.append(self._ranked_similarity(views, batch))
        if c.resolver_prior:
            log_prior = batch["prior"].clamp(min=1e-4).log().masked_fill(~mask, 0.0)  # (B, K), in [-9.2, 0]
            parts.append((log_prior / 9.2104 + 1.0)[..., None])
        props = self.prop_proj(torch.cat(parts, -1)) + self.geom(batch["geom"]) + self.type_emb[0]
        seq = [props, (self.text_proj(text) + self.type_emb[1])[:, None]]
        masks = [mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)]
        if c.text_tokens:
            tok = batch["tokens"][:, : self.max_tokens]
            tm = batch["tmask"][:, : self.max_tokens]
            seq.append(self.token_proj(tok) + self.token_pos[: tok.shape[1]] + self.type_emb[2])
            masks.append(tm)
        if c.image_token:
            seq.append((self.image_proj(batch["image"]) + self.type_emb[3])[:, None])
            masks.append(torch.ones(b, 1, dtype=torch.bool, device=mask.device))
        if c.noun_phrases:
            seq.append(self.np_proj(batch["nps"]) + self.type_emb[4:6])
            masks.append(batch["np_mask"])
        valid = torch.cat(masks, 1)
        x = self.encoder(torch.cat(seq, 1), mask=self._attention_mask(batch["geom"], valid, k))
        logits = self.head(self.norm(x[:, :k])).squeeze(-1)
        if c.resolver_prior:
            logits = logits + self.prior_weight * log_prior
        return logits.masked_fill(~mask, _NEG)


# --------------------------------------------------------------------------- fine-tuning CLIP


class _BackboneTuner:
    """Mixin for methods that fine-tune the backbone: eval-mode backbone, no stale text memo."""

    backbone: ClipBackbone

    def _after_mode_change(self) -> None:
        self.backbone.model.eval()  # no dropout in CLIP, ever: keeps fine-tuning stable
        self.backbone.clear_text_cache()  # embeddings memoized before a training step are stale

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Head weights only: the fine-tuned backbone is saved whole under ``backbone/``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}  # type: ignore[attr-defined]

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized image embeddings, differentiable through the unfrozen blocks."""
        return self.backbone.forward_image(pixel_values).embeds

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalized text embeddings, differentiable through the unfrozen blocks."""
        return self.backbone.forward_text(input_ids, attention_mask).embeds


# --------------------------------------------------------------------------- b. clip fine-tune


@dataclass
class ClipFinetuneConfig(MethodConfig):
    """Options of :class:`ClipFinetune`.

    Attributes:
        views: view kinds ensembled by the ranking head.
        vision_blocks: top vision blocks to fine-tune (-1: all, with embeddings).
        text_blocks: top text blocks to fine-tune (-1: all, with embeddings).
        geometry: add a small MLP on (box geometry, phrase) to the similarity (zero-initialized,
            so training starts from the zero-shot ranking).
        hidden: width of that MLP.
    """

    views: tuple[str, ...] = ("crop", "blur")
    vision_blocks: int = 2
    text_blocks: int = 2
    geometry: bool = True
    hidden: int = 128


@register_method
class ClipFinetune(_BackboneTuner, GroundingMethod):
    """Part of CLIP fine-tuned under a ranking head over proposals (softmax CE)."""

    name = "clip-finetune"
    Config = ClipFinetuneConfig
    uses_proposals = True
    recipe = "scorers"
    saves_backbone = True

    def __init__(self, backbone: ClipBackbone, config: ClipFinetuneConfig | None = None):
        super().__init__(backbone, config)
        c = self.config
        check_view_kinds(c.views)
        d = backbone.embed_dim
        self.view_weights = nn.Parameter(torch.zeros(len(c.views)))
        self.log_scale = nn.Parameter(torch.tensor(float(backbone.model.logit_scale.detach())))
        if c.geometry:
            self.geo = nn.Sequential(nn.Linear(GEOMETRY_DIM + d, c.hidden), nn.GELU(), nn.Linear(c.hidden, 1))
            nn.init.zeros_(self.geo[-1].weight)
            nn.init.zeros_(self.geo[-1].bias)

    def setup_training(self) -> list[str]:
        """Unfreeze the configured blocks (LayerNorms and logit scale stay frozen)."""
        return self.backbone.unfreeze_blocks(self.config.vision_blocks, self.config.text_blocks)

    def train(self, mode: bool = True) -> "ClipFinetune":
        super().train(mode)
        self._after_mode_change()
        return self

    def score(self, views: torch.Tensor, text: torch.Tensor, geom: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from view embeddings ``(B, K, V, D)``, phrases ``(B, D)``, geometry ``(B, K, 7)``."""
        cos = torch.einsum("bkvd,bd->bkv", views, text)
        logits = self.log_scale.exp().clamp(max=100.0) * (cos * self.view_weights.softmax(0)).sum(-1)
        if self.config.geometry:
            t = text[:, None, :].expand(-1, views.shape[1], -1)
            logits = logits + self.geo(torch.cat([geom, t], -1)).squeeze(-1)
        return logits

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training forward on pixels: ``(B, Kmax)`` logits (padding masked)."""
        emb = self.embed_pixels(batch["pixel_values"])  # (sum K*V, D) in (sample, proposal, view) order
        v = len(self.config.views)
        counts = batch["counts"].tolist()
        b, kmax = len(counts), batch["mask"].shape[1]
        views = emb.new_zeros(b, kmax, v, emb.shape[-1])
        for i, part in enumerate(torch.split(emb, [n * v for n in counts])):
            views[i, : counts[i]] = part.reshape(counts[i], v, -1)
        text = self.embed_tokens(batch["input_ids"], batch["attention_mask"])
        return self.score(views, text, batch["geom"]).masked_fill(~batch["mask"], _NEG)

    def feature_key(self) -> dict[str, Any]:
        return region_feature_key(self.backbone, self.config.views)

    def encode_image(self, state: ImageState) -> None:
        state.features.update(region_features(self.backbone, state.image, state.proposals.boxes, self.config.views))

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        boxes = state.proposals.boxes
        if len(boxes) == 0:
            return [Ranking(boxes, torch.zeros(0)) for _ in phrases]
        views = state.features["view_embeds"].transpose(0, 1)[None].expand(len(phrases), -1, -1, -1)
        geom = box_geometry(boxes, state.size)[None].expand(len(phrases), -1, -1)
        text = self.backbone.text_embeds(list(phrases))
        out = []
        for s in self.score(views, text, geom):
            order = s.argsort(descending=True, stable=True)
            out.append(Ranking(boxes[order], s[order]))
        return out


# --------------------------------------------------------------------------- c. FLYP


@dataclass
class FlypConfig(ViewScorerConfig):
    """Options of :class:`Flyp`: the zero-shot scorer's options plus what to fine-tune.

    Attributes:
        vision_blocks: top vision blocks to fine-tune (-1: all, with embeddings).
        text_blocks: top text blocks to fine-tune (-1: all, with embeddings).
        learn_temperature: train CLIP's logit scale (FLYP does; clamped at 100).
    """

    vision_blocks: int = -1
    text_blocks: int = -1
    learn_temperature: bool = True


@register_method
class Flyp(_BackboneTuner, ViewScorer):
    """CLIP fine-tuned with its own contrastive loss on (target crop, phrase) pairs; scores like zero-shot."""

    name = "flyp"
    Config = FlypConfig
    recipe = "scorers"
    saves_backbone = True

    def setup_training(self) -> list[str]:
        """Unfreeze the configured blocks and (optionally) the temperature."""
        return self.backbone.unfreeze_blocks(self.config.vision_blocks, self.config.text_blocks,
                                             logit_scale=self.config.learn_temperature)

    def train(self, mode: bool = True) -> "Flyp":
        super().train(mode)
        self._after_mode_change()
        return self

    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature, clamped like CLIP's own training (max 100)."""
        return self.backbone.model.logit_scale.exp().clamp(max=100.0)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image embeddings (N, D), text embeddings (B, D), logit scale)`` for the contrastive loss."""
        img = self.embed_pixels(batch["pixel_values"])
        txt = self.embed_tokens(batch["input_ids"], batch["attention_mask"])
        return img, txt, self.logit_scale()


__all__ = [
    "GEOMETRY_DIM",
    "PAIR_DIM",
    "resolver_prior",
    "ClipFinetune",
    "ClipFinetuneConfig",
    "Flyp",
    "FlypConfig",
    "ProposalAttention",
    "ProposalAttentionConfig",
    "ProposalClassifier",
    "ProposalClassifierConfig",
    "box_geometry",
    "collate_feature_items",
    "noun_phrases",
]
