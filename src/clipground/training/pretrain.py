"""Pretrain a small CLIP in the synthetic world (``clipground pretrain``).

No pretrained CLIP weights are reachable offline, so clipground ships its own: a
transformers :class:`~transformers.CLIPModel` (a 4-layer ViT on 64 px inputs with 16 px
patches, i.e. a 4x4 grid, and a 3-layer text transformer; the defaults are the bundled
checkpoint's) trained contrastively on *region-caption* pairs from the world's train split
only.

The model is later used zero-shot exactly like a hub CLIP: every candidate box is shown
as isolated views (:mod:`clipground.backbone.views`: ``crop``, ``blur``, ``circle``), encoded
through the checkpoint's own image processor, and compared by cosine similarity with the
phrase. So training shows exactly those views, of these regions:

* ``object``: an object's box (slightly jittered, IoU >= ~0.7), captioned with a noun
  phrase naming a random subset of its attributes: "circle", "the red circle",
  "a large star", "the small blue hexagon"...
* ``part``: a box covering only part of one object (IoU < 0.4 with every object):
  "part of a red circle".
* ``loose``: a box around one whole object with much background (IoU < 0.4):
  "background around a red circle".
* ``background``: a box touching no object: "background".
* ``pair``: the union box of two objects: "a red circle and a blue square".

The loss is a symmetric *multi-positive* contrastive loss: the targets of a region are
every caption in the batch that is true of it ("circle" is true of every circle region,
"the large circle" only of large ones), so shared captions are not pushed apart, while
the non-object regions of the same scene are hard negatives for object captions (a
proposal that cuts an object or spans two must score below the tight box). Several
regions are drawn per scene, so each batch holds same-scene distractors.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..backbone.views import VIEW_KINDS, blur_image, render_view
from ..data.world import SceneObject, WorldConfig, ensure_world, load_scene_objects, load_world_config
from ..errors import ClipgroundError, ConfigError
from ..io import atomic_dir
from ..options import to_dict
from .config import TrainConfig
from .recipes import LossConfig, RecipeConfig, load_recipe_config
from .trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from ..backbone import ClipBackbone

REGION_KINDS = ("object", "part", "loose", "background", "pair")


# --------------------------------------------------------------------------- configs


@dataclass
class ClipModelConfig:
    """Size of the world CLIP (transformers ``CLIPConfig`` fields, simplified)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 128
    max_text_tokens: int = 32
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature


@dataclass
class RegionDataConfig:
    """How training regions, views and captions are drawn (per scene, per epoch)."""

    regions_per_scene: int = 8
    kind_weights: dict[str, float] = field(default_factory=lambda: {
        "object": 0.55, "part": 0.12, "loose": 0.1, "background": 0.08, "pair": 0.15})
    view_weights: dict[str, float] = field(default_factory=lambda: {"crop": 0.4, "blur": 0.4, "circle": 0.2})
    jitter: float = 0.08  # max shift of each object-box side, as a fraction of the box size
    p_colour: float = 0.6  # probability that an object caption names the colour
    p_size: float = 0.4  # ... the size
    p_the: float = 0.4  # object captions start with "the" ...
    p_a: float = 0.3  # ... or "a"; otherwise no article ("red circle")
    max_scenes: int = 0  # use only the first N train scenes (0 = all); for tests
    p_generic: float = 0.0  # object captions name a generic noun ("the red thing") instead of the shape
    p_synonym: float = 0.0  # ... and say a size with its synonym ("big", "little")
    scenes: bool = False  # also show each whole scene: the dense objectives below
    dense_patch: float = 0.0  # weight: every patch names the object under it (or "background")
    dense_pool: float = 0.0  # weight: mask-pooled patch embeddings of objects match their captions


@dataclass
class EvalConfig:
    """The quality gate computed during training with the one evaluator (see :func:`make_eval_fn`):
    the zero-shot scorer (no relation rules) on the attribute expressions of ``split``, choosing
    among the scene's ground-truth boxes."""

    split: str = "val"
    views: list[str] = field(default_factory=lambda: ["crop", "blur"])
    max_records: int = 120  # attribute records of the split scored per eval (0 = all)
    compositional: bool = True  # also report accuracy on the held-out colour-shape pairs
    hard_boxes: int = 4  # per record: part/loose/pair boxes added to the candidates (the ``acc_hard`` gate)
    per_view: list[str] = field(default_factory=lambda: ["crop", "blur", "circle"])  # single-view accuracies


@dataclass
class PretrainConfig(RecipeConfig):
    """Everything ``clipground pretrain`` needs: the recipe schema's ``train``, ``model``, ``data``
    and ``loss`` sections, plus ``world`` (a :class:`~clipground.data.world.WorldConfig`, used when
    the world must be generated) and ``eval``."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/pretrain_world_clip", batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=50,
        max_steps=300, log_every=10, save_every=100, eval_every=50))
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: RegionDataConfig = field(default_factory=RegionDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_pretrain_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated :class:`PretrainConfig`."""
    cfg = load_recipe_config(PretrainConfig, path, overrides)
    for name, weights, allowed in (("data.kind_weights", cfg.data.kind_weights, REGION_KINDS),
                                   ("data.view_weights", cfg.data.view_weights, VIEW_KINDS)):
        bad = set(weights) - set(allowed)
        if bad or not any(float(v) > 0 for v in weights.values()):
            raise ConfigError(f"{name} needs positive weights over {', '.join(allowed)}; got {weights}")
    if not set(cfg.eval.views) <= set(VIEW_KINDS) or not cfg.eval.views:
        raise ConfigError(f"eval.views must be a non-empty subset of {VIEW_KINDS}, got {cfg.eval.views}")
    if not set(cfg.eval.per_view) <= set(VIEW_KINDS):
        raise ConfigError(f"eval.per_view must be a subset of {VIEW_KINDS}, got {cfg.eval.per_view}")
    if cfg.model.image_size % cfg.model.patch_size:
        raise ConfigError("model.image_size must be a multiple of model.patch_size")
    try:
        cfg.world.validate()
    except ClipgroundError as e:
        raise ConfigError(f"world: {e}") from None
    return cfg


# --------------------------------------------------------------------------- model


def build_processor(model_cfg: ClipModelConfig, phrasing: str = "v1"):
    """World tokenizer (the vocabulary of the world's ``phrasing``) + an image processor that
    squashes any view to ``image_size``²."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from .world_tokenizer import build_world_tokenizer, world_words

    tok = build_world_tokenizer(world_words(phrasing), model_max_length=model_cfg.max_text_tokens)
    # Resize straight to a square (no centre crop): a crop view of a wide box keeps every
    # object it contains instead of cutting the sides off.
    s = model_cfg.image_size
    ip = CLIPImageProcessor(size={"height": s, "width": s}, do_center_crop=False, crop_size={"height": s, "width": s})
    return CLIPProcessor(image_processor=ip, tokenizer=tok)


def build_model(model_cfg: ClipModelConfig, tokenizer) -> torch.nn.Module:
    """A freshly initialised ``CLIPModel`` whose text config matches ``tokenizer``."""
    from transformers import CLIPConfig, CLIPModel

    m = model_cfg
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=m.text_hidden, intermediate_size=m.text_hidden * m.mlp_ratio,
            num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
            max_position_embeddings=m.max_text_tokens, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(
            hidden_size=m.vision_hidden, intermediate_size=m.vision_hidden * m.mlp_ratio,
            num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads, image_size=m.image_size,
            patch_size=m.patch_size),
        projection_dim=m.projection_dim, logit_scale_init_value=m.logit_scale_init)
    return CLIPModel(cfg)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def as_backbone(model: torch.nn.Module, processor: Any) -> "ClipBackbone":
    """The model being trained seen through :class:`~clipground.backbone.ClipBackbone` (not frozen), so
    validation computes embeddings exactly as every method does."""
    from ..backbone import ClipBackbone

    return ClipBackbone(_unwrap(model), processor, name="pretraining", frozen=False)


# --------------------------------------------------------------------------- regions & captions

Attrs = tuple[str, str, str]  # (shape, colour, size)
NP = tuple[str, str | None, str | None]  # (shape, colour or None, size or None)


def _attrs(o: SceneObject) -> Attrs:
    return o.shape, o.colour, o.size


def _np_text(np_: NP) -> str:
    shape, colour, size = np_
    return " ".join(w for w in (size, colour, shape or "thing") if w)


def _np_matches(np_: NP, a: Attrs) -> bool:
    return np_[0] in (None, a[0]) and np_[1] in (None, a[1]) and np_[2] in (None, a[2])


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inter_frac(box: Sequence[float], obj: Sequence[float]) -> float:
    """Fraction of ``obj``'s box area covered by ``box``."""
    ix = max(0.0, min(box[2], obj[2]) - max(box[0], obj[0]))
    iy = max(0.0, min(box[3], obj[3]) - max(box[1], obj[1]))
    area = (obj[2] - obj[0]) * (obj[3] - obj[1])
    return ix * iy / area if area > 0 else 0.0


def _clip_box(b: Sequence[float], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in b)
    x1, x2 = max(0.0, min(x1, w - 2.0)), min(float(w), max(x2, 2.0))
    y1, y2 = max(0.0, min(y1, h - 2.0)), min(float(h), max(y2, 2.0))
    return [x1, y1, max(x2, x1 + 2.0), max(y2, y1 + 2.0)]


@dataclass
class Region:
    """A training region: its box, what it contains (``content``) and its caption's claim."""

    box: list[float]
    kind: str
    content: tuple  # ("object", attrs) | ("part", attrs) | ("loose", attrs) | ("background",) | ("pair", a, b)
    claim: tuple  # ("object", np) | ("part", np) | ("loose", np) | ("background",) | ("pair", np1, np2)
    caption: str


def claim_true(claim: tuple, content: tuple) -> bool:
    """Is a caption's claim true of a region's content? (multi-positive targets)."""
    if claim[0] != content[0]:
        return False
    if claim[0] == "background":
        return True
    if claim[0] == "pair":
        (n1, n2), (a, b) = claim[1:], content[1:]
        return (_np_matches(n1, a) and _np_matches(n2, b)) or (_np_matches(n1, b) and _np_matches(n2, a))
    return _np_matches(claim[1], content[1])


class RegionSampler:
    """Draws regions of a scene and their captions (see the module docstring)."""

    def __init__(self, cfg: RegionDataConfig) -> None:
        self.cfg = cfg
        self.kinds = [k for k in REGION_KINDS if cfg.kind_weights.get(k, 0) > 0]
        kw = np.array([cfg.kind_weights[k] for k in self.kinds], float)
        self.kind_p = kw / kw.sum()
        self.views = [v for v in VIEW_KINDS if cfg.view_weights.get(v, 0) > 0]
        vw = np.array([cfg.view_weights[v] for v in self.views], float)
        self.view_p = vw / vw.sum()
        self.articles = ["the", "a", ""]
        aw = np.array([cfg.p_the, cfg.p_a, max(0.0, 1.0 - cfg.p_the - cfg.p_a)], float)
        self.article_p = aw / aw.sum()

    # ---- captions
    def _np(self, rng: np.random.Generator, a: Attrs, p_colour: float | None = None) -> NP:
        pc = self.cfg.p_colour if p_colour is None else p_colour
        np_ = (a[0], a[1] if rng.random() < pc else None, a[2] if rng.random() < self.cfg.p_size else None)
        if self.cfg.p_generic > 0 and rng.random() < self.cfg.p_generic:  # "the red thing" (any shape)
            np_ = (None, np_[1] if np_[1] or np_[2] else a[1], np_[2])
        return np_

    @property
    def rich(self) -> bool:
        """Captions in the rich grammar's words (synonyms, generic nouns, "an")."""
        return self.cfg.p_synonym > 0 or self.cfg.p_generic > 0

    def _say(self, rng: np.random.Generator, np_: NP) -> str:
        """A noun phrase as text: its words, or (rich captions) a size synonym and a generic noun."""
        if not self.rich:
            return _np_text(np_)
        shape, colour, size = np_
        if size and rng.random() < self.cfg.p_synonym:
            size = {"small": "little", "large": "big"}[size]
        noun = shape or ("thing", "shape", "object")[int(rng.integers(3))]
        return " ".join(w for w in (size, colour, noun) if w)

    def _article(self, rng: np.random.Generator) -> str:
        return str(self.articles[int(rng.choice(len(self.articles), p=self.article_p))])

    def caption(self, rng: np.random.Generator, kind: str, content: tuple) -> tuple[tuple, str]:
        """A random true caption of ``content`` -> (claim, text)."""
        if kind == "object":
            np_ = self._np(rng, content[1])
            art = self._article(rng)
            text = self._say(rng, np_)
            if self.rich and art == "a" and text[:1] in "aeiou":
                art = "an"
            return ("object", np_), (f"{art} {text}").strip()
        if kind == "part":
            np_ = self._np(rng, content[1], 0.8)
            return ("part", np_), f"part of a {self._say(rng, np_)}"
        if kind == "loose":
            np_ = self._np(rng, content[1], 0.8)
            return ("loose", np_), f"background around a {self._say(rng, np_)}"
        if kind == "pair":
            n1, n2 = self._np(rng, content[1], 0.8), self._np(rng, content[2], 0.8)
            if rng.random() < 0.5:
                n1, n2 = n2, n1
            return ("pair", n1, n2), f"a {self._say(rng, n1)} and a {self._say(rng, n2)}"
        return ("background",), "background"

    # ---- boxes
    def object_box(self, rng: np.random.Generator, o: SceneObject, w: int, h: int) -> list[float]:
        x1, y1, x2, y2 = o.box
        bw, bh = x2 - x1, y2 - y1
        j = self.cfg.jitter
        d = rng.uniform(-j, j, 4) * np.array([bw, bh, bw, bh])
        return _clip_box([x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]], w, h)

    def part_box(self, rng: np.random.Generator, o: SceneObject, objs: list[SceneObject], w: int, h: int
                 ) -> list[float] | None:
        x1, y1, x2, y2 = o.box
        bw, bh = x2 - x1, y2 - y1
        for _ in range(20):
            fw, fh = rng.uniform(0.25, 0.65), rng.uniform(0.25, 0.65)
            cx, cy = x1 + rng.uniform(0, 1) * bw, y1 + rng.uniform(0, 1) * bh
            b = _clip_box([cx - fw * bw / 2, cy - fh * bh / 2, cx + fw * bw / 2, cy + fh * bh / 2], w, h)
            if (_inter_frac(b, o.box) >= 0.1 and all(_iou(b, q.box) < 0.4 for q in objs)
                    and all(_inter_frac(b, q.box) < 0.05 for q in objs if q is not o)):
                return b
        return None

    def loose_box(self, rng: np.random.Generator, o: SceneObject, objs: list[SceneObject], w: int, h: int
                  ) -> list[float] | None:
        x1, y1, x2, y2 = o.box
        bw, bh = x2 - x1, y2 - y1
        for _ in range(20):
            s = rng.uniform(1.8, 3.5)
            nw, nh = bw * s * rng.uniform(0.8, 1.25), bh * s * rng.uniform(0.8, 1.25)
            ox, oy = rng.uniform(0, max(nw - bw, 0)), rng.uniform(0, max(nh - bh, 0))
            b = _clip_box([x1 - ox, y1 - oy, x1 - ox + nw, y1 - oy + nh], w, h)
            if (_inter_frac(b, o.box) > 0.95 and _iou(b, o.box) < 0.4
                    and all(_inter_frac(b, q.box) < 0.05 for q in objs if q is not o)):
                return b
        return None

    def background_box(self, rng: np.random.Generator, objs: list[SceneObject], w: int, h: int) -> list[float] | None:
        for _ in range(20):
            bw, bh = rng.uniform(0.08, 0.4) * w, rng.uniform(0.08, 0.4) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            b = [x, y, x + bw, y + bh]
            if all(_inter_frac(b, q.box) < 0.03 for q in objs):
                return b
        return None

    def pair_box(self, rng: np.random.Generator, objs: list[SceneObject], first: SceneObject | None = None
                 ) -> tuple[list[float], SceneObject, SceneObject] | None:
        if len(objs) < 2:
            return None
        for _ in range(10):
            i, j = rng.choice(len(objs), 2, replace=False)
            a, b = (first, objs[j] if objs[j] is not first else objs[i]) if first is not None else (objs[i], objs[j])
            u = [min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3])]
            if all(_inter_frac(u, q.box) < 0.3 for q in objs if q is not a and q is not b):
                return u, a, b
        return None

    def sample(self, rng: np.random.Generator, objs: list[SceneObject], w: int, h: int, n: int) -> list[Region]:
        """``n`` regions of one scene (objects first visited in random order)."""
        out: list[Region] = []
        order = list(rng.permutation(len(objs)))
        tries = 0
        while len(out) < n and tries < 4 * n:
            tries += 1
            kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
            o = objs[order[len(out) % len(order)]] if objs else None
            box: list[float] | None
            if kind == "object" and o is not None:
                box, content = self.object_box(rng, o, w, h), ("object", _attrs(o))
            elif kind == "part" and o is not None:
                box, content = self.part_box(rng, o, objs, w, h), ("part", _attrs(o))
            elif kind == "loose" and o is not None:
                box, content = self.loose_box(rng, o, objs, w, h), ("loose", _attrs(o))
            elif kind == "pair":
                r = self.pair_box(rng, objs)
                box, content = (r[0], ("pair", _attrs(r[1]), _attrs(r[2]))) if r else (None, ())
            elif kind == "background":
                box, content = self.background_box(rng, objs, w, h), ("background",)
            else:
                continue
            if box is None:
                continue
            claim, text = self.caption(rng, kind, content)
            out.append(Region(box, kind, content, claim, text))
        return out

    def view(self, rng: np.random.Generator) -> str:
        return str(self.views[int(rng.choice(len(self.views), p=self.view_p))])


# --------------------------------------------------------------------------- dataset


class WorldRegionDataset(torch.utils.data.Dataset):
    """Train-split scenes; item ``i`` of epoch ``e`` is a fixed random set of rendered regions
    (and, with ``cfg.scenes``, the whole scene with a caption per object).

    Randomness comes from ``(seed, epoch, i)`` only, so any epoch can be replayed exactly
    (what exact resume needs). Scene images are decoded once and kept in memory; with
    ``cfg.scenes`` each object's share of every cell of the model's ``grid x grid`` patch grid
    is computed once from its mask.
    """

    def __init__(self, world_dir: str | os.PathLike, cfg: RegionDataConfig, seed: int, split: str = "train",
                 grid: int = 0) -> None:
        self.world = Path(world_dir)
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        coco = json.loads((self.world / f"instances_{split}.json").read_text(encoding="utf-8"))
        images = sorted(coco["images"], key=lambda im: im["id"])
        if cfg.max_scenes > 0:
            images = images[: cfg.max_scenes]
        objects = load_scene_objects(self.world, split)
        self.files = [self.world / im["file_name"] for im in images]
        self.objects = [objects[str(im["id"])] for im in images]
        self._images: list[Image.Image | None] = [None] * len(images)
        self.sampler = RegionSampler(cfg)
        self.cover: list[torch.Tensor] = []
        if cfg.scenes:
            if grid < 1:
                raise ConfigError("data.scenes needs the model's patch grid")
            self.cover = self._coverage(coco, images, grid)

    @staticmethod
    def _coverage(coco: dict[str, Any], images: list[dict[str, Any]], grid: int) -> list[torch.Tensor]:
        """Per scene ``(objects, grid * grid)``: the share of each patch cell each object's mask covers."""
        import cv2

        from ..data.world import rle_decode

        anns: dict[int, list[dict[str, Any]]] = {}
        for a in sorted(coco["annotations"], key=lambda a: a["id"]):
            anns.setdefault(a["image_id"], []).append(a)
        out = []
        for im in images:
            rows = [cv2.resize(rle_decode(a["segmentation"]).astype(np.float32), (grid, grid),
                               interpolation=cv2.INTER_AREA).reshape(-1) for a in anns.get(im["id"], [])]
            out.append(torch.from_numpy(np.stack(rows)).half() if rows else torch.zeros(0, grid * grid).half())
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        if self._images[i] is None:
            with Image.open(self.files[i]) as im:
                self._images[i] = im.convert("RGB")
        return self._images[i]  # type: ignore[return-value]

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = self.image(i)
        w, h = img.size
        regions = self.sampler.sample(rng, self.objects[i], w, h, self.cfg.regions_per_scene)
        kinds = [self.sampler.view(rng) for _ in regions]
        blurred = blur_image(img) if "blur" in kinds else None
        item: dict[str, Any] = {"crops": [(render_view(k, img, r.box, blurred), r) for k, r in zip(kinds, regions)]}
        if self.cfg.scenes:  # drawn after the crops: a crops-only config sees the same regions
            said = [self.sampler.caption(rng, "object", ("object", _attrs(o))) for o in self.objects[i]]
            item.update(scene=img, claims=[c for c, _ in said], captions=[t for _, t in said],
                        contents=[("object", _attrs(o)) for o in self.objects[i]], cover=self.cover[i])
        return item


class RegionCollator:
    """Batch of scenes -> pixel values, tokens and the multi-positive targets.

    Crops: ``targets[i, j]``, caption ``j`` is true of region ``i``. Whole scenes (when the
    items carry them): each scene's candidate captions (its objects' and ``background``),
    which of them are true at every patch (``patch_targets``; a patch mostly covered by one
    object, or by none, is scored; a patch on an object's edge is not), and each object's
    patch coverage with the claim matrix of all scene captions (the pooled objective).
    """

    #: A patch belongs to an object when this share of it is covered, to the background when
    #: no object covers more than the second share.
    ON, OFF = 0.5, 0.05

    def __init__(self, processor) -> None:
        self.processor = processor

    @staticmethod
    def _targets(claims: list[tuple], contents: list[tuple]) -> torch.Tensor:
        """``[i, j]``: caption claim ``j`` is true of content ``i``."""
        return torch.tensor([[claim_true(cl, c) for cl in claims] for c in contents], dtype=torch.bool)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        flat = [x for item in items for x in item["crops"]]
        images = [im for im, _ in flat]
        regions = [r for _, r in flat]
        captions = [r.caption for r in regions]
        out: dict[str, Any] = {}
        scenes = [it for it in items if "scene" in it]
        if scenes:
            out.update(self._scenes(scenes, len(captions)))
            captions = captions + [c for it in scenes for c in it["captions"]] + ["background"]
            images = images + [it["scene"] for it in scenes]
        pix = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tok = self.processor.tokenizer(captions, padding=True, return_tensors="pt")
        # targets[i, j]: caption j is true of region i (contents and claims deduplicated first).
        claims: dict[tuple, int] = {}
        for r in regions:
            claims.setdefault(r.claim, len(claims))
        contents: dict[tuple, int] = {}
        for r in regions:
            contents.setdefault(r.content, len(contents))
        table = self._targets(list(claims), list(contents))
        ri = torch.tensor([contents[r.content] for r in regions])
        cj = torch.tensor([claims[r.claim] for r in regions])
        out.update({"pixel_values": pix, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                    "targets": table[ri][:, cj], "n_crops": len(regions)})
        return out

    def _scenes(self, scenes: list[dict[str, Any]], first: int) -> dict[str, torch.Tensor]:
        n_caps = sum(len(it["captions"]) for it in scenes)
        background = first + n_caps
        cmax = max(len(it["captions"]) for it in scenes) + 1
        p = int(scenes[0]["cover"].shape[1])
        cand = torch.full((len(scenes), cmax), background, dtype=torch.long)
        cand_mask = torch.zeros(len(scenes), cmax, dtype=torch.bool)
        patch_targets = torch.zeros(len(scenes), p, cmax, dtype=torch.bool)
        patch_valid = torch.zeros(len(scenes), p, dtype=torch.bool)
        obj_scene, obj_cover, all_claims, all_contents = [], [], [], []
        k = first
        for b, it in enumerate(scenes):
            n = len(it["captions"])
            cand[b, :n] = torch.arange(k, k + n)
            cand_mask[b, : n + 1] = True
            cover = it["cover"].float()
            true = self._targets(it["claims"], it["contents"])  # [object, caption]
            if n:
                best, owner = cover.max(0)
                on = best >= self.ON
                patch_targets[b, on, :n] = true[owner[on]]
                off = best <= self.OFF
            else:
                on = torch.zeros(p, dtype=torch.bool)
                off = torch.ones(p, dtype=torch.bool)
            patch_targets[b, off, n] = True
            patch_valid[b] = on | off
            obj_scene += [b] * n
            obj_cover.append(cover)
            all_claims += it["claims"]
            all_contents += it["contents"]
            k += n
        return {"scene_candidates": cand, "scene_candidate_mask": cand_mask, "patch_targets": patch_targets,
                "patch_valid": patch_valid, "object_scene": torch.tensor(obj_scene, dtype=torch.long),
                "object_cover": torch.cat(obj_cover), "object_targets": self._targets(all_claims, all_contents),
                "scene_captions": torch.arange(first, first + n_caps)}


def multi_positive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss whose targets are uniform over every true pair.

    ``logits[i, j]`` scores region ``i`` against caption ``j``; ``targets[i, j]`` says
    caption ``j`` is true of region ``i`` (the diagonal always is).
    """
    t = targets.float()
    p_img = t / t.sum(1, keepdim=True)
    p_txt = t.T / t.T.sum(1, keepdim=True)
    li = -(p_img * torch.log_softmax(logits, 1)).sum(1).mean()
    lt = -(p_txt * torch.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


MAX_LOGIT_SCALE = math.log(100.0)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against targets uniform over every true entry (rows without one are skipped)."""
    t = targets.float()
    keep = t.sum(-1) > 0
    p = t[keep] / t[keep].sum(-1, keepdim=True)
    return -(p * torch.log_softmax(logits[keep], -1)).sum(-1).mean()


def make_loss_fn(cfg: RegionDataConfig) -> Any:
    """The trainer's ``loss_fn``: the crops' multi-positive loss and, with ``cfg.scenes``, the dense ones."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """One CLIP forward through the DDP wrapper (crops and scenes together), then the losses."""
        m = _unwrap(model)
        with torch.no_grad():
            m.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        n = int(batch["n_crops"])
        scale = m.logit_scale.exp()
        text = out.text_embeds.float()
        logits = out.logits_per_image[:n, :n].float()  # crops x their captions (one caption per crop)
        targets = batch["targets"].to(logits.device)
        loss = multi_positive_loss(logits, targets)
        metrics: dict[str, float] = {}
        if "patch_targets" in batch:
            patches = out.vision_model_output.last_hidden_state[n:, 1:]
            pe = torch.nn.functional.normalize(m.visual_projection(m.vision_model.post_layernorm(patches)).float(), dim=-1)
            cand = text[batch["scene_candidates"]]  # (B, C, D)
            pl = (scale * torch.einsum("bpd,bcd->bpc", pe, cand)).masked_fill(
                ~batch["scene_candidate_mask"][:, None, :], -1e4)
            valid = batch["patch_valid"]
            dense = _soft_ce(pl[valid], batch["patch_targets"][valid])
            cover = batch["object_cover"].float()
            w = cover / cover.sum(1, keepdim=True).clamp(min=1e-6)
            pooled = torch.nn.functional.normalize(torch.einsum("op,opd->od", w, pe[batch["object_scene"]]), dim=-1)
            pool = multi_positive_loss(scale * pooled @ text[batch["scene_captions"]].T, batch["object_targets"])
            loss = loss + cfg.dense_patch * dense + cfg.dense_pool * pool
            with torch.no_grad():
                hit = batch["patch_targets"][valid].gather(1, pl[valid].argmax(-1, keepdim=True)).float().mean()
            metrics = {"dense": float(dense.detach()), "pool": float(pool.detach()), "patch_acc": float(hit)}
        with torch.no_grad():
            top = logits.argmax(1)
            acc = targets[torch.arange(len(top), device=top.device), top].float().mean()
        return loss, {"r2t_acc": float(acc), "logit_scale": float(scale.detach()), **metrics}

    return loss_fn


# --------------------------------------------------------------------------- evaluation


def _eval_records(world: Path, split: str, max_records: int) -> list[Any]:
    """The first ``max_records`` attribute records of ``split`` (0: all)."""
    from ..data.jsonl import read_jsonl

    path = world / f"{split}.jsonl"
    if not path.is_file():
        return []
    recs = [r for r in read_jsonl(path) if r.meta.get("type") == "attribute"]
    return recs[:max_records] if max_records else recs


def _hard_candidates(world: Path, split: str, records: Sequence[Any], hard_boxes: int, seed: int
                     ) -> dict[str, list[list[float]]]:
    """Per image: its ground-truth boxes plus, for each evaluated record, up to ``hard_boxes``
    boxes around the target that a good region model must score below the tight box (part of
    the object, a loose box around it, a box around it and a neighbour)."""
    objects = load_scene_objects(world, split)
    wcfg = load_world_config(world)
    size = wcfg.image_size if wcfg is not None else 128
    sampler = RegionSampler(RegionDataConfig())
    table: dict[str, list[list[float]]] = {}
    for k, r in enumerate(records):
        objs = objects[str(r.image_id)]
        boxes = table.setdefault(r.image, [list(q.box) for q in objs])
        o = objs[int(r.meta["target"])]
        rng = np.random.default_rng([seed, 999, k])
        hard: list[list[float]] = []
        for _ in range(hard_boxes * 3):
            if len(hard) >= hard_boxes:
                break
            kind = ("part", "loose", "pair")[len(hard) % 3]
            if kind == "part":
                b = sampler.part_box(rng, o, objs, size, size)
            elif kind == "loose":
                b = sampler.loose_box(rng, o, objs, size, size)
            else:
                pb = sampler.pair_box(rng, objs, first=o)
                b = pb[0] if pb else None
            if b is not None:
                hard.append(b)
        boxes.extend(hard)
    return table


def _noun_phrase_records(records: Sequence[Any]) -> list[Any]:
    """The records with each expression replaced by its bare noun phrase (``meta["subject"]``)."""
    from dataclasses import replace

    return [replace(r, expression=str(r.meta.get("subject") or r.expression)) for r in records]


def make_eval_fn(world: Path, processor: Any, cfg: EvalConfig, seed: int):
    """``eval_fn(model)`` for the trainer: the quality gate on ``cfg.split`` (and compositional).

    Every number is Acc@0.5 from :func:`clipground.evaluation.evaluate` with the zero-shot scorer
    (``relations=False``: the gate measures the region model, not the rules) on the model being
    trained: ``{split}_acc`` with the scene's ground-truth boxes as candidates, ``{split}_acc_np``
    with the bare noun phrase, ``{split}_acc_hard`` with hard boxes added to the candidates,
    ``{split}_acc_<view>`` with one view alone, and ``compositional_acc`` / ``_acc_np``; and
    ``{split}_patch_hit``: how often the patch most similar to the phrase touches the target
    (:func:`clipground.evaluation.probes.patch_hits`).
    """
    from ..evaluation import evaluate
    from ..grounder import Grounder
    from ..methods.zero_shot import ZeroShotConfig, ZeroShotScorer
    from ..proposals import get_proposals
    from ..proposals.files import PrecomputedProposals

    main = _eval_records(world, cfg.split, cfg.max_records)
    if not main:
        raise ConfigError(f"world {world} has no attribute records in split {cfg.split!r} to evaluate on")
    comp = _eval_records(world, "compositional", cfg.max_records) if cfg.compositional else []
    gt = {s: get_proposals(f"gt:{world / f'instances_{s}.json'}") for s in {cfg.split, "compositional"}
          if (world / f"instances_{s}.json").is_file()}
    hard = None
    if cfg.hard_boxes:
        table = _hard_candidates(world, cfg.split, main, cfg.hard_boxes, seed)
        hard = PrecomputedProposals.from_table(table, min_size=1.0, top_k=10_000)
    runs: list[tuple[str, list[Any], tuple[str, ...], Any]] = [
        (f"{cfg.split}_acc", main, tuple(cfg.views), gt[cfg.split]),
        (f"{cfg.split}_acc_np", _noun_phrase_records(main), tuple(cfg.views), gt[cfg.split]),
    ]
    if hard is not None:
        runs.append((f"{cfg.split}_acc_hard", main, tuple(cfg.views), hard))
    runs += [(f"{cfg.split}_acc_{v}", main, (v,), gt[cfg.split]) for v in cfg.per_view]
    if comp:
        runs += [("compositional_acc", comp, tuple(cfg.views), gt["compositional"]),
                 ("compositional_acc_np", _noun_phrase_records(comp), tuple(cfg.views), gt["compositional"])]

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        from ..evaluation.probes import patch_hits

        backbone = as_backbone(model, processor)  # a fresh wrapper: no text memo from older weights
        out = {}
        for name, records, views, proposals in runs:
            method = ZeroShotScorer(backbone, ZeroShotConfig(views=views, relations=False))
            res = evaluate(Grounder(method, proposals), records, progress=False, examples=0)
            out[name] = res.metrics["acc@0.5"]
        out[f"{cfg.split}_patch_hit"] = patch_hits(backbone, main)["patch_hit"]  # does the best patch touch it
        return out

    return eval_fn


# --------------------------------------------------------------------------- run


def save_checkpoint_dir(model: torch.nn.Module, processor, out: str | os.PathLike,
                        extra_files: dict[str, bytes] | None = None) -> Path:
    """``save_pretrained`` model + processor into ``out`` atomically (a temp folder renamed into place)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json for AutoImageProcessor too
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def save_pretraining_run(final: torch.nn.Module, processor: Any, out_dir: str | os.PathLike, cfg: Any, command: str,
                         world: Path, result: TrainResult, recipe_md: Any) -> Path:
    """Save a finished world-model run: the trained model and its processor (``save_pretrained``),
    ``RECIPE.md`` (``recipe_md(cfg, command, world, result, n_params)``), ``recipe.json`` and the
    learning curve."""
    n_params = sum(p.numel() for p in final.parameters())
    extra = {
        "RECIPE.md": recipe_md(cfg, command, world, result, n_params).encode(),
        "recipe.json": json.dumps({"command": command, "seed": cfg.train.seed, "world_dir": str(world),
                                   "world": (load_world_config(world) or cfg.world).to_json(),
                                   "config": to_dict(cfg),
                                   "wall_time_s": result.wall_time_s, "cpu_time_s": result.cpu_time_s,
                                   "steps": result.step,
                                   "params": n_params, "metrics": result.last_eval}, indent=1).encode(),
    }
    curve = Path(cfg.train.output_dir) / "learning_curve.png"
    if curve.is_file():
        extra["learning_curve.png"] = curve.read_bytes()
    return save_checkpoint_dir(final, processor, out_dir, extra)


def _recipe_md(cfg: PretrainConfig, command: str, world: Path, result: TrainResult, n_params: int) -> str:
    import yaml

    wcfg = load_world_config(world)
    world_json = json.dumps(wcfg.to_json() if wcfg else None)

    ev = result.last_eval
    lines = [
        "# world-clip: how this checkpoint was made",
        "",
        "A small CLIP (transformers `CLIPModel`) pretrained from scratch by `clipground pretrain` on",
        "region-caption pairs of the synthetic world's **train** split (see",
        "`clipground.training.pretrain`). Load it with `CLIPModel.from_pretrained(dir)` and",
        "`CLIPProcessor.from_pretrained(dir)`, or as the bundled backbone `clipground/world-clip`.",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"- seed: {cfg.train.seed}",
        f"- world: `{world}`, world config: `{world_json}`",
        f"- parameters: {n_params:,}",
        f"- optimiser steps: {result.step} x {cfg.train.batch_size} scenes x {cfg.data.regions_per_scene} regions",
        f"- training wall time: {result.wall_time_s / 60:.1f} min on {platform.machine()} "
        f"({os.cpu_count()} CPU threads, torch {torch.__version__}); main-process CPU time "
        f"{result.cpu_time_s / 60:.1f} min (wall time grows when other jobs share the CPU)",
        "",
        "## Validation metrics (final)",
        "",
        f"Attribute expressions of the world's `{cfg.eval.split}` split; box = argmax over the candidates "
        f"of the mean cosine over views {list(cfg.eval.views)}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in sorted(ev.items()):
        lines.append(f"| {k} | {v:.4f} |")
    lines += ["", "Acc@0.5 from `clipground.evaluation.evaluate` with the zero-shot scorer (no relation rules):",
              "`*_acc`: full expression among the scene's ground-truth boxes; `*_acc_np`: bare noun phrase",
              "(e.g. `red circle`); `*_acc_hard`: hard boxes (part of the object / loose box around it / box",
              "around it and a neighbour) added to the candidates; `*_acc_<view>`: that view alone.",
              "", "## Full config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def pretrain(world_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: PretrainConfig, resume: bool = False,
             command: str = "", progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Generate the world if needed, pretrain, and ``save_pretrained`` to ``out_dir``.

    Training state (checkpoints, ``metrics.jsonl``, learning curve) lives in
    ``cfg.train.output_dir``; ``out_dir`` receives only the final model, processor,
    ``RECIPE.md``, ``recipe.json`` and the learning curve. ``stop_after_steps`` simulates a
    killed run (tests); nothing is saved to ``out_dir`` then.
    """
    from accelerate import PartialState
    from accelerate.utils import set_seed

    # Same process-group setup the Trainer's Accelerator will use (CPU-only: gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
    world = Path(world_dir)
    with state.main_process_first():  # one process generates, the others then find it
        if not (world / "world.json").is_file():
            ensure_world(world, cfg.world, progress=progress and state.is_main_process)
    if not (world / "instances_train.json").is_file():
        raise ConfigError(f"{world} is not a complete synthetic world (no instances_train.json)")
    set_seed(cfg.train.seed)
    processor = build_processor(cfg.model, (load_world_config(world) or cfg.world).phrasing)
    model = build_model(cfg.model, processor.tokenizer)
    dataset = WorldRegionDataset(world, cfg.data, cfg.train.seed, grid=cfg.model.image_size // cfg.model.patch_size)
    eval_fn = make_eval_fn(world, processor, cfg.eval, cfg.train.seed)
    trainer = Trainer(cfg.train, model, dataset, RegionCollator(processor), make_loss_fn(cfg.data), eval_fn=eval_fn,
                      extra_state={"pretrain_config": to_dict(cfg)})
    result = trainer.fit(resume=resume, stop_after_steps=stop_after_steps)
    if result.finished and state.is_main_process:
        save_pretraining_run(trainer.unwrapped_model(), processor, out_dir, cfg, command, world, result, _recipe_md)
    state.wait_for_everyone()
    return result
