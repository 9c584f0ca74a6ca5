"""``region-clip``: proposals scored by a region-aware CLIP (the Alpha-CLIP / Focus-CLIP design).

The vision tower gets a fourth input, the proposal's mask, through a zero-initialised
convolution beside its patch embedding, and LoRA adapters on its attention
(:mod:`clipground.backbone.alpha`); ``clipground train --method region-clip`` trains those few
weights with a region-text contrastive loss in which the other regions of the same image are
negatives (:mod:`clipground.training.recipes.region_clip`). At inference every proposal is
shown as the ``alpha`` view (the whole image plus its mask, one forward per proposal) and
scored exactly like ``zero-shot`` (mean cosine over views, then the relation resolver).

Built on a plain CLIP, the method first makes a region-aware copy of it (mask channel and LoRA
at zero, so it answers as the plain CLIP's whole-image view until trained); built on a
region-aware backbone (the bundled ``clipground/world-region-clip``, a trained directory) it
uses it as is, and its adapter options are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbone import ClipBackbone
from ..backbone.alpha import AdapterConfig, region_backbone
from .base import register_method
from .view_scoring import ViewScorer, ViewScorerConfig


@dataclass
class RegionClipConfig(ViewScorerConfig):
    """Options of :class:`RegionClipScorer`: the zero-shot scorer's (``views`` default ``alpha``) plus the
    region-aware backbone's adapter (:class:`~clipground.backbone.alpha.AdapterConfig`; taken from
    the backbone when it is already region-aware).

    Attributes:
        rank: LoRA rank on the vision attention.
        lora_alpha: LoRA scale numerator.
        lora_dropout: dropout on the LoRA input during training.
        target_modules: vision attention projections with LoRA (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        layernorms: also train the vision tower's LayerNorms.
        mask_lr_scale: training only: the mask convolution's learning rate relative to the adapters'.
            Adam moves all 64 weights of a patch kernel by about the learning rate per step, so the
            mask's share of a patch embedding grows ~100 times faster than one weight: at the
            adapters' rate it would swamp the RGB embedding within a few steps.
    """

    views: tuple[str, ...] = ("alpha",)
    rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    layernorms: bool = False
    mask_lr_scale: float = 0.06

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(self.rank, self.lora_alpha, self.lora_dropout, tuple(self.target_modules), self.layernorms)


_ADAPTER_FIELDS = ("rank", "lora_alpha", "lora_dropout", "target_modules", "layernorms")


@register_method
class RegionClipScorer(ViewScorer):
    """Rank proposals by a region-aware CLIP's similarity of (whole image + proposal mask) to the phrase."""

    name = "region-clip"
    Config = RegionClipConfig
    recipe = "region_clip"
    saves_backbone = True
    inference_options = ("views", "relations", "size_words", "temperature", "prompt", "masks", "sam_model",
                         "roi_size", "roi_dense")

    def __init__(self, backbone: ClipBackbone, config: RegionClipConfig | None = None):
        config = config if config is not None else RegionClipConfig()
        rb = region_backbone(backbone, config.adapter())
        for k, v in rb.adapter.to_dict().items():  # a region-aware backbone brings its own adapter
            setattr(config, k, tuple(v) if k == "target_modules" else v)
        super().__init__(rb, config)

    def setup_training(self) -> list[str]:
        """Make the mask convolution and the LoRA adapters (and LayerNorms if configured) trainable."""
        return self.backbone.setup_training()  # type: ignore[attr-defined]

    def train(self, mode: bool = True) -> "RegionClipScorer":
        super().train(mode)
        self.backbone.model.eval()  # no dropout in CLIP itself ...
        if mode and self.config.lora_dropout > 0:  # ... only on the LoRA inputs, when configured
            for n, m in self.backbone.model.named_modules():
                if n.endswith("lora_dropout"):
                    m.train()
        self.backbone.clear_text_cache()  # embeddings memoized before a training step are stale
        return self

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: ``(region embeddings (N, D), phrase embeddings (M, D), CLIP's temperature)``
        from pixels with the mask channel ``(N, 4, S, S)``; the frozen text tower runs without gradients."""
        regions = self.backbone.forward_image(pixel_values).embeds
        with torch.no_grad():
            texts = self.backbone.forward_text(input_ids, attention_mask).embeds
        return regions, texts, self.backbone.logit_scale.detach()

    def trainable_state_dict(self) -> dict[str, Any]:
        """Nothing beside the backbone: its mask weights and adapter are saved in ``backbone/``."""
        return {}


__all__ = ["RegionClipConfig", "RegionClipScorer"]
