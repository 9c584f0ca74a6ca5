"""Proposal + feature cache: run the proposal source and the frozen CLIP once per image.

Training a head on frozen CLIP features should not pay for CLIP (or selective search) at
every step. :meth:`FeatureCache.build` runs both once per image and stores, per image,
the proposal boxes and objectness, the CLIP embedding of every proposal view (``crop``,
``blur``, ``circle``; see :mod:`clipground.imageops`), the pooled whole-image embedding
and optionally the whole image's patch embeddings; and, per distinct expression, the
pooled text embedding and the text token states.

Layout of a cache directory::

    index.json                 format, fingerprint, image/text lists, finished shards
    images-00000.safetensors   boxes (N,4), scores (N,), offsets (n+1,), views (N,V,D),
                               image_embeds (n,D), sizes (n,2) [, patches (n,P,D)]
    texts-00000.safetensors    embeds (n,D), tokens (T,Dt), offsets (n+1,)

Shards are safetensors files, read lazily through ``safe_open`` (memory-mapped; a slice
reads only its own bytes), so a cache larger than RAM trains fine.

**Never stale.** The index stores a sha256 fingerprint of everything the features depend
on: the backbone (name, config and a hash of its weights), the proposal source's config
(and the mtime/size of a proposal file it reads), the preprocessing (image processor and
tokenizer config, view kinds, patch flag, :data:`FEATURE_VERSION`) and the data (every
image path with its size and mtime, and the sorted expressions). Building into a directory
that holds a cache with another fingerprint raises :class:`StaleCacheError` naming the
part that differs, unless ``rebuild=True`` (then the old cache is deleted and rebuilt).
:meth:`FeatureCache.open` with an expected fingerprint raises the same error.

**Resumable.** Images are processed in a fixed order (sorted paths) in shards of
``shard_size`` images. Each shard is written to a temp file and renamed into place, then
the index (which lists finished shards) is rewritten atomically. A build killed at any
moment resumes at the first unfinished shard and, because each image is encoded on its
own, ends with files byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .backbone import ClipBackbone
from .errors import ClipgroundError
from .imageops import VIEW_KINDS, render_views

CACHE_FORMAT = "clipground-feature-cache"
CACHE_VERSION = 1
#: Bumped whenever the way features are computed changes (invalidates old caches).
FEATURE_VERSION = 1
INDEX_FILE = "index.json"
_TMP = ".tmp-"


class CacheError(ClipgroundError):
    """A feature cache is missing, incomplete, corrupt or asked for something it lacks."""


class StaleCacheError(CacheError):
    """A cache directory holds features computed from different inputs."""


# --------------------------------------------------------------------------- features


def image_features(backbone: ClipBackbone, image: Image.Image, boxes: torch.Tensor, views: Sequence[str],
                   patches: bool = False) -> dict[str, torch.Tensor]:
    """CLIP features of one image and its proposals, exactly as cached and as methods use them.

    Returns ``view_embeds (V, K, D)`` (normalized, one row per view kind and proposal),
    ``image_embed (D,)`` (the whole image) and, with ``patches``, ``patch_embeds (P, D)``.
    The whole image and all views go through one :meth:`ClipBackbone.encode_images` call
    per image, so the values do not depend on which other images are processed alongside.
    """
    views = tuple(views)
    k = int(len(boxes))
    rendered = render_views(image, boxes, views) if k else {v: [] for v in views}
    imgs = [image] + [im for v in views for im in rendered[v]]
    f = backbone.encode_images(imgs)
    out = {
        "image_embed": f.embeds[0],
        "view_embeds": f.embeds[1:].reshape(len(views), k, f.embeds.shape[-1]),
    }
    if patches:
        out["patch_embeds"] = f.patch_embeds[0]
    return out


def text_features(backbone: ClipBackbone, texts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pooled text embeddings ``(N, D)`` and each text's token states ``(L_i, Dt)`` (padding removed)."""
    if not texts:
        return torch.zeros(0, backbone.embed_dim), []
    f = backbone.encode_texts(list(texts))
    lengths = f.mask.sum(1).tolist()
    return f.embeds, [f.tokens[i, : int(n)] for i, n in enumerate(lengths)]


def normalize_text(text: str) -> str:
    """The key an expression is cached under (whitespace collapsed, like ``check_phrase``)."""
    return " ".join(str(text).split())


def cache_texts(expressions: Iterable[str], noun_phrases: bool = True) -> list[str]:
    """The sorted distinct texts a cache stores: the expressions and, optionally, their noun phrases."""
    out = {normalize_text(e) for e in expressions}
    if noun_phrases:
        from .relations import parse

        for e in list(out):
            p = parse(e)
            out.update(normalize_text(t) for t in (p.subject, p.object) if t)
    return sorted(t for t in out if t)


def too_long(backbone: ClipBackbone, texts: Sequence[str]) -> list[bool]:
    """Which texts exceed the backbone's text context (those cannot be encoded)."""
    if not texts:
        return []
    ids = backbone.processor.tokenizer(list(texts))["input_ids"]
    return [len(x) > backbone.max_text_tokens for x in ids]


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


def preprocessing_identity(backbone: ClipBackbone, views: Sequence[str], patches: bool) -> dict[str, Any]:
    """Image-processor and tokenizer settings, view kinds, patch flag and feature version."""
    ip = backbone.processor.image_processor.to_dict()
    tok = backbone.processor.tokenizer
    return {
        "image_processor": {k: v for k, v in ip.items() if k not in ("processor_class",)},
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "max_tokens": backbone.max_text_tokens},
        "views": list(views),
        "patches": bool(patches),
        "feature_version": FEATURE_VERSION,
    }


def data_identity(images: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """Hash of every image's path, size and mtime, and of the sorted expressions."""
    h = hashlib.sha256()
    for p in images:
        try:
            st = os.stat(p)
        except OSError as e:
            raise CacheError(f"cannot read image {p}: {e.strerror}") from None
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"images": len(images), "images_sha256": h.hexdigest(), "texts": len(texts), "texts_sha256": _sha(list(texts))}


@dataclass
class CacheSpec:
    """What to cache and how to lay it out.

    Attributes:
        views: proposal view kinds to embed (``crop``, ``blur``, ``circle``).
        patches: also store the whole image's patch embeddings ``(P, D)``.
        shard_size: images per image shard (the unit of resumption).
        text_shard_size: expressions per text shard.
        noun_phrases: also cache the subject and object noun phrases of every expression
            (parsed with :func:`clipground.relations.parse`), which some methods compare
            with each proposal.
    """

    views: tuple[str, ...] = ("crop", "blur")
    patches: bool = False
    shard_size: int = 64
    text_shard_size: int = 2048
    noun_phrases: bool = True

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        bad = set(self.views) - set(VIEW_KINDS)
        if bad or not self.views or len(set(self.views)) != len(self.views):
            raise CacheError(f"views must be distinct kinds from {VIEW_KINDS}, got {list(self.views)}")
        if self.shard_size < 1 or self.text_shard_size < 1:
            raise CacheError("shard sizes must be >= 1")


def fingerprint(images: Sequence[str], texts: Sequence[str], backbone: ClipBackbone, proposals: Any,
                spec: CacheSpec) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``(sha256, per-component sha256, description)`` of a cache's inputs."""
    parts = {
        "backbone": backbone_identity(backbone),
        "proposals": proposals_identity(proposals),
        "preprocessing": preprocessing_identity(backbone, spec.views, spec.patches),
        "data": data_identity(images, texts),
    }
    comps = {k: _sha(v) for k, v in parts.items()}
    return _sha({"format": CACHE_FORMAT, "version": CACHE_VERSION, **comps}), comps, parts


# --------------------------------------------------------------------------- atomic IO


def _file_mode() -> int:
    """Permissions of a normally created file (mkstemp's are 0600; caches are shared)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP + path.name)
    try:
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP + path.name)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_index(root: Path, index: dict[str, Any]) -> None:
    _atomic_bytes(root / INDEX_FILE, (json.dumps(index, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8"))


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
                              f"(this clipground reads {CACHE_VERSION}); rebuild it")
    return idx


def _describe_mismatch(old: dict[str, Any], comps: dict[str, str]) -> str:
    diff = [k for k, v in comps.items() if old.get("components", {}).get(k) != v]
    return ", ".join(diff) if diff else "fingerprint"


# --------------------------------------------------------------------------- reading


@dataclass
class CachedImage:
    """One image's cached entry: boxes ``(K,4)``, objectness ``(K,)``, ``view_embeds (V,K,D)``,
    ``image_embed (D,)``, ``size (w, h)`` and optional ``patch_embeds (P,D)``."""

    path: str
    boxes: torch.Tensor
    scores: torch.Tensor
    view_embeds: torch.Tensor
    image_embed: torch.Tensor
    size: tuple[int, int]
    patch_embeds: torch.Tensor | None = None

    def features(self) -> dict[str, torch.Tensor]:
        """The ``ImageState.features`` dict a method's ``encode_image`` would produce."""
        out = {"view_embeds": self.view_embeds, "image_embed": self.image_embed}
        if self.patch_embeds is not None:
            out["patch_embeds"] = self.patch_embeds
        return out


@dataclass
class CachedText:
    """One expression's pooled embedding ``(D,)`` and token states ``(L, Dt)``."""

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
        """Expressions too long for the backbone's text context (not cached)."""
        return list(self.index.get("skipped_texts", []))

    def __len__(self) -> int:
        return len(self.index["images"])

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.root)!r}, images={len(self)}, texts={len(self.index['texts'])}, "
                f"views={self.views}, complete={self.complete})")

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
    ) -> "FeatureCache":
        """Build, resume or reuse the cache of ``records`` in ``root``.

        Args:
            root: cache directory (created if missing).
            records: :class:`~clipground.data.records.GroundingRecord` s (only ``image`` and
                ``expression`` are used).
            backbone: the frozen CLIP.
            proposals: a :class:`~clipground.proposals.ProposalSource`.
            spec: views, patch flag and shard sizes (shard sizes of a resumed build are
                taken from its index).
            rebuild: delete a cache with another fingerprint instead of raising
                :class:`StaleCacheError`.
            callback: ``callback(kind, done, total)`` after each image (``kind="images"``)
                and each text shard (``"texts"``); an exception raised there aborts the build
                (the finished shards stay; tests use it to simulate a kill).
        """
        spec = spec or CacheSpec()
        root = Path(root)
        records = list(records)
        images = sorted({str(r.image) for r in records})
        texts_all = cache_texts([r.expression for r in records], spec.noun_phrases)
        fp, comps, parts = fingerprint(images, texts_all, backbone, proposals, spec)
        root.mkdir(parents=True, exist_ok=True)
        idx = _read_index(root)
        if idx is not None and idx["fingerprint"] != fp:
            what = _describe_mismatch(idx, comps)
            if not rebuild:
                raise StaleCacheError(f"{root} holds a feature cache built from different inputs ({what} differ); "
                                      f"pass --rebuild to overwrite it, or choose another directory")
            cls._wipe(root)
            idx = None
        if idx is not None and idx.get("complete"):
            return cls(root, idx)
        for p in root.glob(_TMP + "*"):  # half-written files of a killed build
            p.unlink(missing_ok=True)
        if idx is None:
            long = too_long(backbone, texts_all)
            idx = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "fingerprint": fp,
                "components": comps,
                "inputs": parts,
                "spec": asdict(spec) | {"views": list(spec.views)},
                "embed_dim": backbone.embed_dim,
                "text_width": backbone.text_width,
                "images": images,
                "texts": [t for t, bad in zip(texts_all, long) if not bad],
                "skipped_texts": [t for t, bad in zip(texts_all, long) if bad],
                "image_shards": [],
                "text_shards": [],
                "complete": False,
            }
            _write_index(root, idx)
        cls._build_images(root, idx, backbone, proposals, progress, callback)
        cls._build_texts(root, idx, backbone, progress, callback)
        idx["complete"] = True
        _write_index(root, idx)
        return cls(root, idx)

    @staticmethod
    def _wipe(root: Path) -> None:
        for p in list(root.glob("images-*.safetensors")) + list(root.glob("texts-*.safetensors")) + list(root.glob(_TMP + "*")):
            p.unlink(missing_ok=True)
        (root / INDEX_FILE).unlink(missing_ok=True)

    @staticmethod
    def _build_images(root: Path, idx: dict[str, Any], backbone: ClipBackbone, proposals: Any, progress: bool,
                      callback: Callable[[str, int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        from .images import load_image

        images = idx["images"]
        views = tuple(idx["spec"]["views"])
        patches = bool(idx["spec"]["patches"])
        size = int(idx["spec"]["shard_size"])
        start = len(idx["image_shards"]) * size
        bar = tqdm(total=len(images), initial=start, desc="cache images", disable=not progress, dynamic_ncols=True)
        for s0 in range(start, len(images), size):
            chunk = images[s0 : s0 + size]
            boxes, scores, views_l, embeds, sizes, patch_l, offsets = [], [], [], [], [], [], [0]
            for j, path in enumerate(chunk):
                img = load_image(path)
                props = proposals(img, path) if proposals is not None else None
                b = props.boxes if props is not None else torch.zeros(0, 4)
                sc = props.scores if props is not None else torch.zeros(0)
                f = image_features(backbone, img, b, views, patches)
                boxes.append(b.float())
                scores.append(sc.float())
                views_l.append(f["view_embeds"].transpose(0, 1))  # (K, V, D)
                embeds.append(f["image_embed"])
                sizes.append(torch.tensor(img.size, dtype=torch.int64))
                if patches:
                    patch_l.append(f["patch_embeds"])
                offsets.append(offsets[-1] + len(b))
                bar.update(1)
                if callback is not None:
                    callback("images", s0 + j + 1, len(images))
            tensors = {
                "boxes": torch.cat(boxes).reshape(-1, 4),
                "scores": torch.cat(scores).reshape(-1),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "views": torch.cat(views_l).reshape(-1, len(views), backbone.embed_dim),
                "image_embeds": torch.stack(embeds),
                "sizes": torch.stack(sizes),
            }
            if patches:
                tensors["patches"] = torch.stack(patch_l)
            name = f"images-{len(idx['image_shards']):05d}.safetensors"
            _atomic_safetensors(root / name, tensors)
            idx["image_shards"].append({"file": name, "start": s0, "count": len(chunk)})
            _write_index(root, idx)
        bar.close()

    @staticmethod
    def _build_texts(root: Path, idx: dict[str, Any], backbone: ClipBackbone, progress: bool,
                     callback: Callable[[str, int, int], None] | None) -> None:
        texts = idx["texts"]
        size = int(idx["spec"]["text_shard_size"])
        start = len(idx["text_shards"]) * size
        for s0 in range(start, len(texts), size):
            chunk = texts[s0 : s0 + size]
            emb, toks = text_features(backbone, chunk)
            offsets = [0]
            for t in toks:
                offsets.append(offsets[-1] + len(t))
            tensors = {
                "embeds": emb,
                "tokens": torch.cat(toks) if toks else torch.zeros(0, backbone.text_width),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
            }
            name = f"texts-{len(idx['text_shards']):05d}.safetensors"
            _atomic_safetensors(root / name, tensors)
            idx["text_shards"].append({"file": name, "start": s0, "count": len(chunk)})
            _write_index(root, idx)
            if callback is not None:
                callback("texts", s0 + len(chunk), len(texts))

    # ----------------------------------------------------------------- lookups
    def _handle(self, name: str) -> Any:
        h = self._handles.get(name)
        if h is None:
            path = self.root / name
            if not path.is_file():
                raise CacheError(f"cache shard {path} is missing; rebuild the cache")
            h = safe_open(str(path), framework="pt")
            self._handles[name] = h
        return h

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle (DataLoader workers)
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def image_index(self, path: str) -> int:
        """Position of an image path in the cache (raises :class:`CacheError` if absent)."""
        i = self._image_pos.get(str(path))
        if i is None:
            raise CacheError(f"image {path} is not in the feature cache at {self.root}")
        return i

    def has_image(self, path: str) -> bool:
        return str(path) in self._image_pos

    def has_text(self, text: str) -> bool:
        return normalize_text(text) in self._text_pos

    def _locate(self, shards: list[dict[str, Any]], i: int, what: str) -> tuple[dict[str, Any], int]:
        size = int(self.index["spec"]["shard_size" if what == "image" else "text_shard_size"])
        s = i // size
        if s >= len(shards):
            raise CacheError(f"{what} {i} of the cache at {self.root} is not built yet; resume the build")
        return shards[s], i - shards[s]["start"]

    def image(self, key: int | str, with_patches: bool = True) -> CachedImage:
        """Cached entry of image ``key`` (index or path); reads only its own slices."""
        i = key if isinstance(key, int) else self.image_index(key)
        shard, j = self._locate(self.index["image_shards"], i, "image")
        h = self._handle(shard["file"])
        off = h.get_slice("offsets")[j : j + 2].tolist()
        a, b = int(off[0]), int(off[1])
        patches = None
        if with_patches and self.index["spec"]["patches"]:
            patches = h.get_slice("patches")[j : j + 1][0]
        size = h.get_slice("sizes")[j : j + 1][0].tolist()
        return CachedImage(
            path=self.index["images"][i],
            boxes=h.get_slice("boxes")[a:b],
            scores=h.get_slice("scores")[a:b],
            view_embeds=h.get_slice("views")[a:b].transpose(0, 1).contiguous(),
            image_embed=h.get_slice("image_embeds")[j : j + 1][0],
            size=(int(size[0]), int(size[1])),
            patch_embeds=patches,
        )

    def boxes(self, key: int | str) -> torch.Tensor:
        """Only the proposal boxes of an image ``(K, 4)``."""
        i = key if isinstance(key, int) else self.image_index(key)
        shard, j = self._locate(self.index["image_shards"], i, "image")
        h = self._handle(shard["file"])
        off = h.get_slice("offsets")[j : j + 2].tolist()
        return h.get_slice("boxes")[int(off[0]) : int(off[1])]

    def text(self, text: str) -> CachedText:
        """Cached embedding and token states of an expression."""
        key = normalize_text(text)
        i = self._text_pos.get(key)
        if i is None:
            why = " (too long for the backbone's text context)" if key in set(self.skipped_texts) else ""
            raise CacheError(f"expression {key[:60]!r} is not in the feature cache at {self.root}{why}")
        shard, j = self._locate(self.index["text_shards"], i, "text")
        h = self._handle(shard["file"])
        off = h.get_slice("offsets")[j : j + 2].tolist()
        return CachedText(key, h.get_slice("embeds")[j : j + 1][0], h.get_slice("tokens")[int(off[0]) : int(off[1])])

    def image_state(self, key: int | str, load_pixels: bool = False):
        """An :class:`~clipground.methods.ImageState` filled from the cache (proposals and features).

        Without ``load_pixels`` the image is a blank placeholder of the right size: enough
        for every method's :meth:`rank` on frozen features, with no decoding cost.
        """
        from .methods.base import ImageState
        from .proposals import Proposals

        e = self.image(key)
        if load_pixels:
            from .images import load_image

            img = load_image(e.path)
        else:
            img = Image.new("RGB", e.size)
        return ImageState(image=img, key=e.path, proposals=Proposals(e.boxes, e.scores), features=e.features())

    def summary(self) -> dict[str, Any]:
        """Counts and provenance for the user."""
        done = sum(s["count"] for s in self.index["image_shards"])
        return {
            "root": str(self.root),
            "fingerprint": self.fingerprint,
            "complete": self.complete,
            "images": len(self),
            "images_done": done,
            "texts": len(self.index["texts"]),
            "skipped_texts": len(self.skipped_texts),
            "views": list(self.views),
            "patches": bool(self.index["spec"]["patches"]),
            "backbone": self.index["inputs"]["backbone"]["name"],
            "proposals": self.index["inputs"]["proposals"].get("name"),
            "bytes": sum(p.stat().st_size for p in self.root.glob("*.safetensors")),
        }


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "FEATURE_VERSION",
    "CacheError",
    "CacheSpec",
    "CachedImage",
    "CachedText",
    "FeatureCache",
    "StaleCacheError",
    "cache_texts",
    "fingerprint",
    "image_features",
    "normalize_text",
    "text_features",
    "too_long",
    "weights_sha256",
]
