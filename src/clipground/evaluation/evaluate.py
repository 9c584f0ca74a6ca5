"""The one evaluator: run a :class:`~clipground.grounder.Grounder` over records and score it.

``clipground eval``, the results table and every recipe's validation during training call
:func:`evaluate`, so a number means the same everywhere. Records are grouped by image so
the heavy per-image work (proposals, CLIP image features) runs once per image (or comes
from a feature cache through ``states``) and every expression of that image is one batched
``predict_batch`` call.

Counting rule (the same everywhere):

* an expression the model refuses (e.g. too long for its tokenizer) **counts as a miss**
  (IoU 0, no box) and is listed in ``failures``: a model that cannot read a phrase has not
  grounded it, and leaving such phrases out would flatter models with short contexts;
* an image that fails to load leaves its expressions out of the scores (like images
  missing from disk, which the loaders drop); it is counted and listed, never a crash.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.records import GroundingRecord
from ..errors import ClipgroundError
from ..relations import is_spatial
from . import metrics as M

#: Expressions sent to ``predict_batch`` at once (bounds memory on images with many).
BATCH = 64


@dataclass
class ItemResult:
    """The outcome for one expression (kept for reports and ``predictions.jsonl``)."""

    index: int
    image: str
    expression: str
    target: list[float]
    box: list[float]
    score: float
    iou: float
    ranked_ious: list[float]  # IoUs of the top-10 ranked candidates, best first
    fallback: bool = False
    best_proposal_iou: float | None = None
    n_proposals: int | None = None
    split: str = ""
    type: str | None = None
    spatial: bool = False
    length: str = ""
    image_id: str = ""
    ref_id: str = ""
    refused: bool = False  # the model refused the phrase: scored as a miss, ``box`` is empty

    @property
    def correct(self) -> bool:
        return self.iou >= 0.5


@dataclass
class EvalResult:
    """Scores of one evaluation run; ``items`` is empty when read back from ``metrics.json``.

    Attributes:
        label: name used in comparison tables (the method name unless given).
        metrics: overall numbers (``acc@0.5`` first; rates are fractions in [0, 1]).
        breakdown: ``{"length"|"spatial"|"type"|"split"|"split_type": {bucket: numbers}}``.
        protocol: method, backbone, proposals, IoU threshold, hit criterion, dataset counts.
        counts: records given, scored, failed images/items, and the loader's kept/dropped.
        timing: wall-clock seconds and throughput (informative only).
        failures: ``[{"image", "error", "items"}]`` for images or phrases that failed.
        examples: indices into ``items`` picked for ``examples.png``.
    """

    label: str
    metrics: dict[str, float]
    breakdown: dict[str, dict[str, dict[str, float]]]
    protocol: dict[str, Any]
    counts: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    items: list[ItemResult] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        """Splits this result covers (one row per split in comparison tables)."""
        return list(self.counts.get("splits", []))

    def to_json(self) -> dict[str, Any]:
        """Everything except per-item results (those go to ``predictions.jsonl``)."""
        return {
            "label": self.label,
            "metrics": self.metrics,
            "breakdown": self.breakdown,
            "protocol": self.protocol,
            "counts": self.counts,
            "timing": self.timing,
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        """Read back what :meth:`to_json` wrote (without items)."""
        return cls(label=d.get("label", ""), metrics=dict(d["metrics"]), breakdown=dict(d.get("breakdown", {})),
                   protocol=dict(d.get("protocol", {})), counts=dict(d.get("counts", {})),
                   timing=dict(d.get("timing", {})), failures=list(d.get("failures", [])))


def _group_by_image(records: Sequence[GroundingRecord], batch_by_image: bool) -> list[list[int]]:
    """Record indices grouped by image, in order of first appearance."""
    if not batch_by_image:
        return [[i] for i in range(len(records))]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.image, []).append(i)
    return list(groups.values())


def _image_states(grounder: Any, records: Sequence[GroundingRecord], groups: list[list[int]],
                  states: Callable[[str], Any] | None, batched: bool, num_workers: int, image_batch: int
                  ) -> Iterator[tuple[list[int], str, str | None, float]]:
    """Per group: ``(indices, image, error or None, seconds)``, the group's image made the grounder's current one."""
    if not batched:
        for idx in groups:
            image = records[idx[0]].image
            t1 = time.perf_counter()
            try:
                if states is not None:
                    grounder.set_image_state(states(image))
                else:
                    grounder.set_image(image)
            except ClipgroundError as e:
                yield idx, image, str(e), 0.0
                continue
            yield idx, image, None, time.perf_counter() - t1
        return
    from ..batching import iter_image_states

    it = iter_image_states(grounder, [records[idx[0]].image for idx in groups], num_workers, image_batch)
    for idx in groups:
        t1 = time.perf_counter()
        bs = next(it)
        seconds = time.perf_counter() - t1
        if bs.error is not None:
            yield idx, bs.key, bs.error, 0.0
            continue
        grounder.set_image_state(bs.state)
        yield idx, bs.key, None, seconds


def _item(i: int, r: GroundingRecord, pred: Any, proposals: torch.Tensor | None) -> ItemResult:
    """The scored outcome of record ``i``; ``pred=None`` is a refused phrase (a miss)."""
    target = torch.tensor(r.box, dtype=torch.float32)
    t = r.meta.get("type") if isinstance(r.meta, dict) else None
    if pred is None:
        box, score, iou, cand, fallback = [], 0.0, 0.0, [], False
    else:
        ranked = pred.boxes if len(pred.boxes) else torch.tensor([pred.box], dtype=torch.float32)
        cand = [round(float(v), 6) for v in M.candidate_ious(ranked[: max(M.TOP_K)], target)]
        box, score, fallback = [float(v) for v in pred.box], float(pred.score), bool(pred.fallback)
        iou = float(M.candidate_ious([pred.box], target)[0])
    return ItemResult(
        index=i, image=r.image, expression=r.expression, target=list(r.box), box=box, score=score, iou=iou,
        ranked_ious=cand, fallback=fallback,
        best_proposal_iou=M.best_iou(proposals, target) if proposals is not None else None,
        n_proposals=int(len(proposals)) if proposals is not None else None,
        split=r.split, type=str(t) if t is not None else None, spatial=is_spatial(r.expression),
        length=M.length_bin(r.expression), image_id=r.image_id, ref_id=r.ref_id, refused=pred is None,
    )


def compute_metrics(items: Sequence[ItemResult]) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Overall metrics and per-bucket breakdowns of scored items."""
    ious = torch.tensor([it.iou for it in items], dtype=torch.float32)
    uses_props = bool(items) and all(it.best_proposal_iou is not None for it in items)
    bp = torch.tensor([it.best_proposal_iou for it in items], dtype=torch.float32) if uses_props else None
    ranked = [torch.tensor(it.ranked_ious) for it in items]
    overall = M.summarize(ious, bp)
    m: dict[str, float] = {"acc@0.5": overall["acc@0.5"], "acc@0.75": overall["acc@0.75"], "miou": overall["miou"]}
    for k in M.TOP_K:
        m[f"p@{k}"] = M.precision_at_k(ranked, k, 0.5)
    if bp is not None:
        m["proposal_recall@0.5"] = overall["proposal_recall@0.5"]
        m["mean_proposals"] = float(sum(it.n_proposals or 0 for it in items) / max(1, len(items)))
    m["fallback_rate"] = float(sum(it.fallback for it in items) / max(1, len(items)))
    m["refused_rate"] = float(sum(it.refused for it in items) / max(1, len(items)))
    m["count"] = len(items)

    bd: dict[str, dict[str, dict[str, float]]] = {}
    bd["length"] = M.grouped([it.length for it in items], ious, bp, order=M.LENGTH_BINS)
    bd["spatial"] = M.grouped(["spatial" if it.spatial else "non-spatial" for it in items], ious, bp,
                              order=("spatial", "non-spatial"))
    types = [it.type or "other" for it in items]
    if any(it.type is not None for it in items):
        bd["type"] = M.grouped(types, ious, bp)
    splits = [it.split for it in items]
    if len(set(splits)) > 1:
        bd["split"] = M.grouped(splits, ious, bp)
        if "type" in bd:
            bd["split_type"] = M.grouped([f"{s}/{t}" for s, t in zip(splits, types)], ious, bp)
    return m, bd


def _pick_examples(items: Sequence[ItemResult], n: int) -> list[int]:
    """Up to ``n`` item indices: half correct, half wrong where possible, distinct images first."""
    if n <= 0 or not items:
        return []
    seen: dict[str, int] = {}
    rank = []
    for it in items:
        rank.append(seen.get(it.image, 0))
        seen[it.image] = rank[-1] + 1
    order = sorted(range(len(items)), key=lambda j: (rank[j], j))
    good = [j for j in order if items[j].correct]
    bad = [j for j in order if not items[j].correct]
    n_good = min(len(good), max(n // 2, n - len(bad)))
    n_bad = min(len(bad), n - n_good)
    return sorted(good[:n_good] + bad[:n_bad])


@dataclass
class EvalPart:
    """The scored outcome of some image groups (a whole run, or one shard of it).

    One run's parts, in order, hold its items and failures in the order the single-process
    run finds them; :func:`evaluate` builds the result from them (:func:`_result`), whichever
    engine scored them.
    """

    items: list[ItemResult] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    t_image: float = 0.0
    t_predict: float = 0.0
    n_images: int = 0

    def to_bytes(self) -> bytes:
        """JSON (floats round-trip exactly), what a Ray worker sends and a shard file holds."""
        return json.dumps({"items": [asdict(it) for it in self.items], "failures": self.failures,
                           "t_image": self.t_image, "t_predict": self.t_predict,
                           "n_images": self.n_images}).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "EvalPart":
        d = json.loads(data.decode("utf-8"))
        return cls([ItemResult(**it) for it in d["items"]], list(d["failures"]), float(d["t_image"]),
                   float(d["t_predict"]), int(d["n_images"]))


def score_groups(grounder: Any, records: Sequence[GroundingRecord], groups: list[list[int]], *,
                 states: Callable[[str], Any] | None = None, num_workers: int = 0, image_batch: int = 1,
                 bar: Any = None) -> EvalPart:
    """Ground and score the records of ``groups`` (lists of indices into ``records``, one image each).

    The work of one evaluation, or of one shard of it on a Ray worker: the same function
    either way, so a sharded run scores exactly what the single-process run scores.
    """
    uses_props = bool(getattr(grounder.method, "uses_proposals", False))
    part = EvalPart()
    items, failures = part.items, part.failures
    t0 = time.perf_counter()
    batched = states is None and (num_workers > 0 or image_batch > 1)
    for idx, image, error, seconds in _image_states(grounder, records, groups, states, batched, num_workers,
                                                     image_batch):
        if error is not None:
            failures.append({"image": image, "error": error, "items": len(idx)})
            if bar is not None:
                bar.update(len(idx))
            continue
        part.t_image += seconds
        part.n_images += 1
        t2 = time.perf_counter()
        if bar is not None and part.t_image > 0:
            bar.set_postfix_str(f"{part.n_images / (time.perf_counter() - t0):.2f} images/s", refresh=False)
        props = grounder.state.proposals.boxes if uses_props and grounder.state.proposals is not None else None
        if uses_props and props is None:
            props = torch.zeros(0, 4)
        for s in range(0, len(idx), BATCH):
            chunk = idx[s:s + BATCH]
            try:
                preds = grounder.predict_batch([records[i].expression for i in chunk])
            except ClipgroundError:  # isolate the phrase(s) the model refuses: each is a miss
                preds = []
                for i in chunk:
                    try:
                        preds.append(grounder.predict_batch([records[i].expression])[0])
                    except ClipgroundError as e:
                        preds.append(None)
                        failures.append({"image": image, "expression": records[i].expression, "error": str(e),
                                         "items": 1, "scored_as": "miss"})
            for i, p in zip(chunk, preds):
                items.append(_item(i, records[i], p, props))
        part.t_predict += time.perf_counter() - t2
        if bar is not None:
            bar.update(len(idx))
    return part


def _score_shard(grounder: Any, shard: tuple[Any, ...]) -> bytes:
    """A Ray worker's job: :func:`score_groups` on one shard, as bytes."""
    records, groups, num_workers, image_batch = shard
    return score_groups(grounder, records, groups, num_workers=num_workers, image_batch=image_batch).to_bytes()


def evaluate(
    grounder: Any,
    records: Sequence[GroundingRecord] | Any,
    *,
    batch_by_image: bool = True,
    progress: bool = True,
    examples: int = 16,
    label: str | None = None,
    states: Callable[[str], Any] | None = None,
    num_workers: int = 0,
    image_batch: int = 1,
    engine: Any = None,
    loader: Callable[[], Any] | None = None,
    shard_dir: str | os.PathLike | None = None,
    shard_size: int = 32,
) -> EvalResult:
    """Ground every record's expression in its image and score the boxes.

    Args:
        grounder: a :class:`~clipground.grounder.Grounder` (``set_image`` + ``predict_batch``).
        records: records, or a :class:`~clipground.data.loaders.LoadResult` (its
            kept/dropped counts then go into the protocol).
        batch_by_image: one ``set_image`` per distinct image (``False``: one per record).
        progress: show a tqdm bar.
        examples: how many items to pick for the examples figure.
        label: name of this run in comparison tables (default: the method name).
        states: ``states(image) -> ImageState`` (e.g. ``FeatureCache.image_state``): the
            image's heavy state, given to ``grounder.set_image_state`` instead of encoding it.
        num_workers: decode images and run proposals in this many data-loader worker
            processes, overlapping the CLIP forward (0: in this process).
        image_batch: encode this many images' views together
            (:func:`clipground.batching.iter_image_states`); results equal the one-by-one run.
        engine: a :class:`clipground.distributed.RayEngine`: score shards of ``shard_size``
            images on Ray actors (the result equals the single-process one).
        loader: with ``engine``, what each actor calls once to get its grounder (e.g. a
            ``functools.partial`` of ``Grounder.load``); default: ``grounder`` itself, shipped.
        shard_dir: with ``engine``, where finished shards are kept so a killed run resumes
            (removed once the run is complete; default: in memory only).
    """
    load = None
    if hasattr(records, "records") and hasattr(records, "dropped"):
        load, records = records, records.records
    records = list(records)
    t0 = time.perf_counter()
    groups = _group_by_image(records, batch_by_image)
    bar = tqdm(total=len(records), unit="expr", desc="evaluating", disable=not progress, leave=False)
    workers = 0
    if engine is None:
        parts = [score_groups(grounder, records, groups, states=states, num_workers=num_workers,
                              image_batch=image_batch, bar=bar)]
    else:
        parts, workers = _sharded(grounder, records, groups, bar, engine=engine, loader=loader, states=states,
                                  shard_dir=shard_dir, shard_size=shard_size, num_workers=num_workers,
                                  image_batch=image_batch, batch_by_image=batch_by_image)
    bar.close()
    timing_extra = {"engine": "ray", "ray_workers": workers, "shard_size": shard_size} if engine is not None else {}
    return _result(grounder, records, load, parts, time.perf_counter() - t0, batch_by_image=batch_by_image,
                   batched=states is None and (num_workers > 0 or image_batch > 1), num_workers=num_workers,
                   image_batch=image_batch, examples=examples, label=label, timing_extra=timing_extra)


def _sharded(grounder: Any, records: list[GroundingRecord], groups: list[list[int]], bar: Any, *, engine: Any,
             loader: Callable[[], Any] | None, states: Any, shard_dir: Any, shard_size: int, num_workers: int,
             image_batch: int, batch_by_image: bool) -> tuple[list[EvalPart], int]:
    """The parts of a run scored on Ray, shard by shard (kept in ``shard_dir`` to resume)."""
    from functools import partial

    from ..distributed import MemoryStore, ShardStore, run_fingerprint, run_shards, same, shard_bounds

    if states is not None:
        raise ClipgroundError("a Ray evaluation encodes images on its workers; it cannot read image states")
    batched = num_workers > 0 or image_batch > 1
    bounds = shard_bounds(len(groups), shard_size, image_batch if batched else 1)
    shards = [(records, groups[a:b], num_workers, image_batch) for a, b in bounds]
    method = grounder.method
    fp = run_fingerprint(kind="eval", records=[asdict(r) for r in records], bounds=bounds, method=method.name,
                         config=method.config.to_dict() if hasattr(method, "config") else {},
                         backbone=getattr(grounder.backbone, "name", ""),
                         proposals=grounder.proposals.config() if grounder.proposals is not None else None,
                         batch_by_image=batch_by_image, num_workers=num_workers, image_batch=image_batch)
    store = ShardStore(shard_dir, fp) if shard_dir is not None else MemoryStore()
    sizes = [sum(len(g) for g in groups[a:b]) for a, b in bounds]
    blobs, workers = run_shards(engine, store, loader or partial(same, grounder), _score_shard, shards,
                                tick=lambda i: bar.update(sizes[i]))
    parts = [EvalPart.from_bytes(b) for b in blobs]
    store.remove()
    return parts, workers


def _result(grounder: Any, records: list[GroundingRecord], load: Any, parts: Sequence[EvalPart], total: float, *,
            batch_by_image: bool, batched: bool, num_workers: int, image_batch: int, examples: int,
            label: str | None, timing_extra: dict[str, Any]) -> EvalResult:
    """The one way a run's parts become its :class:`EvalResult` (metrics, protocol, counts, timing)."""
    items = [it for p in parts for it in p.items]
    failures = [f for p in parts for f in p.failures]
    t_image = sum(p.t_image for p in parts)
    t_predict = sum(p.t_predict for p in parts)
    n_images = sum(p.n_images for p in parts)
    uses_props = bool(getattr(grounder.method, "uses_proposals", False))
    metrics, breakdown = compute_metrics(items)
    method = grounder.method
    props_cfg = grounder.proposals.config() if uses_props and grounder.proposals is not None else None
    protocol = {
        "method": method.name,
        "method_config": method.config.to_dict() if hasattr(method, "config") else {},
        "backbone": getattr(grounder.backbone, "name", ""),
        "proposals": props_cfg,
        "iou_threshold": 0.5,
        "hit_criterion": "IoU >= 0.5 (IoU, not GIoU)",
        "refused_phrases": "scored as misses",
        "p_at_k": list(M.TOP_K),
        "batch_by_image": batch_by_image,
    }
    if load is not None:
        protocol["dataset"] = load.to_json()
    counts: dict[str, Any] = {
        "records": len(records),
        "scored": len(items),
        "refused": sum(it.refused for it in items),
        "failed_items": sum(f["items"] for f in failures if "expression" not in f),
        "failed_images": sum(1 for f in failures if "expression" not in f),
        "images": n_images,
        "splits": sorted({r.split for r in records}),
    }
    if load is not None:
        counts.update({"kept": load.kept, "dropped": load.dropped, "invalid": load.invalid, "total": load.total})
    timing = {
        "seconds": round(total, 3),
        "set_image_seconds": round(t_image, 3),
        "predict_seconds": round(t_predict, 3),
        "images_per_second": round(n_images / t_image, 3) if t_image > 0 else 0.0,
        "expressions_per_second": round(len(items) / total, 3) if total > 0 else 0.0,
        "num_workers": int(num_workers) if batched else 0,
        "image_batch": int(image_batch) if batched else 1,
        **timing_extra,
    }
    return EvalResult(label or method.name, metrics, breakdown, protocol, counts, timing, failures, items,
                      _pick_examples(items, examples))


def item_to_json(it: ItemResult) -> dict[str, Any]:
    """One line of ``predictions.jsonl``."""
    d = asdict(it)
    d["correct"] = it.correct
    return d
