"""Region-text contrastive training of a region-aware CLIP (``clipground train --method region-clip``).

What trains: the mask convolution (at ``model.mask_lr_scale`` times the learning rate) and the
LoRA adapters of the vision tower (:mod:`clipground.backbone.alpha`; LayerNorms too with
``model.layernorms``); the text tower and CLIP's temperature stay frozen.

Samples: one image with its regions. A region is (the image, a mask) paired with its phrase:

* a **synthetic world** folder (``--train runs/world-v2``): every expression of the split, its
  mask the object's real segment from ``instances_{split}.json`` (or, with probability
  ``data.p_box``, the box's rectangle, the mask a box proposal gives at inference);
* **Visual Genome** ``region_descriptions.json``: every region description, mask = its box (or
  its ``segmentation`` when a region has one: COCO polygons or uncompressed RLE);
* **any grounding dataset** the loaders read (RefCOCO/g, MDETR, COCO, JSONL): box -> mask.

Expressions of the same object (same ``ref_id`` or box) are one region with several phrases.
Each step draws up to ``data.regions_per_image`` regions per image (and their phrases) from
``(seed, epoch, index)``, plus ``data.hard_negatives`` boxes that are no region (part of one,
a loose box around one, two together, shifted, or background: IoU < 0.4 with every region),
so the loss sees what proposals look like.

Loss (:func:`region_loss`), with CLIP's own temperature: each phrase against every region of the
batch (``loss.text_to_region``: the other regions of the same image, the hard boxes and the other
images' regions are negatives), each region against the batch's phrases
(``loss.region_to_text``), and each phrase against the regions of its own image only
(``loss.same_image``: the choice grounding makes). Regions with the same phrase or the same
object are positives of each other.

Validation: the one evaluator on ``--val`` (a world's ``val.jsonl``) with the region-clip scorer
and the ``--proposals`` source (``{split}`` replaced by ``val``). Saves ``OUT/final`` (a
``Grounder`` directory whose ``backbone/`` is the region-aware CLIP: ``region_clip.json``, the
mask weights and the peft adapter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset

from ...backbone.alpha import box_masks, preprocess_masks
from ...backbone.features import too_long
from ...data.records import GroundingRecord
from ...errors import BadAnnotationError, ConfigError
from ...grounder import Grounder
from ...methods.region_clip import RegionClipConfig, RegionClipScorer
from ...options import to_dict
from ..losses import multi_positive_ce
from ..validation import validation_fn
from . import (DataConfig, LossConfig, RecipeConfig, TrainArgs, check_batch, load_backbone, load_recipe_config,
               load_split, save_final, split_paths, start_run)


# --------------------------------------------------------------------------- config


@dataclass
class RegionData(DataConfig):
    """How regions become samples.

    Attributes:
        regions_per_image: regions (each with one of its phrases) drawn per image per epoch (0: all).
        hard_negatives: boxes per image that are no region (part/loose/pair/shift/background).
        p_box: a region with a segment is shown with its box's rectangle with this probability.
        jitter: a region's box mask is moved by up to this fraction of its size per side.
        world_masks: in a synthetic world, use the objects' real segments.
    """

    regions_per_image: int = 8
    hard_negatives: int = 0
    p_box: float = 0.5
    jitter: float = 0.0
    world_masks: bool = True


@dataclass
class RegionLoss(LossConfig):
    """Weights of the three contrastive terms (see :func:`region_loss`)."""

    text_to_region: float = 1.0
    region_to_text: float = 1.0
    same_image: float = 1.0


@dataclass
class RegionClipRecipeConfig(RecipeConfig):
    """The recipe schema with the region-clip sections."""

    model: RegionClipConfig = field(default_factory=RegionClipConfig)
    data: RegionData = field(default_factory=RegionData)
    loss: RegionLoss = field(default_factory=RegionLoss)


TRAIN_DEFAULTS: dict[str, Any] = dict(lr=1e-3, batch_size=8, max_steps=500, warmup_steps=50, weight_decay=0.01,
                                      save_every=100, eval_every=0)


def load_region_config(path: str | None, overrides: Sequence[str] = ()) -> RegionClipRecipeConfig:
    """Read the recipe config (YAML + ``key=value`` overrides) and check its values."""
    cfg = load_recipe_config(RegionClipRecipeConfig, path, overrides, train_defaults=TRAIN_DEFAULTS)
    d = cfg.data
    if d.regions_per_image < 0 or d.hard_negatives < 0:
        raise ConfigError("data.regions_per_image and data.hard_negatives must be >= 0")
    if not cfg.model.mask_lr_scale > 0:
        raise ConfigError(f"model.mask_lr_scale must be > 0, got {cfg.model.mask_lr_scale}")
    if not 0 <= d.p_box <= 1 or not 0 <= d.jitter < 0.5:
        raise ConfigError("need 0 <= data.p_box <= 1 and 0 <= data.jitter < 0.5")
    if cfg.model.views != ("alpha",) and "alpha" not in cfg.model.views:
        raise ConfigError(f"model.views must include 'alpha' (the view region-clip trains), got {list(cfg.model.views)}")
    weights = (cfg.loss.text_to_region, cfg.loss.region_to_text, cfg.loss.same_image)
    if min(weights) < 0 or not any(w > 0 for w in weights):
        raise ConfigError("loss weights must be >= 0 and not all 0")
    return cfg


# --------------------------------------------------------------------------- masks


def segment_mask(seg: Any, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool mask of a COCO segmentation: polygons (``[[x, y, ...], ...]``) or uncompressed RLE."""
    import cv2

    from ...data.world import rle_decode

    w, h = int(size[0]), int(size[1])
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        m = rle_decode(seg).astype(bool)
        if m.shape != (h, w):
            raise BadAnnotationError(f"a segmentation of {m.shape[1]}x{m.shape[0]} px on an image of {w}x{h} px")
        return m
    if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 for p in seg):
        m = np.zeros((h, w), np.uint8)
        for poly in seg:
            pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2).round().astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        return m.astype(bool)
    raise BadAnnotationError("a segmentation must be COCO polygons or an uncompressed RLE ({'size', 'counts': [...]})")


def world_objects(world: Path, split: str) -> dict[str, list[tuple[list[float], Any]]]:
    """Per world image id, its objects' ``(xyxy box, RLE segment)`` in ``target`` order (decoded when drawn)."""
    path = world / f"instances_{split}.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadAnnotationError(f"cannot read {path}: {e}") from None
    out: dict[str, list[tuple[list[float], Any]]] = {str(im["id"]): [] for im in coco["images"]}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        x, y, w, h = (float(v) for v in a["bbox"])
        out[str(a["image_id"])].append(([x, y, x + w, y + h], a.get("segmentation")))
    return out


# --------------------------------------------------------------------------- hard boxes


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box ``a (4,)`` with boxes ``b (n, 4)``."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


HARD_KINDS = ("part", "loose", "pair", "shift", "background")


def hard_boxes(rng: np.random.Generator, regions: np.ndarray, size: tuple[int, int], count: int,
               max_iou: float = 0.4) -> list[list[float]]:
    """Up to ``count`` boxes with IoU < ``max_iou`` with every region box: part of a region, a loose box
    around one, the union of two, one shifted off itself, or background (kinds in turn)."""
    w, h = float(size[0]), float(size[1])
    out: list[list[float]] = []
    if count <= 0 or len(regions) == 0:
        return out
    for t in range(count * 6):
        if len(out) >= count:
            break
        kind = HARD_KINDS[(len(out) + t) % len(HARD_KINDS)]
        o = regions[int(rng.integers(len(regions)))]
        bw, bh = o[2] - o[0], o[3] - o[1]
        if kind == "part":
            fw, fh = rng.uniform(0.3, 0.6, 2)
            x, y = o[0] + rng.uniform(0, 1 - fw) * bw, o[1] + rng.uniform(0, 1 - fh) * bh
            b = [x, y, x + fw * bw, y + fh * bh]
        elif kind == "loose":
            s = rng.uniform(1.8, 3.0)
            nw, nh = bw * s, bh * s
            x, y = o[0] - rng.uniform(0, nw - bw), o[1] - rng.uniform(0, nh - bh)
            b = [x, y, x + nw, y + nh]
        elif kind == "pair" and len(regions) > 1:
            q = regions[int(rng.integers(len(regions)))]
            b = [min(o[0], q[0]), min(o[1], q[1]), max(o[2], q[2]), max(o[3], q[3])]
        elif kind == "shift":
            dx, dy = rng.choice([-1, 1], 2) * rng.uniform(0.6, 1.0, 2) * np.array([bw, bh])
            b = [o[0] + dx, o[1] + dy, o[2] + dx, o[3] + dy]
        else:
            sw, sh = rng.uniform(0.1, 0.35) * w, rng.uniform(0.1, 0.35) * h
            x, y = rng.uniform(0, w - sw), rng.uniform(0, h - sh)
            b = [x, y, x + sw, y + sh]
        b = [max(0.0, b[0]), max(0.0, b[1]), min(w, b[2]), min(h, b[3])]
        if b[2] - b[0] < 4 or b[3] - b[1] < 4:
            continue
        if float(_iou(np.asarray(b), regions).max()) < max_iou:
            out.append([float(v) for v in b])
    return out


# --------------------------------------------------------------------------- data


@dataclass
class Region:
    """One object of an image: its box, its segment (if known) and every phrase of it."""

    box: list[float]
    segment: Any = None
    phrases: list[str] = field(default_factory=list)


class RegionDataset(Dataset):
    """Images with their regions; item ``i`` of epoch ``e`` draws regions, phrases, masks and hard
    boxes from ``(seed, e, i)`` only (exact resume)."""

    def __init__(self, records: Sequence[GroundingRecord], cfg: RegionData, seed: int = 0,
                 world: Path | None = None) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        objects: dict[str, dict[str, list[tuple[list[float], Any]]]] = {}
        by_image: dict[str, dict[Any, Region]] = {}
        for r in records:
            regions = by_image.setdefault(r.image, {})
            table = None
            if world is not None and "target" in r.meta and r.split:
                if r.split not in objects:
                    objects[r.split] = world_objects(world, r.split)
                table = objects[r.split].get(str(r.image_id))
            if table is not None and not regions:  # every object of a world scene is a region, said or not
                for t, (box, seg) in enumerate(table):
                    regions[("target", t)] = Region(box, seg if cfg.world_masks else None)
            key = ("target", int(r.meta["target"])) if table is not None else (r.ref_id or tuple(round(v, 1) for v in r.box))
            reg = regions.get(key)
            if reg is None:
                reg = regions[key] = Region([float(v) for v in r.box], r.meta.get("segmentation"))
            if r.expression not in reg.phrases:
                reg.phrases.append(r.expression)
        self.images = list(by_image)
        self.regions = [list(by_image[im].values()) for im in self.images]
        self.n_regions = sum(len(x) for x in self.regions)
        self.n_said = sum(1 for x in self.regions for g in x if g.phrases)
        self.n_phrases = sum(len(g.phrases) for x in self.regions for g in x)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ...images import load_image

        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = load_image(self.images[i])
        w, h = img.size
        regs = self.regions[i]
        order = rng.permutation(len(regs)).tolist()
        order = [k for k in order if regs[k].phrases] + [k for k in order if not regs[k].phrases]  # said ones first
        if self.cfg.regions_per_image > 0:
            order = order[: self.cfg.regions_per_image]
        masks, phrases, keys = [], [], []
        for k in order:
            reg = regs[k]
            if reg.phrases:
                phrases.append(reg.phrases[int(rng.integers(len(reg.phrases)))])
            keys.append((i, k))
            use_box = reg.segment is None or rng.random() < self.cfg.p_box
            if use_box:
                b = np.asarray(reg.box, dtype=np.float64)
                if self.cfg.jitter > 0:
                    bw, bh = b[2] - b[0], b[3] - b[1]
                    b = b + rng.uniform(-self.cfg.jitter, self.cfg.jitter, 4) * np.array([bw, bh, bw, bh])
                masks.append(box_masks(torch.tensor([b.tolist()]), (w, h))[0].numpy())
            else:
                masks.append(segment_mask(reg.segment, (w, h)))
        all_boxes = np.asarray([g.box for g in regs], dtype=np.float64).reshape(-1, 4)
        hard = hard_boxes(rng, all_boxes, (w, h), self.cfg.hard_negatives)
        if hard:
            masks += list(box_masks(torch.tensor(hard), (w, h)).numpy())
        return {"image": img, "masks": masks, "phrases": phrases, "keys": keys}


def make_collate(backbone: Any) -> Any:
    """Collate: each image preprocessed once, every mask through the same processor geometry, phrases tokenized."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        pix, alpha, image_of, keys, phrases, phrase_region = [], [], [], [], [], []
        n = 0
        for b, it in enumerate(items):
            p = backbone.preprocess([it["image"]]).cpu()
            m = preprocess_masks(backbone.processor, it["masks"]).to(p.dtype)
            pix.append(p.expand(len(it["masks"]), -1, -1, -1))
            alpha.append(m)
            image_of += [b] * len(it["masks"])
            keys += list(it["keys"]) + [None] * (len(it["masks"]) - len(it["keys"]))
            phrases += it["phrases"]
            phrase_region += list(range(n, n + len(it["phrases"])))
            n += len(it["masks"])
        tok = backbone.tokenize(phrases)
        nr, npr = n, len(phrases)
        region_key = keys
        # positives[m, r]: phrase m is true of region r (its own region, the same object, or a region
        # shown with the same phrase); hard boxes (no key) are never positive.
        text_of = dict(zip(phrase_region, phrases))
        pos = torch.zeros(npr, nr, dtype=torch.bool)
        for m_i, r_m in enumerate(phrase_region):
            for r in range(nr):
                if region_key[r] is not None:
                    pos[m_i, r] = region_key[r] == region_key[r_m] or text_of.get(r) == phrases[m_i]
        img = torch.tensor(image_of)
        return {"pixel_values": torch.cat([torch.cat(pix), torch.cat(alpha)], 1),
                "input_ids": tok["input_ids"].cpu(), "attention_mask": tok["attention_mask"].cpu(),
                "positives": pos, "phrase_region": torch.tensor(phrase_region, dtype=torch.long),
                "same_image": img[torch.tensor(phrase_region, dtype=torch.long)][:, None] == img[None, :]}

    return collate


# --------------------------------------------------------------------------- loss


def region_loss(cfg: RegionLoss) -> Any:
    """The trainer's ``loss_fn``: the three contrastive terms of the module docstring."""

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        regions, texts, scale = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        pos = batch["positives"].to(regions.device)
        logits = scale * texts @ regions.t()  # (phrases, regions)
        every = torch.ones_like(pos)
        loss = regions.new_zeros(())
        if cfg.text_to_region:
            loss = loss + cfg.text_to_region * multi_positive_ce(logits, pos.float(), every).mean()
        if cfg.region_to_text:
            own = batch["phrase_region"].to(regions.device)
            r2t = logits.t()[own]  # each phrase's own region against every phrase
            loss = loss + cfg.region_to_text * multi_positive_ce(r2t, pos.t()[own].float(), torch.ones_like(r2t, dtype=torch.bool)).mean()
        same = batch["same_image"].to(regions.device)
        if cfg.same_image:
            loss = loss + cfg.same_image * multi_positive_ce(logits, pos.float(), same).mean()
        with torch.no_grad():
            pick = logits.masked_fill(~same, -1e4).argmax(1, keepdim=True)
            acc = pos.gather(1, pick).float().mean()
        return loss, {"image_top1": float(acc), "scale": float(scale)}

    return loss_fn


# --------------------------------------------------------------------------- the recipe


def _world_dir(path: Path) -> Path | None:
    d = path.parent if path.is_file() else path
    return d if (d / "world.json").is_file() else None


def train(args: TrainArgs) -> Path:
    """``clipground train --method region-clip``."""
    from ...proposals import get_proposals
    from ..trainer import Trainer

    cfg = load_region_config(args.config, args.overrides)
    start_run(cfg, args)
    train_path, val_path = split_paths(args)
    train_records = load_split(train_path, args.images, cfg.data.limit, cfg.train.seed, "training")
    val_records = load_split(val_path, args.images, cfg.data.val_limit, cfg.train.seed, "validation") if val_path else []
    world = _world_dir(train_path)

    backbone = load_backbone(args)
    torch.manual_seed(cfg.train.seed)
    method = RegionClipScorer(backbone, cfg.model)
    trainable = method.setup_training()
    share = method.backbone.trainable_share()  # type: ignore[attr-defined]
    print(f"training {len(trainable)} tensors, {int(share['trainable']):,} parameters: "
          f"{share['share_of_vision']:.2%} of the vision tower ({share['share_of_model']:.2%} of the CLIP)", flush=True)
    long = too_long(method.backbone, [r.expression for r in train_records])
    if any(long):
        print(f"left out {sum(long)} training phrases too long for the text encoder", flush=True)
        train_records = [r for r, x in zip(train_records, long) if not x]
    dataset = RegionDataset(train_records, cfg.data, cfg.train.seed, world)
    print(f"training regions: {dataset.n_regions} ({dataset.n_said} with {dataset.n_phrases} phrases, the others "
          f"negatives only) on {len(dataset)} images", flush=True)
    check_batch(len(dataset), cfg.train, "training images")

    eval_fn = None
    if val_records:
        proposals = get_proposals(args.proposals.replace("{split}", "val"))
        eval_fn = validation_fn(Grounder(method, proposals), val_records)
    trainer = Trainer(cfg.train, method, dataset, collate_fn=make_collate(method.backbone),
                      loss_fn=region_loss(cfg.loss), eval_fn=eval_fn,
                      extra_state={"method": "region-clip", "method_config": method.config.to_dict()},
                      lr_scale=lambda n, p: cfg.model.mask_lr_scale if "patch_embedding.alpha" in n else 1.0)
    t0 = time.perf_counter()
    result = trainer.fit(resume=args.resume)
    print(f"trained {result.step} steps in {result.wall_time_s:.1f} s; last: "
          + ", ".join(f"{k}={v:.4g}" for k, v in {**result.last_metrics, **result.last_eval}.items()), flush=True)
    method = trainer.unwrapped_model()  # type: ignore[assignment]
    method.eval()
    summary = {
        "method": "region-clip",
        "backbone": args.backbone,
        "proposals": args.proposals,
        "train": {"annotations": str(train_path), "images": len(dataset), "regions": dataset.n_regions,
                  "regions_with_phrases": dataset.n_said,
                  "phrases": dataset.n_phrases},
        "trainable": share,
        "steps": result.step,
        "train_seconds": round(result.wall_time_s, 1),
        "cpu_seconds": round(result.cpu_time_s, 1),
        "session_seconds": round(time.perf_counter() - t0, 1),
        "last_metrics": result.last_metrics,
        "val": result.last_eval,
        "config": to_dict(cfg),
    }
    return save_final(Grounder(method, get_proposals(args.proposals.replace("{split}", "test"))), args.out, summary,
                      args)


__all__ = [
    "HARD_KINDS",
    "Region",
    "RegionClipRecipeConfig",
    "RegionData",
    "RegionDataset",
    "RegionLoss",
    "hard_boxes",
    "load_region_config",
    "make_collate",
    "region_loss",
    "segment_mask",
    "train",
    "world_objects",
]
