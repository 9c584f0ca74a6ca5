"""What the methods read from CLIP: proposal-view features, dense patch tokens, text features.

Every method and the feature cache compute CLIP features through these functions, so a
method run live and a method trained from cached features see the same numbers, and no
method re-implements CLIP plumbing.

* **Region features** (proposal scorers): each proposal shown in isolation through the views
  of :mod:`clipground.backbone.views`, embedded by the image tower, plus the whole image; or
  pooled from one whole-image encoding (:func:`roi_embeddings`, the ``roi`` view); or the whole
  image with the proposal's mask through a region-aware backbone (:func:`alpha_embeddings`, the
  ``alpha`` view).
* **Dense features** (fusion regressor, locator): the image padded to a square
  (:mod:`clipground.backbone.geometry`), optionally encoded at a finer patch grid
  (:class:`DenseView`: ``tiles`` or ``input_size``), giving per-patch tokens and per-patch
  joint-space embeddings (the last layer's, or the MaskCLIP value path).
* **Text features**: pooled embeddings and token states of phrases.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError
from .clip import DENSE_EMBEDS, ClipBackbone, TextFeatures
from .geometry import InputGeometry, clip_square_input, crop_fraction, square_geometry
from .views import MASK_VIEW_KINDS, POOLED_VIEW_KINDS, blur_image, fgvp_view, iter_views

# --------------------------------------------------------------------------- region features


@dataclass(frozen=True)
class RoiView:
    """How the ``roi`` view pools box embeddings from one whole-image encoding.

    Attributes:
        size: side the padded square is encoded at, with interpolated position embeddings
            (0: the checkpoint's own input size); a larger side gives a finer patch grid.
        dense: which per-patch joint-space embeddings are pooled: ``value`` (the last block's
            value path, MaskCLIP) or ``final`` (the last layer's patch tokens).
    """

    size: int = 0
    dense: str = "value"

    def __post_init__(self) -> None:
        if int(self.size) < 0:
            raise ConfigError(f"roi_size must be >= 0 (0 = the checkpoint's own), got {self.size}")
        if self.dense not in DENSE_EMBEDS:
            raise ConfigError(f"roi_dense must be one of {', '.join(DENSE_EMBEDS)}, got {self.dense!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def box_cover(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(K, h, w)``: the area of each grid cell each box covers, for boxes in grid units.

    Boxes thinner than a cell still cover the cells they lie in (a minimum side of 1e-3).
    """
    h, w = grid
    b = boxes.float()
    x1, y1 = b[:, 0:1], b[:, 1:2]
    x2, y2 = torch.maximum(b[:, 2:3], x1 + 1e-3), torch.maximum(b[:, 3:4], y1 + 1e-3)
    xs, ys = torch.arange(w, dtype=torch.float32)[None], torch.arange(h, dtype=torch.float32)[None]
    cx = (torch.minimum(x2, xs + 1) - torch.maximum(x1, xs)).clamp(min=0)  # (K, w)
    cy = (torch.minimum(y2, ys + 1) - torch.maximum(y1, ys)).clamp(min=0)  # (K, h)
    return cy[:, :, None] * cx[:, None, :]


def pool_boxes(patch_embeds: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
    """``(K, D)`` normalized embeddings of boxes (normalized ``xyxy`` of the model input) pooled
    from ``(P, D)`` patch embeddings: each patch normalized, weighted by the area the box covers."""
    h, w = grid
    scale = boxes.new_tensor([w, h, w, h]).float()
    cover = box_cover(boxes.float() * scale, grid).reshape(len(boxes), h * w)
    cover = cover / cover.sum(1, keepdim=True).clamp(min=1e-9)
    pe = F.normalize(patch_embeds.float(), dim=-1)
    return F.normalize(cover @ pe, dim=-1)


def roi_embeddings(backbone: ClipBackbone, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor],
                   roi: RoiView = RoiView()) -> list[torch.Tensor]:
    """Per image, ``(K, D)`` box embeddings pooled from one encoding of the whole image.

    Each image is padded to a square (nothing cropped) and encoded once at ``roi.size``, so
    the cost is one image-tower pass per image whatever the number of boxes.
    """
    if not images:
        return []
    squares, geoms = zip(*(clip_square_input(backbone, im, whole=True) for im in images))
    f = backbone.encode_images(list(squares), size=roi.size or backbone.image_size, dense=roi.dense)
    out = []
    for i, (g, b) in enumerate(zip(geoms, boxes)):
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        out.append(pool_boxes(f.patch_embeds[i], f.grid, g.to_normalized(b)) if len(b)
                   else torch.zeros(0, backbone.embed_dim))
    return out


def proposal_masks(boxes: torch.Tensor, size: tuple[int, int], masks: torch.Tensor | None = None) -> torch.Tensor:
    """``(K, H, W)`` bool masks of the proposals: ``masks`` when given (segments), else each box's rectangle."""
    from .alpha import box_masks

    if masks is not None:
        m = torch.as_tensor(masks).bool()
        if m.shape != (len(boxes), int(size[1]), int(size[0])):
            raise ConfigError(f"expected {len(boxes)} masks of {size[1]}x{size[0]} pixels, got shape {tuple(m.shape)}")
        return m
    return box_masks(boxes, size)


def alpha_embeddings(backbone: ClipBackbone, images: Sequence[Image.Image], masks: Sequence[torch.Tensor],
                     batch_size: int = 64) -> list[torch.Tensor]:
    """Per image, ``(K, D)`` embeddings of the ``alpha`` view: the whole image with each of its ``(K, H, W)``
    masks as the region-aware backbone's mask channel (one forward per (image, mask) pair, batched
    across images; each image is preprocessed once)."""
    from .alpha import check_alpha_views

    check_alpha_views(("alpha",), backbone)
    counts = [int(len(m)) for m in masks]
    parts = [backbone.preprocess_regions(im, list(m)) for im, m in zip(images, masks) if len(m)]  # type: ignore[attr-defined]
    emb = torch.zeros(0, backbone.embed_dim)
    if parts:
        pix = torch.cat(parts)
        with torch.inference_mode():
            emb = torch.cat([backbone.forward_image(pix[i : i + batch_size]).embeds
                             for i in range(0, len(pix), batch_size)]).float().cpu()
    return list(torch.split(emb, counts))


def _iter_rendered(image: Image.Image, boxes: torch.Tensor, kinds: Sequence[str], masks: torch.Tensor | None
                   ) -> Iterator[Image.Image]:
    """The rendered views (``crop``, ``blur``, ``circle``, and ``fgvp`` from ``masks``) of every box,
    kind by kind, boxes in order, rendered one at a time (see :func:`~clipground.backbone.views.iter_views`)."""
    blurred = blur_image(image) if "fgvp" in kinds else None
    for kind in kinds:
        if kind == "fgvp":
            for m in masks:  # type: ignore[union-attr]
                yield fgvp_view(image, m, blurred)
        else:
            yield from iter_views(image, boxes, (kind,))


def view_embeddings_batch(backbone: ClipBackbone, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor],
                          views: Sequence[str], roi: RoiView = RoiView(),
                          masks: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """:func:`view_embeddings` of several images, their rendered views encoded in shared batches.

    ``masks``: per image, the ``(K, H, W)`` masks of the mask views (``alpha``, ``fgvp``); ``None``
    (or a ``None`` entry) uses each box's rectangle.
    """
    views = tuple(views)
    rendered_kinds = tuple(v for v in views if v not in POOLED_VIEW_KINDS and v != "alpha")
    d = backbone.embed_dim
    need_masks = any(v in MASK_VIEW_KINDS for v in views)
    mlist = [proposal_masks(b, im.size, None if masks is None else masks[i]) if need_masks else None
             for i, (im, b) in enumerate(zip(images, boxes))]
    # Views are rendered as the encoder takes them: one batch of images is held at a time.
    stream = (v for im, b, m in zip(images, boxes, mlist) if len(b) for v in _iter_rendered(im, b, rendered_kinds, m))
    emb = backbone.encode_image_embeds(stream) if rendered_kinds else torch.zeros(0, d)
    pooled = roi_embeddings(backbone, images, boxes, roi) if "roi" in views else None
    alpha = alpha_embeddings(backbone, images, mlist) if "alpha" in views else None  # type: ignore[arg-type]
    out, at = [], 0
    for i, b in enumerate(boxes):
        k = int(len(b))
        n = k * len(rendered_kinds)
        part = emb[at:at + n].reshape(len(rendered_kinds), k, d)
        at += n
        by_kind = dict(zip(rendered_kinds, part))
        if pooled is not None:
            by_kind["roi"] = pooled[i]
        if alpha is not None:
            by_kind["alpha"] = alpha[i]
        out.append(torch.stack([by_kind[v] for v in views]) if views else torch.zeros(0, k, d))
    return out


def view_embeddings(backbone: ClipBackbone, image: Image.Image, boxes: torch.Tensor,
                    views: Sequence[str], roi: RoiView = RoiView(), masks: torch.Tensor | None = None) -> torch.Tensor:
    """``(V, K, D)`` normalized embeddings of every view kind of every box (views only, batched).

    Rendered views (crop, blur, circle, fgvp) are encoded in batches; ``roi`` is pooled from one
    whole-image encoding (:func:`roi_embeddings`, options in ``roi``); ``alpha`` is the
    region-aware backbone on the whole image with each mask (``masks``, default the boxes).
    """
    return view_embeddings_batch(backbone, [image], [boxes], views, roi, None if masks is None else [masks])[0]


def region_features(backbone: ClipBackbone, image: Image.Image, boxes: torch.Tensor, views: Sequence[str],
                    patches: bool = False, roi: RoiView = RoiView()) -> dict[str, torch.Tensor]:
    """CLIP features of one image and its proposals: ``view_embeds (V, K, D)``, ``image_embed (D,)``
    and, with ``patches``, ``patch_embeds (P, D)``.

    The whole image and all rendered views go through one :meth:`ClipBackbone.encode_images`
    call per image, so the values do not depend on which other images are processed alongside
    (the feature cache stores exactly these). A ``roi`` view is pooled from one more encoding of
    the padded image (:func:`roi_embeddings`, options in ``roi``); the ``alpha`` view, of box
    masks, goes through one more call. ``views`` may be empty: only the whole image is encoded
    (what the fine-tuned scorers read from a cache).
    """
    views = tuple(views)
    rendered_kinds = tuple(v for v in views if v not in POOLED_VIEW_KINDS and v != "alpha")
    k = int(len(boxes))
    masks = proposal_masks(boxes, image.size) if any(v in MASK_VIEW_KINDS for v in views) else None
    rendered = list(_iter_rendered(image, boxes, rendered_kinds, masks)) if k else []
    f = backbone.encode_images([image] + rendered)
    d = f.embeds.shape[-1]
    by_kind = dict(zip(rendered_kinds, f.embeds[1:].reshape(len(rendered_kinds), k, d)))
    if "roi" in views:
        by_kind["roi"] = roi_embeddings(backbone, [image], [boxes], roi)[0].to(f.embeds.dtype) if k else f.embeds.new_zeros(0, d)
    if "alpha" in views:
        by_kind["alpha"] = alpha_embeddings(backbone, [image], [masks])[0].to(f.embeds.dtype)  # type: ignore[list-item]
    out = {"image_embed": f.embeds[0],
           "view_embeds": torch.stack([by_kind[v] for v in views]) if views else f.embeds.new_zeros(0, k, d)}
    if patches:
        out["patch_embeds"] = f.patch_embeds[0]
    return out


def _name(backbone: ClipBackbone | str) -> str:
    return backbone if isinstance(backbone, str) else backbone.name


def region_feature_key(backbone: ClipBackbone | str, views: Sequence[str], roi: RoiView = RoiView()) -> dict[str, Any]:
    """Identifies states holding :func:`region_features` (what a cached state is checked against)."""
    key: dict[str, Any] = {"kind": "regions", "views": list(views), "backbone": _name(backbone)}
    if "roi" in views:
        key["roi"] = roi.to_dict()
    return key


# --------------------------------------------------------------------------- dense features


@dataclass(frozen=True)
class DenseView:
    """How a dense method sees the image: the patch grid and which joint-space patch embeddings.

    Attributes:
        tiles: ``t > 1`` also encodes ``t x t`` tiles at the native resolution and re-assembles
            their patch tokens into one ``t``-times finer grid.
        input_size: ``S > 0`` encodes the whole square at ``S x S`` pixels with interpolated
            position embeddings instead (0: the checkpoint's own size).
        dense: ``final`` (last layer's patch tokens, projected) or ``value`` (MaskCLIP value path).
    """

    tiles: int = 1
    input_size: int = 0
    dense: str = "final"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiles", max(int(self.tiles), 1))
        object.__setattr__(self, "input_size", int(self.input_size))
        if self.input_size < 0:
            raise ConfigError(f"input_size must be >= 0 (0 = the checkpoint's own), got {self.input_size}")
        if self.input_size and self.tiles > 1:
            raise ConfigError("use either tiles > 1 or input_size, not both")
        if self.dense not in DENSE_EMBEDS:
            raise ConfigError(f"dense must be one of {', '.join(DENSE_EMBEDS)}, got {self.dense!r}")

    @classmethod
    def of(cls, cfg: Any) -> "DenseView":
        """The view named by a method config's ``tiles``, ``input_size`` and ``dense`` fields."""
        return cls(cfg.tiles, cfg.input_size, cfg.dense)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dense_feature_key(backbone: ClipBackbone | str, view: DenseView, mirrors: Sequence[str] = ()) -> dict[str, Any]:
    """Identifies states holding :func:`dense_features` of an image (and of its ``mirrors``)."""
    return {"kind": "dense", **view.to_dict(), "mirrors": list(mirrors), "backbone": _name(backbone)}


def grid_shape(num_patches: int) -> tuple[int, int]:
    """``(h, w)`` of a row-major patch grid of ``num_patches`` cells (square when it can be)."""
    side = int(round(num_patches ** 0.5))
    return (side, side) if side * side == num_patches else (1, num_patches)


def patch_grid(backbone: ClipBackbone, view: DenseView) -> tuple[int, int]:
    """``(h, w)`` of the patch grid :func:`dense_features` gives, from the backbone's config."""
    vc = backbone.model.config.vision_config
    if view.input_size:
        return view.input_size // int(vc.patch_size), view.input_size // int(vc.patch_size)
    side = int(vc.image_size) // int(vc.patch_size) * view.tiles
    return side, side


def dense_geometry(backbone: ClipBackbone, size: tuple[int, int], view: DenseView) -> InputGeometry:
    """The :class:`InputGeometry` of an image of ``size`` under ``view`` (no pixels needed)."""
    fraction = 1.0 if view.input_size else crop_fraction(backbone.processor.image_processor)
    return square_geometry(int(size[0]), int(size[1]), fraction)


def square_views(backbone: ClipBackbone, image: Image.Image, view: DenseView
                 ) -> tuple[list[Image.Image], InputGeometry]:
    """The padded square and, with ``view.tiles > 1``, its ``tiles x tiles`` tiles (row-major).

    Each tile is cut so that what the processor keeps after its centre crop is exactly the
    tile (enlarged by ``1 / crop_fraction`` around the tile centre, padded with the mean
    colour), so the tiles' patch grids abut into one ``tiles``-times finer grid. With
    ``input_size`` the square is resized whole (no crop), so its geometry keeps all of it.
    """
    tiles = view.tiles
    sq, geom = clip_square_input(backbone, image, whole=bool(view.input_size))
    if tiles <= 1 or view.input_size:
        return [sq], geom
    side = sq.size[0]
    frac = crop_fraction(backbone.processor.image_processor)
    half = side / tiles / 2 / frac
    fill = tuple(int(round(255 * c)) for c in (getattr(backbone.processor.image_processor, "image_mean", None)
                                                 or (0.5, 0.5, 0.5)))
    m = int(half) + 2
    canvas = Image.new("RGB", (side + 2 * m, side + 2 * m), fill)
    canvas.paste(sq, (m, m))
    out = [sq]
    for i in range(tiles):
        for j in range(tiles):
            cx, cy = (j + 0.5) * side / tiles + m, (i + 0.5) * side / tiles + m
            out.append(canvas.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half))))
    return out, geom


def dense_features(backbone: ClipBackbone, images: Sequence[Image.Image], view: DenseView) -> dict[str, Any]:
    """Frozen CLIP features of padded-square images for the dense methods (one pass for all views).

    Returns ``{"img_embed": (N, D), "patches": (N, P, Dv), "patch_embeds": (N, P, D),
    "grid": (H, W), "geometry": [InputGeometry] * N}``; ``img_embed`` is always the whole
    square's.
    """
    crops, geoms = [], []
    for im in images:
        v, g = square_views(backbone, im, view)
        crops += v
        geoms.append(g)
    f = backbone.encode_images(crops, size=view.input_size or None, dense=view.dense)
    n, per = len(images), len(crops) // max(len(images), 1)
    gh, gw = f.grid
    tiles = view.tiles

    def assemble(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(n, per, *x.shape[1:])
        if tiles <= 1 or view.input_size:
            return x[:, 0]
        t = x[:, 1:].reshape(n, tiles, tiles, gh, gw, -1).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(n, tiles * gh * tiles * gw, -1)

    k = 1 if view.input_size else tiles
    return {"img_embed": f.embeds.reshape(n, per, -1)[:, 0], "patches": assemble(f.patch_tokens),
            "patch_embeds": assemble(f.patch_embeds), "grid": (gh * k, gw * k), "geometry": geoms}


def select_image(f: dict[str, Any], i: int) -> dict[str, Any]:
    """Image ``i`` of a batch from :func:`dense_features` (the shared ``grid`` kept as is)."""
    return {k: v if k == "grid" else v[i] for k, v in f.items()}


def patch_text_similarity(patch_embeds: torch.Tensor, txt_embed: torch.Tensor) -> torch.Tensor:
    """Per-patch CLIP similarity to the phrase, raw and standardized over the image: ``(B, P, 2)``.

    The cosine of each projected patch with the phrase embedding is CLIP's own dense
    phrase-conditioned signal; handing it to a dense head as a feature lets training start
    from "where CLIP thinks the phrase is" instead of discovering cross-modal matching alone.
    """
    sim = torch.einsum("bpd,bd->bp", F.normalize(patch_embeds.float(), dim=-1), F.normalize(txt_embed.float(), dim=-1))
    z = (sim - sim.mean(1, keepdim=True)) / (sim.std(1, keepdim=True) + 1e-4)
    return torch.stack([sim, z], -1)


# --------------------------------------------------------------------------- text features


def encode_phrases(backbone: ClipBackbone, phrases: Sequence[str], prompt: str = "{}") -> TextFeatures:
    """Text features (pooled embedding, token states, mask, word embeddings) of the prompted phrases."""
    return backbone.encode_texts([prompt.format(p) for p in phrases])


def text_features(backbone: ClipBackbone, texts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pooled text embeddings ``(N, D)`` and each text's token states ``(L_i, Dt)`` (padding removed)."""
    if not texts:
        return torch.zeros(0, backbone.embed_dim), []
    f = backbone.encode_texts(list(texts))
    lengths = f.mask.sum(1).tolist()
    return f.embeds, [f.tokens[i, : int(n)] for i, n in enumerate(lengths)]


def too_long(backbone: ClipBackbone, texts: Sequence[str]) -> list[bool]:
    """Which texts exceed the backbone's text context (those cannot be encoded)."""
    if not texts:
        return []
    ids = backbone.processor.tokenizer(list(texts))["input_ids"]
    return [len(x) > backbone.max_text_tokens for x in ids]


__all__ = [
    "DenseView",
    "RoiView",
    "alpha_embeddings",
    "box_cover",
    "pool_boxes",
    "proposal_masks",
    "roi_embeddings",
    "view_embeddings_batch",
    "dense_feature_key",
    "dense_features",
    "dense_geometry",
    "encode_phrases",
    "grid_shape",
    "patch_grid",
    "patch_text_similarity",
    "region_feature_key",
    "region_features",
    "select_image",
    "square_views",
    "text_features",
    "too_long",
    "view_embeddings",
]
