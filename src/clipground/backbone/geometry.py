"""Where a model's input square sits in the original image: the geometry every dense method needs.

:class:`InputGeometry` is an explicit, invertible map between the normalized coordinates of
what a model *sees* (``[0, 1]^2`` of its input square) and pixels of the original image.
:func:`pad_to_square` pads the image on the right/bottom with the checkpoint's mean colour,
so the processor's "resize shortest edge + centre crop" becomes a plain resize of the whole
image (nothing is cropped away); a checkpoint whose crop is smaller than its resize (e.g.
resize 256, crop 224) is handled by the crop fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from .clip import ClipBackbone


@dataclass(frozen=True)
class InputGeometry:
    """Affine map from normalized model-input coordinates to original-image pixels.

    ``x_pixel = u * scale_x + offset_x`` and ``y_pixel = v * scale_y + offset_y`` for
    ``(u, v)`` in ``[0, 1]^2`` of the model's input; ``width``/``height`` are the original
    image size (boxes mapped back are clipped to it).
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    def to_pixels(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Normalized ``xyxy`` boxes ``(..., 4)`` -> original-image pixel ``xyxy``."""
        s = boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = boxes.new_tensor([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        out = boxes * s + o
        if clip:
            lim = boxes.new_tensor([self.width, self.height, self.width, self.height])
            out = torch.minimum(out.clamp(min=0), lim)
        return out

    def to_normalized(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-image pixel ``xyxy`` boxes -> normalized model-input ``xyxy``."""
        s = boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = boxes.new_tensor([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        return (boxes - o) / s

    def grid_to_image(self, grid: torch.Tensor) -> torch.Tensor:
        """Resample ``(h, w)`` (or ``(C, h, w)``) values over the model input to ``(H, W)`` pixels.

        Each image pixel centre is mapped into the model's input square and sampled
        bilinearly; pixels the model never saw take the nearest border value.
        """
        squeeze = grid.dim() == 2
        g = grid[None, None] if squeeze else grid[None]
        xs = (torch.arange(self.width, dtype=torch.float32) + 0.5 - self.offset_x) / self.scale_x
        ys = (torch.arange(self.height, dtype=torch.float32) + 0.5 - self.offset_y) / self.scale_y
        gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
        coords = torch.stack([gx, gy], dim=-1)[None].to(g.dtype)
        out = F.grid_sample(g, coords, mode="bilinear", padding_mode="border", align_corners=False)[0]
        return out[0] if squeeze else out


def _size_field(size: Any, key: str) -> int | None:
    """Read a field of a transformers size spec (``SizeDict`` or plain dict)."""
    if size is None:
        return None
    v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(v) if v else None


def crop_fraction(image_processor: Any) -> float:
    """Fraction of a square image's side that the processor keeps after resize + centre crop.

    ``1.0`` when the processor resizes to exactly the crop size (the common CLIP setting)
    or does not crop at all.
    """
    if not getattr(image_processor, "do_center_crop", False):
        return 1.0
    crop = _size_field(getattr(image_processor, "crop_size", None), "height")
    size = getattr(image_processor, "size", None)
    short = _size_field(size, "shortest_edge") or _size_field(size, "height")
    if not crop or not short or crop >= short:
        return 1.0
    return crop / short


def pad_to_square(image: Image.Image, fill: Sequence[float] = (0.5, 0.5, 0.5),
                  fraction: float = 1.0) -> tuple[Image.Image, InputGeometry]:
    """Pad ``image`` right/bottom to a square of side ``max(W, H)`` and describe the geometry.

    Args:
        image: RGB image.
        fill: pad colour in ``[0, 1]`` (use the checkpoint's normalization mean, which maps
            the padding to zero after normalization).
        fraction: :func:`crop_fraction` of the processor that will see the square.
    """
    w, h = image.size
    side = max(w, h)
    color = tuple(int(round(255 * c)) for c in fill)
    if (w, h) == (side, side):
        sq = image
    else:
        sq = Image.new("RGB", (side, side), color)
        sq.paste(image, (0, 0))
    return sq, square_geometry(w, h, fraction)


def square_geometry(width: int, height: int, fraction: float = 1.0) -> InputGeometry:
    """The :class:`InputGeometry` of :func:`pad_to_square` for a ``width x height`` image."""
    side = max(width, height)
    margin = side * (1.0 - fraction) / 2.0
    return InputGeometry(side * fraction, side * fraction, margin, margin, width, height)


def clip_square_input(backbone: ClipBackbone, image: Image.Image, whole: bool = False
                      ) -> tuple[Image.Image, InputGeometry]:
    """:func:`pad_to_square` with the backbone processor's mean colour and crop fraction.

    ``whole``: the square will be resized whole (``ClipBackbone.preprocess(size=...)``), so
    its geometry keeps all of it whatever the processor's own centre crop.
    """
    ip = backbone.processor.image_processor
    fill = tuple(getattr(ip, "image_mean", None) or (0.5, 0.5, 0.5))
    return pad_to_square(image, fill, 1.0 if whole else crop_fraction(ip))
