"""Draw predictions on images with PIL (used by ``clipground predict --out`` and reports).

Colours are fixed so pictures read the same everywhere: the prediction in red, the ground
truth in green, other ranked candidates in thin yellow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

PRED_COLOR = (230, 25, 75)
GT_COLOR = (60, 180, 75)
CANDIDATE_COLOR = (255, 225, 25)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _box_list(box: Sequence[float] | torch.Tensor) -> list[float]:
    b = box.tolist() if hasattr(box, "tolist") else list(box)
    if len(b) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {b}")
    return [float(v) for v in b]


def _label(draw: ImageDraw.ImageDraw, box: list[float], text: str, color: tuple[int, int, int],
           font: ImageFont.ImageFont, size: tuple[int, int]) -> None:
    """Text on a filled tab above the box (inside it when the box touches the top edge)."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - l + 6, b - t + 4
    x = min(max(0.0, box[0]), max(0.0, size[0] - tw))
    y = box[1] - th if box[1] - th >= 0 else max(0.0, box[1])
    draw.rectangle([x, y, x + tw, y + th], fill=color)
    draw.text((x + 3 - l, y + 2 - t), text, fill=(255, 255, 255), font=font)


def draw_prediction(
    image: Image.Image,
    box: Sequence[float] | torch.Tensor,
    label: str,
    score: float | None = None,
    gt_box: Sequence[float] | torch.Tensor | None = None,
    candidates: Sequence[Sequence[float]] | torch.Tensor | None = None,
) -> Image.Image:
    """A copy of ``image`` with the predicted ``box`` (xyxy pixels) and its label drawn.

    Args:
        image: a PIL image (not modified).
        box: predicted box ``[x1, y1, x2, y2]``.
        label: text to show (usually the phrase); empty for none.
        score: appended to the label when given.
        gt_box: ground-truth box, drawn in green under the prediction.
        candidates: other ranked boxes ``(K, 4)``, drawn thin in yellow beneath both.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(min(w, h) / 200))
    font = _font(max(10, round(min(w, h) / 40)))
    if candidates is not None:
        for c in (candidates.tolist() if hasattr(candidates, "tolist") else candidates):
            draw.rectangle(_box_list(c), outline=CANDIDATE_COLOR, width=max(1, width // 2))
    if gt_box is not None:
        draw.rectangle(_box_list(gt_box), outline=GT_COLOR, width=width)
    b = _box_list(box)
    draw.rectangle(b, outline=PRED_COLOR, width=width)
    text = label if score is None else (f"{label} ({score:.2f})" if label else f"{score:.2f}")
    if text:
        _label(draw, b, text, PRED_COLOR, font, (w, h))
    return out
