"""Recipe of ``fusion-regressor``, and the frozen-feature machinery the dense recipe shares.

The CLIP backbone is frozen, so its outputs for a training image or phrase never change:
:func:`build_feature_cache` encodes every distinct (padded-square) image and every distinct
phrase once, in chunks saved atomically as safetensors under the cache directory (a
killed run resumes at the first missing chunk; a different backbone or dataset gets a
different key). Training then runs on :class:`CachedGroundingDataset` with no backbone
pass at all.

``clipground train --method fusion-regressor --train WORLD/train.jsonl --val WORLD/val.jsonl
--backbone clipground/world-clip --out runs/fusion [--config configs/fusion_regressor.yaml]
[key=value ...]`` writes ``metrics.jsonl``, ``learning_curve.png``, checkpoints, and the
trained method in ``runs/fusion/final`` (``Grounder.from_pretrained``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ...backbone import ClipBackbone
from ...data.records import GroundingRecord
from ...errors import BadAnnotationError, ClipgroundError
from ...heatmaps import crop_fraction
from ...images import load_image
from ...mirror import FLIP_KINDS, check_kinds, flip_box, flip_expression, flip_image
from ...methods.regression import (FusionRegressor, FusionRegressorConfig, box_losses, dense_input,
                                  dense_view, encode_square_images, grid_shape)
from ..config import TrainConfig, load_config
from ..trainer import Trainer
from . import TrainArgs, register_recipe

CACHE_VERSION = 2

# --------------------------------------------------------------------------- data


def load_split(path: str, images: str | None, split: str) -> list[GroundingRecord]:
    """Records of ``path``: a world/dataset folder holding ``{split}.jsonl``, or any annotation file."""
    from ...data.loaders import load_records

    p = Path(path)
    if p.is_dir() and (p / f"{split}.jsonl").is_file():
        p = p / f"{split}.jsonl"
    res = load_records(p, images=images)
    if not res.records:
        raise BadAnnotationError(f"no usable records in {path} ({res.summary()})")
    return res.records


# --------------------------------------------------------------------------- flips


def split_key(key: str) -> tuple[str, str]:
    """``path#kind`` -> ``(path, kind)``; a plain path -> ``(path, "")``."""
    path, sep, kind = key.rpartition("#")
    return (path, kind) if sep and kind in FLIP_KINDS else (key, "")


def load_keyed_image(key: str) -> Any:
    """Load ``path`` or a flipped view ``path#h`` / ``path#v`` / ``path#hv`` (feature-cache keys)."""
    path, kind = split_key(key)
    return flip_image(load_image(path), kind)


def add_flips(records: Sequence[GroundingRecord], kinds: Sequence[str]) -> list[GroundingRecord]:
    """``records`` plus mirrored copies (image key ``path#kind``, flipped box, swapped words).

    Training-set augmentation: a mirrored scene with "left" and "right" swapped describes
    the mirrored object, so the copies are as correct as the originals.
    """
    kinds = check_kinds(kinds)
    sizes: dict[str, tuple[int, int]] = {}
    out = list(records)
    for kind in kinds:
        for r in records:
            if r.image not in sizes:
                sizes[r.image] = load_image(r.image).size
            out.append(GroundingRecord(f"{r.image}#{kind}", flip_expression(r.expression, kind),
                                       flip_box(r.box, kind, *sizes[r.image]), r.image_id, r.ref_id, r.split,
                                       {**r.meta, "flip": kind}))
    return out


# --------------------------------------------------------------------------- feature cache


@dataclass
class FeatureCache:
    """Frozen CLIP features of distinct images and phrases.

    Attributes:
        images: image paths (index = image id in the cache).
        sizes: ``(N, 2)`` original ``(width, height)``.
        img_embed: ``(N, D)`` pooled image embeddings.
        patches: ``(N, P, Dv)`` last-layer patch tokens (float16).
        patch_embeds: ``(N, P, D)`` patch tokens projected to the joint space (float16).
        texts: the prompted phrases (index = text id).
        txt_embed: ``(E, D)`` pooled text embeddings.
        txt_tokens: ``(E, L, Dt)`` token states (float16), padded to the longest phrase.
        txt_len: ``(E,)`` number of real tokens.
        txt_words: ``(E, L, Dt)`` the tokens' input word embeddings (float16): plain lookups,
            recomputed at every build instead of stored in the chunks.
        fraction: the processor's crop fraction (for :func:`square_geometry`).
        view: the image-token options the features were computed with
            (:func:`~clipground.methods.regression.dense_input`).
    """

    images: list[str]
    sizes: torch.Tensor
    img_embed: torch.Tensor
    patches: torch.Tensor
    patch_embeds: torch.Tensor
    texts: list[str]
    txt_embed: torch.Tensor
    txt_tokens: torch.Tensor
    txt_len: torch.Tensor
    txt_words: torch.Tensor | None = None
    fraction: float = 1.0
    view: dict[str, Any] = field(default_factory=lambda: {"tiles": 1, "input_size": 0, "dense": "final"})
    image_index: dict[str, int] = field(default_factory=dict)
    text_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_index = {p: i for i, p in enumerate(self.images)}
        self.text_index = {t: i for i, t in enumerate(self.texts)}


def _backbone_fingerprint(backbone: ClipBackbone) -> str:
    """Identifies the backbone's weights and preprocessing cheaply (name, config, a weight checksum)."""
    h = hashlib.sha1()
    h.update(backbone.model.config.to_json_string().encode())
    h.update(json.dumps(backbone.processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for i, p in enumerate(backbone.model.parameters()):
            h.update(f"{float(p.double().sum()):.10e}".encode())
            if i >= 8:
                break
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def build_feature_cache(backbone: ClipBackbone, records: Sequence[GroundingRecord], prompt: str = "{}",
                        cache_dir: str | os.PathLike | None = None, chunk: int = 256,
                        progress: bool = True, tiles: int = 1, input_size: int = 0,
                        dense: str = "final") -> FeatureCache:
    """Encode each distinct image and phrase of ``records`` once (resumable on disk).

    With ``cache_dir=None`` everything stays in memory. ``tiles``, ``input_size`` and
    ``dense`` as in :func:`~clipground.methods.regression.encode_square_images`.
    """
    view = dense_view(tiles, input_size, dense)
    from tqdm.auto import tqdm

    images = list(dict.fromkeys(r.image for r in records))
    texts = list(dict.fromkeys(prompt.format(r.expression) for r in records))
    key_src = json.dumps({"v": CACHE_VERSION, "bb": _backbone_fingerprint(backbone), "images": images,
                          "texts": texts, "view": view})
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else None

    def run(kind: str, items: Sequence[Any], encode: Callable[[Sequence[Any]], dict[str, torch.Tensor]]) -> list[dict]:
        parts = []
        chunks = _chunked(items, chunk)
        for i, c in enumerate(tqdm(chunks, desc=f"caching {kind} features", disable=not progress, leave=False)):
            path = root / f"{kind}-{key}-{i:05d}.safetensors" if root is not None else None
            if path is not None and path.is_file():
                parts.append(load_file(str(path)))
                continue
            part = encode(c)
            if path is not None:
                _atomic_save(part, path)
            parts.append(part)
        return parts

    def enc_images(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        pil = [load_keyed_image(k) for k in keys]
        sizes = torch.tensor([im.size for im in pil], dtype=torch.int64)
        f = encode_square_images(backbone, pil, **view)
        return {"sizes": sizes, "img_embed": f["img_embed"].float().cpu(), "patches": f["patches"].half().cpu(),
                "patch_embeds": f["patch_embeds"].half().cpu()}

    def enc_texts(ts: Sequence[str]) -> dict[str, torch.Tensor]:
        f = backbone.encode_texts(list(ts))
        return {"txt_embed": f.embeds.float().cpu(), "txt_tokens": f.tokens.half().cpu(),
                "txt_len": f.mask.sum(1).to(torch.int64).cpu()}

    ip = run("img", images, enc_images)
    tp = run("txt", texts, enc_texts)
    width = max(int(p["txt_tokens"].shape[1]) for p in tp)
    tokens = torch.cat([torch.nn.functional.pad(p["txt_tokens"], (0, 0, 0, width - p["txt_tokens"].shape[1]))
                        for p in tp])
    if root is not None:
        meta = {"key": key, "images": len(images), "texts": len(texts), "backbone": backbone.name}
        (root / f"index-{key}.json").write_text(json.dumps(meta))
    return FeatureCache(
        images=images,
        sizes=torch.cat([p["sizes"] for p in ip]),
        img_embed=torch.cat([p["img_embed"] for p in ip]),
        patches=torch.cat([p["patches"] for p in ip]),
        patch_embeds=torch.cat([p["patch_embeds"] for p in ip]),
        texts=texts,
        txt_embed=torch.cat([p["txt_embed"] for p in tp]),
        txt_tokens=tokens,
        txt_len=torch.cat([p["txt_len"] for p in tp]),
        txt_words=backbone.word_embeddings(texts, width).half(),
        fraction=crop_fraction(backbone.processor.image_processor),
        view=view,
    )


# --------------------------------------------------------------------------- dataset


@dataclass
class Batch:
    """A training batch from the feature cache (model-input coordinates for targets).

    ``boxes`` are normalized ``xyxy`` targets, ``pixel_boxes`` the original pixel boxes,
    ``scale``/``offset`` ``(B,)`` the per-image geometry (``pixel = norm * scale + offset``),
    ``sizes`` ``(B, 2)`` image ``(width, height)``, ``masks`` optional ``(B, H, W)`` targets.
    """

    img_embed: torch.Tensor
    patches: torch.Tensor
    patch_embeds: torch.Tensor
    txt_embed: torch.Tensor
    txt_tokens: torch.Tensor
    txt_mask: torch.Tensor
    boxes: torch.Tensor
    pixel_boxes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    sizes: torch.Tensor
    masks: torch.Tensor | None = None
    txt_words: torch.Tensor | None = None

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional inputs of the fusion / locator networks."""
        return self.img_embed, self.patches, self.patch_embeds, self.txt_embed, self.txt_tokens, self.txt_mask

    def to(self, device: torch.device | str, **kwargs: Any) -> "Batch":
        """Move every tensor (accelerate calls this to place batches on the device)."""
        return Batch(**{k: (v.to(device, **kwargs) if isinstance(v, torch.Tensor) else v)
                        for k, v in self.__dict__.items()})


class CachedGroundingDataset(torch.utils.data.Dataset):
    """Records as indices into a :class:`FeatureCache`; :meth:`collate` builds a :class:`Batch`.

    Args:
        cache: the features.
        records: the records (their image and prompted phrase must be in ``cache``).
        prompt: the prompt template used when the cache was built.
        masks: optional per-record target masks (``(H, W)`` float tensors in model-input
            coordinates, or ``None`` entries), e.g. from :func:`load_instance_masks`.
    """

    def __init__(self, cache: FeatureCache, records: Sequence[GroundingRecord], prompt: str = "{}",
                 masks: Sequence[torch.Tensor | None] | None = None):
        self.cache = cache
        self.img = torch.tensor([cache.image_index[r.image] for r in records], dtype=torch.long)
        self.txt = torch.tensor([cache.text_index[prompt.format(r.expression)] for r in records], dtype=torch.long)
        self.pixel_boxes = torch.tensor([r.box for r in records], dtype=torch.float32)
        sizes = cache.sizes[self.img]
        side = sizes.max(1).values.float()
        self.scale = side * cache.fraction
        self.offset = side * (1.0 - cache.fraction) / 2.0
        self.boxes = (self.pixel_boxes - self.offset[:, None]) / self.scale[:, None]
        self.masks = list(masks) if masks is not None else None

    def __len__(self) -> int:
        return len(self.img)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> Batch:
        """Gather cached features for dataset indices ``idx``."""
        c = self.cache
        ix = torch.tensor(idx, dtype=torch.long)
        ii, tt = self.img[ix], self.txt[ix]
        lens = c.txt_len[tt]
        width = int(lens.max())
        masks = None
        if self.masks is not None and all(self.masks[i] is not None for i in idx):
            masks = torch.stack([self.masks[i] for i in idx]).float()
        return Batch(
            img_embed=c.img_embed[ii], patches=c.patches[ii].float(), patch_embeds=c.patch_embeds[ii].float(),
            txt_embed=c.txt_embed[tt],
            txt_tokens=c.txt_tokens[tt, :width].float(),
            txt_mask=torch.arange(width)[None] < lens[:, None],
            boxes=self.boxes[ix], pixel_boxes=self.pixel_boxes[ix], scale=self.scale[ix], offset=self.offset[ix],
            sizes=c.sizes[ii], masks=masks,
            txt_words=None if c.txt_words is None else c.txt_words[tt, :width].float(),
        )


def box_coverage(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of each cell of an ``h x w`` grid over ``[0, 1]^2`` covered by each box: ``(B, h, w)``."""
    ex = torch.linspace(0, 1, w + 1, device=boxes.device, dtype=boxes.dtype)
    ey = torch.linspace(0, 1, h + 1, device=boxes.device, dtype=boxes.dtype)
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    cx = (torch.minimum(x2, ex[1:]) - torch.maximum(x1, ex[:-1])).clamp(min=0) * w
    cy = (torch.minimum(y2, ey[1:]) - torch.maximum(y1, ey[:-1])).clamp(min=0) * h
    return cy[:, :, None] * cx[:, None, :]


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean soft Dice loss over the batch of ``(B, H, W)`` maps."""
    inter = (prob * target).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def map_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice of map logits against soft targets."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits.sigmoid(), target)


def check_view(cache: FeatureCache, model_cfg: Any) -> None:
    """Refuse to train a model on features made with other image-token options (tiles, input size, ...)."""
    want = dense_input(model_cfg)
    if cache.view != want:
        raise ClipgroundError(f"feature cache was built with {cache.view} but the model wants {want}")


def pixel_boxes(norm: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Normalized predictions -> original pixels, clipped to each image (as inference does)."""
    px = norm.clamp(0, 1) * batch.scale[:, None] + batch.offset[:, None]
    lim = batch.sizes.repeat(1, 2).float()
    return torch.minimum(px.clamp(min=0), lim)


def grounding_metrics(pred_px: torch.Tensor, gt_px: torch.Tensor) -> dict[str, float]:
    """Mean IoU and Acc@0.5 of paired pixel boxes."""
    from ...boxes import paired_iou

    iou = paired_iou(pred_px, gt_px)
    return {"miou": float(iou.mean()), "acc50": float((iou >= 0.5).float().mean())}


def evaluate_dataset(predict: Callable[[Batch], torch.Tensor], ds: CachedGroundingDataset,
                     device: torch.device | str = "cpu", batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``predict(batch) -> normalized boxes`` over a cached dataset."""
    preds, gts = [], []
    for s in range(0, len(ds), batch_size):
        b = ds.collate(list(range(s, min(len(ds), s + batch_size))))
        preds.append(pixel_boxes(predict(b.to(device)).float().cpu(), b))
        gts.append(b.pixel_boxes)
    return grounding_metrics(torch.cat(preds), torch.cat(gts))


def subset(records: list[GroundingRecord], limit: int, seed: int = 0) -> list[GroundingRecord]:
    """A fixed random subset of at most ``limit`` records (0: all)."""
    if limit <= 0 or len(records) <= limit:
        return records
    g = np.random.default_rng(seed)
    keep = sorted(g.choice(len(records), size=limit, replace=False).tolist())
    return [records[i] for i in keep]


# --------------------------------------------------------------------------- recipe


@dataclass
class FusionLossConfig:
    """Loss weights: Smooth L1 and GIoU on normalized boxes, the IoU-quality head, the
    auxiliary per-patch map (BCE + Dice against the box's patch coverage), and for a ``peak``
    head the cross-entropy of the patch softmax against the coverage distribution."""

    l1: float = 5.0
    giou: float = 2.0
    quality: float = 1.0
    patch_map: float = 1.0
    patch_ce: float = 1.0


@dataclass
class FusionRecipeConfig:
    """Everything ``clipground train --method fusion-regressor`` reads from YAML / overrides.

    ``eval_limit``: at most this many validation records (a fixed random subset).
    ``flips``: training-set mirror augmentation, any of ``h``, ``v``, ``hv`` (see :func:`add_flips`).
    ``num_threads``: CPU threads for torch (0: torch's default). On a shared CPU, 1 thread is
    often several times faster per step for these small models than oversubscribed cores.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=64, lr=3e-4,
                                                                   warmup_steps=200, weight_decay=0.05,
                                                                   save_every=1000, eval_every=500, log_every=20))
    model: FusionRegressorConfig = field(default_factory=FusionRegressorConfig)
    loss: FusionLossConfig = field(default_factory=FusionLossConfig)
    eval_limit: int = 2000
    flips: list[str] = field(default_factory=list)
    num_threads: int = 0


def fusion_loss(weights: FusionLossConfig) -> Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]:
    """The trainer's ``loss_fn`` for a :class:`~clipground.methods.regression.FusionHead`."""
    from ...boxes import paired_iou

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
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


def prepare_data(args: TrainArgs, backbone: ClipBackbone, prompt: str, eval_limit: int, seed: int,
                 flips: Sequence[str] = (), progress: bool = True, view: dict[str, Any] | None = None
                 ) -> tuple[list[GroundingRecord], list[GroundingRecord], FeatureCache]:
    """Load train (+ flips) / val records and build (or reuse) their feature cache.

    Without ``--val``, a ``--train`` folder's own ``val.jsonl`` (a world folder) is used.
    """
    train = add_flips(load_split(args.train, args.images, "train"), flips)
    val_path = args.val
    if val_path is None and Path(args.train).is_dir() and (Path(args.train) / "val.jsonl").is_file():
        val_path = str(Path(args.train) / "val.jsonl")
    val = subset(load_split(val_path, args.images, "val"), eval_limit, seed) if val_path else []
    cache_dir = Path(args.cache) if args.cache else Path(args.out) / "feature_cache"
    cache = build_feature_cache(backbone, train + val, prompt, cache_dir, progress=progress, **(view or {}))
    return train, val, cache


def train_fusion_regressor(cfg: FusionRecipeConfig, backbone: ClipBackbone, train: list[GroundingRecord],
                           val: list[GroundingRecord], cache: FeatureCache, resume: bool = False,
                           stop_after_steps: int | None = None) -> tuple[FusionRegressor, Any]:
    """Train a :class:`FusionRegressor` on cached features; returns the method and the trainer result."""
    check_view(cache, cfg.model)
    torch.manual_seed(cfg.train.seed)
    method = FusionRegressor(backbone, cfg.model)
    ds = CachedGroundingDataset(cache, train, cfg.model.prompt)
    vds = CachedGroundingDataset(cache, val, cfg.model.prompt) if val else None

    def eval_fn(head: torch.nn.Module) -> dict[str, float]:
        if vds is None:
            return {}
        return evaluate_dataset(lambda b: head(*b.inputs(), b.txt_words).boxes, vds, next(head.parameters()).device)

    trainer = Trainer(cfg.train, method.fusion, ds, ds.collate, fusion_loss(cfg.loss),
                      eval_fn=eval_fn if vds is not None else None,
                      extra_state={"method": method.name, "config": method.config.to_dict()})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    method.eval()
    return method, result


def save_final(method: torch.nn.Module, out: str | os.PathLike, result: Any) -> Path:
    """Save the trained method to ``out/final`` (Grounder layout) and its last metrics."""
    from ...grounder import Grounder

    final = Path(out) / "final"
    Grounder(method).save_pretrained(final)
    summary = {"step": result.step, "finished": result.finished, "train": result.last_metrics,
               "val": result.last_eval, "wall_time_s": result.wall_time_s}
    from ...io import atomic_write as atomic_write_text

    atomic_write_text(Path(out) / "final_metrics.json", json.dumps(summary, indent=2, default=float))
    return final


def set_threads(n: int) -> None:
    """Use ``n`` torch CPU threads (0 leaves torch's default)."""
    if n < 0:
        raise ClipgroundError(f"num_threads must be >= 0, got {n}")
    if n > 0:
        torch.set_num_threads(n)


def load_backbone(args: TrainArgs) -> ClipBackbone:
    """The frozen backbone of a recipe (on GPU when one is available)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ClipBackbone.from_pretrained(args.backbone, device=device)


@register_recipe("fusion-regressor")
def run(args: TrainArgs) -> Path:
    """``clipground train --method fusion-regressor``: cache features, train, save ``out/final``."""
    cfg = load_config(FusionRecipeConfig, args.config, args.overrides)
    cfg.train.output_dir = args.out
    set_threads(cfg.num_threads)
    backbone = load_backbone(args)
    train, val, cache = prepare_data(args, backbone, cfg.model.prompt, cfg.eval_limit, cfg.train.seed,
                                     flips=cfg.flips, progress=cfg.train.progress,
                                     view=dense_input(cfg.model))
    if len(train) < cfg.train.batch_size and cfg.train.drop_last:
        raise ClipgroundError(f"only {len(train)} training records for batch_size {cfg.train.batch_size}; "
                              f"lower batch_size (e.g. batch_size={max(1, len(train))})")
    method, result = train_fusion_regressor(cfg, backbone, train, val, cache, resume=args.resume)
    return save_final(method, args.out, result)
