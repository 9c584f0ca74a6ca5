"""Pretrain a small SAM in the synthetic world (``clipground pretrain --model sam``).

No SAM weights are reachable offline, so clipground trains its own promptable segmenter: a
transformers :class:`~transformers.SamModel` with a small config (a 4-layer windowed ViT on
128 px inputs, 8 px patches, a 64-wide prompt encoder and two-way mask decoder) and the
matching :class:`~transformers.SamProcessor`, so it loads with ``from_pretrained(dir)`` and
plugs into :class:`clipground.segmenters.SamSegmenter` exactly like a hub SAM.

Training follows SAM's recipe on the world's train-split masks: each scene is encoded once and
prompted with several of its objects, every prompt a jittered box, one point drawn uniformly
inside the mask, or both (one kind per batch). The decoder always returns its three masks;
the mask loss (BCE + dice on the low-resolution logits) takes the best of the three, as SAM
does for ambiguous prompts, and the IoU head regresses each mask's actual IoU, which is what
:class:`~clipground.segmenters.SamSegmenter` ranks the masks by.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.world import ensure_world, load_scene_objects, load_world_config, rle_decode
from ..data.world.config import WorldConfig
from ..errors import ClipgroundError, ConfigError
from ..options import to_dict
from ..segmenters import SAM_PROMPTS
from .config import TrainConfig
from .recipes import LossConfig, RecipeConfig, load_recipe_config
from .trainer import Trainer, TrainResult




# --------------------------------------------------------------------------- configs


@dataclass
class SamModelConfig:
    """Size of the world SAM (transformers ``SamConfig`` fields, simplified).

    ``hidden`` is the width shared by the vision neck, the prompt encoder and the mask decoder
    (SAM requires them equal); masks come out at 4x the patch grid.
    """

    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    window_size: int = 4
    global_attn_indexes: list[int] = field(default_factory=lambda: [1, 3])
    hidden: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_mlp: int = 256
    iou_hidden: int = 64
    init_std: float = 0.02


@dataclass
class SamDataConfig:
    """How prompts are drawn from each train scene (per scene, per epoch)."""

    objects_per_scene: int = 4  # prompts per encoded scene (objects drawn without replacement, then repeated)
    prompt_weights: dict[str, float] = field(default_factory=lambda: {"box": 0.4, "point": 0.4, "point+box": 0.2})
    box_jitter: float = 0.1  # max shift of each box side, as a fraction of the box side (SAM: ~10%)
    max_scenes: int = 0  # use only the first N train scenes (0 = all); for tests


@dataclass
class SamLossConfig(LossConfig):
    """Weights of the mask losses (on the best of the three masks) and the IoU head's MSE."""

    bce: float = 1.0
    dice: float = 1.0
    iou: float = 1.0


@dataclass
class SamEvalConfig:
    """The quality gate: mean mask IoU against the ground-truth masks of ``split`` (and
    ``new-look``) with a ground-truth box prompt and with one random point inside the object,
    through :class:`~clipground.segmenters.SamSegmenter` as every method uses it."""

    split: str = "val"
    max_objects: int = 150  # objects of the split scored per eval (0 = all)
    new_look: bool = True


@dataclass
class SamPretrainConfig(RecipeConfig):
    """Everything ``clipground pretrain --model sam`` needs (the recipe schema plus ``world`` and ``eval``)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/pretrain_world_sam", batch_size=8, lr=5e-4, weight_decay=0.05, warmup_steps=50,
        max_steps=300, log_every=10, save_every=100, eval_every=100))
    model: SamModelConfig = field(default_factory=SamModelConfig)
    data: SamDataConfig = field(default_factory=SamDataConfig)
    loss: SamLossConfig = field(default_factory=SamLossConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    eval: SamEvalConfig = field(default_factory=SamEvalConfig)


def load_sam_pretrain_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
                             ) -> SamPretrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated :class:`SamPretrainConfig`."""
    cfg = load_recipe_config(SamPretrainConfig, path, overrides)
    w = cfg.data.prompt_weights
    if set(w) - set(SAM_PROMPTS) or not any(float(v) > 0 for v in w.values()):
        raise ConfigError(f"data.prompt_weights needs positive weights over {', '.join(SAM_PROMPTS)}; got {w}")
    m = cfg.model
    if m.image_size % m.patch_size:
        raise ConfigError("model.image_size must be a multiple of model.patch_size")
    if m.hidden % 2 or m.hidden % m.decoder_heads:
        raise ConfigError("model.hidden must be even and a multiple of model.decoder_heads")
    if cfg.data.objects_per_scene < 1:
        raise ConfigError("data.objects_per_scene must be >= 1")
    try:
        cfg.world.validate()
    except ClipgroundError as e:
        raise ConfigError(f"world: {e}") from None
    return cfg


# --------------------------------------------------------------------------- model


def build_sam(cfg: SamModelConfig) -> tuple[torch.nn.Module, Any]:
    """A freshly initialized ``SamModel`` and its ``SamProcessor`` (longest side -> ``image_size``, padded)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vc = SamVisionConfig(hidden_size=cfg.vision_hidden, output_channels=cfg.hidden,
                         num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                         image_size=cfg.image_size, patch_size=cfg.patch_size, mlp_dim=4 * cfg.vision_hidden,
                         window_size=cfg.window_size, global_attn_indexes=list(cfg.global_attn_indexes),
                         num_pos_feats=cfg.hidden // 2, initializer_range=cfg.init_std)
    pc = SamPromptEncoderConfig(hidden_size=cfg.hidden, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                mask_input_channels=16)
    mc = SamMaskDecoderConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.decoder_layers,
                              num_attention_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp,
                              iou_head_hidden_dim=cfg.iou_hidden)
    model = SamModel(SamConfig(vision_config=vc, prompt_encoder_config=pc, mask_decoder_config=mc,
                               initializer_range=cfg.init_std))
    with torch.no_grad():
        # SAM's random Fourier features for prompt and image positions have unit scale; the
        # transformers init scales them by hidden/2, far too high a frequency to learn from scratch.
        pe = model.shared_image_embedding.positional_embedding
        pe.copy_(torch.randn(pe.shape))
    low = 4 * cfg.image_size // cfg.patch_size
    ip = SamImageProcessor(size={"longest_edge": cfg.image_size},
                           pad_size={"height": cfg.image_size, "width": cfg.image_size},
                           mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    return model, SamProcessor(image_processor=ip)


def frozen_sam_parameters(name: str, param: torch.nn.Parameter) -> bool:
    """Trainer ``param_filter``: everything but the fixed random Fourier features (a buffer in SAM)."""
    return "shared_image_embedding" not in name


# --------------------------------------------------------------------------- data


class WorldMaskDataset(torch.utils.data.Dataset):
    """Train-split scenes; item ``i`` of epoch ``e`` is the scene's pixels and a fixed random set
    of prompts with their target masks, drawn from ``(seed, epoch, i)`` only (exact resume).

    Prompts and targets are in the processor's frame: the image resized so its longest side is
    ``image_size`` and padded bottom-right; targets are each mask's coverage of the decoder's
    ``4 * grid`` square output cells.
    """

    def __init__(self, world_dir: str | os.PathLike, cfg: SamDataConfig, processor: Any, seed: int,
                 split: str = "train") -> None:
        self.world = Path(world_dir)
        self.cfg, self.processor, self.seed, self.epoch = cfg, processor, seed, 0
        coco = json.loads((self.world / f"instances_{split}.json").read_text(encoding="utf-8"))
        images = sorted(coco["images"], key=lambda im: im["id"])
        if cfg.max_scenes > 0:
            images = images[: cfg.max_scenes]
        anns: dict[int, list[dict[str, Any]]] = {}
        for a in sorted(coco["annotations"], key=lambda a: a["id"]):
            anns.setdefault(a["image_id"], []).append(a)
        keep = [im for im in images if anns.get(im["id"])]
        self.files = [self.world / im["file_name"] for im in keep]
        self.rles = [[a["segmentation"] for a in anns[im["id"]]] for im in keep]
        self.size = int(processor.image_processor.size["longest_edge"])
        self.low = int(processor.image_processor.mask_pad_size["height"])
        self._pixels: list[torch.Tensor | None] = [None] * len(keep)
        kinds = list(cfg.prompt_weights)
        p = np.array([float(cfg.prompt_weights[k]) for k in kinds])
        self.kinds, self.kind_p = kinds, p / p.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, i: int) -> torch.Tensor:
        if self._pixels[i] is None:
            with Image.open(self.files[i]) as im:
                pv = self.processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
            self._pixels[i] = pv.half()  # kept in memory: a scene is decoded and normalized once
        return self._pixels[i].float()  # type: ignore[union-attr]

    def target(self, mask: np.ndarray, scale: float) -> torch.Tensor:
        """A full-image mask -> its coverage of the decoder's output cells (padded frame)."""
        h, w = mask.shape
        rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = cv2.resize(mask.astype(np.float32), (rw, rh), interpolation=cv2.INTER_AREA)
        frame = np.zeros((self.size, self.size), np.float32)
        frame[:rh, :rw] = resized
        low = cv2.resize(frame, (self.low, self.low), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(low)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        rles = self.rles[i]
        k = self.cfg.objects_per_scene
        order = rng.permutation(len(rles))
        picks = [int(order[j % len(order)]) for j in range(k)]
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        h, w = rles[0]["size"]
        scale = self.size / max(h, w)
        boxes, points, targets = [], [], []
        masks = {j: rle_decode(rles[j]) for j in set(picks)}
        for j in picks:
            m = masks[j]
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0
            bw, bh = x2 - x1, y2 - y1
            d = rng.uniform(-1, 1, 4) * self.cfg.box_jitter * np.array([bw, bh, bw, bh])
            b = np.clip(np.array([x1, y1, x2, y2]) + d, 0, [w, h, w, h])
            if b[2] - b[0] < 1 or b[3] - b[1] < 1:
                b = np.array([x1, y1, x2, y2])
            t = int(rng.integers(len(xs)))
            boxes.append(b * scale)
            points.append([[xs[t] * scale, ys[t] * scale]])  # a pixel index, as SamSegmenter sends the peak
            targets.append(self.target(m, scale))
        return {"pixel_values": self.pixels(i), "kind": kind,
                "boxes": torch.tensor(np.array(boxes), dtype=torch.float32),
                "points": torch.tensor(np.array(points), dtype=torch.float32),
                "targets": torch.stack(targets)}


def collate_masks(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; the whole batch uses the first item's prompt kind (SAM takes one kind per call)."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "kind": items[0]["kind"],
            "boxes": torch.stack([it["boxes"] for it in items]), "points": torch.stack([it["points"] for it in items]),
            "targets": torch.stack([it["targets"] for it in items])}


# --------------------------------------------------------------------------- loss


def prompt_inputs(kind: str, boxes: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
    """``SamModel`` prompt arguments for ``kind``: boxes ``(B, K, 4)``, points ``(B, K, 1, 2)``."""
    out: dict[str, torch.Tensor] = {}
    if "box" in kind:
        out["input_boxes"] = boxes
    if "point" in kind:
        out["input_points"] = points
        out["input_labels"] = torch.ones(points.shape[:3], dtype=torch.long, device=points.device)
    return out


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask BCE, dice and IoU (thresholded at 0.5) of logits ``(..., M, h, w)`` against soft
    targets ``(..., h, w)``, each ``(..., M)``."""
    t = targets.unsqueeze(-3).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))
    p = logits.sigmoid()
    inter, total = (p * t).sum((-1, -2)), p.sum((-1, -2)) + t.sum((-1, -2))
    dice = 1 - (2 * inter + 1) / (total + 1)
    with torch.no_grad():
        hard_p, hard_t = logits > 0, t > 0.5
        iou = (hard_p & hard_t).sum((-1, -2)) / (hard_p | hard_t).sum((-1, -2)).clamp(min=1)
    return bce, dice, iou.float()


def make_sam_loss_fn(cfg: SamLossConfig) -> Any:
    """The trainer's ``loss_fn``: one SAM forward (image + prompts) through the DDP wrapper."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(pixel_values=batch["pixel_values"], multimask_output=True,
                    **prompt_inputs(batch["kind"], batch["boxes"], batch["points"]))
        logits = out.pred_masks.float()  # (B, K, 3, h, w)
        bce, dice, iou = mask_losses(logits, batch["targets"])
        per = cfg.bce * bce + cfg.dice * dice
        best = per.argmin(-1, keepdim=True)
        mask_loss = per.gather(-1, best).mean()
        iou_loss = F.mse_loss(out.iou_scores.float(), iou)
        loss = mask_loss + cfg.iou * iou_loss
        return loss, {"mask": float(mask_loss.detach()), "iou_mse": float(iou_loss.detach()),
                      "best_iou": float(iou.gather(-1, best).mean())}

    return loss_fn


# --------------------------------------------------------------------------- evaluation


@dataclass
class MaskCase:
    """One evaluated object: its image, ground-truth mask, box and the point prompt inside it."""

    file: Path
    mask: np.ndarray
    box: tuple[float, float, float, float]
    point: tuple[int, int]


def mask_cases(world: Path, split: str, max_objects: int, seed: int) -> list[MaskCase]:
    """The first ``max_objects`` objects of ``split`` (0: all), each with one seeded random point
    inside its mask (the 'one point inside the object' prompt)."""
    coco = json.loads((world / f"instances_{split}.json").read_text(encoding="utf-8"))
    files = {str(im["id"]): world / im["file_name"] for im in coco["images"]}
    objects = load_scene_objects(world, split, masks=True)
    rng = np.random.default_rng([seed, 4242])
    cases: list[MaskCase] = []
    for image_id in sorted(objects, key=int):
        for o in objects[image_id]:
            if o.mask is None or not o.mask.any():
                continue
            ys, xs = np.nonzero(o.mask)
            t = int(rng.integers(len(xs)))
            cases.append(MaskCase(files[image_id], o.mask, tuple(map(float, o.box)), (int(xs[t]), int(ys[t]))))
            if max_objects and len(cases) >= max_objects:
                return cases
    return cases


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def score_segmenter(segmenter: Any, cases: Sequence[MaskCase]) -> dict[str, float]:
    """Mean mask IoU of ``segmenter`` (a ``prepare``/``segment`` segmenter) over ``cases``,
    prompted with the ground-truth box (``box_iou``) and with the case's point (``point_iou``);
    each image is prepared once."""
    from ..segmenters import SamSegmenter, Seeds

    if not isinstance(segmenter, SamSegmenter):
        raise ConfigError("score_segmenter needs a SamSegmenter")
    by_file: dict[Path, list[MaskCase]] = {}
    for c in cases:
        by_file.setdefault(c.file, []).append(c)
    scores: dict[str, list[float]] = {"box": [], "point": []}
    prompt = segmenter.prompt
    try:
        for file, group in by_file.items():
            with Image.open(file) as im:
                prepared = segmenter.prepare(im.convert("RGB"))
            for c in group:
                seeds = Seeds(heat=np.zeros(c.mask.shape, np.float32), peak=c.point, region=c.mask, box=c.box)
                for kind in scores:
                    segmenter.prompt = kind
                    scores[kind].append(mask_iou(segmenter.segment(prepared, seeds), c.mask))
    finally:
        segmenter.prompt = prompt
    return {f"{k}_iou": float(np.mean(v)) if v else 0.0 for k, v in scores.items()}


def make_sam_eval_fn(world: Path, processor: Any, cfg: SamEvalConfig, seed: int):
    """``eval_fn(model)``: ``{split}_box_iou``, ``{split}_point_iou`` (and ``new-look_*``)."""
    from ..segmenters import SamSegmenter

    splits = [cfg.split] + (["new-look"] if cfg.new_look and (world / "instances_new-look.json").is_file() else [])
    cases = {s: mask_cases(world, s, cfg.max_objects, seed) for s in splits}
    if not cases[cfg.split]:
        raise ConfigError(f"world {world} has no masks in split {cfg.split!r} to evaluate on")

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        seg = SamSegmenter.from_model(model, processor)
        out: dict[str, float] = {}
        for s, cs in cases.items():
            out.update({f"{s}_{k}": v for k, v in score_segmenter(seg, cs).items()})
        return out

    return eval_fn


# --------------------------------------------------------------------------- run


def _recipe_md(cfg: SamPretrainConfig, command: str, world: Path, result: TrainResult, n_params: int) -> str:
    import yaml

    wcfg = load_world_config(world)
    lines = [
        "# world-sam: how this checkpoint was made",
        "",
        "A small SAM (transformers `SamModel`) trained from scratch by `clipground pretrain --model sam`",
        "on the masks of the synthetic world's **train** split with box, point and point+box prompts",
        "(see `clipground.training.pretrain_sam`). Load it with `SamModel.from_pretrained(dir)` and",
        "`SamProcessor.from_pretrained(dir)`, or as the bundled segmenter `clipground/world-sam`.",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"- seed: {cfg.train.seed}",
        f"- world: `{world}`, world config: `{json.dumps(wcfg.to_json() if wcfg else None)}`",
        f"- parameters: {n_params:,}",
        f"- optimiser steps: {result.step} x {cfg.train.batch_size} scenes x {cfg.data.objects_per_scene} prompts",
        f"- training wall time: {result.wall_time_s / 60:.1f} min on {platform.machine()} "
        f"({os.cpu_count()} CPU threads, torch {torch.__version__}); main-process CPU time "
        f"{result.cpu_time_s / 60:.1f} min (wall time grows when other jobs share the CPU)",
        "",
        "## Validation metrics (final)",
        "",
        "Mean mask IoU against the ground-truth masks through `clipground.segmenters.SamSegmenter`",
        "(the best of SAM's three masks by its predicted IoU): `*_box_iou` prompted with the",
        "ground-truth box, `*_point_iou` with one random pixel inside the object.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(result.last_eval.items())]
    lines += ["", "## Full config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def pretrain_sam(world_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: SamPretrainConfig,
                 resume: bool = False, command: str = "", progress: bool = True,
                 stop_after_steps: int | None = None) -> TrainResult:
    """Generate the world if needed, train the world SAM, and ``save_pretrained`` it to ``out_dir``
    (with ``RECIPE.md``, ``recipe.json`` and the learning curve). Training state lives in
    ``cfg.train.output_dir``; ``stop_after_steps`` simulates a killed run (tests)."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from .pretrain import save_pretraining_run

    state = PartialState(cpu=not torch.cuda.is_available())
    world = Path(world_dir)
    with state.main_process_first():
        if not (world / "world.json").is_file():
            ensure_world(world, cfg.world, progress=progress and state.is_main_process)
    if not (world / "instances_train.json").is_file():
        raise ConfigError(f"{world} is not a complete synthetic world (no instances_train.json)")
    set_seed(cfg.train.seed)
    model, processor = build_sam(cfg.model)
    dataset = WorldMaskDataset(world, cfg.data, processor, cfg.train.seed)
    eval_fn = make_sam_eval_fn(world, processor, cfg.eval, cfg.train.seed)
    trainer = Trainer(cfg.train, model, dataset, collate_masks, make_sam_loss_fn(cfg.loss), eval_fn=eval_fn,
                      param_filter=frozen_sam_parameters, extra_state={"pretrain_config": to_dict(cfg)})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    if result.finished and state.is_main_process:
        save_pretraining_run(trainer.unwrapped_model(), processor, out_dir, cfg, command, world, result, _recipe_md)
    state.wait_for_everyone()
    return result
