"""Region-aware CLIP (the Alpha-CLIP / Focus-CLIP design): a mask channel and LoRA on any CLIP vision tower.

A CLIP vision tower sees the whole image; a region-aware one also takes a binary mask (the
*alpha* channel) saying where to look. Two changes make any ``transformers`` ``CLIPModel`` one:

* **Mask channel** (:class:`MaskPatchEmbedding`): the tower's RGB patch convolution gets a
  parallel convolution of the same kernel and stride over the mask, whose output is added to
  the RGB patch embedding. It is initialised to zero, so the region-aware model starts as
  exactly the original CLIP. The mask is normalised as Alpha-CLIP does
  (``(m - ALPHA_MEAN) / ALPHA_STD`` with mean 0.5 and std 0.26, ``m`` in [0, 1]), and goes
  through the checkpoint's own image processor (:func:`preprocess_masks`), so it is resized and
  cropped exactly like the pixels. Pixels without a mask are read as "the whole image"
  (a mask of ones), as Alpha-CLIP does for plain images.
* **LoRA** through peft (``LoraConfig`` / ``get_peft_model``) on the vision tower's attention
  projections (:class:`AdapterConfig`: which projections, rank, scale). Trainable: the mask
  convolution, the adapters and, optionally, the vision tower's LayerNorms; the text tower
  and everything else stay frozen.

On disk a region-aware backbone is a directory (:func:`save_region_backbone`)::

    region_clip.json         base checkpoint name, adapter config, mask constants
    mask_channel.safetensors the mask convolution (and the LayerNorms when trained)
    adapter/                 the peft LoRA adapter (adapter_config.json, adapter_model.safetensors)

:meth:`ClipBackbone.from_pretrained` loads such a directory (the base CLIP by its name, then
the mask channel and the adapter), so a region-aware backbone goes wherever a CLIP does.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointNotFoundError, ConfigError
from .clip import ClipBackbone, _is_norm

#: Alpha-CLIP's normalisation of the mask channel: ``(m - 0.5) / 0.26`` for ``m`` in [0, 1].
ALPHA_MEAN = 0.5
ALPHA_STD = 0.26
REGION_FILE = "region_clip.json"
MASK_WEIGHTS = "mask_channel.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "clipground-region-clip"
#: The vision tower's attention projections LoRA may adapt (transformers' CLIP names).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class AdapterConfig:
    """What makes a CLIP region-aware: the LoRA on the vision attention and what else trains.

    Attributes:
        rank: LoRA rank ``r``.
        lora_alpha: LoRA scale numerator (the update is scaled by ``lora_alpha / rank``).
        lora_dropout: dropout on the LoRA input.
        target_modules: attention projections of every vision block to adapt (of
            ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        layernorms: also train the vision tower's LayerNorms.
    """

    rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_MODULES
    layernorms: bool = False

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        bad = sorted(set(self.target_modules) - set(ATTENTION_MODULES))
        if bad or not self.target_modules:
            raise ConfigError(f"target_modules must be a non-empty subset of {', '.join(ATTENTION_MODULES)}, "
                              f"got {list(self.target_modules)}")
        if int(self.rank) < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= float(self.lora_dropout) < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def target_regex(self) -> str:
        """The peft ``target_modules`` pattern: the chosen projections of the vision blocks only."""
        return r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(" + "|".join(self.target_modules) + r")"


# --------------------------------------------------------------------------- the mask channel


class MaskPatchEmbedding(nn.Module):
    """The RGB patch convolution plus a parallel, zero-initialised convolution on the mask.

    Keeps the wrapped convolution's parameters under their own names (``weight``, ``bias``),
    so the CLIP's other weights load as before; the mask convolution is ``alpha``. Input with
    one channel more than the RGB convolution takes carries the normalised mask last; input
    without it is read as a mask of ones (the whole image).
    """

    def __init__(self, rgb: nn.Conv2d):
        super().__init__()
        self.weight = rgb.weight
        self.bias = rgb.bias
        self.in_channels, self.out_channels = rgb.in_channels, rgb.out_channels
        self.kernel_size, self.stride, self.padding = rgb.kernel_size, rgb.stride, rgb.padding
        self.alpha = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
        nn.init.zeros_(self.alpha.weight)
        self.alpha.to(device=rgb.weight.device, dtype=rgb.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = nn.functional.conv2d(x[:, : self.in_channels], self.weight, self.bias, self.stride, self.padding)
        if x.shape[1] > self.in_channels:
            alpha = x[:, self.in_channels : self.in_channels + 1]
        else:
            alpha = torch.full_like(x[:, :1], (1.0 - ALPHA_MEAN) / ALPHA_STD)
        return rgb + self.alpha(alpha)


def patch_module(model: nn.Module) -> nn.Module:
    """The vision tower's patch-embedding module (a plain conv, or the :class:`MaskPatchEmbedding`)."""
    return model.vision_model.embeddings.patch_embedding


def has_mask_channel(model: nn.Module) -> bool:
    """Whether ``model``'s vision tower takes a mask channel."""
    try:
        return isinstance(patch_module(model), MaskPatchEmbedding)
    except AttributeError:
        return False


def add_mask_channel(model: nn.Module) -> MaskPatchEmbedding:
    """Give ``model``'s vision tower a zero-initialised mask channel (in place; idempotent)."""
    emb = model.vision_model.embeddings
    if not isinstance(emb.patch_embedding, MaskPatchEmbedding):
        emb.patch_embedding = MaskPatchEmbedding(emb.patch_embedding)
    return emb.patch_embedding


def add_lora(model: nn.Module, cfg: AdapterConfig) -> Any:
    """Wrap ``model`` with peft LoRA adapters on the vision attention (in place); returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
                    target_modules=cfg.target_regex(), bias="none")
    return get_peft_model(model, lc)


def normalize_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] as the mask channel reads it (Alpha-CLIP's constants)."""
    return (mask.clamp(0, 1) - ALPHA_MEAN) / ALPHA_STD


def _mask_image(mask: np.ndarray | torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask.convert("L").convert("RGB")
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ConfigError(f"a mask must be 2-D (height, width), got shape {tuple(m.shape)}")
    m = (m.astype(np.float32) * 255.0 if m.dtype != np.uint8 else m.astype(np.float32)).clip(0, 255)
    return Image.fromarray(m.round().astype(np.uint8), "L").convert("RGB")


def preprocess_masks(processor: Any, masks: Sequence[Any], size: int | None = None) -> torch.Tensor:
    """``(N, 1, S, S)`` normalised mask channel of ``(H, W)`` masks in [0, 1] (bool, float, uint8 or PIL).

    Each mask is handed to the checkpoint's own image processor as an image, without the colour
    normalisation, so it is resized and cropped with exactly the geometry of the pixels
    (``size``: as :meth:`ClipBackbone.preprocess`'s).
    """
    if len(masks) == 0:
        return torch.zeros(0, 1, 0, 0)
    kw: dict[str, Any] = {"do_normalize": False}
    if size:
        kw.update(size={"height": int(size), "width": int(size)}, crop_size={"height": int(size), "width": int(size)})
    out = processor.image_processor(images=[_mask_image(m) for m in masks], return_tensors="pt", **kw)
    return normalize_mask(out["pixel_values"][:, :1].float())


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(K, H, W)`` bool masks of ``xyxy`` pixel boxes on an image of ``size = (W, H)`` (pixels whose
    centre lies in the box; at least one pixel)."""
    w, h = int(size[0]), int(size[1])
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    inx = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])
    iny = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])
    m = iny[:, :, None] & inx[:, None, :]
    empty = ~m.flatten(1).any(1)
    for k in torch.nonzero(empty).flatten().tolist():  # a sub-pixel box: the pixel its centre is in
        cx = min(w - 1, max(0, int((b[k, 0] + b[k, 2]) / 2)))
        cy = min(h - 1, max(0, int((b[k, 1] + b[k, 3]) / 2)))
        m[k, cy, cx] = True
    return m


# --------------------------------------------------------------------------- the backbone


def trainable_share(model: nn.Module) -> dict[str, float]:
    """Trainable parameters against the vision tower's and the whole model's (LoRA and mask weights counted)."""
    vision = [p for n, p in model.named_parameters() if "vision_model" in n]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "patch_embedding.alpha" in n)
    v_total = sum(p.numel() for p in vision)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "vision_params": v_total - added, "model_params": total - added,
            "added": added, "share_of_vision": trainable / max(1, v_total - added),
            "share_of_model": trainable / max(1, total - added)}


class RegionClipBackbone(ClipBackbone):
    """A :class:`ClipBackbone` whose vision tower has the mask channel and the LoRA adapters.

    ``model`` is the CLIP with the adapters injected (peft changes it in place); ``peft`` is the
    ``PeftModel`` around it, kept to save the adapter. ``base`` names the CLIP it was made from.
    """

    def __init__(self, model: nn.Module, processor: Any, peft_model: Any, adapter: AdapterConfig, base: str,
                 name: str = "", frozen: bool = True):
        super().__init__(model, processor, name=name, frozen=frozen)
        self.peft = peft_model
        self.adapter = adapter
        self.base = base

    # ----------------------------------------------------------------- building
    @classmethod
    def from_backbone(cls, backbone: ClipBackbone, adapter: AdapterConfig | None = None,
                      name: str | None = None) -> "RegionClipBackbone":
        """A fresh region-aware copy of a plain backbone: zero mask channel, zero LoRA update, so its
        outputs equal the original's. The original is left untouched."""
        if isinstance(backbone, RegionClipBackbone):
            raise ConfigError(f"backbone '{backbone.name}' is already region-aware")
        if backbone.onnx is not None:
            raise ConfigError("a region-aware backbone runs in PyTorch; load the plain CLIP without runtime='onnx'")
        adapter = adapter or AdapterConfig()
        model = copy.deepcopy(backbone.model)
        add_mask_channel(model)
        pm = add_lora(model, adapter)
        from .hub import BUNDLED

        base = backbone.name
        if base not in BUNDLED and Path(base).expanduser().is_dir():  # a local base is found from anywhere
            base = str(Path(base).expanduser().resolve())
        return cls(model, backbone.processor, pm, adapter, base=base, name=name or f"{backbone.name}+region-clip")

    def setup_training(self) -> list[str]:
        """Make the mask convolution, the LoRA adapters (and, if configured, the vision LayerNorms)
        trainable; everything else frozen. Returns the trainable parameter names."""
        self.freeze()
        names = []
        for n, p in self.model.named_parameters():
            keep = ("lora_" in n and "vision_model" in n) or "patch_embedding.alpha" in n
            keep = keep or (self.adapter.layernorms and "vision_model" in n and _is_norm(n))
            if keep:
                p.requires_grad_(True)
                names.append(n)
        return names

    def trainable_share(self) -> dict[str, float]:
        """:func:`trainable_share` of the model as :meth:`setup_training` leaves it (state restored)."""
        before = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.setup_training()
        try:
            return trainable_share(self.model)
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(before[n])

    # ----------------------------------------------------------------- saving
    def mask_state_dict(self) -> dict[str, torch.Tensor]:
        """What the directory's ``mask_channel.safetensors`` holds: the mask convolution (and LayerNorms)."""
        out = {}
        for n, p in self.model.named_parameters():
            if "patch_embedding.alpha" in n or (self.adapter.layernorms and "vision_model" in n and _is_norm(n)
                                                and "lora_" not in n):
                out[n] = p.detach().cpu().contiguous()
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the region-aware directory: ``region_clip.json``, the mask weights and the peft adapter."""
        from safetensors.torch import save_file

        from ..io import write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.peft.save_pretrained(str(path / ADAPTER_DIR))
        (path / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        cfg_path = path / ADAPTER_DIR / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = self.base  # the base by its clipground name, not a local path
        write_json(cfg_path, cfg)
        save_file(self.mask_state_dict(), str(path / MASK_WEIGHTS))
        write_json(path / REGION_FILE, {"format": FORMAT, "version": 1, "base": self.base,
                                        "adapter": self.adapter.to_dict(),
                                        "mask": {"mean": ALPHA_MEAN, "std": ALPHA_STD}})

    # ----------------------------------------------------------------- encoding
    def preprocess_regions(self, image: Image.Image, masks: Sequence[Any], size: int | None = None) -> torch.Tensor:
        """``(K, 4, S, S)``: the image's pixels once, with each mask as the fourth channel."""
        pix = self.preprocess([image], size)
        alpha = preprocess_masks(self.processor, masks, size).to(pix.device, pix.dtype)
        return torch.cat([pix.expand(len(masks), -1, -1, -1), alpha], 1)

    @torch.inference_mode()
    def encode_regions(self, image: Image.Image, masks: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """``(K, D)`` normalised embeddings of the whole image looking at each mask (one forward per mask)."""
        if len(masks) == 0:
            return torch.zeros(0, self.embed_dim)
        out = []
        for i in range(0, len(masks), batch_size):
            out.append(self.forward_image(self.preprocess_regions(image, masks[i : i + batch_size])).embeds)
        return torch.cat(out)


def is_region_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a region-aware backbone directory (holds ``region_clip.json``)."""
    return (Path(path) / REGION_FILE).is_file()


def load_region_backbone(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu"
                         ) -> RegionClipBackbone:
    """Load a directory written by :meth:`RegionClipBackbone.save_pretrained`: the base CLIP by its
    name (bundled, local or hub), then the mask channel and the peft adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / REGION_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        adapter = AdapterConfig(**meta["adapter"])
        base_name = str(meta["base"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointNotFoundError(f"cannot read region-aware backbone {path}/{REGION_FILE}: {e}") from None
    for need in (MASK_WEIGHTS, f"{ADAPTER_DIR}/adapter_config.json"):
        if not (path / need).is_file():
            raise CheckpointNotFoundError(f"region-aware backbone {path} is incomplete: {need} is missing")
    base_path = base_name
    if not Path(base_name).is_absolute() and (path / base_name).is_dir():  # a base saved beside the adapter
        base_path = str(path / base_name)
    base = ClipBackbone.from_pretrained(base_path, device=device)
    model = base.model
    add_mask_channel(model)
    try:
        pm = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR), is_trainable=False)
        state = load_file(str(path / MASK_WEIGHTS))
        missing = [k for k in state if k not in dict(model.named_parameters())]
        if missing or not any("patch_embedding.alpha" in k for k in state):
            raise ValueError(f"{MASK_WEIGHTS} does not fit base '{base_name}' (unexpected {missing[:3]})")
        model.load_state_dict(state, strict=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointNotFoundError(f"cannot load region-aware backbone {path}: {first}") from None
    return RegionClipBackbone(model.to(device), base.processor, pm, adapter, base=base_name,
                              name=name or str(path))


def region_backbone(backbone: ClipBackbone, adapter: AdapterConfig | None = None) -> RegionClipBackbone:
    """``backbone`` itself when it is region-aware, else a fresh region-aware copy of it."""
    if isinstance(backbone, RegionClipBackbone):
        return backbone
    return RegionClipBackbone.from_backbone(backbone, adapter)


def is_region_backbone(backbone: Any) -> bool:
    return isinstance(backbone, RegionClipBackbone)


def check_alpha_views(views: Sequence[str], backbone: Any) -> None:
    """Refuse the ``alpha`` view on a plain CLIP (it has no mask channel) with what to use instead."""
    from .hub import WORLD_REGION_CLIP

    if "alpha" in views and not is_region_backbone(backbone):
        raise ConfigError(f"view 'alpha' needs a region-aware backbone (a mask channel), and '{backbone.name}' is a "
                          f"plain CLIP: use --backbone {WORLD_REGION_CLIP}, the backbone/ folder of a `clipground "
                          f"train --method region-clip` output, or the region-clip method")


__all__ = [
    "ALPHA_MEAN",
    "ALPHA_STD",
    "ATTENTION_MODULES",
    "AdapterConfig",
    "MaskPatchEmbedding",
    "RegionClipBackbone",
    "add_lora",
    "check_alpha_views",
    "add_mask_channel",
    "box_masks",
    "has_mask_channel",
    "is_region_backbone",
    "is_region_dir",
    "load_region_backbone",
    "normalize_mask",
    "preprocess_masks",
    "region_backbone",
    "trainable_share",
]
