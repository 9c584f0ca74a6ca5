"""Turn a phrase heatmap into a box with a promptable segmenter.

Pipeline (:func:`box_from_heatmap`): the heatmap is min-max normalized; its peak and the
connected region above ``threshold`` around the peak are the *seeds*; a segmenter turns the
seeds into a mask; the answer is the tight box of the mask component containing the peak
(the largest component if the peak fell outside the mask). Segmenters share one contract,
``prepare(image)`` once per image and ``segment(prepared, seeds) -> bool (H, W)``:

* :class:`ThresholdSegmenter` (``threshold``): the seed region itself (an ablation).
* :class:`GrabCutSegmenter` (``grabcut``, the weight-free default): OpenCV GrabCut
  initialized with the heatmap's core as definite foreground, the (dilated) seed region as
  probable foreground, a band around it as probable background and pixels far from it as
  definite background.
* :class:`SamSegmenter` (``sam``): ``transformers.SamModel`` prompted with the peak point
  and/or the seed box; the image embedding is computed once in ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import UnknownNameError
from .backbone.hub import load_pretrained
from .heatmaps import normalize_heatmap


@dataclass
class Seeds:
    """What a segmenter is prompted with, all in original-image pixels.

    Attributes:
        heat: ``(H, W)`` heatmap normalized to ``[0, 1]``.
        peak: ``(x, y)`` integer pixel of the maximum.
        region: ``(H, W)`` bool, the connected above-threshold region containing the peak.
        box: tight ``xyxy`` box of ``region`` (pixel edges).
        threshold: the threshold ``region`` was cut at.
    """

    heat: np.ndarray
    peak: tuple[int, int]
    region: np.ndarray
    box: tuple[float, float, float, float]
    threshold: float = 0.5


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight ``xyxy`` box (pixel edges) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def component_at(mask: np.ndarray, peak: tuple[int, int]) -> np.ndarray:
    """The 8-connected component of ``mask`` containing ``peak``, else its largest one.

    An empty mask is returned unchanged.
    """
    if not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    x, y = peak
    lab = int(labels[y, x])
    if lab == 0:
        lab = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == lab


def make_seeds(heat: np.ndarray, threshold: float = 0.5) -> Seeds:
    """Peak, above-threshold region around it and its box, from a raw ``(H, W)`` heatmap."""
    h = normalize_heatmap(np.asarray(heat, dtype=np.float32))
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    peak = (int(x), int(y))
    region = component_at(h >= threshold, peak)
    if not region.any():  # a constant heatmap: no evidence, fall back to the whole image
        region = np.ones_like(h, dtype=bool)
    return Seeds(h, peak, region, mask_box(region), threshold)


class Segmenter:
    """Contract: ``prepare(image)`` once per image, ``segment(prepared, seeds)`` per phrase."""

    name: str = ""

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        return {"size": image.size}

    def segment(self, prepared: dict[str, Any], seeds: Seeds) -> np.ndarray:
        raise NotImplementedError


class ThresholdSegmenter(Segmenter):
    """The thresholded heatmap region itself (no image evidence)."""

    name = "threshold"

    def segment(self, prepared: dict[str, Any], seeds: Seeds) -> np.ndarray:
        return seeds.region


class GrabCutSegmenter(Segmenter):
    """OpenCV GrabCut seeded by the heatmap (needs no weights).

    Args:
        iters: GrabCut iterations.
        margin: band width as a fraction of ``max(H, W)``: the seed region dilated by one
            band is probable foreground, the next band probable background, the rest
            definite background.
        max_side: GrabCut runs on the image downscaled to at most this side (it is
            super-linear in the pixel count); the mask is scaled back up.
        core: pixels of the seed region with normalized heat >= ``core`` are definite
            foreground (the peak at least), anchoring the foreground colour model.
    """

    name = "grabcut"

    def __init__(self, iters: int = 5, margin: float = 0.1, max_side: int = 320, core: float = 0.95):
        self.iters = iters
        self.core = core
        self.margin = margin
        self.max_side = max_side

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        w, h = image.size
        s = min(1.0, self.max_side / max(w, h))
        small = image if s == 1.0 else image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        return {"size": (w, h), "small": np.ascontiguousarray(np.asarray(small.convert("RGB"))[:, :, ::-1])}

    def segment(self, prepared: dict[str, Any], seeds: Seeds) -> np.ndarray:
        w, h = prepared["size"]
        img = prepared["small"]
        sh, sw = img.shape[:2]
        region = cv2.resize(seeds.region.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
        heat = cv2.resize(seeds.heat, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if not region.any():
            return seeds.region
        # GrabCut carves objects out of a generous foreground guess better than it grows
        # them: the seed region dilated by `margin` is probable foreground, the next band
        # of the same width probable background, everything farther definite background.
        dist = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 3)
        band = self.margin * max(sh, sw)
        mask = np.full((sh, sw), cv2.GC_BGD, np.uint8)
        mask[dist <= 2 * band] = cv2.GC_PR_BGD
        mask[dist <= band] = cv2.GC_PR_FGD
        # The heatmap's core (around the peak) anchors the foreground colour model.
        core = region & (heat >= self.core)
        if not core.any():
            core = np.zeros_like(region)
            core[min(sh - 1, seeds.peak[1] * sh // h), min(sw - 1, seeds.peak[0] * sw // w)] = True
        mask[core] = cv2.GC_FGD
        if not ((mask == cv2.GC_BGD) | (mask == cv2.GC_PR_BGD)).any():
            return seeds.region  # nothing can be background: GrabCut has no model to fit
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(img, mask, None, bgd, fgd, self.iters, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return seeds.region
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        if (sw, sh) != (w, h):
            fg = cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return fg


SAM_PROMPTS = ("point", "box", "point+box")


class SamSegmenter(Segmenter):
    """Segment Anything through ``transformers.SamModel`` / ``SamProcessor``.

    Args:
        model: hub id or local directory of a SAM checkpoint.
        prompt: ``point`` (the heatmap peak), ``box`` (the seed box) or ``point+box``.
        device: where to run SAM.
    """

    name = "sam"

    def __init__(self, model: str = "facebook/sam-vit-base", prompt: str = "point+box",
                 device: str | torch.device = "cpu"):
        from transformers import SamModel, SamProcessor

        if prompt not in SAM_PROMPTS:
            raise UnknownNameError(f"unknown sam_prompt {prompt!r}; choose from {list(SAM_PROMPTS)}")
        opt, alt = "sam_model", "segmenter='grabcut'"
        self.model = load_pretrained(SamModel, model, "SAM model", opt, alt).to(device).eval()
        self.processor = load_pretrained(SamProcessor, model, "SAM processor", opt, alt)
        self.prompt = prompt
        self.device = torch.device(device)

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any, prompt: str = "point+box") -> "SamSegmenter":
        """Wrap an in-memory ``SamModel`` + ``SamProcessor`` (e.g. one being trained)."""
        if prompt not in SAM_PROMPTS:
            raise UnknownNameError(f"unknown sam_prompt {prompt!r}; choose from {list(SAM_PROMPTS)}")
        seg = cls.__new__(cls)
        seg.model, seg.processor, seg.prompt = model, processor, prompt
        seg.device = next(model.parameters()).device
        return seg

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        inp = self.processor(images=image, return_tensors="pt")
        emb = self.model.get_image_embeddings(inp["pixel_values"].to(self.device))
        return {"size": image.size, "embeddings": emb, "original_sizes": inp["original_sizes"],
                "reshaped_input_sizes": inp["reshaped_input_sizes"]}

    def segment(self, prepared: dict[str, Any], seeds: Seeds) -> np.ndarray:
        # Prompts go to SAM's resized input frame, as SamProcessor does: scale x and y by
        # reshaped/original size (the image itself is already embedded in prepare()).
        (oh, ow), (rh, rw) = prepared["original_sizes"][0].tolist(), prepared["reshaped_input_sizes"][0].tolist()
        sx, sy = rw / ow, rh / oh
        fwd: dict[str, torch.Tensor] = {}
        if "point" in self.prompt:
            px, py = float(seeds.peak[0]), float(seeds.peak[1])  # SAM adds the half-pixel shift itself
            fwd["input_points"] = torch.tensor([[[[px * sx, py * sy]]]], dtype=torch.float32, device=self.device)
            fwd["input_labels"] = torch.ones(1, 1, 1, dtype=torch.long, device=self.device)
        if "box" in self.prompt:
            x1, y1, x2, y2 = seeds.box
            fwd["input_boxes"] = torch.tensor([[[x1 * sx, y1 * sy, x2 * sx, y2 * sy]]], dtype=torch.float32,
                                              device=self.device)
        out = self.model(image_embeddings=prepared["embeddings"], multimask_output=True, **fwd)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), prepared["original_sizes"], prepared["reshaped_input_sizes"])[0]  # (1, 3, H, W)
        best = int(out.iou_scores[0, 0].argmax())
        return masks[0, best].numpy().astype(bool)


SEGMENTERS = ("grabcut", "sam", "threshold")


def make_segmenter(kind: str, sam_model: str = "facebook/sam-vit-base", sam_prompt: str = "point+box",
                   grabcut_iters: int = 5, grabcut_margin: float = 0.1, max_side: int = 320,
                   grabcut_core: float = 0.95, device: str | torch.device = "cpu") -> Segmenter:
    """Build a segmenter by name (``grabcut``, ``sam`` or ``threshold``)."""
    if kind == "grabcut":
        return GrabCutSegmenter(iters=grabcut_iters, margin=grabcut_margin, max_side=max_side, core=grabcut_core)
    if kind == "sam":
        return SamSegmenter(sam_model, prompt=sam_prompt, device=device)
    if kind == "threshold":
        return ThresholdSegmenter()
    raise UnknownNameError(f"unknown segmenter {kind!r}; choose from {list(SEGMENTERS)}")


def box_from_heatmap(heat: np.ndarray, segmenter: Segmenter, prepared: dict[str, Any],
                     threshold: float = 0.5) -> tuple[tuple[float, float, float, float], Seeds]:
    """The box of the segmented component around the heatmap peak (and the seeds used).

    Falls back to the seed region when the segmenter returns an empty mask.
    """
    seeds = make_seeds(heat, threshold)
    mask = np.asarray(segmenter.segment(prepared, seeds), dtype=bool)
    comp = component_at(mask, seeds.peak)
    if not comp.any():
        comp = seeds.region
    return mask_box(comp), seeds


def segment_boxes(segmenter: Segmenter, image: Image.Image, boxes: torch.Tensor,
                  prepared: dict[str, Any] | None = None) -> torch.Tensor:
    """``(K, H, W)`` bool segments of ``xyxy`` boxes, each prompted by its box (SAM's box prompt).

    The masks of the mask views (:data:`clipground.backbone.views.MASK_VIEW_KINDS`) when they are
    segments rather than rectangles. Each segment is kept inside its box; an empty one falls back
    to the box's rectangle.
    """
    from .backbone.alpha import box_masks

    w, h = image.size
    rects = box_masks(boxes, (w, h))
    if len(rects) == 0:
        return rects
    prepared = segmenter.prepare(image) if prepared is None else prepared
    out = torch.zeros_like(rects)
    for k, b in enumerate(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist()):
        region = rects[k].numpy()
        cx, cy = min(w - 1, max(0, int((b[0] + b[2]) / 2))), min(h - 1, max(0, int((b[1] + b[3]) / 2)))
        seeds = Seeds(region.astype(np.float32), (cx, cy), region, (b[0], b[1], b[2], b[3]))
        m = torch.from_numpy(np.asarray(segmenter.segment(prepared, seeds), dtype=bool)) & rects[k]
        out[k] = m if bool(m.any()) else rects[k]
    return out
