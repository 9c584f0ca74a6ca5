"""The feature cache: run the proposal source and the frozen CLIP once per image, train from disk.

Training a head on frozen CLIP features should not pay for CLIP (or selective search) at
every step. :meth:`FeatureCache.build` computes, once per image, the features a family of
methods reads, with the same functions the methods call live
(:mod:`clipground.backbone.features`), and once per distinct text its embedding and token
states. One cache holds one *kind* of image features:

* ``regions`` (the proposal scorers): the proposal boxes and objectness, the CLIP embedding
  of every proposal view (``crop``, ``blur``, ``circle``), the whole-image embedding and
  optionally its patch embeddings (:func:`~clipground.backbone.features.region_features`);
* ``dense`` (the fusion regressor, the locator): the padded-square image's pooled embedding,
  patch tokens and joint-space patch embeddings at the chosen patch grid
  (:func:`~clipground.backbone.features.dense_features`; stored in float16, as are the text
  token states of a dense cache). Image keys may name mirrored views (``path#h``, see
  :mod:`clipground.mirror`).

Layout of a cache directory::

    index.json                 format, kind, fingerprint, image/text lists, finished shards
    images-00000.safetensors   regions: boxes (N,4), scores (N,), offsets (n+1,), views (N,V,D),
                               image_embeds (n,D), sizes (n,2) [, patches (n,P,D)]
                               dense: sizes (n,2), img_embed (n,D), patches (n,P,Dv), patch_embeds (n,P,D)
    texts-00000.safetensors    embeds (n,D), tokens (T,Dt), offsets (n+1,)

Shards are safetensors files read lazily through ``safe_open`` (memory-mapped; a slice reads
only its own bytes), so a cache larger than RAM works for the proposal scorers; the dense
recipes load it whole (:meth:`FeatureCache.dense_arrays`).

**Never stale.** The index stores a sha256 fingerprint of everything the features depend on:
the backbone (name, config and a hash of every weight tensor), the proposal source's config
(and the size/mtime of a proposal file it reads), the preprocessing (image processor and
tokenizer config, the feature kind and its options, the text prompt,
:data:`FEATURE_VERSION`) and the data (every image path with its size and mtime, and the
sorted texts). Building into a directory holding a cache with another fingerprint raises
:class:`StaleCacheError` naming the part that differs, unless ``rebuild=True``.

**Resumable.** Images are processed in a fixed order (sorted keys) in shards of
``shard_size`` images; each shard is written atomically, then the index (which lists
finished shards). A build killed at any moment resumes at the first unfinished shard and,
because a shard's content depends only on its own images, ends with files byte-identical to
an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbone import ClipBackbone
from .backbone.features import (DenseView, RoiView, dense_feature_key, dense_features, dense_geometry, patch_grid,
                                region_feature_key, region_features, text_features, too_long)
from .backbone.views import check_view_kinds
from .errors import ClipgroundError
from .io import TMP_PREFIX, save_safetensors, write_json
from .mirror import load_keyed_image, split_key
from .proposals import ProposalSource

CACHE_FORMAT = "clipground-feature-cache"
CACHE_VERSION = 2
#: Bumped whenever the way features are computed changes (invalidates old caches).
FEATURE_VERSION = 1
INDEX_FILE = "index.json"
KINDS = ("regions", "dense")


class CacheError(ClipgroundError):
    """A feature cache is missing, incomplete, corrupt or asked for something it lacks."""


class StaleCacheError(CacheError):
    """A cache directory holds features computed from different inputs."""


def normalize_text(text: str) -> str:
    """The key a text is cached under (whitespace collapsed, like the phrase check does)."""
    return " ".join(str(text).split())


def cache_texts(expressions: Iterable[str], noun_phrases: bool = True, prompt: str = "{}") -> list[str]:
    """The sorted distinct texts a cache stores: the prompted expressions and, optionally, their noun phrases."""
    out = {normalize_text(prompt.format(e)) for e in expressions}
    if noun_phrases:
        from .relations import parse

        for e in list(out):
            p = parse(e)
            out.update(normalize_text(t) for t in (p.subject, p.object) if t)
    return sorted(t for t in out if t)


# --------------------------------------------------------------------------- what to cache


@dataclass
class CacheSpec:
    """What to cache and how to lay it out.

    Attributes:
        kind: ``regions`` (proposal views) or ``dense`` (patch tokens of the padded square).
        views: ``regions``: proposal view kinds to embed (``crop``, ``blur``, ``circle``, ``roi``; ``alpha``
            with a region-aware backbone, box masks); empty: proposal boxes and the whole-image embedding only.
        patches: ``regions``: also store the whole image's patch embeddings ``(P, D)``.
        roi_size, roi_dense: ``regions`` with a ``roi`` view: the
            :class:`~clipground.backbone.features.RoiView` its box embeddings are pooled with.
        tiles, input_size, dense: ``dense``: the :class:`~clipground.backbone.features.DenseView`.
        prompt: template the expressions are put in before text encoding.
        noun_phrases: also cache the subject and object noun phrases of every expression
            (parsed with :func:`clipground.relations.parse`), which some scorers compare
            with each proposal.
        shard_size: images per image shard (the unit of resumption).
        text_shard_size: texts per text shard.
    """

    kind: str = "regions"
    views: tuple[str, ...] = ("crop", "blur")
    patches: bool = False
    roi_size: int = 0
    roi_dense: str = "value"
    tiles: int = 1
    input_size: int = 0
    dense: str = "final"
    prompt: str = "{}"
    noun_phrases: bool = True
    shard_size: int = 64
    text_shard_size: int = 2048

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CacheError(f"cache kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        try:
            self.views = check_view_kinds(self.views, pooled=True, masked=("alpha",)) if self.views else ()
            RoiView(self.roi_size, self.roi_dense)
            DenseView(self.tiles, self.input_size, self.dense)
        except ClipgroundError as e:
            raise CacheError(str(e)) from None
        if self.shard_size < 1 or self.text_shard_size < 1:
            raise CacheError("shard sizes must be >= 1")

    @classmethod
    def dense_of(cls, view: DenseView, **kwargs: Any) -> "CacheSpec":
        """A ``dense`` spec for a method's :class:`~clipground.backbone.features.DenseView`."""
        return cls(kind="dense", tiles=view.tiles, input_size=view.input_size, dense=view.dense, **kwargs)

    @property
    def view(self) -> DenseView:
        return DenseView(self.tiles, self.input_size, self.dense)

    @property
    def roi(self) -> RoiView:
        return RoiView(self.roi_size, self.roi_dense)

    def feature_options(self) -> dict[str, Any]:
        """The options the features depend on (part of the fingerprint)."""
        if self.kind == "regions":
            opts = {"kind": self.kind, "views": list(self.views), "patches": bool(self.patches)}
            return opts | ({"roi": self.roi.to_dict()} if "roi" in self.views else {})
        return {"kind": self.kind, **self.view.to_dict()}


# --------------------------------------------------------------------------- fingerprint


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_identity(backbone: ClipBackbone) -> dict[str, Any]:
    """Name, model config and weights hash of a backbone (the weights hash is what counts)."""
    cfg = backbone.model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
        for sub in ("text_config", "vision_config"):
            if isinstance(cfg.get(sub), dict):
                cfg[sub].pop(k, None)
    return {"name": backbone.name, "config_sha256": _sha(cfg), "weights_sha256": weights_sha256(backbone.model)}


def proposals_identity(proposals: Any) -> dict[str, Any]:
    """The proposal source's config, plus size/mtime of the file it reads (if any)."""
    if proposals is None:
        return {"name": None}
    conf = dict(proposals.config())
    path = conf.get("path")
    if path:
        p = Path(path)
        conf["file"] = {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} if p.is_file() else None
    return conf


def preprocessing_identity(backbone: ClipBackbone, spec: CacheSpec) -> dict[str, Any]:
    """Image-processor and tokenizer settings, feature options, prompt and feature version."""
    ip = backbone.processor.image_processor.to_dict()
    tok = backbone.processor.tokenizer
    return {
        "image_processor": {k: v for k, v in ip.items() if k not in ("processor_class",)},
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "max_tokens": backbone.max_text_tokens},
        "features": spec.feature_options(),
        "prompt": spec.prompt,
        "noun_phrases": spec.noun_phrases,
        "feature_version": FEATURE_VERSION,
    }


def data_identity(images: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """Hash of every image key with its file's size and mtime, and of the sorted texts."""
    h = hashlib.sha256()
    for key in images:
        path, _ = split_key(key)
        try:
            st = os.stat(path)
        except OSError as e:
            raise CacheError(f"cannot read image {path}: {e.strerror}") from None
        h.update(f"{key}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"images": len(images), "images_sha256": h.hexdigest(), "texts": len(texts), "texts_sha256": _sha(list(texts))}


def fingerprint(images: Sequence[str], texts: Sequence[str], backbone: ClipBackbone, proposals: Any,
                spec: CacheSpec) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``(sha256, per-component sha256, description)`` of a cache's inputs."""
    parts = {
        "backbone": backbone_identity(backbone),
        "proposals": proposals_identity(proposals if spec.kind == "regions" else None),
        "preprocessing": preprocessing_identity(backbone, spec),
        "data": data_identity(images, texts),
    }
    comps = {k: _sha(v) for k, v in parts.items()}
    return _sha({"format": CACHE_FORMAT, "version": CACHE_VERSION, **comps}), comps, parts


# --------------------------------------------------------------------------- index


def _write_index(root: Path, index: dict[str, Any]) -> None:
    write_json(root / INDEX_FILE, index, indent=1)


def _read_index(root: Path) -> dict[str, Any] | None:
    p = root / INDEX_FILE
    if not p.is_file():
        return None
    try:
        idx = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{p} is unreadable ({e}); delete {root} and build again") from None
    if not isinstance(idx, dict) or idx.get("format") != CACHE_FORMAT:
        raise CacheError(f"{root} is not a clipground feature cache (bad {INDEX_FILE})")
    if idx.get("version") != CACHE_VERSION:
        raise StaleCacheError(f"{root} was written by cache format version {idx.get('version')} "
                              f"(this clipground reads {CACHE_VERSION}); rebuild it (--rebuild)")
    return idx


def _describe_mismatch(old: dict[str, Any], comps: dict[str, str]) -> str:
    diff = [k for k, v in comps.items() if old.get("components", {}).get(k) != v]
    return ", ".join(diff) if diff else "fingerprint"


# --------------------------------------------------------------------------- entries


@dataclass
class CachedImage:
    """One image's cached entry: ``size (w, h)``, proposal ``boxes (K, 4)`` and objectness
    ``scores (K,)`` (empty for a dense cache), and ``features``: what the methods'
    ``encode_image`` puts in ``ImageState.features`` (regions: ``view_embeds (V, K, D)``,
    ``image_embed (D,)`` [, ``patch_embeds (P, D)``]; dense: ``img_embed``, ``patches``,
    ``patch_embeds``)."""

    path: str
    size: tuple[int, int]
    boxes: torch.Tensor
    scores: torch.Tensor
    features: dict[str, torch.Tensor]

    @property
    def view_embeds(self) -> torch.Tensor:
        return self.features["view_embeds"]

    @property
    def image_embed(self) -> torch.Tensor:
        return self.features["image_embed"]


@dataclass
class CachedText:
    """One text's pooled embedding ``(D,)`` and token states ``(L, Dt)``."""

    text: str
    embed: torch.Tensor
    tokens: torch.Tensor


class FeatureCache:
    """A built (or partially built) cache directory; see the module docstring."""

    def __init__(self, root: str | os.PathLike, index: dict[str, Any]):
        self.root = Path(root)
        self.index = index
        self._image_pos = {p: i for i, p in enumerate(index["images"])}
        self._text_pos = {t: i for i, t in enumerate(index["texts"])}
        self._handles: dict[str, Any] = {}

    # ----------------------------------------------------------------- properties
    @property
    def fingerprint(self) -> str:
        return str(self.index["fingerprint"])

    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec(**{**self.index["spec"], "views": tuple(self.index["spec"]["views"])})

    @property
    def kind(self) -> str:
        return str(self.index["spec"]["kind"])

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.index["spec"]["views"])

    @property
    def images(self) -> list[str]:
        return list(self.index["images"])

    @property
    def texts(self) -> list[str]:
        return list(self.index["texts"])

    @property
    def skipped_texts(self) -> list[str]:
        """Texts too long for the backbone's text context (not cached)."""
        return list(self.index.get("skipped_texts", []))

    @property
    def backbone_name(self) -> str:
        return str(self.index["inputs"]["backbone"]["name"])

    def feature_key(self) -> dict[str, Any]:
        """The :meth:`~clipground.methods.GroundingMethod.feature_key` its image states carry."""
        spec = self.spec
        if spec.kind == "regions":
            return region_feature_key(self.backbone_name, spec.views, spec.roi)
        return dense_feature_key(self.backbone_name, spec.view)

    def __len__(self) -> int:
        return len(self.index["images"])

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.root)!r}, kind={self.kind!r}, images={len(self)}, "
                f"texts={len(self.index['texts'])}, complete={self.complete})")

    # ----------------------------------------------------------------- open / build
    @classmethod
    def open(cls, root: str | os.PathLike, expected_fingerprint: str | None = None,
             require_complete: bool = True) -> "FeatureCache":
        """Open a cache directory; refuse a different fingerprint or an unfinished build."""
        root = Path(root)
        idx = _read_index(root)
        if idx is None:
            raise CacheError(f"no feature cache at {root} (build one with `clipground cache build`)")
        if expected_fingerprint is not None and idx["fingerprint"] != expected_fingerprint:
            raise StaleCacheError(f"feature cache at {root} was built from different inputs; "
                                  f"rebuild it (`clipground cache build ... --rebuild`)")
        if require_complete and not idx.get("complete"):
            raise CacheError(f"feature cache at {root} is incomplete (a build was interrupted); "
                             f"run the same `clipground cache build` again to resume it")
        return cls(root, idx)

    @classmethod
    def open_for_boxes(cls, root: str | os.PathLike, records: Iterable[Any], backbone: ClipBackbone,
                       proposals: Any) -> "FeatureCache | None":
        """A complete ``regions`` cache in ``root`` of these records' images and texts, this backbone
        and these proposals, whatever views it embeds (``None`` if there is none): what a reader of
        boxes and texts only (the fine-tuned scorers) can reuse instead of building its own."""
        idx = _read_index(Path(root))
        if idx is None or not idx.get("complete") or idx.get("spec", {}).get("kind") != "regions":
            return None
        records = list(records)
        images = sorted({str(r.image) for r in records})
        spec = CacheSpec(**{**idx["spec"], "views": tuple(idx["spec"]["views"])})
        texts_all = cache_texts([r.expression for r in records], spec.noun_phrases, spec.prompt)
        _, comps, _ = fingerprint(images, texts_all, backbone, proposals, spec)
        same = all(idx.get("components", {}).get(k) == comps[k] for k in ("backbone", "proposals", "data"))
        return cls(Path(root), idx) if same else None

    @classmethod
    def build(
        cls,
        root: str | os.PathLike,
        records: Iterable[Any],
        backbone: ClipBackbone,
        proposals: Any,
        spec: CacheSpec | None = None,
        rebuild: bool = False,
        progress: bool = True,
        callback: Callable[[str, int, int], None] | None = None,
        engine: Any = None,
        loader: Callable[[], Any] | None = None,
    ) -> "FeatureCache":
        """Build, resume or reuse the cache of ``records`` in ``root``.

        Args:
            root: cache directory (created if missing).
            records: :class:`~clipground.data.records.GroundingRecord` s (only ``image`` and
                ``expression`` are used; ``image`` may be a mirrored key ``path#h``).
            backbone: the frozen CLIP.
            proposals: a :class:`~clipground.proposals.ProposalSource` (``regions`` only; ignored
                for ``dense``).
            spec: kind, feature options and shard sizes (shard sizes of a resumed build are
                taken from its index).
            rebuild: delete a cache with another fingerprint instead of raising
                :class:`StaleCacheError`.
            callback: ``callback(kind, done, total)`` after each image (``kind="images"``)
                and each text shard (``"texts"``); an exception raised there aborts the build
                (the finished shards stay; tests use it to simulate a kill).
            engine: a :class:`clipground.distributed.RayEngine`: image shards are computed on Ray
                actors (by :meth:`image_shard`, as here) and written here as they arrive; the
                files equal a single-process build's.
            loader: with ``engine``, what each actor calls once for its ``(backbone, proposals)``
                (default: these two, shipped to the actors).
        """
        spec = spec or CacheSpec()
        root = Path(root)
        records = list(records)
        images = sorted({str(r.image) for r in records})
        texts_all = cache_texts([r.expression for r in records], spec.noun_phrases, spec.prompt)
        if spec.kind == "regions" and proposals is None:
            raise CacheError("a regions cache needs a proposal source")
        fp, comps, parts = fingerprint(images, texts_all, backbone, proposals, spec)
        root.mkdir(parents=True, exist_ok=True)
        idx = _read_index(root)
        if idx is not None and idx["fingerprint"] != fp:
            what = _describe_mismatch(idx, comps)
            if not rebuild:
                raise StaleCacheError(f"{root} holds a feature cache built from different inputs ({what} differ); "
                                      f"pass --rebuild (cache.rebuild=true) to overwrite it, or choose another directory")
            cls._wipe(root)
            idx = None
        if idx is not None and idx.get("complete"):
            return cls(root, idx)
        for p in root.glob(TMP_PREFIX + "*"):  # half-written files of a killed build
            p.unlink(missing_ok=True)
        if idx is None:
            cls._wipe(root)  # shard files without an index: of unknown inputs, never adopted
            long = too_long(backbone, texts_all)
            grid = patch_grid(backbone, spec.view) if spec.kind == "dense" else None
            idx = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "fingerprint": fp,
                "components": comps,
                "inputs": parts,
                "spec": asdict(spec) | {"views": list(spec.views)},
                "embed_dim": backbone.embed_dim,
                "text_width": backbone.text_width,
                "grid": list(grid) if grid else None,
                "images": images,
                "texts": [t for t, bad in zip(texts_all, long) if not bad],
                "skipped_texts": [t for t, bad in zip(texts_all, long) if bad],
                "image_shards": [],
                "text_shards": [],
                "complete": False,
            }
            _write_index(root, idx)
        builder = cls(root, idx)
        if engine is None:
            builder._build_images(backbone, proposals, progress, callback)
        else:
            builder._build_images_ray(engine, loader, backbone, proposals, progress, callback)
        builder._build_texts(backbone, callback)
        idx["complete"] = True
        _write_index(root, idx)
        return cls(root, idx)

    @staticmethod
    def _wipe(root: Path) -> None:
        for p in list(root.glob("images-*.safetensors")) + list(root.glob("texts-*.safetensors")) + list(root.glob(TMP_PREFIX + "*")):
            p.unlink(missing_ok=True)
        (root / INDEX_FILE).unlink(missing_ok=True)

    def _commit_shard(self, what: str, tensors: dict[str, torch.Tensor] | None, start: int, count: int) -> None:
        """Write shard ``len(shards)`` (``tensors=None``: it is already on disk) and list it in the index."""
        shards = self.index[f"{what}_shards"]
        name = f"{what}s-{len(shards):05d}.safetensors"
        if tensors is not None:
            save_safetensors(self.root / name, tensors)
        shards.append({"file": name, "start": start, "count": count})
        _write_index(self.root, self.index)

    def _written_shard(self, n: int, count: int) -> bool:
        """Whether image shard ``n`` is on disk, whole, though not yet in the index (a Ray build
        writes shards as they finish, in any order; the index lists them in order)."""
        from safetensors import safe_open

        path = self.root / f"images-{n:05d}.safetensors"
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return int(f.get_slice("sizes").get_shape()[0]) == count
        except Exception:  # noqa: BLE001 - unreadable: compute it again
            return False

    @staticmethod
    def image_shard(backbone: ClipBackbone, proposals: Any, keys: Sequence[str], spec: CacheSpec,
                    tick: Callable[[int], None] = lambda j: None) -> dict[str, torch.Tensor]:
        """The tensors of one image shard (the same function for a local and a Ray build)."""
        if spec.kind == "regions":
            return FeatureCache._region_shard(backbone, proposals, keys, spec, tick)
        return FeatureCache._dense_shard(backbone, keys, spec, tick)

    def _build_images_ray(self, engine: Any, loader: Callable[[], Any] | None, backbone: ClipBackbone,
                          proposals: Any, progress: bool, callback: Callable[[str, int, int], None] | None) -> None:
        """:meth:`_build_images` with the shards computed on Ray actors; each is written as it
        arrives and listed in the index once every shard before it is, so a kill loses none."""
        from functools import partial

        from tqdm.auto import tqdm

        from .distributed import map_shards, same

        idx, spec = self.index, self.spec
        images = idx["images"]
        size = int(idx["spec"]["shard_size"])
        bounds = [(a, min(a + size, len(images))) for a in range(0, len(images), size)]
        first = len(idx["image_shards"])
        todo = [n for n in range(first, len(bounds)) if not self._written_shard(n, bounds[n][1] - bounds[n][0])]
        bar = tqdm(total=len(images), initial=first * size, desc="cache images", unit="img", disable=not progress,
                   dynamic_ncols=True)

        def commit_ready() -> None:
            while len(idx["image_shards"]) < len(bounds):
                n = len(idx["image_shards"])
                a, b = bounds[n]
                if n in todo_left or not self._written_shard(n, b - a):
                    return
                self._commit_shard("image", None, a, b - a)
                bar.update(b - a)
                if callback is not None:
                    callback("images", b, len(images))

        def got(n: int, data: bytes) -> None:
            from safetensors.torch import load as load_tensors

            save_safetensors(self.root / f"images-{n:05d}.safetensors", load_tensors(data))
            todo_left.discard(n)
            commit_ready()

        todo_left = set(todo)
        commit_ready()
        shards = [(images[a:b], spec) for a, b in bounds]
        map_shards(engine, loader or partial(same, (backbone, proposals)), _ray_image_shard, shards, todo, got)
        commit_ready()
        bar.close()

    def _build_images(self, backbone: ClipBackbone, proposals: Any, progress: bool,
                      callback: Callable[[str, int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        idx, spec = self.index, self.spec
        images = idx["images"]
        size = int(idx["spec"]["shard_size"])
        start = len(idx["image_shards"]) * size
        bar = tqdm(total=len(images), initial=start, desc="cache images", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for s0 in range(start, len(images), size):
            chunk = images[s0 : s0 + size]

            def tick(j: int) -> None:
                bar.update(1)
                if callback is not None:
                    callback("images", s0 + j + 1, len(images))

            n = s0 // size
            if self._written_shard(n, len(chunk)):  # written by a killed run before its index was
                for j in range(len(chunk)):
                    tick(j)
                self._commit_shard("image", None, s0, len(chunk))
                continue
            self._commit_shard("image", self.image_shard(backbone, proposals, chunk, spec, tick), s0, len(chunk))
        bar.close()

    @staticmethod
    def _region_shard(backbone: ClipBackbone, proposals: Any, keys: Sequence[str], spec: CacheSpec,
                      tick: Callable[[int], None]) -> dict[str, torch.Tensor]:
        boxes, scores, views_l, embeds, sizes, patch_l, offsets = [], [], [], [], [], [], [0]
        for j, key in enumerate(keys):
            img = load_keyed_image(key)
            props = proposals(img, key)
            f = region_features(backbone, img, props.boxes, spec.views, spec.patches, spec.roi)
            boxes.append(props.boxes.float())
            scores.append(props.scores.float())
            views_l.append(f["view_embeds"].transpose(0, 1))  # (K, V, D)
            embeds.append(f["image_embed"])
            sizes.append(torch.tensor(img.size, dtype=torch.int64))
            if spec.patches:
                patch_l.append(f["patch_embeds"])
            offsets.append(offsets[-1] + len(props.boxes))
            tick(j)
        out = {
            "boxes": torch.cat(boxes).reshape(-1, 4),
            "scores": torch.cat(scores).reshape(-1),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "views": torch.cat(views_l).reshape(offsets[-1], len(spec.views), backbone.embed_dim),
            "image_embeds": torch.stack(embeds),
            "sizes": torch.stack(sizes),
        }
        if spec.patches:
            out["patches"] = torch.stack(patch_l)
        return out

    @staticmethod
    def _dense_shard(backbone: ClipBackbone, keys: Sequence[str], spec: CacheSpec,
                     tick: Callable[[int], None]) -> dict[str, torch.Tensor]:
        # One batched pass per shard: a shard's content depends only on its own images.
        pil = [load_keyed_image(k) for k in keys]
        f = dense_features(backbone, pil, spec.view)
        for j in range(len(keys)):
            tick(j)
        return {"sizes": torch.tensor([im.size for im in pil], dtype=torch.int64),
                "img_embed": f["img_embed"].float(), "patches": f["patches"].half(),
                "patch_embeds": f["patch_embeds"].half()}

    def _build_texts(self, backbone: ClipBackbone, callback: Callable[[str, int, int], None] | None) -> None:
        idx = self.index
        texts = idx["texts"]
        size = int(idx["spec"]["text_shard_size"])
        half = idx["spec"]["kind"] == "dense"
        for s0 in range(len(idx["text_shards"]) * size, len(texts), size):
            chunk = texts[s0 : s0 + size]
            emb, toks = text_features(backbone, chunk)
            offsets = [0]
            for t in toks:
                offsets.append(offsets[-1] + len(t))
            tokens = torch.cat(toks) if toks else torch.zeros(0, backbone.text_width)
            self._commit_shard("text", {"embeds": emb.float(), "tokens": tokens.half() if half else tokens.float(),
                                        "offsets": torch.tensor(offsets, dtype=torch.int64)}, s0, len(chunk))
            if callback is not None:
                callback("texts", s0 + len(chunk), len(texts))

    # ----------------------------------------------------------------- lookups
    def _handle(self, name: str) -> Any:
        from safetensors import SafetensorError, safe_open

        h = self._handles.get(name)
        if h is None:
            path = self.root / name
            if not path.is_file():
                raise CacheError(f"cache shard {path} is missing; rebuild the cache (--rebuild)")
            try:
                h = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CacheError(f"cache shard {path} is corrupt ({str(e).splitlines()[0]}); "
                                 f"rebuild the cache (--rebuild)") from None
            self._handles[name] = h
        return h

    def _slice(self, name: str, field: str, a: int, b: int) -> torch.Tensor:
        try:
            return self._handle(name).get_slice(field)[a:b]
        except CacheError:
            raise
        except Exception as e:  # a truncated or hand-edited shard
            raise CacheError(f"cache shard {self.root / name} is corrupt ({type(e).__name__}: {e}); "
                             f"rebuild the cache (--rebuild)") from None

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle (DataLoader workers)
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def image_index(self, key: str) -> int:
        """Position of an image key in the cache (raises :class:`CacheError` if absent)."""
        i = self._image_pos.get(str(key))
        if i is None:
            raise CacheError(f"image {key} is not in the feature cache at {self.root}")
        return i

    def has_image(self, key: str) -> bool:
        return str(key) in self._image_pos

    def has_text(self, text: str) -> bool:
        return normalize_text(text) in self._text_pos

    def text_index(self, text: str) -> int:
        """Position of a text in the cache (raises :class:`CacheError` if absent)."""
        key = normalize_text(text)
        i = self._text_pos.get(key)
        if i is None:
            why = " (too long for the backbone's text context)" if key in set(self.skipped_texts) else ""
            raise CacheError(f"text {key[:60]!r} is not in the feature cache at {self.root}{why}")
        return i

    def _locate(self, what: str, i: int) -> tuple[str, int]:
        shards = self.index[f"{what}_shards"]
        size = int(self.index["spec"]["shard_size" if what == "image" else "text_shard_size"])
        s = i // size
        if s >= len(shards):
            raise CacheError(f"{what} {i} of the cache at {self.root} is not built yet; resume the build")
        return shards[s]["file"], i - shards[s]["start"]

    def image(self, key: int | str, with_patches: bool = True) -> CachedImage:
        """Cached entry of image ``key`` (index or key); reads only its own slices."""
        i = key if isinstance(key, int) else self.image_index(key)
        name, j = self._locate("image", i)
        size = self._slice(name, "sizes", j, j + 1)[0].tolist()
        size = (int(size[0]), int(size[1]))
        path = self.index["images"][i]
        if self.kind == "dense":
            feats = {k: self._slice(name, k, j, j + 1)[0] for k in ("img_embed", "patches", "patch_embeds")}
            return CachedImage(path, size, torch.zeros(0, 4), torch.zeros(0), feats)
        a, b = (int(v) for v in self._slice(name, "offsets", j, j + 2).tolist())
        feats = {"view_embeds": self._slice(name, "views", a, b).transpose(0, 1).contiguous(),
                 "image_embed": self._slice(name, "image_embeds", j, j + 1)[0]}
        if with_patches and self.index["spec"]["patches"]:
            feats["patch_embeds"] = self._slice(name, "patches", j, j + 1)[0]
        return CachedImage(path, size, self._slice(name, "boxes", a, b), self._slice(name, "scores", a, b), feats)

    def boxes(self, key: int | str) -> torch.Tensor:
        """Only the proposal boxes of an image ``(K, 4)``."""
        i = key if isinstance(key, int) else self.image_index(key)
        name, j = self._locate("image", i)
        if self.kind == "dense":
            return torch.zeros(0, 4)
        a, b = (int(v) for v in self._slice(name, "offsets", j, j + 2).tolist())
        return self._slice(name, "boxes", a, b)

    def text(self, text: str) -> CachedText:
        """Cached embedding and token states of a text."""
        i = self.text_index(text)
        name, j = self._locate("text", i)
        a, b = (int(v) for v in self._slice(name, "offsets", j, j + 2).tolist())
        return CachedText(self.index["texts"][i], self._slice(name, "embeds", j, j + 1)[0],
                          self._slice(name, "tokens", a, b))

    def image_state(self, key: int | str, load_pixels: bool = False, backbone: ClipBackbone | None = None):
        """An :class:`~clipground.methods.ImageState` filled from the cache, ready for
        :meth:`~clipground.Grounder.set_image_state`.

        Without ``load_pixels`` the image is a blank placeholder of the right size: enough
        for every method's :meth:`rank` on frozen features, with no decoding cost. A dense
        state also needs the ``backbone`` (its processor fixes the input geometry).
        """
        from .methods.base import ImageState
        from .proposals import Proposals

        e = self.image(key)
        img = load_keyed_image(e.path) if load_pixels else Image.new("RGB", e.size)
        feats: dict[str, Any] = dict(e.features)
        props = None
        if self.kind == "dense":
            if backbone is None:
                raise CacheError("a dense cache's image state needs the backbone (for the input geometry)")
            spec = self.spec
            feats = {k: v.float() for k, v in feats.items()}
            feats["grid"] = tuple(self.index["grid"])
            feats["geometry"] = dense_geometry(backbone, e.size, spec.view)
        else:
            props = Proposals(e.boxes, e.scores)
        return ImageState(image=img, key=e.path, proposals=props, features=feats, feature_key=self.feature_key())

    def proposal_source(self) -> "CachedProposals":
        """A proposal source that answers with this cache's boxes (for live re-encoding)."""
        return CachedProposals(self)

    def dense_arrays(self) -> dict[str, torch.Tensor]:
        """Every image of a dense cache at once: ``sizes (N, 2)``, ``img_embed (N, D)``,
        ``patches (N, P, Dv)`` and ``patch_embeds (N, P, D)`` (float16), rows in :attr:`images` order."""
        if self.kind != "dense":
            raise CacheError(f"{self.root} is a {self.kind} cache, not a dense one")
        fields = ("sizes", "img_embed", "patches", "patch_embeds")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in fields}
        for s in self.index["image_shards"]:
            for k in fields:
                parts[k].append(self._slice(s["file"], k, 0, s["count"]))
        if len(self) and sum(s["count"] for s in self.index["image_shards"]) != len(self):
            raise CacheError(f"feature cache at {self.root} is incomplete; resume its build")
        return {k: torch.cat(v) for k, v in parts.items()}

    def text_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every text at once: ``embeds (T, D)``, token states zero-padded ``(T, L, Dt)`` and lengths ``(T,)``."""
        embeds, toks, lens = [], [], []
        for s in self.index["text_shards"]:
            off = self._slice(s["file"], "offsets", 0, s["count"] + 1)
            tok = self._slice(s["file"], "tokens", 0, int(off[-1]))
            embeds.append(self._slice(s["file"], "embeds", 0, s["count"]))
            for a, b in zip(off[:-1].tolist(), off[1:].tolist()):
                toks.append(tok[a:b])
                lens.append(b - a)
        width = max(lens, default=1)
        dt = self.index["text_width"]
        dtype = toks[0].dtype if toks else torch.float32
        padded = torch.zeros(len(toks), width, dt, dtype=dtype)
        for i, t in enumerate(toks):
            padded[i, : len(t)] = t
        emb = torch.cat(embeds) if embeds else torch.zeros(0, self.index["embed_dim"])
        return emb, padded, torch.tensor(lens, dtype=torch.int64)

    def summary(self) -> dict[str, Any]:
        """Counts and provenance for the user."""
        done = sum(s["count"] for s in self.index["image_shards"])
        return {
            "root": str(self.root),
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "complete": self.complete,
            "images": len(self),
            "images_done": done,
            "texts": len(self.index["texts"]),
            "skipped_texts": len(self.skipped_texts),
            "features": self.spec.feature_options(),
            "backbone": self.backbone_name,
            "proposals": self.index["inputs"]["proposals"].get("name"),
            "bytes": sum(p.stat().st_size for p in self.root.glob("*.safetensors")),
        }


def _ray_image_shard(loaded: tuple[ClipBackbone, Any], shard: tuple[Sequence[str], CacheSpec]) -> bytes:
    """A Ray worker's job: :meth:`FeatureCache.image_shard` as safetensors bytes."""
    from safetensors.torch import save

    backbone, proposals = loaded
    keys, spec = shard
    tensors = FeatureCache.image_shard(backbone, proposals, keys, spec)
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


class CachedProposals(ProposalSource):
    """The boxes a regions cache holds for each image key, as a proposal source.

    For methods whose features change while they train (the fine-tuned scorers): their
    validation re-encodes each image live, on the proposals the cache was built with.
    """

    name = "cache"
    needs_image_key = True

    def __init__(self, cache: FeatureCache):
        super().__init__()
        self.cache = cache

    def __call__(self, image: Image.Image, image_key: str | None = None) -> Any:
        from .proposals import Proposals

        if image_key is None:
            raise CacheError("cached proposals are looked up by image key; pass image_key")
        e = self.cache.image(image_key, with_patches=False)
        return Proposals(e.boxes, e.scores)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.cache.root)}


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "FEATURE_VERSION",
    "KINDS",
    "CacheError",
    "CacheSpec",
    "CachedImage",
    "CachedProposals",
    "CachedText",
    "FeatureCache",
    "StaleCacheError",
    "cache_texts",
    "fingerprint",
    "normalize_text",
    "weights_sha256",
]
