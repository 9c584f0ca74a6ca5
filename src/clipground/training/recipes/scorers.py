"""Training recipes of the four trained proposal scorers (:mod:`clipground.methods.trained_scorers`).

``clipground train --method proposal-classifier|proposal-attention|clip-finetune|flyp``:

1. loads the annotations (any format :func:`clipground.data.loaders.load_records` reads,
   or a synthetic-world folder: its ``train.jsonl``/``val.jsonl``);
2. builds (or resumes, or reuses) the proposal + feature cache of each split
   (:class:`clipground.cache.FeatureCache`) in ``--cache DIR`` (``DIR/train``, ``DIR/val``;
   default ``OUT/cache``). ``{split}`` in ``--proposals`` is replaced by the split name, so
   ``gt:world/instances_{split}.json`` gives each split its own oracle boxes;
3. marks proposals positive when IoU with the target >= ``data.pos_iou``; expressions
   without a positive proposal are counted (the proposal-recall ceiling) and left out of
   the loss;
4. trains with the shared :class:`~clipground.training.Trainer` (resumable with
   ``--resume``). Frozen-backbone methods read only the cache; ``clip-finetune`` and
   ``flyp`` take the cached boxes and render proposal views from the image at each step,
   since their features change while training;
5. saves ``OUT/final`` with :meth:`Grounder.save_pretrained` and ``OUT/final_metrics.json``.

Config: a YAML file (``--config``, see ``configs/scorer_*.yaml``) with sections ``train``
(:class:`~clipground.training.TrainConfig`), ``method`` (the method's config), ``data``
(:class:`ScorerData`) and ``cache`` (:class:`ScorerCacheOptions`); ``key=value``
overrides on the command line (``lr=3e-4``, ``method.layers=4``, ``data.pos_iou=0.6``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from ...backbone import ClipBackbone
from ...cache import CacheSpec, CachedImage, CachedText, FeatureCache, image_features, normalize_text, text_features, too_long
from ...data.records import GroundingRecord
from ...errors import BadAnnotationError, ClipgroundError
from ...imageops import render_views
from ...methods import get_method_class
from ...methods.base import GroundingMethod
from ...methods.trained_scorers import (
    ClipFinetune,
    Flyp,
    box_geometry,
    collate_feature_items,
    multi_positive_ce,
    resolver_prior,
    noun_phrases,
)
from ...relations import parse
from ..config import ConfigError, TrainConfig, apply_overrides, from_dict, to_dict
from . import TrainArgs, register_recipe

FROZEN_METHODS = ("proposal-classifier", "proposal-attention")
PIXEL_METHODS = ("clip-finetune", "flyp")


# --------------------------------------------------------------------------- config


@dataclass
class ScorerData:
    """How training samples are made from records and cached proposals.

    Attributes:
        pos_iou: a proposal is positive when its IoU with the target is >= this.
        neg_iou: ``flyp`` takes negatives only among proposals with IoU < this.
        sentences: ``all`` (every expression is a sample) or ``one`` (one sample per
            object per epoch, its sentence drawn from ``(seed, epoch, index)``).
        train_proposals: proposals per sample for the backbone-training methods (the best
            positive plus random others; 0 = all). Frozen-feature methods use all.
        flyp_text: ``subject`` (spatial expressions are reduced to their subject noun phrase,
            as the zero-shot resolver asks CLIP at inference) or ``expression``.
        pos_weight: BCE weight of positives (``proposal-classifier``).
        limit: use at most this many training records (0: all).
        val_limit: evaluate on at most this many validation records (0: all).
        eval_batch: expressions per batch when evaluating from the cache.
    """

    pos_iou: float = 0.5
    neg_iou: float = 0.3
    sentences: str = "all"
    train_proposals: int = 16
    flyp_text: str = "subject"
    pos_weight: float = 1.0
    limit: int = 0
    val_limit: int = 0
    eval_batch: int = 64


@dataclass
class ScorerCacheOptions:
    """Feature-cache options (views come from the method config).

    Attributes:
        patches: also cache whole-image patch embeddings.
        shard_size: images per cache shard (the unit of resumption).
        rebuild: rebuild a cache whose fingerprint differs instead of failing.
    """

    patches: bool = False
    shard_size: int = 64
    rebuild: bool = False


#: Method-specific defaults of the shared training config (YAML files can override them).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "proposal-classifier": dict(lr=1e-3, epochs=10, batch_size=32, warmup_steps=50, weight_decay=0.01),
    "proposal-attention": dict(lr=3e-4, epochs=20, batch_size=32, warmup_steps=200, weight_decay=0.05),
    "clip-finetune": dict(lr=1e-5, epochs=3, batch_size=16, warmup_steps=50, weight_decay=0.1),
    "flyp": dict(lr=1e-5, epochs=3, batch_size=32, warmup_steps=50, weight_decay=0.1),
}


def recipe_config_class(method: str) -> type:
    """The config dataclass of ``method``'s recipe: ``train``, ``method``, ``data``, ``cache``."""
    mcls = get_method_class(method)
    defaults = TRAIN_DEFAULTS.get(method, {})
    return make_dataclass(
        f"{mcls.__name__}RecipeConfig",
        [
            ("train", TrainConfig, field(default_factory=lambda: TrainConfig(**defaults))),
            ("method", mcls.Config, field(default_factory=mcls.Config)),
            ("data", ScorerData, field(default_factory=ScorerData)),
            ("cache", ScorerCacheOptions, field(default_factory=ScorerCacheOptions)),
        ],
    )


def load_recipe_config(method: str, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Any:
    """Read the YAML config of ``method``'s recipe and apply ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or not isinstance(data.get("train", {}) or {}, dict):
            raise ConfigError(f"{p}: top level and its 'train' section must be mappings")
    # The method's training defaults sit under whatever the file sets.
    data = dict(data)
    data["train"] = {**TRAIN_DEFAULTS.get(method, {}), **(data.get("train") or {})}
    cfg = apply_overrides(from_dict(recipe_config_class(method), data), overrides)
    d = cfg.data
    if d.sentences not in ("all", "one"):
        raise ConfigError(f"data.sentences must be 'all' or 'one', got {d.sentences!r}")
    if d.flyp_text not in ("subject", "expression"):
        raise ConfigError(f"data.flyp_text must be 'subject' or 'expression', got {d.flyp_text!r}")
    if not 0 < d.pos_iou <= 1 or not 0 <= d.neg_iou <= d.pos_iou:
        raise ConfigError("need 0 < data.pos_iou <= 1 and 0 <= data.neg_iou <= data.pos_iou")
    return cfg


# --------------------------------------------------------------------------- data


def resolve_annotations(train: str, val: str | None) -> tuple[str, str | None]:
    """A synthetic-world folder stands for its ``train.jsonl`` (and ``val.jsonl``)."""
    p = Path(train)
    if p.is_dir() and (p / "world.json").is_file():
        v = val if val is not None else (str(p / "val.jsonl") if (p / "val.jsonl").is_file() else None)
        return str(p / "train.jsonl"), v
    return train, val


def load_annotation_records(path: str, images: str | None, limit: int = 0, what: str = "training") -> list[GroundingRecord]:
    """Records of an annotation file whose images exist (dropped ones are reported)."""
    from ...data.loaders import load_records

    res = load_records(path, images=images, limit=limit or None)
    print(f"{what} data {path}: {res.summary()}", flush=True)
    if not res.records:
        raise BadAnnotationError(f"no usable {what} records in {path} ({res.summary()})")
    return res.records


def proposals_for(spec: str, split: str) -> Any:
    """The proposal source for one split (``{split}`` in the spec is replaced)."""
    from ...proposals import get_proposals

    return get_proposals(spec.replace("{split}", split))


class LiveFeatures:
    """Computes what :class:`FeatureCache` stores, with the backbone, at every access.

    The same interface as the cache (``boxes``, ``image``, ``text``, ``has_text``); boxes
    come from ``boxes_from`` (a cache) or a proposal source. Used to time training without
    a cache and to check that cached and live features agree.
    """

    def __init__(self, backbone: ClipBackbone, views: Sequence[str], boxes_from: FeatureCache | None = None,
                 proposals: Any = None):
        if boxes_from is None and proposals is None:
            raise ValueError("LiveFeatures needs a cache or a proposal source for boxes")
        self.backbone, self.views, self.boxes_from, self.proposals = backbone, tuple(views), boxes_from, proposals

    def boxes(self, path: str) -> torch.Tensor:
        if self.boxes_from is not None:
            return self.boxes_from.boxes(path)
        from ...images import load_image

        return self.proposals(load_image(path), path).boxes

    def image(self, path: str) -> CachedImage:
        from ...images import load_image

        img = load_image(path)
        b = self.boxes(path)
        f = image_features(self.backbone, img, b, self.views)
        return CachedImage(path, b.clone(), torch.zeros(len(b)), f["view_embeds"].clone(), f["image_embed"].clone(),
                           img.size)

    def has_text(self, text: str) -> bool:
        return not too_long(self.backbone, [normalize_text(text)])[0]

    def text(self, text: str) -> CachedText:
        emb, toks = text_features(self.backbone, [normalize_text(text)])
        return CachedText(normalize_text(text), emb[0].clone(), toks[0].clone())


def _rng(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)


def _object_key(r: GroundingRecord) -> tuple:
    return (r.image, r.ref_id) if r.ref_id else (r.image, tuple(round(v, 1) for v in r.box))


@dataclass
class DataStats:
    """What happened to the records: the proposal-recall ceiling and what was left out."""

    records: int = 0
    too_long: int = 0
    no_positive: int = 0
    used: int = 0
    samples: int = 0

    @property
    def recall(self) -> float:
        """Share of (encodable) expressions with at least one positive proposal."""
        n = self.records - self.too_long
        return (n - self.no_positive) / n if n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "too_long": self.too_long, "no_positive": self.no_positive,
                "used": self.used, "samples": self.samples, "proposal_recall": round(self.recall, 6)}


class _ProposalSamples(Dataset):
    """Records matched with their image's proposals; shared by the two dataset kinds."""

    def __init__(self, source: Any, records: Sequence[GroundingRecord], pos_iou: float, sentences: str = "all",
                 seed: int = 0):
        self.source, self.pos_iou, self.sentences, self.seed, self.epoch = source, pos_iou, sentences, seed, 0
        self.stats = DataStats(records=len(records))
        kept: list[tuple[GroundingRecord, torch.Tensor]] = []
        for r in records:
            if not source.has_text(r.expression):
                self.stats.too_long += 1
                continue
            ious = box_iou(source.boxes(r.image), torch.tensor([r.box], dtype=torch.float32))[:, 0]
            if not bool((ious >= pos_iou).any()):
                self.stats.no_positive += 1
                continue
            kept.append((r, ious))
        self.stats.used = len(kept)
        if sentences == "one":
            groups: dict[tuple, list[int]] = {}
            for i, (r, _) in enumerate(kept):
                groups.setdefault(_object_key(r), []).append(i)
            self.groups = list(groups.values())
        else:
            self.groups = [[i] for i in range(len(kept))]
        self.kept = kept
        self.stats.samples = len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def pick(self, i: int) -> tuple[GroundingRecord, torch.Tensor]:
        g = self.groups[i]
        j = g[0] if len(g) == 1 else g[int(torch.randint(len(g), (1,), generator=_rng(self.seed, self.epoch, i)))]
        return self.kept[j]


class FeatureDataset(_ProposalSamples):
    """Frozen-feature samples: every proposal's view embeddings, geometry and labels, plus the phrase
    (pooled embedding, token states and, with ``noun_phrases``, its subject/object phrase embeddings)."""

    def __init__(self, source: Any, records: Sequence[GroundingRecord], pos_iou: float, sentences: str = "all",
                 seed: int = 0, noun_phrases: bool = False, prior_temperature: float | None = None):
        super().__init__(source, records, pos_iou, sentences, seed)
        self.noun_phrases = noun_phrases
        # With a temperature, every sample carries the zero-shot resolver's scores (needs
        # noun phrases); they depend only on cached features, so each is computed once.
        self.prior_temperature = prior_temperature
        self._priors: dict[tuple[str, str], torch.Tensor] = {}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r, ious = self.pick(i)
        e = self.source.image(r.image)
        t = self.source.text(r.expression)
        item = {"views": e.view_embeds.transpose(0, 1), "geom": box_geometry(e.boxes, e.size), "text": t.embed,
                "tokens": t.tokens, "image": e.image_embed, "labels": (ious >= self.pos_iou).float()}
        if self.noun_phrases:
            subj, obj = noun_phrases(r.expression)
            nps = torch.zeros(2, t.embed.shape[-1])
            nps[0] = self.source.text(subj).embed
            if obj:
                nps[1] = self.source.text(obj).embed
            item["nps"], item["np_mask"] = nps, torch.tensor([True, obj is not None])
            if self.prior_temperature is not None:
                key = (r.image, r.expression)
                if key not in self._priors:
                    self._priors[key] = resolver_prior(r.expression, item["views"].float(), item["geom"],
                                                       item["text"].float(), nps.float(), item["np_mask"],
                                                       self.prior_temperature)
                item["prior"] = self._priors[key]
        return item


class PixelDataset(_ProposalSamples):
    """Samples for backbone training: the image, a subset of its cached proposals and the phrase.

    The subset (``train_proposals``) always holds the best positive first, then random
    others drawn from ``(seed, epoch, index)``; with ``neg_iou`` set, the others are only
    proposals with IoU below it (clean negatives for the contrastive loss).
    """

    def __init__(self, source: Any, records: Sequence[GroundingRecord], pos_iou: float, sentences: str = "all",
                 seed: int = 0, train_proposals: int = 16, neg_iou: float | None = None,
                 text_fn: Callable[[str], str] | None = None):
        super().__init__(source, records, pos_iou, sentences, seed)
        self.train_proposals, self.neg_iou, self.text_fn = train_proposals, neg_iou, text_fn

    def __getitem__(self, i: int) -> dict[str, Any]:
        r, ious = self.pick(i)
        boxes = self.source.boxes(r.image)
        best = int(ious.argmax())
        others = torch.tensor([k for k in range(len(boxes)) if k != best and
                               (self.neg_iou is None or float(ious[k]) < self.neg_iou)], dtype=torch.long)
        if self.train_proposals > 0 and len(others) > self.train_proposals - 1:
            perm = torch.randperm(len(others), generator=_rng(self.seed, self.epoch, i))
            others = others[perm[: self.train_proposals - 1]]
        sel = torch.cat([torch.tensor([best]), others])
        text = self.text_fn(r.expression) if self.text_fn is not None else r.expression
        return {"image": r.image, "boxes": boxes[sel], "labels": (ious[sel] >= self.pos_iou).float(),
                "text": text, "key": _object_key(r), "spatial": parse(r.expression).is_spatial}


def make_pixel_collate(backbone: ClipBackbone, views: Sequence[str]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate for :class:`PixelDataset`: render views, preprocess, tokenize, pad."""
    from ...images import load_image

    views = tuple(views)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        pics = []
        counts, geoms, labels = [], [], []
        for it in items:
            img = load_image(it["image"])
            rv = render_views(img, it["boxes"], views)
            for k in range(len(it["boxes"])):
                pics.extend(rv[v][k] for v in views)
            counts.append(len(it["boxes"]))
            geoms.append(box_geometry(it["boxes"], img.size))
            labels.append(it["labels"])
        kmax = max(counts)
        b = len(items)
        geom = torch.zeros(b, kmax, geoms[0].shape[1])
        lab = torch.zeros(b, kmax)
        mask = torch.zeros(b, kmax, dtype=torch.bool)
        for i, (g, l) in enumerate(zip(geoms, labels)):
            geom[i, : len(g)], lab[i, : len(l)], mask[i, : len(g)] = g, l, True
        tok = backbone.tokenize([it["text"] for it in items])
        return {"pixel_values": backbone.preprocess(pics), "counts": torch.tensor(counts), "geom": geom,
                "labels": lab, "mask": mask, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                "keys": [it["key"] for it in items], "texts": [it["text"] for it in items],
                "spatial": torch.tensor([it["spatial"] for it in items]),
                "images": [it["image"] for it in items]}

    return collate


def flyp_text(expression: str) -> str:
    """The text FLYP pairs with the target crop: the subject noun phrase of a spatial expression."""
    p = parse(expression)
    return p.subject if p.is_spatial else expression


# --------------------------------------------------------------------------- losses


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return labels.gather(1, logits.argmax(1, keepdim=True)).squeeze(1).float().mean()


def classifier_loss(pos_weight: float = 1.0) -> Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]:
    """BCE over every real proposal ("is this the target")."""

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = model(batch)
        m = batch["mask"]
        pw = torch.tensor(pos_weight, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits[m], batch["labels"][m], pos_weight=pw)
        return loss, {"top1": _top1(logits, batch["labels"]).detach()}

    return loss_fn


def ranking_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Softmax cross-entropy over the image's proposals (any positive counts)."""
    logits = model(batch)
    loss = multi_positive_ce(logits, batch["labels"], batch["mask"]).mean()
    return loss, {"top1": _top1(logits, batch["labels"]).detach()}


def flyp_loss(views: int) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict]]:
    """CLIP's symmetric contrastive loss on (target crop, phrase) pairs, FLYP-style.

    Text -> image: each phrase against every proposal view in the batch (its own target
    positive; the image's other proposals and other samples' proposals negative).
    Image -> text: each target view against the batch's phrases. Samples with the same
    object or the same text are positives of each other; for a spatial expression reduced
    to its subject, the other proposals of its own image are left out (they may match the
    subject too).
    """

    def loss_fn(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        img, txt, scale = model(batch)
        counts = batch["counts"].tolist()
        b = len(counts)
        sample = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))
        first = torch.zeros(len(sample), dtype=torch.bool)
        first[torch.tensor([0] + list(torch.tensor(counts).cumsum(0)[:-1].tolist()))] = True
        keys, texts, images = batch["keys"], batch["texts"], batch["images"]
        same = torch.tensor([[keys[i] == keys[j] or texts[i] == texts[j] for j in range(b)] for i in range(b)])
        same_img = torch.tensor([[images[i] == images[j] for j in range(b)] for i in range(b)])
        pos_t2i = same[:, sample] & first[None, :]
        valid_t2i = ~(batch["spatial"][:, None] & same_img[:, sample] & ~pos_t2i)
        losses, acc = [], []
        emb = img.reshape(len(sample), views, -1)
        for v in range(views):
            e = emb[:, v]
            l_t2i = scale * txt @ e.t()
            l_i2t = scale * e[first] @ txt.t()
            losses.append(0.5 * (multi_positive_ce(l_t2i, pos_t2i.float(), valid_t2i).mean()
                                 + multi_positive_ce(l_i2t, same.float(), torch.ones_like(same)).mean()))
            acc.append(pos_t2i.gather(1, l_t2i.masked_fill(~valid_t2i, -1e4).argmax(1, keepdim=True)).float().mean())
        return torch.stack(losses).mean(), {"t2i_top1": torch.stack(acc).mean().detach(), "scale": scale.detach()}

    return loss_fn


# --------------------------------------------------------------------------- evaluation from a cache


@torch.no_grad()
def evaluate_on_cache(method: GroundingMethod, cache: FeatureCache, records: Sequence[GroundingRecord],
                      live: bool = False, max_phrases: int = 64) -> dict[str, float]:
    """Acc@0.5 of ``method`` on ``records`` using the cache's proposals (and features unless ``live``).

    ``live=True`` re-encodes each image with the method's own backbone (needed while it is
    being fine-tuned). Records whose expression the backbone cannot encode count as misses.
    Returns ``acc@0.5``, ``proposal_recall@0.5``, ``count`` and per-``meta["type"]`` accuracies.
    """
    if not live and tuple(getattr(method.config, "views", cache.views)) != cache.views:
        raise ClipgroundError(f"method views {list(method.config.views)} differ from the cache's {list(cache.views)}")
    was_training = method.training
    method.eval()
    by_image: dict[str, list[GroundingRecord]] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    hits, recall, types = [], [], []
    for path, recs in by_image.items():
        state = cache.image_state(path, load_pixels=live)
        if live:
            state.features = {}
            method.encode_image(state)
        for s in range(0, len(recs), max_phrases):
            chunk = recs[s : s + max_phrases]
            ok = [not too_long(method.backbone, [normalize_text(r.expression)])[0] for r in chunk]
            good = [r for r, o in zip(chunk, ok) if o]
            ranks = iter(method.rank(state, [normalize_text(r.expression) for r in good]) if good else [])
            for r, o in zip(chunk, ok):
                tgt = torch.tensor([r.box], dtype=torch.float32)
                recall.append(bool(len(state.proposals.boxes)) and float(box_iou(state.proposals.boxes, tgt).max()) >= 0.5)
                rk = next(ranks) if o else None
                hit = rk is not None and len(rk.boxes) > 0 and float(box_iou(rk.boxes[:1], tgt)[0, 0]) >= 0.5
                hits.append(hit)
                types.append(str(r.meta.get("type", "")) if isinstance(r.meta, dict) else "")
    method.train(was_training)
    n = max(1, len(hits))
    out = {"acc@0.5": sum(hits) / n, "proposal_recall@0.5": sum(recall) / n, "count": float(len(hits))}
    for t in sorted(set(types) - {""}):
        sel = [h for h, tt in zip(hits, types) if tt == t]
        out[f"acc@0.5/{t}"] = sum(sel) / len(sel)
    return out


# --------------------------------------------------------------------------- the recipe


def build_caches(args: TrainArgs, cfg: Any, backbone: ClipBackbone, train_records: list[GroundingRecord],
                 val_records: list[GroundingRecord] | None, progress: bool = True) -> tuple[FeatureCache, FeatureCache | None]:
    """Build/resume/reuse the train (and val) caches under ``--cache`` (default ``OUT/cache``)."""
    root = Path(args.cache) if args.cache else Path(args.out) / "cache"
    spec = CacheSpec(views=tuple(cfg.method.views), patches=cfg.cache.patches, shard_size=cfg.cache.shard_size)
    caches = []
    for split, recs in (("train", train_records), ("val", val_records)):
        if recs is None:
            caches.append(None)
            continue
        print(f"feature cache ({split}): {root / split}", flush=True)
        caches.append(FeatureCache.build(root / split, recs, backbone, proposals_for(args.proposals, split), spec,
                                         rebuild=cfg.cache.rebuild, progress=progress))
    return caches[0], caches[1]


def _train_scorer(args: TrainArgs) -> Path:
    from ...grounder import Grounder
    from ...io import atomic_write as atomic_write_text
    from ..trainer import Trainer

    cfg = load_recipe_config(args.method, args.config, args.overrides)
    cfg.train.output_dir = str(args.out)
    out = Path(args.out)
    train_path, val_path = resolve_annotations(args.train, args.val)
    train_records = load_annotation_records(train_path, args.images, cfg.data.limit, "training")
    val_records = load_annotation_records(val_path, args.images, cfg.data.val_limit, "validation") if val_path else None

    backbone = ClipBackbone.from_pretrained(args.backbone)
    t0 = time.perf_counter()
    train_cache, val_cache = build_caches(args, cfg, backbone, train_records, val_records, progress=cfg.train.progress)
    cache_s = time.perf_counter() - t0
    print(f"feature caches ready in {cache_s:.1f} s", flush=True)

    torch.manual_seed(cfg.train.seed)
    mcls = get_method_class(args.method)
    method = mcls(backbone, cfg.method)
    d = cfg.data
    if args.method in FROZEN_METHODS:
        dataset: Dataset = FeatureDataset(train_cache, train_records, d.pos_iou, d.sentences, cfg.train.seed,
                                          noun_phrases=bool(getattr(cfg.method, "noun_phrases", False)),
                                          prior_temperature=float(backbone.logit_scale)
                                          if getattr(cfg.method, "resolver_prior", False) else None)
        collate = collate_feature_items
        loss_fn = classifier_loss(d.pos_weight) if args.method == "proposal-classifier" else ranking_loss
    else:
        assert isinstance(method, (ClipFinetune, Flyp))
        unfrozen = method.setup_training()
        print(f"fine-tuning {len(unfrozen)} CLIP tensors (LayerNorms frozen)", flush=True)
        is_flyp = isinstance(method, Flyp)
        dataset = PixelDataset(train_cache, train_records, d.pos_iou, d.sentences, cfg.train.seed, d.train_proposals,
                               neg_iou=d.neg_iou if is_flyp else None,
                               text_fn=flyp_text if is_flyp and d.flyp_text == "subject" else None)
        collate = make_pixel_collate(backbone, method.config.views)
        loss_fn = flyp_loss(len(method.config.views)) if is_flyp else ranking_loss
    stats = dataset.stats  # type: ignore[attr-defined]
    print(f"training samples: {stats.samples} ({stats.used} expressions); proposal recall ceiling "
          f"{stats.recall:.1%}: {stats.no_positive} expressions without a proposal of IoU >= {d.pos_iou} skipped"
          + (f", {stats.too_long} too long for the text encoder" if stats.too_long else ""), flush=True)
    if len(dataset) == 0:
        raise ClipgroundError("no training sample has a positive proposal; check the proposals and data.pos_iou")

    eval_fn = None
    if val_cache is not None and val_records:
        live = args.method in PIXEL_METHODS
        eval_fn = lambda m: {k: v for k, v in evaluate_on_cache(m, val_cache, val_records, live=live).items()}  # noqa: E731

    trainer = Trainer(cfg.train, method, dataset, collate_fn=collate, loss_fn=loss_fn, eval_fn=eval_fn,
                      extra_state={"method": args.method, "method_config": method.config.to_dict()})
    result = trainer.fit(resume=args.resume)
    print(f"trained {result.step} steps in {result.wall_time_s:.1f} s; last: "
          + ", ".join(f"{k}={v:.4g}" for k, v in {**result.last_metrics, **result.last_eval}.items()), flush=True)
    method = trainer.unwrapped_model()  # type: ignore[assignment]
    method.eval()
    final = out / "final"
    Grounder(method, proposals_for(args.proposals, "test")).save_pretrained(final)
    summary = {
        "method": args.method,
        "backbone": args.backbone,
        "proposals": args.proposals,
        "train": {"annotations": train_path, **stats.to_json(), "cache": str(train_cache.root),
                  "cache_fingerprint": train_cache.fingerprint},
        "steps": result.step,
        "train_seconds": round(result.wall_time_s, 1),
        "cache_seconds": round(cache_s, 1),
        "last_metrics": result.last_metrics,
        "val": result.last_eval,
        "config": to_dict(cfg),
    }
    atomic_write_text(out / "final_metrics.json", json.dumps(summary, indent=2, sort_keys=True, default=str))
    return final


for _name in FROZEN_METHODS + PIXEL_METHODS:
    register_recipe(_name)(_train_scorer)

__all__ = [
    "DataStats",
    "FeatureDataset",
    "LiveFeatures",
    "PixelDataset",
    "ScorerCacheOptions",
    "ScorerData",
    "build_caches",
    "classifier_loss",
    "evaluate_on_cache",
    "flyp_loss",
    "flyp_text",
    "load_recipe_config",
    "make_pixel_collate",
    "ranking_loss",
    "recipe_config_class",
]
