"""Pretrain a small BLIP in the synthetic world (``clipground pretrain --model blip``).

The seed's detector-free path reads a Grad-CAM heatmap off BLIP's image-text matching (ITM)
head. No BLIP weights are reachable offline, so clipground trains a transformers
:class:`~transformers.BlipForImageTextRetrieval` with a small config (a 4-layer ViT on 128 px
whole scenes with 8 px patches, a 4-layer BERT text encoder cross-attending to it) and a
:class:`~transformers.BlipProcessor` with a WordPiece tokenizer over the world's words
(:func:`~clipground.training.world_tokenizer.build_world_bert_tokenizer`).

Objectives, as BLIP's retrieval model has them:

* **ITM**: does this expression refer to exactly one object of this scene? Positives are the
  scene's referring expressions; negatives are the same expressions with one word changed
  (a colour, shape, size or direction) and expressions of other scenes, each checked against
  the scene by the world's independent checker (:func:`~clipground.data.world.check_expression`):
  no referent is a negative, one referent a positive, several are dropped. The hard negatives
  differ from a positive only in what the target object looks like or where it is, so the
  match depends on looking at that object, which is what the Grad-CAM heatmap then shows.
* **ITC**: the image [CLS] and the text-only [CLS] projections, contrasted over the batch with
  every (scene, expression) pair the checker accepts as a positive.

Each scene is encoded once per step and cross-attended by all of its texts.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.world import COLOUR_NAMES, SHAPES, ensure_world, load_scene_objects, load_world_config
from ..data.world.config import WorldConfig
from ..data.world.grammar import check_expression
from ..errors import ClipgroundError, ConfigError
from ..options import to_dict
from .config import TrainConfig
from .recipes import LossConfig, RecipeConfig, load_recipe_config
from .trainer import Trainer, TrainResult

#: Word swaps that make a hard negative (each word maps to its alternatives).
_SWAPS: dict[str, tuple[str, ...]] = {
    **{c: tuple(x for x in COLOUR_NAMES if x != c) for c in COLOUR_NAMES},
    **{s: tuple(x for x in SHAPES if x != s) for s in SHAPES},
    "small": ("large", "big"), "little": ("large", "big"), "large": ("small", "little"), "big": ("small", "little"),
    "left": ("right",), "right": ("left",), "top": ("bottom",), "bottom": ("top",), "above": ("below",),
    "below": ("above",), "leftmost": ("rightmost",), "rightmost": ("leftmost",), "topmost": ("bottommost",),
    "bottommost": ("topmost",), "biggest": ("smallest",), "smallest": ("biggest",), "largest": ("smallest",),
    "closest": ("farthest",), "farthest": ("closest",), "second": ("third",), "third": ("second",),
}


# --------------------------------------------------------------------------- configs


@dataclass
class BlipModelConfig:
    """Size of the world BLIP (transformers ``BlipConfig`` fields, simplified)."""

    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 64
    max_text_tokens: int = 32
    init_std: float = 0.02


@dataclass
class BlipDataConfig:
    """Texts drawn per scene (per scene, per epoch)."""

    positives: int = 2  # the scene's referring expressions (repeated when it has fewer)
    hard_negatives: int = 2  # a positive with one word swapped, checked to have no referent
    easy_negatives: int = 1  # another scene's expression, checked to have no referent
    max_scenes: int = 0  # use only the first N train scenes (0 = all); for tests


@dataclass
class BlipLossConfig(LossConfig):
    """Weights of the two objectives and the ITC temperature."""

    itm: float = 1.0
    itc: float = 0.5
    temperature: float = 0.07


@dataclass
class BlipEvalConfig:
    """The quality gate on ``split``: ITM accuracy on its positives and checked negatives, and how
    often the Grad-CAM heatmap's peak (:class:`~clipground.heatmaps.BlipItmHeatmap`, as
    ``heatmap-segment`` uses it) falls inside the target's box."""

    split: str = "val"
    max_records: int = 150  # records scored per eval (0 = all)
    new_look: bool = True


@dataclass
class BlipPretrainConfig(RecipeConfig):
    """Everything ``clipground pretrain --model blip`` needs (the recipe schema plus ``world`` and ``eval``)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/pretrain_world_blip", batch_size=16, lr=5e-4, weight_decay=0.05, warmup_steps=50,
        max_steps=300, log_every=10, save_every=100, eval_every=100))
    model: BlipModelConfig = field(default_factory=BlipModelConfig)
    data: BlipDataConfig = field(default_factory=BlipDataConfig)
    loss: BlipLossConfig = field(default_factory=BlipLossConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    eval: BlipEvalConfig = field(default_factory=BlipEvalConfig)


def load_blip_pretrain_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
                              ) -> BlipPretrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated :class:`BlipPretrainConfig`."""
    cfg = load_recipe_config(BlipPretrainConfig, path, overrides)
    m = cfg.model
    if m.image_size % m.patch_size:
        raise ConfigError("model.image_size must be a multiple of model.patch_size")
    if cfg.data.positives < 1 or cfg.data.hard_negatives + cfg.data.easy_negatives < 1:
        raise ConfigError("data needs positives >= 1 and at least one negative per scene")
    if cfg.loss.temperature <= 0:
        raise ConfigError("loss.temperature must be > 0")
    try:
        cfg.world.validate()
    except ClipgroundError as e:
        raise ConfigError(f"world: {e}") from None
    return cfg


# --------------------------------------------------------------------------- model


def build_blip(cfg: BlipModelConfig, phrasing: str = "rich") -> tuple[torch.nn.Module, Any]:
    """A freshly initialized ``BlipForImageTextRetrieval`` and its ``BlipProcessor``."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    from .world_tokenizer import build_world_bert_tokenizer

    tok = build_world_bert_tokenizer(phrasing, model_max_length=cfg.max_text_tokens)
    text = dict(vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=cfg.mlp_ratio * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.max_text_tokens, encoder_hidden_size=cfg.vision_hidden,
                bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                initializer_range=cfg.init_std)
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=cfg.mlp_ratio * cfg.vision_hidden,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, initializer_range=cfg.init_std)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim,
                        image_text_hidden_size=cfg.projection_dim, initializer_range=cfg.init_std)
    model = BlipForImageTextRetrieval(config)
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}),
                         tokenizer=tok)
    return model, proc


class BlipMatcher(torch.nn.Module):
    """Training view of a ``BlipForImageTextRetrieval``: each scene encoded once, many texts per scene.

    ``forward`` returns the ITM logits of every text against its scene and the normalized ITC
    features of the scenes and of the texts (text-only encoder pass, as BLIP's ITC does).
    """

    def __init__(self, blip: torch.nn.Module) -> None:
        super().__init__()
        self.blip = blip

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.blip
        img = b.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, D)
        enc = img[text_scene]
        hid = b.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=enc,
                             encoder_attention_mask=torch.ones(enc.shape[:2], dtype=torch.long, device=enc.device)
                             ).last_hidden_state
        itm = b.itm_head(hid[:, 0])
        uni = b.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return itm, F.normalize(b.vision_proj(img[:, 0]), dim=-1), F.normalize(b.text_proj(uni), dim=-1)


# --------------------------------------------------------------------------- data


def _referent_count(text: str, objects: Sequence[Any], cfg: WorldConfig, side: int) -> int:
    return len(check_expression(text, objects, cfg, side))


def swap_one_word(text: str, rng: np.random.Generator) -> str | None:
    """``text`` with one swappable word (colour, shape, size, direction...) replaced, or ``None``."""
    words = text.split()
    spots = [i for i, w in enumerate(words) if w in _SWAPS]
    if not spots:
        return None
    i = spots[int(rng.integers(len(spots)))]
    alts = _SWAPS[words[i]]
    words[i] = alts[int(rng.integers(len(alts)))]
    return " ".join(words)


class WorldMatchDataset(torch.utils.data.Dataset):
    """Train-split scenes; item ``i`` of epoch ``e`` is the scene's pixels and its checked texts
    (labels 1 = refers to exactly one object), drawn from ``(seed, epoch, i)`` only."""

    def __init__(self, world_dir: str | os.PathLike, cfg: BlipDataConfig, processor: Any, seed: int,
                 split: str = "train") -> None:
        from ..data.jsonl import read_jsonl

        self.world = Path(world_dir)
        self.cfg, self.processor, self.seed, self.epoch = cfg, processor, seed, 0
        self.wcfg = load_world_config(self.world) or WorldConfig()
        coco = json.loads((self.world / f"instances_{split}.json").read_text(encoding="utf-8"))
        sizes = {str(im["id"]): max(int(im["width"]), int(im["height"])) for im in coco["images"]}
        objects = load_scene_objects(self.world, split)
        by_image: dict[str, list[str]] = {}
        files: dict[str, Path] = {}
        for r in read_jsonl(self.world / f"{split}.jsonl"):
            by_image.setdefault(str(r.image_id), []).append(r.expression)
            files[str(r.image_id)] = Path(r.image)  # read_jsonl makes it absolute
        ids = sorted(by_image, key=int)
        if cfg.max_scenes > 0:
            ids = ids[: cfg.max_scenes]
        self.ids, self.files = ids, [files[i] for i in ids]
        self.texts = [by_image[i] for i in ids]
        self.objects = [objects[i] for i in ids]
        self.sides = [sizes[i] for i in ids]
        self.all_texts = [t for ts in self.texts for t in ts]
        self._pixels: list[torch.Tensor | None] = [None] * len(ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def pixels(self, i: int) -> torch.Tensor:
        if self._pixels[i] is None:
            with Image.open(self.files[i]) as im:
                pv = self.processor.image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
            self._pixels[i] = pv.half()
        return self._pixels[i].float()  # type: ignore[union-attr]

    def label(self, text: str, i: int) -> int | None:
        """1 if ``text`` refers to exactly one object of scene ``i``, 0 if to none, ``None`` if ambiguous."""
        n = _referent_count(text, self.objects[i], self.wcfg, self.sides[i])
        return 1 if n == 1 else (0 if n == 0 else None)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        own = self.texts[i]
        order = rng.permutation(len(own))
        pos = [own[int(order[j % len(order)])] for j in range(self.cfg.positives)]
        texts, labels = list(pos), [1] * len(pos)
        for want, maker in ((self.cfg.hard_negatives, "hard"), (self.cfg.easy_negatives, "easy")):
            got = 0
            for _ in range(8 * want):
                if got >= want:
                    break
                if maker == "hard":
                    t = swap_one_word(pos[int(rng.integers(len(pos)))], rng)
                else:
                    t = self.all_texts[int(rng.integers(len(self.all_texts)))]
                if t is None or t in texts:
                    continue
                lab = self.label(t, i)
                if lab == 0:
                    texts.append(t)
                    labels.append(0)
                    got += 1
        return {"pixel_values": self.pixels(i), "texts": texts, "labels": labels, "n_pos": len(pos), "index": i}


class MatchCollator:
    """Batch of scenes -> pixels, tokens, each text's scene, ITM labels and the ITC targets
    (``itc_targets[s, j]``: positive text ``j`` refers to exactly one object of scene ``s``)."""

    def __init__(self, processor: Any, dataset: WorldMatchDataset) -> None:
        self.processor, self.dataset = processor, dataset

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [t for it in items for t in it["texts"]]
        tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        scene = torch.tensor([k for k, it in enumerate(items) for _ in it["texts"]])
        labels = torch.tensor([lab for it in items for lab in it["labels"]])
        starts = np.cumsum([0] + [len(it["texts"]) for it in items])[:-1]
        pos_idx = [int(s) + j for s, it in zip(starts, items) for j in range(it["n_pos"])]
        targets = torch.zeros(len(items), len(pos_idx))
        for s, it in enumerate(items):
            for c, j in enumerate(pos_idx):
                targets[s, c] = 1.0 if int(scene[j]) == s else float(self.dataset.label(texts[j], it["index"]) == 1)
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "text_scene": scene, "labels": labels,
                "positive_index": torch.tensor(pos_idx), "itc_targets": targets}


# --------------------------------------------------------------------------- loss


def make_blip_loss_fn(cfg: BlipLossConfig) -> Any:
    """The trainer's ``loss_fn``: one :class:`BlipMatcher` forward, then ITM cross-entropy and the
    multi-positive ITC loss."""
    from .pretrain import multi_positive_loss

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        itm, img, txt = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["text_scene"])
        labels = batch["labels"]
        itm_loss = F.cross_entropy(itm.float(), labels)
        logits = img.float() @ txt[batch["positive_index"]].float().T / cfg.temperature
        itc_loss = multi_positive_loss(logits, batch["itc_targets"] > 0)
        with torch.no_grad():
            acc = (itm.argmax(-1) == labels).float().mean()
        return cfg.itm * itm_loss + cfg.itc * itc_loss, {"itm": float(itm_loss.detach()),
                                                         "itc": float(itc_loss.detach()), "itm_acc": float(acc)}

    return loss_fn


# --------------------------------------------------------------------------- evaluation


def make_blip_eval_fn(world: Path, processor: Any, cfg: BlipEvalConfig, seed: int):
    """``eval_fn(model)``: ``{split}_itm_acc`` (positives and checked negatives), ``{split}_peak_hit``
    (the Grad-CAM peak inside the target box) and its attribute-only share, also on ``new-look``."""
    from ..data.jsonl import read_jsonl
    from ..heatmaps import BlipItmHeatmap

    splits = [cfg.split] + (["new-look"] if cfg.new_look and (world / "new-look.jsonl").is_file() else [])
    data = {}
    for s in splits:
        recs = list(read_jsonl(world / f"{s}.jsonl"))
        recs = recs[: cfg.max_records] if cfg.max_records else recs
        ds = WorldMatchDataset(world, BlipDataConfig(positives=1, hard_negatives=1, easy_negatives=0), processor,
                               seed, split=s)
        data[s] = (recs, ds)
    if not data[cfg.split][0]:
        raise ConfigError(f"world {world} has no records in split {cfg.split!r} to evaluate on")

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        blip = model.blip if isinstance(model, BlipMatcher) else model
        heat = BlipItmHeatmap.from_model(blip, processor)
        out: dict[str, float] = {}
        for s, (recs, ds) in data.items():
            hits, attr = [], []
            by_image: dict[str, list[Any]] = {}
            for r in recs:
                by_image.setdefault(r.image, []).append(r)
            for image, rs in by_image.items():
                with Image.open(image) as im:
                    prepared = heat.prepare(im.convert("RGB"))
                maps = heat(prepared, [r.expression for r in rs])
                for r, m in zip(rs, maps):
                    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
                    x1, y1, x2, y2 = r.box
                    hit = float(x1 <= x < x2 and y1 <= y < y2)
                    hits.append(hit)
                    if r.meta.get("type") == "attribute":
                        attr.append(hit)
            correct = []
            n = min(len(ds), max(1, len(recs) // 2))
            for i in range(n):
                item = ds[i]
                tok = processor.tokenizer(item["texts"], padding=True, return_tensors="pt")
                pv = item["pixel_values"][None].expand(len(item["texts"]), -1, -1, -1)
                itm = blip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pv,
                           use_itm_head=True).itm_score
                correct += (itm.argmax(-1) == torch.tensor(item["labels"])).float().tolist()
            out[f"{s}_peak_hit"] = float(np.mean(hits)) if hits else 0.0
            out[f"{s}_peak_hit_attribute"] = float(np.mean(attr)) if attr else 0.0
            out[f"{s}_itm_acc"] = float(np.mean(correct)) if correct else 0.0
        return out

    return eval_fn


# --------------------------------------------------------------------------- run


def _recipe_md(cfg: BlipPretrainConfig, command: str, world: Path, result: TrainResult, n_params: int) -> str:
    import yaml

    wcfg = load_world_config(world)
    lines = [
        "# world-blip: how this checkpoint was made",
        "",
        "A small BLIP (transformers `BlipForImageTextRetrieval`) trained from scratch by",
        "`clipground pretrain --model blip` on whole scenes of the synthetic world's **train** split:",
        "image-text matching against checked hard negatives plus its contrastive head (see",
        "`clipground.training.pretrain_blip`). Load it with `BlipForImageTextRetrieval.from_pretrained(dir)`",
        "and `BlipProcessor.from_pretrained(dir)`, or as the bundled heatmap model `clipground/world-blip`.",
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
        f"- optimiser steps: {result.step} x {cfg.train.batch_size} scenes x "
        f"{cfg.data.positives + cfg.data.hard_negatives + cfg.data.easy_negatives} texts",
        f"- training wall time: {result.wall_time_s / 60:.1f} min on {platform.machine()} "
        f"({os.cpu_count()} CPU threads, torch {torch.__version__}); main-process CPU time "
        f"{result.cpu_time_s / 60:.1f} min (wall time grows when other jobs share the CPU)",
        "",
        "## Validation metrics (final)",
        "",
        "`*_itm_acc`: ITM accuracy on a scene's expressions and checked one-word-swapped negatives;",
        "`*_peak_hit`: the Grad-CAM heatmap's peak (`clipground.heatmaps.BlipItmHeatmap`) falls inside",
        "the target's box (`_attribute`: attribute expressions only).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(result.last_eval.items())]
    lines += ["", "## Full config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def pretrain_blip(world_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: BlipPretrainConfig,
                  resume: bool = False, command: str = "", progress: bool = True,
                  stop_after_steps: int | None = None) -> TrainResult:
    """Generate the world if needed, train the world BLIP, and ``save_pretrained`` it to ``out_dir``
    (with ``RECIPE.md``, ``recipe.json`` and the learning curve)."""
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
    model, processor = build_blip(cfg.model, (load_world_config(world) or cfg.world).phrasing)
    dataset = WorldMatchDataset(world, cfg.data, processor, cfg.train.seed)
    eval_fn = make_blip_eval_fn(world, processor, cfg.eval, cfg.train.seed)
    trainer = Trainer(cfg.train, BlipMatcher(model), dataset, MatchCollator(processor, dataset),
                      make_blip_loss_fn(cfg.loss), eval_fn=eval_fn, extra_state={"pretrain_config": to_dict(cfg)})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    if result.finished and state.is_main_process:
        save_pretraining_run(trainer.unwrapped_model().blip, processor, out_dir, cfg, command, world, result,
                             _recipe_md)
    state.wait_for_everyone()
    return result
