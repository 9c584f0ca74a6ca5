"""Recipe of ``locator``: map loss + box loss on cached frozen CLIP features.

``clipground train --method locator --train WORLD --backbone clipground/world-clip
--out runs/locator [--config configs/locator.yaml]``: the same cached features and validation
as the fusion regressor's recipe (:mod:`clipground.training.dense_data`).

Map targets are the target box rasterized with exact area coverage (each cell's target is
the fraction of it inside the box), at the locator's grid and at the refined resolution.
When instance masks are available (``masks: auto`` finds the COCO ``instances_{split}.json``
the synthetic world writes next to ``{split}.jsonl``; or give a path), the record's mask
(the instance whose box matches the record's box) replaces the box raster. Loss:
``map * (BCE + Dice)(refined) + map * coarse * (BCE + Dice)(coarse) + l1 * SmoothL1 + giou * GIoU``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...backbone.features import patch_grid
from ...cache import FeatureCache
from ...data.records import GroundingRecord
from ...errors import BadAnnotationError
from ...grounder import Grounder
from ...methods.dense import Locator, LocatorConfig
from ...mirror import flip_box, split_key
from ..config import TrainConfig
from ..dense_data import DenseBatch, DenseData, DenseDataset, prepare_dense
from ..losses import box_coverage, box_losses, map_loss
from ..trainer import Trainer
from ..validation import validation_fn
from . import (CachedRecipeConfig, LossConfig, TrainArgs, check_batch, load_backbone, load_recipe_config, save_final,
               start_run)


# --------------------------------------------------------------------------- masks


def _decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray | None:
    """COCO segmentation (uncompressed RLE or polygons) -> bool mask; ``None`` if unsupported."""
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        from ...data.world import rle_decode

        return rle_decode(seg)
    if isinstance(seg, list) and seg:
        m = np.zeros((h, w), np.uint8)
        polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2).round().astype(np.int32) for p in seg if len(p) >= 6]
        cv2.fillPoly(m, polys, 1)
        return m.astype(bool)
    return None


def load_instance_masks(records: Sequence[GroundingRecord], instances: str | Path) -> list[np.ndarray | None]:
    """Per record, the mask of the instance in its image whose box matches its box (IoU >= 0.9).

    ``instances`` is a COCO instances JSON whose ``file_name`` s are relative to its folder
    (as the synthetic world writes them). Records without a match get ``None``.
    """
    from ...boxes import iou

    path = Path(instances)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadAnnotationError(f"cannot read instance masks {path}: {e}") from None
    root = path.parent
    by_file = {str((root / im["file_name"]).resolve()): im for im in coco.get("images", [])}
    anns: dict[Any, list[dict]] = {}
    for a in coco.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    out: list[np.ndarray | None] = []
    for r in records:
        path, kind = split_key(r.image)  # a mirrored training copy: find the original, flip its mask
        im = by_file.get(str(Path(path).resolve()))
        cands = anns.get(im["id"], []) if im else []
        mask = None
        if cands:
            box = flip_box(r.box, kind, im["width"], im["height"])
            bx = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                               for a in cands], dtype=torch.float32)
            ious = iou(torch.tensor([box], dtype=torch.float32), bx)[0]
            k = int(ious.argmax())
            if float(ious[k]) >= 0.9 and cands[k].get("segmentation") is not None:
                mask = _decode_segmentation(cands[k]["segmentation"], im["height"], im["width"])
                if mask is not None and "h" in kind:
                    mask = mask[:, ::-1]
                if mask is not None and "v" in kind:
                    mask = mask[::-1]
        out.append(None if mask is None else np.ascontiguousarray(mask))
    return out


def mask_to_input(mask: np.ndarray, offset: float, scale: float, out_hw: tuple[int, int]) -> torch.Tensor:
    """Warp an image-pixel mask into model-input coordinates (the padded square's ``[offset, offset +
    scale]`` window, see :class:`~clipground.backbone.geometry.InputGeometry`) at ``out_hw``."""
    h, w = mask.shape
    side = max(h, w)
    sq = np.zeros((side, side), np.float32)
    sq[:h, :w] = mask
    lo, hi = int(round(offset)), int(round(offset + scale))
    sq = sq[lo:hi, lo:hi]
    return torch.from_numpy(cv2.resize(sq, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA)).half()


def resolve_masks(spec: str, path: str, split: str, records: Sequence[GroundingRecord], ds: DenseDataset,
                  out_hw: tuple[int, int]) -> list[torch.Tensor | None] | None:
    """Target masks for ``ds``'s ``records`` per the ``masks`` option (``auto``, ``none`` or a JSON path)."""
    if spec == "none" or not records:
        return None
    if spec == "auto":
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        cand = folder / f"instances_{split}.json"
        if not cand.is_file():
            return None
        spec = str(cand)
    raw = load_instance_masks(records, spec)
    if all(m is None for m in raw):
        return None
    out: list[torch.Tensor | None] = []
    for i, m in enumerate(raw):
        if m is not None:
            out.append(mask_to_input(m, float(ds.offset[i]), float(ds.scale[i]), out_hw))
        else:  # no instance matched this record: its box raster stands in for the mask
            out.append(box_coverage(ds.boxes[i : i + 1], *out_hw)[0].half())
    return out


# --------------------------------------------------------------------------- recipe


@dataclass
class LocatorLossConfig(LossConfig):
    """Loss weights: map (BCE + Dice; ``coarse`` scales the low-resolution term) and box terms."""

    map: float = 1.0
    coarse: float = 0.5
    l1: float = 5.0
    giou: float = 2.0


@dataclass
class LocatorData(DenseData):
    """Records of the locator recipe; ``masks``: ``auto`` (world instance masks when present),
    ``none``, or a COCO instances JSON path."""

    masks: str = "auto"


@dataclass
class LocatorRecipeConfig(CachedRecipeConfig):
    """Everything ``clipground train --method locator`` reads from YAML / overrides."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=64, lr=5e-4,
                                                                   warmup_steps=200, weight_decay=0.05,
                                                                   save_every=1000, eval_every=500, log_every=20))
    model: LocatorConfig = field(default_factory=LocatorConfig)
    data: LocatorData = field(default_factory=lambda: LocatorData(val_limit=2000))
    loss: LocatorLossConfig = field(default_factory=LocatorLossConfig)


def locator_loss(w: LocatorLossConfig) -> Callable[[torch.nn.Module, DenseBatch], tuple[torch.Tensor, dict[str, Any]]]:
    """The trainer's ``loss_fn`` for a :class:`~clipground.methods.dense.LocatorNet`."""

    def loss_fn(model: torch.nn.Module, batch: DenseBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(*batch.inputs())
        (h, wd), (hh, ww) = out.coarse.shape[-2:], out.refined.shape[-2:]
        if batch.masks is not None:
            fine = batch.masks.to(out.refined.dtype)
            coarse = F.adaptive_avg_pool2d(fine[:, None], (h, wd))[:, 0]
        else:
            fine, coarse = box_coverage(batch.boxes, hh, ww), box_coverage(batch.boxes, h, wd)
        m_fine, m_coarse = map_loss(out.refined, fine), map_loss(out.coarse, coarse)
        l1, giou = box_losses(out.boxes.float(), batch.boxes)
        loss = w.map * (m_fine + w.coarse * m_coarse) + w.l1 * l1 + w.giou * giou
        return loss, {"map": m_fine.detach(), "map_coarse": m_coarse.detach(), "l1": l1.detach(), "giou": giou.detach()}

    return loss_fn


def config_class(method: str = "locator") -> type[LocatorRecipeConfig]:
    return LocatorRecipeConfig


def fit(cfg: LocatorRecipeConfig, backbone: Any, train_records: Sequence[GroundingRecord], cache: FeatureCache,
        val_records: Sequence[GroundingRecord] = (), val_cache: FeatureCache | None = None,
        masks_from: str | None = None, resume: bool = False, stop_after_steps: int | None = None
        ) -> tuple[Locator, Any]:
    """Train a :class:`Locator` on a dense cache; returns the method and the trainer result.

    ``masks_from``: the training annotation path ``data.masks: auto`` looks for instance masks beside.
    """
    torch.manual_seed(cfg.train.seed)
    method = Locator(backbone, cfg.model)
    ds = DenseDataset(cache, train_records, backbone, method.view, cfg.model.prompt)
    gh, gw = patch_grid(backbone, method.view)
    up = cfg.model.upsample
    if masks_from is not None:
        ds.masks = resolve_masks(cfg.data.masks, masks_from, "train", train_records, ds, (gh * up, gw * up))
    eval_fn = None
    if val_cache is not None and val_records:
        eval_fn = validation_fn(Grounder(method), val_records, states=lambda p: val_cache.image_state(p, backbone=backbone))
    trainer = Trainer(cfg.train, method.net, ds, ds.collate, locator_loss(cfg.loss), eval_fn=eval_fn,
                      extra_state={"method": method.name, "config": method.config.to_dict()})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    method.eval()
    return method, result


def train(args: TrainArgs) -> Path:
    """``clipground train --method locator``: cache features, train, save ``out/final``."""
    cfg = load_recipe_config(LocatorRecipeConfig, args.config, args.overrides)
    start_run(cfg, args)
    backbone = load_backbone(args)
    train_records, val_records, cache, val_cache = prepare_dense(args, cfg, backbone)
    check_batch(len(train_records), cfg.train, "training records")
    method, result = fit(cfg, backbone, train_records, cache, val_records, val_cache, masks_from=args.train,
                         resume=args.resume)
    return save_final(Grounder(method), args.out, {"step": result.step, "finished": result.finished,
                                                   "train": result.last_metrics, "val": result.last_eval,
                                                   "wall_time_s": result.wall_time_s, "cache": str(cache.root),
                                                   "cache_fingerprint": cache.fingerprint}, args)
