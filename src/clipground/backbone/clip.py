"""A frozen CLIP backbone loaded through transformers.

``ClipBackbone.from_pretrained(name_or_path)`` accepts a hub id (default
``openai/clip-vit-base-patch32``), a local directory written by ``save_pretrained`` (a
region-aware CLIP's directory too, see :mod:`clipground.backbone.alpha`), or a
bundled name (``clipground/world-clip``, the small CLIP our own code pretrains in the
synthetic world and ships inside the package). All three take the same code path:
``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained``.

Checkpoint names are resolved by :mod:`clipground.backbone.hub` (offline, a hub id that is
not in the local cache fails fast with one line instead of transformers' retry loop).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from ..errors import BadPhraseError, CheckpointNotFoundError, ConfigError
from ..phrases import check_phrase, printable
from .hub import REGION_FILE, offline_message, resolve_checkpoint

if TYPE_CHECKING:
    from .onnx_runtime import OnnxTowers

DEFAULT_BACKBONE = "openai/clip-vit-base-patch32"
#: What a dense method can read as per-patch joint-space embeddings (see ``forward_image``).
DENSE_EMBEDS = ("final", "value")
#: Images the checkpoint's processor is given at once (bounds its full-size float copies).
PREPROCESS_CHUNK = 8


def _is_norm(name: str) -> bool:
    n = name.lower()
    return "layer_norm" in n or "layernorm" in n or ".ln_" in n or n.endswith("norm.weight") or n.endswith("norm.bias")


@dataclass
class ImageFeatures:
    """Image-tower outputs for a batch.

    Attributes:
        embeds: ``(N, D)`` L2-normalized image embeddings in the joint space.
        patch_tokens: ``(N, P, Dv)`` last-layer patch token states (CLS removed), pre-projection.
        patch_embeds: ``(N, P, D)`` patch tokens passed through the post-LayerNorm and the
            visual projection (the joint space; used for dense patch-text similarity).
        grid: ``(h, w)`` patch grid, ``h * w == P``.
    """

    embeds: torch.Tensor
    patch_tokens: torch.Tensor
    patch_embeds: torch.Tensor
    grid: tuple[int, int]


@dataclass
class TextFeatures:
    """Text-tower outputs: ``embeds (N, D)`` normalized, ``tokens (N, L, Dt)``, ``mask (N, L)``,
    and ``words (N, L, Dt)``: each token's input word embedding (no position, no context).

    The last-layer token states blur words contrastive pretraining never needed to tell
    apart (CLIP is known to be weak at "left"/"right"); the input embeddings keep them
    distinct, at no extra cost.
    """

    embeds: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    words: torch.Tensor | None = None

    def select(self, ix: torch.Tensor) -> "TextFeatures":
        """The rows ``ix`` of every field."""
        return TextFeatures(self.embeds[ix], self.tokens[ix], self.mask[ix],
                            None if self.words is None else self.words[ix])


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _unloadable_message(name: str, path: str, e: Exception) -> str:
    """One line for a checkpoint transformers could not load, saying what to do about it."""
    if "Weights only load failed" in str(e):  # torch refused a pickle that needs more than tensors
        return (f"cannot load CLIP checkpoint '{name}': its pytorch_model.bin is a pickle holding more than "
                f"tensors (loading it could run code), so it is refused; if you trust the file, convert it: "
                f"load it with torch.load, save the tensors with safetensors.torch.save_file as "
                f"model.safetensors in that directory, and remove pytorch_model.bin")
    return (f"cannot load CLIP checkpoint '{name}' ({type(e).__name__}: {_first_line(e)}); check that {path} is "
            f"a complete save_pretrained CLIP folder (config.json, model.safetensors, tokenizer and "
            f"preprocessor files)")


class ClipBackbone(nn.Module):
    """Frozen CLIP: batched image/text encoding plus the checkpoint's own preprocessing.

    The model is in eval mode with ``requires_grad=False`` unless a method calls
    :meth:`unfreeze`. Text embeddings are memoized (phrases repeat across predictions).
    """

    def __init__(self, model: nn.Module, processor, name: str = "", text_cache_size: int = 4096, frozen: bool = True,
                 onnx: "OnnxTowers | None" = None):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name = name
        #: onnxruntime sessions the encode functions use instead of ``model`` (``runtime="onnx"``).
        self.onnx = onnx
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        if frozen:  # ``frozen=False`` wraps a model being trained (e.g. to validate it) as it is
            self.freeze()

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_BACKBONE, device: str | torch.device = "cpu",
                        runtime: str = "torch", **kwargs) -> "ClipBackbone":
        """Load a CLIP checkpoint (hub id, local directory or bundled name).

        ``runtime="onnx"`` loads a directory written by ``clipground export onnx``
        (:mod:`clipground.backbone.onnx_runtime`): inference encodes run in onnxruntime, the
        PyTorch model stays for what is not a tower forward (and for training). The backbone's
        ``name`` is then the exported checkpoint's.
        """
        from transformers import CLIPModel, CLIPProcessor

        from .onnx_runtime import check_runtime

        check_runtime(runtime)
        path, local_only = resolve_checkpoint(name_or_path)
        if local_only and (Path(path) / REGION_FILE).is_file():  # a region-aware CLIP (mask channel + LoRA)
            from .alpha import load_region_backbone

            if runtime != "torch":
                raise ConfigError(f"'{name_or_path}' is a region-aware CLIP, which runs in PyTorch only (runtime='torch')")
            return load_region_backbone(path, name=str(name_or_path), device=device)
        towers = None
        if runtime == "onnx":
            from .onnx_runtime import OnnxTowers

            if str(device) != "cpu":
                raise ConfigError("runtime 'onnx' runs on the CPU; use device='cpu'")
            towers = OnnxTowers(path)
            name_or_path = towers.meta.get("source") or str(name_or_path)
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=local_only, **kwargs)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=local_only)
        except OSError as e:
            if local_only and not Path(path).is_dir():
                raise CheckpointNotFoundError(offline_message(str(name_or_path))) from None
            raise CheckpointNotFoundError(f"cannot load CLIP checkpoint '{name_or_path}': {_first_line(e)}") from None
        except Exception as e:  # a broken or unsafe folder: transformers raises many types
            raise CheckpointNotFoundError(_unloadable_message(str(name_or_path), path, e)) from None
        return cls(model.to(device), processor, name=str(name_or_path), onnx=towers)

    def use_onnx(self, directory: str | os.PathLike | None) -> "ClipBackbone":
        """Encode with the onnxruntime towers exported to ``directory`` (``None``: back to PyTorch).

        The export must come from a checkpoint with the same architecture; the towers' weights
        replace this model's for inference encodes only.
        """
        if directory is None:
            self.onnx = None
            return self
        from .onnx_runtime import OnnxTowers

        towers = OnnxTowers(directory)
        cfg = Path(directory) / "config.json"
        if cfg.is_file():
            import json

            vc = json.loads(cfg.read_text()).get("vision_config", {})
            if int(vc.get("hidden_size", self.vision_width)) != self.vision_width:
                raise ConfigError(f"{directory} was exported from another architecture than backbone '{self.name}'")
        self.onnx = towers
        return self

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnx``: what runs the inference encodes."""
        return "torch" if self.onnx is None else "onnx"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model and processor in the standard transformers layout."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # ----------------------------------------------------------------- state
    def freeze(self) -> "ClipBackbone":
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def unfreeze(self) -> "ClipBackbone":
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self

    def unfreeze_blocks(self, vision_blocks: int, text_blocks: int, projections: bool = True,
                        logit_scale: bool = False) -> list[str]:
        """Make the top encoder blocks trainable; returns the parameter names (relative to ``model``).

        ``vision_blocks``/``text_blocks`` count blocks from the top; ``-1`` means all blocks plus
        the embeddings. LayerNorms always stay frozen (fine-tuning them is the usual way CLIP
        collapses), as does ``logit_scale`` unless asked for.
        """
        m = self.model
        self.freeze()
        chosen: list[str] = []

        def pick(prefix: str, tower: nn.Module, n: int) -> None:
            layers = tower.encoder.layers
            idx = range(len(layers)) if n < 0 else range(max(0, len(layers) - n), len(layers))
            for i in idx:
                for name, p in layers[i].named_parameters():
                    if not _is_norm(name):
                        p.requires_grad_(True)
                        chosen.append(f"{prefix}.encoder.layers.{i}.{name}")
            if n < 0:
                for name, p in tower.embeddings.named_parameters():
                    p.requires_grad_(True)
                    chosen.append(f"{prefix}.embeddings.{name}")

        if vision_blocks:
            pick("vision_model", m.vision_model, vision_blocks)
        if text_blocks:
            pick("text_model", m.text_model, text_blocks)
        if projections and (vision_blocks or text_blocks):
            for proj in ("visual_projection", "text_projection"):
                for name, p in getattr(m, proj).named_parameters():
                    p.requires_grad_(True)
                    chosen.append(f"{proj}.{name}")
        if logit_scale:
            m.logit_scale.requires_grad_(True)
            chosen.append("logit_scale")
        return chosen

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def vision_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def max_text_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # ----------------------------------------------------------------- preprocessing
    def preprocess(self, images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
        """The checkpoint's own image preprocessing -> ``pixel_values (N, 3, S, S)``.

        With ``size`` the images are resized straight to ``size x size`` instead (no centre
        crop; meant for square inputs encoded at a resolution other than the native one, see
        :meth:`forward_image`'s ``interpolate_pos_encoding``).
        """
        kw = {}
        if size:
            kw = {"size": {"height": int(size), "width": int(size)}, "crop_size": {"height": int(size), "width": int(size)}}
        images = list(images)
        # A few images at a time: the processor holds every image of a call as a full-size float
        # tensor, and a blur view is a whole photo. Each image is processed on its own, so the
        # pixels are the same whatever the chunk.
        parts = [self.processor.image_processor(images=images[i:i + PREPROCESS_CHUNK], return_tensors="pt",
                                                **kw)["pixel_values"] for i in range(0, len(images), PREPROCESS_CHUNK)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize with the checkpoint's tokenizer; refuses texts longer than the context."""
        texts = [check_phrase(t) for t in texts]
        tok = self.processor.tokenizer(list(texts), padding=True, return_tensors="pt")
        if tok["input_ids"].shape[1] > self.max_text_tokens:
            lengths = tok["attention_mask"].sum(1)
            i = int(lengths.argmax())
            raise BadPhraseError(
                f"phrase is too long for this model's tokenizer: {len(texts[i])} characters became "
                f"{int(lengths[i])} tokens, the limit is {self.max_text_tokens} (text outside the "
                f"tokenizer's vocabulary, e.g. another script, takes several tokens per character); "
                f"shorten it: '{printable(texts[i][:60])}'"
            )
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    # ----------------------------------------------------------------- encoding
    def forward_image(self, pixel_values: torch.Tensor, dense: str = "final") -> ImageFeatures:
        """Image tower on preprocessed pixels (differentiable when unfrozen).

        Pixels of another side than the checkpoint's are encoded with interpolated position
        embeddings (a finer patch grid for the dense methods). ``dense`` picks what
        ``patch_embeds`` holds: ``"final"`` the last layer's patch tokens projected to the joint
        space; ``"value"`` the last attention block's *value* path of each patch alone, projected
        the same way (MaskCLIP, Zhou et al. 2022: the attention pooling mixes every token into
        the output, the value path keeps each patch's own content, so it matches text locally).
        """
        m = self.model
        if dense not in DENSE_EMBEDS:
            raise ValueError(f"dense must be one of {DENSE_EMBEDS}, got {dense!r}")
        interpolate = int(pixel_values.shape[-1]) != self.image_size
        out = m.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate,
                             output_hidden_states=dense == "value")
        pooled = m.visual_projection(out.pooler_output)
        patches = out.last_hidden_state[:, 1:]
        if dense == "value":
            last = m.vision_model.encoder.layers[-1]
            attn = last.self_attn
            x = attn.out_proj(attn.v_proj(last.layer_norm1(out.hidden_states[-2][:, 1:])))
            patch_embeds = m.visual_projection(m.vision_model.post_layernorm(x))
        else:
            patch_embeds = m.visual_projection(m.vision_model.post_layernorm(patches))
        p = patches.shape[1]
        side = int(round(p ** 0.5))
        grid = (side, p // side) if side * (p // side) == p else (1, p)
        return ImageFeatures(nn.functional.normalize(pooled, dim=-1), patches, patch_embeds, grid)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """Text tower on token ids (differentiable when unfrozen)."""
        m = self.model
        out = m.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = m.text_projection(out.pooler_output)
        words = m.text_model.embeddings.token_embedding(input_ids)
        return TextFeatures(nn.functional.normalize(pooled, dim=-1), out.last_hidden_state, attention_mask.bool(),
                            words)

    def _encode_pixels(self, pixel_values: torch.Tensor, dense: str = "final") -> ImageFeatures:
        """:meth:`forward_image` for inference, in onnxruntime when the backbone has exported towers."""
        if self.onnx is None:
            return self.forward_image(pixel_values, dense)
        if dense not in DENSE_EMBEDS:
            raise ValueError(f"dense must be one of {DENSE_EMBEDS}, got {dense!r}")
        o = self.onnx.run_image(pixel_values)
        patches = o["patch_tokens"]
        p = patches.shape[1]
        side = int(round(p ** 0.5))
        grid = (side, p // side) if side * (p // side) == p else (1, p)
        return ImageFeatures(o["embeds"], patches, o["value_embeds" if dense == "value" else "patch_embeds"], grid)

    def _encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """:meth:`forward_text` for inference, in onnxruntime when the backbone has exported towers."""
        if self.onnx is None:
            return self.forward_text(input_ids, attention_mask)
        o = self.onnx.run_text(input_ids, attention_mask)
        words = self.model.text_model.embeddings.token_embedding(input_ids)
        return TextFeatures(o["embeds"], o["tokens"], attention_mask.bool(), words)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64, size: int | None = None,
                      dense: str = "final") -> ImageFeatures:
        """Encode PIL images in batches (``size``, ``dense``: see :meth:`preprocess`, :meth:`forward_image`)."""
        if len(images) == 0:
            d, w = self.embed_dim, self.vision_width
            return ImageFeatures(torch.zeros(0, d), torch.zeros(0, 0, w), torch.zeros(0, 0, d), (0, 0))
        parts = [self._encode_pixels(self.preprocess(images[i : i + batch_size], size), dense)
                 for i in range(0, len(images), batch_size)]
        return ImageFeatures(
            torch.cat([p.embeds for p in parts]),
            torch.cat([p.patch_tokens for p in parts]),
            torch.cat([p.patch_embeds for p in parts]),
            parts[0].grid,
        )

    @torch.inference_mode()
    def encode_image_embeds(self, images: Iterable[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """``(N, D)`` normalized embeddings of a stream of images, ``batch_size`` at a time.

        The same batches and numbers as ``encode_images(list(images)).embeds``, but only one
        batch of images is held and the patch outputs are dropped as each batch ends.
        """
        parts: list[torch.Tensor] = []
        it = iter(images)
        while True:
            batch = list(itertools.islice(it, batch_size))
            if not batch:
                break
            parts.append(self._encode_pixels(self.preprocess(batch)).embeds.clone())
            del batch
        return torch.cat(parts) if parts else torch.zeros(0, self.embed_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> TextFeatures:
        """Encode texts in batches (token states padded to the longest in each batch)."""
        parts = [self._encode_tokens(**self.tokenize(texts[i : i + batch_size]))
                 for i in range(0, len(texts), batch_size)]
        width = max(f.tokens.shape[1] for f in parts)

        def padded(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else (0, width - x.shape[1]))

        return TextFeatures(torch.cat([f.embeds for f in parts]), torch.cat([padded(f.tokens) for f in parts]),
                            torch.cat([padded(f.mask) for f in parts]), torch.cat([padded(f.words) for f in parts]))

    @torch.inference_mode()
    def word_embeddings(self, texts: Sequence[str], width: int, batch_size: int = 4096) -> torch.Tensor:
        """Input word embeddings ``(N, width, Dt)`` of ``texts`` (zero-padded): token lookups only,
        no Transformer pass, so a feature cache can add them for every phrase in seconds."""
        emb = self.model.text_model.embeddings.token_embedding
        out = torch.zeros(len(texts), width, emb.embedding_dim)
        for i in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[i : i + batch_size])["input_ids"]
            out[i : i + len(ids), : ids.shape[1]] = emb(ids).float().cpu()[:, :width]
        return out

    def clear_text_cache(self) -> None:
        """Forget memoized text embeddings (after the text tower's weights changed)."""
        self._text_cache.clear()

    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalized text embeddings ``(N, D)``, memoized per phrase (LRU)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            emb = self.encode_texts(missing).embeds
            for t, e in zip(missing, emb):
                self._text_cache[t] = e
                if len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
        for t in texts:
            self._text_cache.move_to_end(t)
        return torch.stack([self._text_cache[t] for t in texts]) if texts else torch.zeros(0, self.embed_dim)
