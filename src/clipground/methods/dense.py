"""Dense, proposal-free methods: a trained locator and a zero-shot heatmap + segmenter.

``locator`` (trainable; after RISCLIP, Kim et al., 2024, adapted to a frozen CLIP):
    CLIP's frozen last-layer patch tokens (FiLM-modulated by the phrase embedding and given
    CLIP's patch-phrase similarity as a feature, as in the fusion regressor) get small trainable *adapters*: residual blocks in
    which every patch token cross-attends to the phrase's text tokens, then to the other
    patches (self-attention), then an MLP. A linear *locator head* turns each adapted patch
    into a logit: a low-resolution ``h x w`` probability map of the target. A small
    convolutional *refiner* upsamples it ``upsample``-fold (bilinear x2 stages with 3x3
    convolutions, residual on the upsampled coarse map). The box comes from the refined
    map: its first and second moments (with ``p ** moment_power`` as weights, so the
    background's small probabilities do not drag the box) give ``cx = E[x]`` and
    ``w = sqrt(12 Var[x])`` (exact for a uniform rectangle), and an MLP on the moments and
    the map-pooled refiner features adds a learned correction (zero at initialization).
    Everything is differentiable, so the box loss also shapes the map. Trained with map
    loss (BCE + Dice against the target box rasterized with exact area coverage, or the
    record's mask) at both resolutions plus box loss (Smooth L1 + GIoU); see
    :mod:`clipground.training.recipes.locator`. Same padded-square geometry as the fusion
    regressor (:mod:`clipground.backbone.geometry`).

``heatmap-segment`` (zero-shot, detector-free):
    A phrase heatmap (:mod:`clipground.heatmaps`: CLIP patch-text similarity, CLIP
    Grad-CAM, or BLIP ITM Grad-CAM, the default) is turned into a box by a promptable segmenter
    (:mod:`clipground.segmenters`: SAM by default, GrabCut, or the plain threshold): the box
    is the tight box of the mask component around the heatmap peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import ClipBackbone
from ..backbone.features import (DenseView, dense_feature_key, dense_features, encode_phrases, patch_grid,
                                 patch_text_similarity, select_image)
from ..backbone.geometry import InputGeometry
from ..backbone.hub import companion_checkpoint
from ..errors import ConfigError
from ..heatmaps import make_heatmap_source
from ..segmenters import box_from_heatmap, make_segmenter
from .base import GroundingMethod, ImageState, MethodConfig, Ranking, register_method

# --------------------------------------------------------------------------- locator


@dataclass
class LocatorConfig(MethodConfig):
    """Options of :class:`Locator`.

    Attributes:
        dim: width of the adapter blocks.
        adapter_layers: number of cross-attention adapter blocks.
        heads: attention heads.
        ff_mult: adapter MLP width as a multiple of ``dim``.
        dropout: dropout in the adapters.
        upsample: refiner upsampling factor (a power of two).
        refiner_channels: channels of the refiner convolutions.
        moment_power: exponent applied to map probabilities before taking box moments.
        similarity: add each patch's CLIP similarity to the phrase as an input feature.
        film: modulate patch tokens multiplicatively by the phrase embedding.
        tiles: encode ``tiles x tiles`` tiles too, for a finer patch grid (as the fusion regressor).
        input_size: encode the image at this side with interpolated position embeddings instead
            (0 = the checkpoint's own; as the fusion regressor).
        dense: joint-space patch embeddings for the similarity feature, ``"final"`` or ``"value"``.
        prompt: template the phrase is put in before text encoding.
    """

    dim: int = 192
    adapter_layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.0
    upsample: int = 4
    refiner_channels: int = 32
    moment_power: float = 4.0
    similarity: bool = True
    film: bool = True
    tiles: int = 1
    input_size: int = 0
    dense: str = "final"
    prompt: str = "{}"


@dataclass
class LocatorOutput:
    """``coarse (B, h, w)`` and ``refined (B, H, W)`` map logits, ``boxes (B, 4)`` normalized
    ``xyxy`` (not clipped), ``scores (B,)`` (peak refined probability)."""

    coarse: torch.Tensor
    refined: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


class AdapterBlock(nn.Module):
    """Pre-norm residual block: patches cross-attend to text, self-attend, then an MLP."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.n1, self.n2, self.n3, self.nt = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        t = self.nt(text)
        x = x + self.cross(self.n1(x), t, t, key_padding_mask=text_pad, need_weights=False)[0]
        h = self.n2(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.n3(x))


def _moments(prob: torch.Tensor, power: float) -> torch.Tensor:
    """``(B, H, W)`` probabilities -> moment box ``(B, 4)`` as ``(cx, cy, w, h)`` normalized."""
    b, hh, ww = prob.shape
    wgt = prob.clamp(min=1e-6) ** power
    q = wgt / wgt.sum((1, 2), keepdim=True)
    xs = (torch.arange(ww, device=prob.device, dtype=prob.dtype) + 0.5) / ww
    ys = (torch.arange(hh, device=prob.device, dtype=prob.dtype) + 0.5) / hh
    qx, qy = q.sum(1), q.sum(2)  # marginals (B, W), (B, H)
    cx, cy = (qx * xs).sum(1), (qy * ys).sum(1)
    vx = (qx * (xs - cx[:, None]) ** 2).sum(1)
    vy = (qy * (ys - cy[:, None]) ** 2).sum(1)
    return torch.stack([cx, cy, (12 * vx + 1e-6).sqrt(), (12 * vy + 1e-6).sqrt()], 1)


class LocatorNet(nn.Module):
    """The trainable part of :class:`Locator`: adapters, locator head, refiner, box head."""

    def __init__(self, cfg: LocatorConfig, vision_width: int, text_width: int, embed_dim: int,
                 grid: tuple[int, int]):
        super().__init__()
        if cfg.upsample < 1 or cfg.upsample & (cfg.upsample - 1):
            raise ConfigError(f"upsample must be a power of two, got {cfg.upsample}")
        d, c = cfg.dim, cfg.refiner_channels
        self.grid = grid
        self.power = cfg.moment_power
        self.vis_in = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, d))
        self.txt_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, d))
        self.sent_in = nn.Linear(embed_dim, d)
        self.pos = nn.Parameter(torch.randn(grid[0] * grid[1], d) * 0.02)
        self.sim_in = nn.Linear(2, d) if cfg.similarity else None
        self.film = nn.Linear(embed_dim, d) if cfg.film else None
        self.adapters = nn.ModuleList(AdapterBlock(d, cfg.heads, cfg.ff_mult, cfg.dropout)
                                      for _ in range(cfg.adapter_layers))
        self.out_norm = nn.LayerNorm(d)
        self.locator = nn.Linear(d, 1)
        self.reduce = nn.Conv2d(d, c, 1)
        stages: list[nn.Module] = []
        ch = c + 1
        for _ in range(cfg.upsample.bit_length() - 1):
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(ch, c, 3, padding=1), nn.GroupNorm(1, c), nn.GELU()]
            ch = c
        stages += [nn.Conv2d(ch, c, 3, padding=1), nn.GELU()]
        self.refiner = nn.Sequential(*stages)
        self.refine_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.refine_out.weight)
        nn.init.zeros_(self.refine_out.bias)
        self.upsample = cfg.upsample
        self.box_mlp = nn.Sequential(nn.Linear(4 + c + d, 128), nn.LeakyReLU(0.1), nn.Linear(128, 4))
        nn.init.zeros_(self.box_mlp[-1].weight)
        nn.init.zeros_(self.box_mlp[-1].bias)

    def forward(self, img_embed: torch.Tensor, patches: torch.Tensor, patch_embeds: torch.Tensor,
                txt_embed: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor) -> LocatorOutput:
        """Same inputs as :class:`~clipground.methods.regression.FusionHead`."""
        b, p, _ = patches.shape
        gh, gw = self.grid
        sent = self.sent_in(txt_embed)
        text = torch.cat([sent[:, None], self.txt_in(txt_tokens)], 1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=text.device), ~txt_mask.bool()], 1)
        x = self.vis_in(patches)
        if self.film is not None:
            x = x * (1 + self.film(txt_embed)[:, None])
        if self.sim_in is not None:
            x = x + self.sim_in(patch_text_similarity(patch_embeds, txt_embed))
        x = x + self.pos[:p]
        for blk in self.adapters:
            x = blk(x, text, pad)
        x = self.out_norm(x)
        coarse = self.locator(x)[..., 0].reshape(b, gh, gw)
        feat = self.reduce(x.transpose(1, 2).reshape(b, -1, gh, gw))
        hid = self.refiner(torch.cat([feat, coarse[:, None]], 1))
        up = F.interpolate(coarse[:, None], scale_factor=self.upsample, mode="bilinear", align_corners=False)
        refined = (up + self.refine_out(hid))[:, 0]
        prob = refined.float().sigmoid()
        mom = _moments(prob, self.power)
        wgt = prob.clamp(min=1e-6) ** self.power
        q = (wgt / wgt.sum((1, 2), keepdim=True))[:, None]
        pooled = (hid * q).sum((2, 3))
        delta = self.box_mlp(torch.cat([mom, pooled, sent], 1))
        cxcy = mom[:, :2] + delta[:, :2]
        wh = (mom[:, 2:] * delta[:, 2:].exp()).clamp(min=1e-3)
        boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)
        return LocatorOutput(coarse, refined, boxes, prob.flatten(1).max(1).values)


@register_method
class Locator(GroundingMethod):
    """Phrase-conditioned probability map on frozen CLIP patches, refined, then a box."""

    name = "locator"
    Config = LocatorConfig
    uses_proposals = False
    recipe = "locator"

    def __init__(self, backbone: ClipBackbone, config: LocatorConfig | None = None):
        super().__init__(backbone, config)
        self.view = DenseView.of(self.config)
        self.net = LocatorNet(self.config, backbone.vision_width, backbone.text_width, backbone.embed_dim,
                              patch_grid(backbone, self.view))

    def feature_key(self) -> dict[str, Any]:
        return dense_feature_key(self.backbone, self.view)

    def encode_image(self, state: ImageState) -> None:
        state.features.update(select_image(dense_features(self.backbone, [state.image], self.view), 0))

    def forward_phrases(self, state: ImageState, phrases: list[str]) -> LocatorOutput:
        """Network outputs for phrases in the encoded image (maps in model-input coordinates)."""
        t = encode_phrases(self.backbone, phrases, self.config.prompt)
        f = state.features
        n = len(phrases)
        return self.net(f["img_embed"].expand(n, -1), f["patches"].expand(n, -1, -1),
                        f["patch_embeds"].expand(n, -1, -1), t.embeds, t.tokens, t.mask)

    @torch.inference_mode()
    def heatmaps(self, state: ImageState, phrases: list[str]) -> torch.Tensor:
        """Refined probability maps resampled to the original image: ``(len(phrases), H, W)``."""
        geom: InputGeometry = state.features["geometry"]
        return geom.grid_to_image(self.forward_phrases(state, phrases).refined.sigmoid())

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        if not phrases:
            return []
        out = self.forward_phrases(state, phrases)
        geom: InputGeometry = state.features["geometry"]
        boxes = geom.to_pixels(out.boxes.clamp(0, 1))
        return [Ranking(boxes[i : i + 1], out.scores[i : i + 1]) for i in range(len(phrases))]


# --------------------------------------------------------------------------- heatmap + segmenter


@dataclass
class HeatmapSegmentConfig(MethodConfig):
    """Options of :class:`HeatmapSegment`.

    Attributes:
        heatmap: ``blip`` (ITM Grad-CAM, the seed's path), ``clip`` (patch-text similarity) or
            ``clip-gradcam``.
        blip_model: BLIP ITM checkpoint (hub id, local directory or bundled name) for
            ``heatmap="blip"``; ``auto``: the bundled world BLIP beside a bundled world CLIP,
            else ``Salesforce/blip-itm-base-coco``.
        blip_layer: text-encoder layer whose cross-attention BLIP Grad-CAM reads.
        segmenter: ``sam`` (promptable), ``grabcut`` (weight-free) or ``threshold``.
        sam_model: SAM checkpoint for ``segmenter="sam"``; ``auto``: the bundled world SAM beside
            a bundled world CLIP, else ``facebook/sam-vit-base``.
        sam_prompt: ``point``, ``box`` or ``point+box`` (peak point / seed box).
        threshold: seed region = heatmap (min-max normalized) >= threshold, around the peak.
        grabcut_iters: GrabCut iterations.
        grabcut_margin: GrabCut band width (fraction of the image side): seed region dilated
            by one band = probable foreground, next band = probable background, rest = background.
        grabcut_core: normalized heat above which seed pixels are definite foreground.
        max_side: GrabCut working resolution (longest side).
        prompt: template the phrase is put in before text encoding.
    """

    heatmap: str = "blip"
    blip_model: str = "auto"
    blip_layer: int = 7
    segmenter: str = "sam"
    sam_model: str = "auto"
    sam_prompt: str = "point+box"
    threshold: float = 0.5
    grabcut_iters: int = 5
    grabcut_margin: float = 0.1
    grabcut_core: float = 0.95
    max_side: int = 320
    prompt: str = "{}"


@register_method
class HeatmapSegment(GroundingMethod):
    """Zero-shot: phrase heatmap -> promptable segmenter -> box of the mask around the peak."""

    name = "heatmap-segment"
    Config = HeatmapSegmentConfig
    uses_proposals = False

    def __init__(self, backbone: ClipBackbone, config: HeatmapSegmentConfig | None = None):
        super().__init__(backbone, config)
        c = self.config
        if not 0.0 < c.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {c.threshold}")
        # Plain attributes (not submodules): BLIP/SAM weights are never part of a saved method.
        blip = companion_checkpoint("blip", backbone.name) if c.blip_model == "auto" else c.blip_model
        sam = companion_checkpoint("sam", backbone.name) if c.sam_model == "auto" else c.sam_model
        self.tools: dict[str, Any] = {
            "heatmap": make_heatmap_source(c.heatmap, backbone, blip_model=blip, blip_layer=c.blip_layer,
                                           prompt=c.prompt),
            "segmenter": make_segmenter(c.segmenter, sam_model=sam, sam_prompt=c.sam_prompt,
                                        grabcut_iters=c.grabcut_iters, grabcut_margin=c.grabcut_margin,
                                        max_side=c.max_side, grabcut_core=c.grabcut_core, device=backbone.device),
        }

    def encode_image(self, state: ImageState) -> None:
        state.features["heat"] = self.tools["heatmap"].prepare(state.image)
        state.features["seg"] = self.tools["segmenter"].prepare(state.image)

    def heatmaps(self, state: ImageState, phrases: list[str]) -> list[Any]:
        """Raw ``(H, W)`` heatmaps of the phrases in original-image pixels."""
        return self.tools["heatmap"](state.features["heat"], phrases)

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        out = []
        for heat in self.heatmaps(state, phrases):
            box, _ = box_from_heatmap(heat, self.tools["segmenter"], state.features["seg"], self.config.threshold)
            out.append(Ranking(torch.tensor([box], dtype=torch.float32), torch.tensor([float(heat.max())])))
        return out
