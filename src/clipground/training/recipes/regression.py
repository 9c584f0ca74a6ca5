"""Recipe of ``fusion-regressor``: box losses on cached frozen CLIP features.

``clipground train --method fusion-regressor --train WORLD --backbone clipground/world-clip
--out runs/fusion [--config configs/fusion_regressor.yaml] [key=value ...]`` caches the frozen
CLIP features of every training image (and its mirrored copies) and phrase once
(:mod:`clipground.training.dense_data`), trains the fusion head with no backbone pass, validates
with the one evaluator on the validation cache, and writes ``metrics.jsonl``,
``learning_curve.png``, checkpoints, and the trained method in ``runs/fusion/final``
(``Grounder.from_pretrained``).

Loss: Smooth L1 + GIoU on normalized ``xyxy``, plus the quality term (BCE of the predicted
IoU), an auxiliary per-patch "inside the target box" BCE + Dice on the fused image tokens,
and for a ``peak`` head the cross-entropy of the patch softmax against the target's patch
coverage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...backbone.features import grid_shape
from ...boxes import paired_iou
from ...cache import FeatureCache
from ...grounder import Grounder
from ...methods.regression import FusionRegressor, FusionRegressorConfig
from ..config import TrainConfig
from ..dense_data import DenseBatch, DenseData, DenseDataset, prepare_dense
from ..losses import box_coverage, box_losses, map_loss
from ..trainer import Trainer
from ..validation import validation_fn
from . import (CachedRecipeConfig, LossConfig, TrainArgs, check_batch, load_backbone, load_recipe_config, save_final,
               start_run)


@dataclass
class FusionLossConfig(LossConfig):
    """Loss weights: Smooth L1 and GIoU on normalized boxes, the IoU-quality head, the
    auxiliary per-patch map (BCE + Dice against the box's patch coverage), and for a ``peak``
    head the cross-entropy of the patch softmax against the coverage distribution."""

    l1: float = 5.0
    giou: float = 2.0
    quality: float = 1.0
    patch_map: float = 1.0
    patch_ce: float = 1.0


@dataclass
class FusionRecipeConfig(CachedRecipeConfig):
    """Everything ``clipground train --method fusion-regressor`` reads from YAML / overrides."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=64, lr=3e-4,
                                                                   warmup_steps=200, weight_decay=0.05,
                                                                   save_every=1000, eval_every=500, log_every=20))
    model: FusionRegressorConfig = field(default_factory=FusionRegressorConfig)
    data: DenseData = field(default_factory=lambda: DenseData(val_limit=2000))
    loss: FusionLossConfig = field(default_factory=FusionLossConfig)


def fusion_loss(weights: FusionLossConfig) -> Callable[[torch.nn.Module, DenseBatch], tuple[torch.Tensor, dict[str, Any]]]:
    """The trainer's ``loss_fn`` for a :class:`~clipground.methods.regression.FusionHead`."""

    def loss_fn(model: torch.nn.Module, batch: DenseBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(*batch.inputs(), batch.txt_words)
        extra = {}
        if out.cell_boxes is not None:
            # Peak head: every patch the target covers learns the target's box (weighted by its
            # coverage), and the patch softmax learns to peak on those patches.
            p = out.cell_boxes.shape[1]
            cov = box_coverage(batch.boxes, *grid_shape(p)).flatten(1)
            w = cov / cov.sum(1, keepdim=True).clamp(min=1e-8)
            l1, giou = box_losses(out.cell_boxes, batch.boxes[:, None].expand(-1, p, -1), w)
            ce = -(w * out.patch_logits.float().log_softmax(1)).sum(1).mean()
            extra = {"patch_ce": (weights.patch_ce, ce)}
        else:
            l1, giou = box_losses(out.boxes, batch.boxes)
        with torch.no_grad():
            iou = paired_iou(out.boxes.detach().float().clamp(0, 1), batch.boxes.clamp(0, 1))
        q = torch.nn.functional.binary_cross_entropy_with_logits(out.quality.float(), iou)
        loss = weights.l1 * l1 + weights.giou * giou + weights.quality * q
        metrics = {"l1": l1.detach(), "giou": giou.detach(), "quality": q.detach(), "iou": iou.mean()}
        for name, (wt, term) in extra.items():
            loss = loss + wt * term
            metrics[name] = term.detach()
        if weights.patch_map > 0:
            target = box_coverage(batch.boxes, *grid_shape(out.patch_logits.shape[1])).flatten(1)
            pm = map_loss(out.patch_logits, target)
            loss = loss + weights.patch_map * pm
            metrics["patch_map"] = pm.detach()
        return loss, metrics

    return loss_fn


def config_class(method: str = "fusion-regressor") -> type[FusionRecipeConfig]:
    return FusionRecipeConfig


def fit(cfg: FusionRecipeConfig, backbone: Any, train_records: Sequence[Any], cache: FeatureCache,
        val_records: Sequence[Any] = (), val_cache: FeatureCache | None = None, resume: bool = False,
        stop_after_steps: int | None = None) -> tuple[FusionRegressor, Any]:
    """Train a :class:`FusionRegressor` on a dense cache; returns the method and the trainer result."""
    torch.manual_seed(cfg.train.seed)
    method = FusionRegressor(backbone, cfg.model)
    ds = DenseDataset(cache, train_records, backbone, method.view, cfg.model.prompt, words=cfg.model.words)
    eval_fn = None
    if val_cache is not None and val_records:  # test-time mirrors are not cached: those validate live
        states = None if cfg.model.tta else (lambda p: val_cache.image_state(p, backbone=backbone))
        eval_fn = validation_fn(Grounder(method), val_records, states=states)
    trainer = Trainer(cfg.train, method.fusion, ds, ds.collate, fusion_loss(cfg.loss), eval_fn=eval_fn,
                      extra_state={"method": method.name, "config": method.config.to_dict()})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    method.eval()
    return method, result


def train(args: TrainArgs) -> Path:
    """``clipground train --method fusion-regressor``: cache features, train, save ``out/final``."""
    cfg = load_recipe_config(FusionRecipeConfig, args.config, args.overrides)
    start_run(cfg, args)
    backbone = load_backbone(args)
    train_records, val_records, cache, val_cache = prepare_dense(args, cfg, backbone)
    check_batch(len(train_records), cfg.train, "training records")
    method, result = fit(cfg, backbone, train_records, cache, val_records, val_cache, resume=args.resume)
    return save_final(Grounder(method), args.out, {"step": result.step, "finished": result.finished,
                                                   "train": result.last_metrics, "val": result.last_eval,
                                                   "wall_time_s": result.wall_time_s, "cache": str(cache.root),
                                                   "cache_fingerprint": cache.fingerprint}, args)
