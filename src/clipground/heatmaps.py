"""Phrase-conditioned heatmaps over an image, for the detector-free ``heatmap-segment`` method.

Heatmap sources share one contract (``prepare(image)`` once, then
``__call__(prepared, phrases) -> list[(H, W) float32 arrays]`` in image pixels; the model
grid is mapped to pixels with :class:`~clipground.backbone.geometry.InputGeometry`):

  - :class:`ClipSimilarityHeatmap` (``clip``): cosine similarity of CLIP's projected patch
    embeddings with the phrase embedding; with ``gradcam=True`` (``clip-gradcam``) Grad-CAM
    of the image-text similarity at a vision layer instead.
  - :class:`BlipItmHeatmap` (``blip``): Grad-CAM of BLIP's image-text-matching score on the
    text encoder's cross-attention maps (the ALBEF/BLIP recipe), through
    ``transformers.BlipForImageTextRetrieval``; needs downloaded weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import ClipBackbone
from .backbone.geometry import InputGeometry, clip_square_input
from .backbone.hub import load_pretrained
from .errors import UnknownNameError

# --------------------------------------------------------------------------- heatmap sources


def normalize_heatmap(heat: np.ndarray) -> np.ndarray:
    """Min-max scale to ``[0, 1]`` (a constant map becomes all zeros)."""
    lo, hi = float(heat.min()), float(heat.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(heat, dtype=np.float32)
    return ((heat - lo) / (hi - lo)).astype(np.float32)


class HeatmapSource:
    """Contract: ``prepare(image)`` once per image, then heatmaps for phrases in image pixels."""

    name: str = ""

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, prepared: dict[str, Any], phrases: list[str]) -> list[np.ndarray]:
        raise NotImplementedError


class ClipSimilarityHeatmap(HeatmapSource):
    """CLIP patch-text similarity (or Grad-CAM of the similarity) on the padded-square input.

    Args:
        backbone: the shared CLIP backbone.
        gradcam: use Grad-CAM of ``cos(image, text)`` at vision layer ``layer`` instead of
            the patch-embedding similarity (one image forward per :meth:`__call__`, one
            backward per phrase).
        layer: vision encoder layer whose output Grad-CAM reads (negative counts from the
            end; the last layer's patch tokens do not feed the pooled embedding, so the
            default is the penultimate one).
        prompt: template for the phrase.
    """

    def __init__(self, backbone: ClipBackbone, gradcam: bool = False, layer: int = -2, prompt: str = "{}"):
        self.backbone = backbone
        self.gradcam = gradcam
        self.layer = layer
        self.prompt = prompt
        self.name = "clip-gradcam" if gradcam else "clip"

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        sq, geom = clip_square_input(self.backbone, image)
        out: dict[str, Any] = {"geometry": geom}
        if self.gradcam:
            out["pixel_values"] = self.backbone.preprocess([sq])
        else:
            f = self.backbone.encode_images([sq])
            out["patch_embeds"] = F.normalize(f.patch_embeds[0].float(), dim=-1)
            out["grid"] = f.grid
        return out

    def _gradcam(self, prepared: dict[str, Any], text: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        layers = self.backbone.model.vision_model.encoder.layers
        layer = layers[self.layer]
        acts: dict[str, torch.Tensor] = {}

        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            acts["h"] = out[0] if isinstance(out, tuple) else out

        with torch.inference_mode(False), torch.enable_grad():
            pv = prepared["pixel_values"].clone().requires_grad_(True)
            handle = layer.register_forward_hook(hook)
            try:
                f = self.backbone.forward_image(pv)
            finally:
                handle.remove()
            h = acts["h"]
            scores = f.embeds[0] @ text.clone().T  # (T,)
            cams = []
            for i in range(len(scores)):
                (g,) = torch.autograd.grad(scores[i], h, retain_graph=i + 1 < len(scores))
                a, g = h[0, 1:].detach(), g[0, 1:]
                weights = g.mean(0)  # Grad-CAM: channel weights = mean gradient over tokens
                cams.append(torch.relu(a @ weights))
        return torch.stack(cams), f.grid

    def __call__(self, prepared: dict[str, Any], phrases: list[str]) -> list[np.ndarray]:
        text = self.backbone.text_embeds([self.prompt.format(p) for p in phrases]).float()
        geom: InputGeometry = prepared["geometry"]
        if self.gradcam:
            maps, (gh, gw) = self._gradcam(prepared, text)
        else:
            maps, (gh, gw) = text @ prepared["patch_embeds"].T, prepared["grid"]
        return [geom.grid_to_image(m.reshape(gh, gw).detach().float()).numpy() for m in maps]


class BlipItmHeatmap(HeatmapSource):
    """Grad-CAM of BLIP's image-text matching score on a cross-attention layer.

    The image is encoded once in :meth:`prepare` (``BlipImageProcessor`` plainly resizes to
    its square input, so the grid covers the whole image, stretched); per phrase the text
    encoder runs with the cached image tokens, and the heatmap is ``attention * relu(grad)``
    of the cross-attention probabilities, averaged over heads and text tokens.

    Args:
        model: hub id or local directory of a ``BlipForImageTextRetrieval`` checkpoint.
        layer: text-encoder layer whose cross-attention is read (7, the usual choice for
            12-layer BLIP base; clamped to the penultimate layer, because in the last one only
            the [CLS] row reaches the ITM head; a negative value counts from the end).
        device: where to run BLIP.
    """

    name = "blip"

    def __init__(self, model: str = "Salesforce/blip-itm-base-coco", layer: int = 7, device: str | torch.device = "cpu",
                 prompt: str = "{}"):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        opt, alt = "blip_model", "heatmap='clip'"
        self.model = load_pretrained(BlipForImageTextRetrieval, model, "BLIP ITM model", opt, alt,
                                      attn_implementation="eager").to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = load_pretrained(BlipProcessor, model, "BLIP processor", opt, alt)
        self._setup(prompt, layer)

    def _setup(self, prompt: str, layer: int) -> None:
        n = len(self.model.text_encoder.encoder.layer)
        # In the last layer only the [CLS] row reaches the ITM head, so prefer an earlier one.
        self.layer = min(layer, max(n - 2, 0)) if layer >= 0 else n + layer
        self.last = self.layer == n - 1
        self.prompt = prompt
        self.device = next(self.model.parameters()).device

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any, layer: int = 7, prompt: str = "{}") -> "BlipItmHeatmap":
        """Wrap an in-memory ``BlipForImageTextRetrieval`` + ``BlipProcessor`` (e.g. one being trained;
        its config must use eager attention, so cross-attention probabilities are returned)."""
        heat = cls.__new__(cls)
        heat.model, heat.processor = model, processor
        heat._setup(prompt, layer)
        return heat

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        w, h = image.size
        pv = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        emb = self.model.vision_model(pixel_values=pv).last_hidden_state  # (1, 1 + N, D)
        n = emb.shape[1] - 1
        side = int(round(n ** 0.5))
        return {"image_embeds": emb, "grid": (side, n // side), "geometry": InputGeometry(w, h, 0.0, 0.0, w, h)}

    def __call__(self, prepared: dict[str, Any], phrases: list[str]) -> list[np.ndarray]:
        geom: InputGeometry = prepared["geometry"]
        gh, gw = prepared["grid"]
        tok = self.processor.tokenizer([self.prompt.format(p) for p in phrases], padding=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        xattn = self.model.text_encoder.encoder.layer[self.layer].crossattention.self
        cap: dict[str, torch.Tensor] = {}

        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            cap["attn"] = out[1]

        with torch.inference_mode(False), torch.enable_grad():
            img = prepared["image_embeds"].clone().expand(len(phrases), -1, -1).requires_grad_(True)
            ids, mask = ids.clone(), mask.clone()
            img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=self.device)
            handle = xattn.register_forward_hook(hook)
            try:
                hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                                                 encoder_attention_mask=img_mask).last_hidden_state
            finally:
                handle.remove()
            itm = self.model.itm_head(hidden[:, 0, :])  # (T, 2): [no match, match]
            attn = cap["attn"]  # (T, heads, L, 1 + N)
            (grad,) = torch.autograd.grad(itm[:, 1].sum(), attn)
        cam = (attn.detach() * grad.clamp(min=0)).mean(1)[..., 1:]  # (T, L, N), image CLS dropped
        valid = mask.clone().float()
        if not self.last:
            valid[:, 0] = 0.0  # the [CLS]/[ENC] token summarizes, it does not point
        valid = valid / valid.sum(1, keepdim=True).clamp(min=1.0)
        maps = torch.einsum("tln,tl->tn", cam, valid)
        return [geom.grid_to_image(m.reshape(gh, gw).float().cpu()).numpy() for m in maps]


HEATMAP_SOURCES = ("clip", "clip-gradcam", "blip")


def make_heatmap_source(kind: str, backbone: ClipBackbone, blip_model: str = "Salesforce/blip-itm-base-coco",
                        blip_layer: int = 7, prompt: str = "{}") -> HeatmapSource:
    """Build a heatmap source by name (``clip``, ``clip-gradcam`` or ``blip``)."""
    if kind == "clip":
        return ClipSimilarityHeatmap(backbone, gradcam=False, prompt=prompt)
    if kind == "clip-gradcam":
        return ClipSimilarityHeatmap(backbone, gradcam=True, prompt=prompt)
    if kind == "blip":
        return BlipItmHeatmap(blip_model, layer=blip_layer, device=backbone.device, prompt=prompt)
    raise UnknownNameError(f"unknown heatmap source {kind!r}; choose from {list(HEATMAP_SOURCES)}")

