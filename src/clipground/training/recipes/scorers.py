"""Training recipes of the four trained proposal scorers (:mod:`clipground.methods.trained_scorers`).

``clipground train --method proposal-classifier|proposal-attention|clip-finetune|flyp``:

1. loads the annotations (any format :func:`clipground.data.loaders.load_records` reads,
   or a synthetic-world folder: its ``train.jsonl``/``val.jsonl``);
2. builds (or resumes, or reuses) the ``regions`` feature cache of each split
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
5. validates with the one evaluator (:mod:`clipground.training.validation`): frozen methods
   on the validation cache's image states, fine-tuned ones re-encoding each image live on
   the cached proposals;
6. saves ``OUT/final`` with :meth:`Grounder.save_pretrained` and ``OUT/final_metrics.json``.

Config: the recipe schema of :mod:`clipground.training.recipes` (``--config``, see
``configs/scorer_*.yaml``): sections ``train``, ``model`` (the method's config), ``data``
(:class:`ScorerData`) and ``cache``; ``key=value`` overrides on the command line
(``lr=3e-4``, ``model.layers=4``, ``data.pos_iou=0.6``).
"""

from __future__ import annotations

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
from ...backbone.features import RoiView, region_features, text_features, too_long
from ...backbone.views import render_views
from ...cache import CachedImage, CachedText, CacheSpec, FeatureCache, normalize_text
from ...data.records import GroundingRecord
from ...errors import ClipgroundError, ConfigError
from ...grounder import Grounder
from ...methods import get_method_class
from ...methods.trained_scorers import (
    ClipFinetune,
    Flyp,
    box_geometry,
    collate_feature_items,
    noun_phrases,
    resolver_prior,
)
from ...options import to_dict
from ...relations import parse
from ..losses import multi_positive_ce
from ..validation import validation_fn
from . import (CacheOptions, CachedRecipeConfig, DataConfig, TrainArgs, build_split_caches, check_batch, load_backbone,
               load_recipe_config, load_split, save_final, split_paths, start_run)

FROZEN_METHODS = ("proposal-classifier", "proposal-attention")
PIXEL_METHODS = ("clip-finetune", "flyp")


# --------------------------------------------------------------------------- config


@dataclass
class ScorerData(DataConfig):
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
    """

    pos_iou: float = 0.5
    neg_iou: float = 0.3
    sentences: str = "all"
    train_proposals: int = 16
    flyp_text: str = "subject"
    pos_weight: float = 1.0


@dataclass
class ScorerCacheOptions(CacheOptions):
    """Feature-cache options of the scorers; ``patches``: also cache whole-image patch embeddings."""

    patches: bool = False


#: Method-specific defaults of the shared training config (YAML files can override them).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "proposal-classifier": dict(lr=1e-3, epochs=10, batch_size=32, warmup_steps=50, weight_decay=0.01),
    "proposal-attention": dict(lr=3e-4, epochs=20, batch_size=32, warmup_steps=200, weight_decay=0.05),
    "clip-finetune": dict(lr=1e-5, epochs=3, batch_size=16, warmup_steps=50, weight_decay=0.1),
    "flyp": dict(lr=1e-5, epochs=3, batch_size=32, warmup_steps=50, weight_decay=0.1),
}


def config_class(method: str) -> type:
    """The recipe config of ``method``: the schema's sections, ``model`` being the method's config."""
    mcls = get_method_class(method)
    return make_dataclass(
        f"{mcls.__name__}RecipeConfig",
        [
            ("model", mcls.Config, field(default_factory=mcls.Config)),
            ("data", ScorerData, field(default_factory=ScorerData)),
            ("cache", ScorerCacheOptions, field(default_factory=ScorerCacheOptions)),
        ],
        bases=(CachedRecipeConfig,),
    )


def load_scorer_config(method: str, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """Read the YAML config of ``method``'s recipe and apply ``key=value`` overrides."""
    cfg = load_recipe_config(config_class(method), path, overrides, train_defaults=TRAIN_DEFAULTS.get(method, {}))
    d = cfg.data
    if d.sentences not in ("all", "one"):
        raise ConfigError(f"data.sentences must be 'all' or 'one', got {d.sentences!r}")
    if d.flyp_text not in ("subject", "expression"):
        raise ConfigError(f"data.flyp_text must be 'subject' or 'expression', got {d.flyp_text!r}")
    if not 0 < d.pos_iou <= 1 or not 0 <= d.neg_iou <= d.pos_iou:
        raise ConfigError("need 0 < data.pos_iou <= 1 and 0 <= data.neg_iou <= data.pos_iou")
    return cfg


# --------------------------------------------------------------------------- data


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
                 proposals: Any = None, roi: RoiView = RoiView()):
        if boxes_from is None and proposals is None:
            raise ValueError("LiveFeatures needs a cache or a proposal source for boxes")
        self.backbone, self.views, self.boxes_from, self.proposals = backbone, tuple(views), boxes_from, proposals
        self.roi = roi

    def boxes(self, path: str) -> torch.Tensor:
        if self.boxes_from is not None:
            return self.boxes_from.boxes(path)
        from ...images import load_image

        return self.proposals(load_image(path), path).boxes

    def image(self, path: str) -> CachedImage:
        from ...images import load_image

        img = load_image(path)
        b = self.boxes(path)
        f = region_features(self.backbone, img, b, self.views, roi=self.roi)
        return CachedImage(path, img.size, b.clone(), torch.zeros(len(b)), {k: v.clone() for k, v in f.items()})

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


# --------------------------------------------------------------------------- the recipe


def build_caches(args: TrainArgs, cfg: Any, backbone: ClipBackbone, train_records: list[GroundingRecord],
                 val_records: list[GroundingRecord] | None) -> tuple[FeatureCache, FeatureCache | None]:
    """Build/resume/reuse the train (and val) ``regions`` caches under ``--cache`` (default ``OUT/cache``)."""
    # The fine-tuned scorers render their views from pixels at every step and read only the
    # cached boxes (and texts): their cache embeds no views.
    views = () if args.method in PIXEL_METHODS else tuple(cfg.model.views)
    roi = getattr(cfg.model, "roi", RoiView())
    spec = CacheSpec(views=views, patches=cfg.cache.patches, roi_size=roi.size, roi_dense=roi.dense,
                     shard_size=cfg.cache.shard_size)
    splits = {"train": train_records, "val": val_records or []}
    reused: dict[str, FeatureCache] = {}
    if args.method in PIXEL_METHODS:  # any complete cache of the same boxes and texts serves them
        for split, recs in splits.items():
            found = FeatureCache.open_for_boxes(args.cache_root / split, recs, backbone, proposals_for(args.proposals, split)) \
                if recs else None
            if found is not None:
                print(f"feature cache ({split}): reusing the boxes and texts of {found.root}", flush=True)
                reused[split] = found
    caches = build_split_caches(args, cfg, backbone, spec, {k: v for k, v in splits.items() if k not in reused},
                                lambda split: proposals_for(args.proposals, split))
    caches.update(reused)
    return caches["train"], caches.get("val")


def scorer_validation(method: Any, val_cache: FeatureCache, val_records: Sequence[GroundingRecord]) -> Callable:
    """The trainer's ``eval_fn``: the one evaluator on the validation cache (frozen methods read its
    image states; fine-tuned ones re-encode each image live on its cached proposals)."""
    if method.name in PIXEL_METHODS:
        return validation_fn(Grounder(method, val_cache.proposal_source()), val_records)
    return validation_fn(Grounder(method, val_cache.proposal_source()), val_records, states=val_cache.image_state)


def train(args: TrainArgs) -> Path:
    """``clipground train --method proposal-classifier|proposal-attention|clip-finetune|flyp``."""
    from ..trainer import Trainer

    cfg = load_scorer_config(args.method, args.config, args.overrides)
    start_run(cfg, args)
    train_path, val_path = split_paths(args)
    train_records = load_split(train_path, args.images, cfg.data.limit, cfg.train.seed, "training")
    val_records = load_split(val_path, args.images, cfg.data.val_limit, cfg.train.seed, "validation") if val_path else []

    backbone = load_backbone(args)
    t0 = time.perf_counter()
    train_cache, val_cache = build_caches(args, cfg, backbone, train_records, val_records)
    cache_s = time.perf_counter() - t0
    print(f"feature caches ready in {cache_s:.1f} s", flush=True)

    torch.manual_seed(cfg.train.seed)
    method = get_method_class(args.method)(backbone, cfg.model)
    d = cfg.data
    if args.method in FROZEN_METHODS:
        dataset: Dataset = FeatureDataset(train_cache, train_records, d.pos_iou, d.sentences, cfg.train.seed,
                                          noun_phrases=bool(getattr(cfg.model, "noun_phrases", False)),
                                          prior_temperature=float(backbone.logit_scale)
                                          if getattr(cfg.model, "resolver_prior", False) else None)
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
    check_batch(len(dataset), cfg.train)

    eval_fn = scorer_validation(method, val_cache, val_records) if val_cache is not None else None
    trainer = Trainer(cfg.train, method, dataset, collate_fn=collate, loss_fn=loss_fn, eval_fn=eval_fn,
                      extra_state={"method": args.method, "method_config": method.config.to_dict()})
    result = trainer.fit(resume=args.resume)
    print(f"trained {result.step} steps in {result.wall_time_s:.1f} s; last: "
          + ", ".join(f"{k}={v:.4g}" for k, v in {**result.last_metrics, **result.last_eval}.items()), flush=True)
    method = trainer.unwrapped_model()  # type: ignore[assignment]
    method.eval()
    summary = {
        "method": args.method,
        "backbone": args.backbone,
        "proposals": args.proposals,
        "train": {"annotations": str(train_path), **stats.to_json(), "cache": str(train_cache.root),
                  "cache_fingerprint": train_cache.fingerprint},
        "steps": result.step,
        "train_seconds": round(result.wall_time_s, 1),
        "cache_seconds": round(cache_s, 1),
        "last_metrics": result.last_metrics,
        "val": result.last_eval,
        "config": to_dict(cfg),
    }
    return save_final(Grounder(method, proposals_for(args.proposals, "test")), args.out, summary, args)


__all__ = [
    "DataStats",
    "FeatureDataset",
    "LiveFeatures",
    "PixelDataset",
    "ScorerCacheOptions",
    "ScorerData",
    "build_caches",
    "classifier_loss",
    "config_class",
    "flyp_loss",
    "flyp_text",
    "load_scorer_config",
    "make_pixel_collate",
    "ranking_loss",
    "scorer_validation",
    "train",
]
