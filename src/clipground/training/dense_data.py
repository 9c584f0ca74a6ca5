"""Training data of the dense recipes (fusion regressor, locator): cached patch tokens as batches.

The backbone is frozen, so its outputs for a training image or phrase never change: the
recipe builds a ``dense`` :class:`~clipground.cache.FeatureCache` of the training split once
(images, their mirrored copies, and the prompted phrases), and :class:`DenseDataset` serves
batches from it with no backbone pass at all. Targets are the records' boxes mapped into the
model's input square with the same :class:`~clipground.backbone.geometry.InputGeometry` the
method uses at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backbone import ClipBackbone
from ..backbone.features import DenseView, dense_geometry
from ..cache import CacheSpec, FeatureCache, normalize_text
from ..data.records import GroundingRecord
from ..errors import ConfigError
from ..mirror import add_flips
from .recipes import CachedRecipeConfig, DataConfig, TrainArgs, build_split_caches, load_split, split_paths


@dataclass
class DenseData(DataConfig):
    """Records of a dense recipe. ``flips``: training-set mirror augmentation, any of ``h``,
    ``v``, ``hv`` (:func:`clipground.mirror.add_flips`)."""

    flips: list[str] = field(default_factory=list)


@dataclass
class DenseBatch:
    """A training batch (model-input coordinates for targets).

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

    def to(self, device: torch.device | str, **kwargs: Any) -> "DenseBatch":
        """Move every tensor (accelerate calls this to place batches on the device)."""
        return DenseBatch(**{k: (v.to(device, **kwargs) if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})


class DenseDataset(torch.utils.data.Dataset):
    """Records as indices into a dense cache; :meth:`collate` builds a :class:`DenseBatch`.

    Args:
        cache: a complete ``dense`` feature cache holding every record's image and prompted phrase.
        records: the records (a record whose phrase is too long for the text tower must be
            left out before, see :func:`encodable`).
        backbone: the frozen backbone (input geometry; word embeddings with ``words``).
        view: the model's :class:`~clipground.backbone.features.DenseView`; a cache built with
            another one is refused.
        prompt: the model's prompt template (the cache must have been built with it).
        words: also serve each phrase token's input word embedding (``txt_words``).
        masks: optional per-record target masks (``(H, W)`` tensors in model-input coordinates,
            or ``None`` entries).
    """

    def __init__(self, cache: FeatureCache, records: Sequence[GroundingRecord], backbone: ClipBackbone,
                 view: DenseView = DenseView(), prompt: str = "{}", words: bool = False,
                 masks: Sequence[torch.Tensor | None] | None = None):
        spec = cache.spec
        if spec.kind != "dense" or spec.view != view or spec.prompt != prompt:
            have = spec.feature_options() | {"prompt": spec.prompt}
            raise ConfigError(f"feature cache {cache.root} holds {have} but the model reads "
                              f"{{'kind': 'dense', **{view.to_dict()}, 'prompt': {prompt!r}}}; rebuild it for this model")
        self.cache = cache
        arrays = cache.dense_arrays()
        self.img_embed, self.patches, self.patch_embeds = arrays["img_embed"], arrays["patches"], arrays["patch_embeds"]
        self.sizes = arrays["sizes"]
        self.txt_embed, self.txt_tokens, self.txt_len = cache.text_arrays()
        self.txt_words = backbone.word_embeddings(cache.texts, self.txt_tokens.shape[1]).half() if words else None
        self.img = torch.tensor([cache.image_index(r.image) for r in records], dtype=torch.long)
        self.txt = torch.tensor([cache.text_index(prompt.format(r.expression)) for r in records], dtype=torch.long)
        self.pixel_boxes = torch.tensor([r.box for r in records], dtype=torch.float32).reshape(-1, 4)
        geoms = [dense_geometry(backbone, (int(w), int(h)), view) for w, h in self.sizes.tolist()]
        scale = torch.tensor([g.scale_x for g in geoms], dtype=torch.float32)
        offset = torch.tensor([g.offset_x for g in geoms], dtype=torch.float32)
        self.scale, self.offset = scale[self.img], offset[self.img]
        self.boxes = (self.pixel_boxes - self.offset[:, None]) / self.scale[:, None]
        self.masks = list(masks) if masks is not None else None

    def __len__(self) -> int:
        return len(self.img)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> DenseBatch:
        """Gather cached features for dataset indices ``idx``."""
        ix = torch.tensor(idx, dtype=torch.long)
        ii, tt = self.img[ix], self.txt[ix]
        lens = self.txt_len[tt]
        width = int(lens.max())
        masks = None
        if self.masks is not None and all(self.masks[i] is not None for i in idx):
            masks = torch.stack([self.masks[i] for i in idx]).float()
        return DenseBatch(
            img_embed=self.img_embed[ii].float(), patches=self.patches[ii].float(),
            patch_embeds=self.patch_embeds[ii].float(), txt_embed=self.txt_embed[tt].float(),
            txt_tokens=self.txt_tokens[tt, :width].float(), txt_mask=torch.arange(width)[None] < lens[:, None],
            boxes=self.boxes[ix], pixel_boxes=self.pixel_boxes[ix], scale=self.scale[ix], offset=self.offset[ix],
            sizes=self.sizes[ii], masks=masks,
            txt_words=None if self.txt_words is None else self.txt_words[tt, :width].float(),
        )


def encodable(records: Sequence[GroundingRecord], cache: FeatureCache, prompt: str) -> list[GroundingRecord]:
    """The records whose prompted phrase the cache holds (too-long phrases are reported and left out)."""
    keep = [r for r in records if cache.has_text(normalize_text(prompt.format(r.expression)))]
    if len(keep) < len(records):
        print(f"left out {len(records) - len(keep)} training records whose phrase is too long for the text "
              f"encoder", flush=True)
    return keep


def prepare_dense(args: TrainArgs, cfg: CachedRecipeConfig, backbone: ClipBackbone
                  ) -> tuple[list[GroundingRecord], list[GroundingRecord], FeatureCache, FeatureCache | None]:
    """Load train (+ mirrored copies) and val records and build (or reuse) their dense caches.

    Both caches live under ``--cache`` (default ``OUT/cache``): ``train/`` and ``val/``. The
    validation cache serves the one evaluator image states, so validation costs no backbone
    pass for images either.
    """
    data: DenseData = cfg.data  # type: ignore[assignment]
    train_path, val_path = split_paths(args)
    train = add_flips(load_split(train_path, args.images, data.limit, cfg.train.seed, "training"), data.flips)
    val = load_split(val_path, args.images, data.val_limit, cfg.train.seed, "validation") if val_path else []
    view = DenseView.of(cfg.model)
    prompt = cfg.model.prompt
    spec = CacheSpec.dense_of(view, prompt=prompt, noun_phrases=False, shard_size=cfg.cache.shard_size)
    caches = build_split_caches(args, cfg, backbone, spec, {"train": train, "val": val})
    if caches["train"] is None:
        raise ConfigError("no training records")
    return encodable(train, caches["train"], prompt), val, caches["train"], caches["val"]


__all__ = ["DenseBatch", "DenseData", "DenseDataset", "encodable", "prepare_dense"]
