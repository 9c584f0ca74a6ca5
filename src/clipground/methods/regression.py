"""Fusion regressor: a small Transformer on frozen CLIP tokens that regresses the box directly.

No proposals. In the spirit of TransVG (Deng et al., ICCV 2021) but on a *frozen* CLIP:
CLIP's last-layer patch tokens and pooled image embedding, and the phrase's text token
states and pooled text embedding, are linearly projected to a shared ``dim``-wide space,
given learned type (REG / image / text) and position embeddings, and fused by a
Transformer encoder together with a learned ``[REG]`` token. An MLP with LeakyReLU on the
``[REG]`` output predicts ``(cx, cy, w, h)`` through a sigmoid, converted to
``(x_min, y_min, x_max, y_max)`` (so ``min < max`` by construction), plus a quality logit
(the predicted IoU of its own box, used as the score). With ``anchor`` (default) the centre
is instead the soft-argmax of per-patch target scores (a linear head on the fused patch
tokens) plus the MLP's offset, so the centre follows the patches from the first steps.
With ``peak`` the same MLP form (on each fused patch token joined with the ``[REG]`` output)
predicts a box at every patch and the answer is the box of the highest-scoring patch, as
CenterNet-style detectors do: a soft-argmax is pulled towards the image centre until the
patch scores are very peaked, which costs small objects their IoU.

Image tokens: the checkpoint's own patch grid, a finer one from ``tiles`` or from
``input_size`` (the whole image at a larger side with interpolated position embeddings),
optionally shortened by ``merge`` (a 3x3 convolution and a strided linear merge of
neighbouring patches) so that a fine grid stays cheap for the Transformer.

The phrase also enters before fusion, cheaply: each patch token is modulated
multiplicatively by the phrase embedding (FiLM-style) and gets CLIP's own patch-phrase
similarity as a feature (``film`` / ``similarity`` options).

With ``relations`` (inference only, needs ``peak``) a spatial phrase is answered the ReCLIP
way: the regressor, run on the phrase's subject noun phrase, turns into a detector of that
noun phrase (each patch's box is a candidate, its patch logit the score), and the rules of
:mod:`clipground.relations` pick the candidate the superlative, ordinal or relation names:
geometric comparisons a Transformer trained on whole phrases may not learn from the data.

Geometry: the image is padded right/bottom to a square with the checkpoint's mean colour
(:mod:`clipground.backbone.geometry`) before CLIP's own preprocessing, so the processor's
resize+centre-crop is a plain resize of the whole image; the predicted normalized box lives
in that square and :class:`~clipground.backbone.geometry.InputGeometry` maps it back to
original pixels exactly (clipped to the image).

Training (``clipground train --method fusion-regressor``, :mod:`clipground.training.recipes.regression`)
caches the frozen CLIP features of every image and phrase once, so an epoch costs no
backbone pass. Loss: Smooth L1 + GIoU on normalized ``xyxy``, plus the quality term and an
auxiliary per-patch "inside the target box" BCE + Dice on the fused image tokens (a linear
head), which gives the fusion dense, early gradient: without it the regressor sits at the
mean box for hundreds of steps before it starts to match phrases to patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbone import ClipBackbone, TextFeatures
from ..backbone.features import (DenseView, dense_feature_key, dense_features, encode_phrases, grid_shape,
                                 patch_grid, patch_text_similarity, select_image)
from ..backbone.geometry import InputGeometry
from ..errors import ClipgroundError
from ..mirror import check_kinds, flip_box, flip_expression, flip_image, vote_boxes
from ..relations import ParsedExpression, parse, resolve
from .base import GroundingMethod, ImageState, MethodConfig, Ranking, register_method


def cxcywh_to_xyxy(raw: torch.Tensor) -> torch.Tensor:
    """Unbounded ``(..., 4)`` logits -> sigmoid ``(cx, cy, w, h)`` -> ``xyxy`` (min < max always)."""
    cx, cy, w, h = raw.sigmoid().unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@dataclass
class FusionRegressorConfig(MethodConfig):
    """Options of :class:`FusionRegressor` (architecture; training options live in the recipe).

    Attributes:
        dim: width of the shared fusion space.
        layers: Transformer encoder layers.
        heads: attention heads.
        ff_mult: feed-forward width as a multiple of ``dim``.
        dropout: dropout inside the encoder.
        head_hidden: hidden width of the box MLP.
        similarity: add each patch's CLIP similarity to the phrase as an input feature.
        film: modulate patch tokens multiplicatively by the phrase embedding before fusion.
        anchor: regress the box centre as an offset from the soft-argmax of the per-patch
            target scores (else the [REG] MLP predicts it from scratch).
        peak: also predict a box at every (merged) patch, from its fused token and the
            ``[REG]`` output, and answer with the box of the most likely patch (CenterNet-style
            "box at the peak"; the recipe trains each patch's box on the patches the target
            covers). Precise where a soft-argmax centre would be pulled towards the middle.
        tiles: also encode the image as ``tiles x tiles`` tiles for a finer patch grid
            (see :class:`~clipground.backbone.features.DenseView`); 1 = the whole image only.
        input_size: encode the whole image at this side in pixels, with interpolated position
            embeddings, for a finer patch grid (0 = the checkpoint's own size).
        dense: joint-space patch embeddings for the similarity feature: ``"final"`` (last-layer
            tokens) or ``"value"`` (MaskCLIP-style value path, see ``ClipBackbone.forward_image``).
        merge: with ``merge = k > 1`` the projected patch grid gets a 3x3 convolution (local
            context) and a ``k x k`` strided linear merge before the Transformer: a ``k``-times
            shorter image sequence, so a fine grid stays affordable.
        rel_pos: a learned bias per layer, head and 2-D offset between image tokens, added to
            their attention logits (as Swin's relative position bias), so "the patch left of
            me" is one learned number instead of something to infer from absolute positions.
        words: add each phrase token's input word embedding (projected) to its final CLIP
            state: the final states of a contrastively trained text tower can hardly tell
            opposite spatial words apart, the input embeddings keep them distinct.
        relations: answer a spatial phrase (superlative, ordinal, two-place relation) with the
            ReCLIP-style geometry rules of :mod:`clipground.relations` over the regressor's own
            candidates: with ``peak`` every patch predicts a box, and the regressor run on the
            phrase's subject (and object) noun phrase scores those boxes. Inference only.
        tta: test-time mirror views (any of ``h``, ``v``, ``hv``): the image is also encoded
            mirrored, the phrase's spatial words swapped to match (:mod:`clipground.mirror`),
            and the views' boxes, mapped back, vote (:func:`~clipground.mirror.vote_boxes`).
            Inference only: a trained model may be loaded with it.
        prompt: template the phrase is put in before text encoding.
    """

    dim: int = 256
    layers: int = 4
    heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.1
    head_hidden: int = 256
    similarity: bool = True
    film: bool = True
    anchor: bool = True
    peak: bool = False
    tiles: int = 1
    input_size: int = 0
    dense: str = "final"
    merge: int = 1
    rel_pos: bool = False
    words: bool = False
    relations: bool = False
    tta: tuple[str, ...] = ()
    prompt: str = "{}"


@dataclass
class FusionOutput:
    """Head outputs: ``boxes (B, 4)`` normalized ``xyxy`` (not clipped), ``quality (B,)`` logits,
    ``patch_logits (B, P)`` per-patch "inside the target" logits (auxiliary training signal),
    and with ``peak`` the box predicted at every patch, ``cell_boxes (B, P, 4)``."""

    boxes: torch.Tensor
    quality: torch.Tensor
    patch_logits: torch.Tensor
    cell_boxes: torch.Tensor | None = None


class FusionHead(nn.Module):
    """The trainable part: projections, embeddings, Transformer encoder, box MLP."""

    def __init__(self, cfg: FusionRegressorConfig, vision_width: int, text_width: int, embed_dim: int,
                 num_patches: int, max_text: int):
        super().__init__()
        d = cfg.dim
        self.img_in = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, d))
        self.txt_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, d))
        self.word_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, d)) if cfg.words else None
        self.img_pool_in = nn.Linear(embed_dim, d)
        self.txt_pool_in = nn.Linear(embed_dim, d)
        self.type_embed = nn.Embedding(3, d)  # 0: [REG], 1: image, 2: text
        gh, gw = grid_shape(num_patches)
        self.merge = max(int(cfg.merge), 1)
        self.neck = None
        if self.merge > 1:
            if gh % self.merge or gw % self.merge:
                raise ClipgroundError(f"merge={self.merge} does not divide the {gh}x{gw} patch grid")
            self.neck = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(d, d, self.merge, stride=self.merge))
            gh, gw = gh // self.merge, gw // self.merge
            num_patches = gh * gw
        self.img_pos = nn.Parameter(torch.randn(1 + num_patches, d) * 0.02)
        self.txt_pos = nn.Parameter(torch.randn(1 + max_text, d) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.ff_mult * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.heads = cfg.heads
        self.rel_bias = None
        if cfg.rel_pos:
            self.rel_bias = nn.Parameter(torch.zeros(cfg.layers, cfg.heads, (2 * gh - 1) * (2 * gw - 1)))
            ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            dy = ys.flatten()[:, None] - ys.flatten()[None]
            dx = xs.flatten()[:, None] - xs.flatten()[None]
            self.register_buffer("rel_index", (dy + gh - 1) * (2 * gw - 1) + dx + gw - 1, persistent=False)
        h = cfg.head_hidden
        self.head = nn.Sequential(nn.Linear(d, h), nn.LeakyReLU(0.1), nn.Linear(h, h), nn.LeakyReLU(0.1),
                                  nn.Linear(h, 5))
        self.patch_head = nn.Linear(d, 1)
        self.sim_in = nn.Linear(2, d) if cfg.similarity else None
        self.film = nn.Linear(embed_dim, d) if cfg.film else None
        self.anchor = cfg.anchor
        self.grid = (gh, gw)
        self.cell_head = nn.Sequential(nn.Linear(2 * d, h), nn.LeakyReLU(0.1), nn.Linear(h, h), nn.LeakyReLU(0.1),
                                       nn.Linear(h, 4)) if cfg.peak else None
        ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
        self.register_buffer("centers", torch.stack([xs.flatten(), ys.flatten()], -1), persistent=False)

    def forward(self, img_embed: torch.Tensor, patches: torch.Tensor, patch_embeds: torch.Tensor,
                txt_embed: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                txt_words: torch.Tensor | None = None) -> FusionOutput:
        """Fuse one image's (or a batch's) tokens with phrase tokens.

        Shapes: ``img_embed (B, D)``, ``patches (B, P, Dv)``, ``patch_embeds (B, P, D)``,
        ``txt_embed (B, D)``, ``txt_tokens (B, L, Dt)``, ``txt_mask (B, L)`` (True = real token),
        ``txt_words (B, L, Dt)`` the tokens' input word embeddings (needed with ``words``).
        """
        b, p, _ = patches.shape
        length = txt_tokens.shape[1]
        tt = self.txt_in(txt_tokens)
        if self.word_in is not None:
            if txt_words is None:
                raise ClipgroundError("this fusion regressor reads word embeddings (words=True) but got none")
            tt = tt + self.word_in(txt_words[:, :length])
        pt = self.img_in(patches)
        if self.film is not None:
            pt = pt * (1 + self.film(txt_embed)[:, None])
        if self.sim_in is not None:
            pt = pt + self.sim_in(patch_text_similarity(patch_embeds, txt_embed))
        if self.neck is not None:
            gh, gw = grid_shape(p)
            pt = self.neck(pt.transpose(1, 2).reshape(b, -1, gh, gw)).flatten(2).transpose(1, 2)
            p = pt.shape[1]
        img = torch.cat([self.img_pool_in(img_embed)[:, None], pt], 1) + self.img_pos[: 1 + p]
        txt = torch.cat([self.txt_pool_in(txt_embed)[:, None], tt], 1) + self.txt_pos[: 1 + length]
        reg = self.reg_token.expand(b, 1, -1)
        types = self.type_embed.weight
        x = torch.cat([reg + types[0], img + types[1], txt + types[2]], 1)
        keep = torch.cat([torch.ones(b, 3 + p, dtype=torch.bool, device=x.device), txt_mask.bool()], 1)
        if self.rel_bias is None:
            x = self.encoder(x, src_key_padding_mask=~keep)
        else:
            x = self._encode_with_rel_bias(x, keep, p)
        out = self.head(x[:, 0])
        patch_logits = self.patch_head(x[:, 2 : 2 + p])[..., 0]
        if self.cell_head is not None:
            # A box at every patch: centre within two cells of the patch's own, size free.
            raw = self.cell_head(torch.cat([x[:, 2 : 2 + p], x[:, :1].expand(-1, p, -1)], -1)).float()
            cell = raw.new_tensor([1.0 / self.grid[1], 1.0 / self.grid[0]])
            cxcy = self.centers[:p] + 2 * torch.tanh(raw[..., :2]) * cell
            wh = raw[..., 2:4].sigmoid()
            cell_boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
            best = cell_boxes[torch.arange(b, device=x.device), patch_logits.argmax(-1)]
            return FusionOutput(best, out[:, 4], patch_logits, cell_boxes)
        if not self.anchor:
            return FusionOutput(cxcywh_to_xyxy(out[:, :4]), out[:, 4], patch_logits)
        # Soft-argmax anchor: the score-weighted mean of patch centres, plus a learned offset.
        c = patch_logits.float().softmax(-1) @ self.centers[:p]
        cxcy = c + out[:, :2]
        wh = out[:, 2:4].sigmoid()
        return FusionOutput(torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1), out[:, 4], patch_logits)

    def _encode_with_rel_bias(self, x: torch.Tensor, keep: torch.Tensor, p: int) -> torch.Tensor:
        """The encoder with each layer's relative position bias on image-token pairs (and the
        padding as ``-inf``) in one additive ``(B * heads, L, L)`` attention mask."""
        b, length, _ = x.shape
        pad = torch.zeros(b, length, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        for i, layer in enumerate(self.encoder.layers):
            mask = pad[:, None, None, :].expand(b, self.heads, length, length).clone()
            mask[:, :, 2 : 2 + p, 2 : 2 + p] += self.rel_bias[i][:, self.rel_index].to(x.dtype)
            x = layer(x, src_mask=mask.reshape(b * self.heads, length, length))
        return self.encoder.norm(x)


@register_method
class FusionRegressor(GroundingMethod):
    """Direct box regression from frozen CLIP image and text tokens (see module docstring)."""

    name = "fusion-regressor"
    Config = FusionRegressorConfig
    uses_proposals = False
    recipe = "regression"
    inference_options = ("tta", "relations")

    def __init__(self, backbone: ClipBackbone, config: FusionRegressorConfig | None = None):
        super().__init__(backbone, config)
        if self.config.relations and not self.config.peak:
            raise ClipgroundError("relations=True needs a peak model (its per-patch boxes are the candidates)")
        self.view = DenseView.of(self.config)
        self.mirrors = [""] + check_kinds(self.config.tta)
        gh, gw = patch_grid(backbone, self.view)
        self.fusion = FusionHead(self.config, backbone.vision_width, backbone.text_width, backbone.embed_dim,
                                 gh * gw, backbone.max_text_tokens)

    def feature_key(self) -> dict[str, Any]:
        return dense_feature_key(self.backbone, self.view, self.mirrors[1:])

    def encode_image(self, state: ImageState) -> None:
        # The image and its mirrors (``tta``) in one backbone pass.
        f = dense_features(self.backbone, [flip_image(state.image, k) for k in self.mirrors], self.view)
        state.features.update(select_image(f, 0))
        if len(self.mirrors) > 1:
            state.features["mirrors"] = {k: select_image(f, i) for i, k in enumerate(self.mirrors) if k}

    def _boxes(self, f: dict[str, Any], text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel boxes ``(n, 4)`` and scores ``(n,)`` of one view's features for ``n`` phrases."""
        n = len(text.embeds)
        out = self.fusion(f["img_embed"].expand(n, -1), f["patches"].expand(n, -1, -1),
                          f["patch_embeds"].expand(n, -1, -1), text.embeds, text.tokens, text.mask, text.words)
        geom: InputGeometry = f["geometry"]
        return geom.to_pixels(out.boxes.clamp(0, 1)), out.quality.sigmoid()

    @staticmethod
    def _noun_phrases(parsed: ParsedExpression) -> list[str]:
        return [parsed.subject] + ([parsed.object] if parsed.object else [])

    def _resolve(self, f: dict[str, Any], parsed: ParsedExpression, text: TextFeatures,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The geometry rules' box and score for a spatial phrase, given its noun phrases' text.

        Candidates are the boxes every patch predicts for the subject noun phrase; a noun
        phrase's "similarity" to a candidate is its patch logit there (temperature 1), so the
        resolver's relative probabilities are the patch softmax.
        """
        n = len(text.embeds)
        out = self.fusion(f["img_embed"].expand(n, -1), f["patches"].expand(n, -1, -1),
                          f["patch_embeds"].expand(n, -1, -1), text.embeds, text.tokens, text.mask, text.words)
        geom: InputGeometry = f["geometry"]
        boxes = geom.to_pixels(out.cell_boxes[0].clamp(0, 1))
        logits = dict(zip(self._noun_phrases(parsed), out.patch_logits.float()))
        scores = resolve(parsed, boxes, size, logits.__getitem__, temperature=1.0)
        best = int(scores.argmax())
        return boxes[best], scores[best]

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        if not phrases:
            return []
        views = {"": state.features, **state.features.get("mirrors", {})}
        w, h = state.size
        # Every distinct phrase of every view through the text tower once (most phrases have
        # no word a mirror swaps, so their views share one text).
        texts = {kind: [flip_expression(p, kind) for p in phrases] for kind in self.mirrors}
        # With ``relations``: every spatial phrase's noun phrases in the same single text pass.
        parsed = {t: parse(t) for ts in texts.values() for t in ts} if self.config.relations else {}
        spatial = {t: p for t, p in parsed.items() if p.is_spatial}
        nps = [q for p in spatial.values() for q in self._noun_phrases(p)]
        unique = list(dict.fromkeys([t for ts in texts.values() for t in ts] + nps))
        enc = encode_phrases(self.backbone, unique, self.config.prompt)
        row = {t: i for i, t in enumerate(unique)}
        per_view = []
        for kind in self.mirrors:
            ix = torch.tensor([row[t] for t in texts[kind]], device=enc.embeds.device)
            boxes, scores = self._boxes(views[kind], enc.select(ix))
            for i, t in enumerate(texts[kind]):
                if t in spatial:
                    np_ix = torch.tensor([row[q] for q in self._noun_phrases(spatial[t])], device=ix.device)
                    boxes[i], scores[i] = self._resolve(views[kind], spatial[t], enc.select(np_ix), (w, h))
            if kind:
                boxes = boxes.new_tensor([flip_box(b, kind, w, h) for b in boxes.tolist()])
            per_view.append((boxes, scores))
        if len(per_view) == 1:
            boxes, scores = per_view[0]
            return [Ranking(boxes[i : i + 1], scores[i : i + 1]) for i in range(len(phrases))]
        out = []
        for i in range(len(phrases)):
            box, score = vote_boxes(torch.stack([b[i] for b, _ in per_view]), torch.stack([s[i] for _, s in per_view]))
            out.append(Ranking(box[None], score[None]))
        return out
