"""CLIP towers exported to ONNX and run with onnxruntime: the backbone's ``runtime="onnx"``.

:func:`export_onnx` writes a self-contained directory: the checkpoint itself
(``save_pretrained``: config, tokenizer, preprocessor, weights, so the directory loads like any
CLIP folder), ``image_<S>.onnx`` for each exported input side ``S`` (pooled embedding, patch
tokens and both per-patch joint-space embeddings: the last layer's and the MaskCLIP value
path), ``text.onnx`` (pooled embedding and token states) and ``onnx.json`` describing them.
Every graph has a dynamic batch axis (the text graph a dynamic length too). ``quantize="int8"``
adds onnxruntime's dynamic int8 quantisation of the weights.

:class:`OnnxTowers` holds the onnxruntime sessions; :class:`~clipground.backbone.clip.ClipBackbone`
calls it from its encode functions, so every method and the feature cache get it without a change.
onnx and onnxruntime are imported only here, and only when used.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointNotFoundError, ConfigError
from ..io import write_json

if TYPE_CHECKING:
    from .clip import ClipBackbone

MANIFEST = "onnx.json"
RUNTIMES = ("torch", "onnx")
QUANTIZE = ("none", "int8")
IMAGE_OUTPUTS = ("embeds", "patch_tokens", "patch_embeds", "value_embeds")
TEXT_OUTPUTS = ("embeds", "tokens")


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is a known one, else a :class:`ConfigError`."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


class _ImageTower(nn.Module):
    """The image tower as one traceable function of pixels (what ``forward_image`` computes)."""

    def __init__(self, model: nn.Module, interpolate: bool):
        super().__init__()
        self.model = model
        self.interpolate = interpolate

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        vm = m.vision_model
        out = vm(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate, output_hidden_states=True)
        pooled = nn.functional.normalize(m.visual_projection(out.pooler_output), dim=-1)
        patches = out.last_hidden_state[:, 1:]
        final = m.visual_projection(vm.post_layernorm(patches))
        last = vm.encoder.layers[-1]
        x = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(out.hidden_states[-2][:, 1:])))
        value = m.visual_projection(vm.post_layernorm(x))
        return pooled, patches, final, value


class _TextTower(nn.Module):
    """The text tower as one traceable function of token ids and mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        out = m.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.normalize(m.text_projection(out.pooler_output), dim=-1), out.last_hidden_state


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: tuple[str, ...],
            dynamic: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=list(outputs),
                          dynamic_axes=dynamic, opset_version=17, do_constant_folding=True)


def _quantize(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantisation
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_onnx(backbone: "ClipBackbone", out: str | os.PathLike, image_sizes: list[int] | None = None,
                quantize: str = "none") -> Path:
    """Export ``backbone``'s towers to ``out`` (see the module docstring); returns the directory.

    Args:
        image_sizes: input sides to export the image tower at (default: the checkpoint's own);
            another side than the native one uses interpolated position embeddings.
        quantize: ``none`` (fp32 graphs) or ``int8`` (dynamic int8 quantisation; the graphs
            the runtime loads are then the quantised ones).
    """
    from ..io import atomic_dir

    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    sizes = sorted({int(s) for s in (image_sizes or [backbone.image_size])})
    patch = int(backbone.model.config.vision_config.patch_size)
    bad = [s for s in sizes if s <= 0 or s % patch]
    if bad:
        raise ConfigError(f"image sizes must be positive multiples of the patch size {patch}, got {bad}")
    model = backbone.model.eval()
    # The eager attention traces into plain ops every onnxruntime version runs.
    previous = getattr(model.config, "_attn_implementation", None)
    _set_attention(model, "eager")
    files: dict[str, Any] = {"image": {}, "text": None}
    try:
        with atomic_dir(out) as tmp:
            backbone.save_pretrained(tmp)
            with torch.no_grad():
                for s in sizes:
                    name = f"image_{s}.onnx"
                    px = torch.zeros(2, 3, s, s)
                    _export(_ImageTower(model, s != backbone.image_size), (px,), tmp / name, ["pixel_values"],
                            IMAGE_OUTPUTS, {"pixel_values": {0: "batch"}, **{o: {0: "batch"} for o in IMAGE_OUTPUTS}})
                    files["image"][str(s)] = name
                tok = backbone.tokenize(["a photo", "an example phrase"])
                _export(_TextTower(model), (tok["input_ids"], tok["attention_mask"]), tmp / "text.onnx",
                        ["input_ids", "attention_mask"], TEXT_OUTPUTS,
                        {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                         "embeds": {0: "batch"}, "tokens": {0: "batch", 1: "length"}})
                files["text"] = "text.onnx"
            if quantize == "int8":
                for key, name in [*files["image"].items(), ("text", files["text"])]:
                    qname = name.replace(".onnx", ".int8.onnx")
                    _quantize(tmp / name, tmp / qname)
                    (tmp / name).unlink()
                    if key == "text":
                        files["text"] = qname
                    else:
                        files["image"][key] = qname
            write_json(tmp / MANIFEST, {"source": backbone.name, "quantize": quantize, "files": files,
                                        "format_version": 1})
    finally:
        if previous is not None:
            _set_attention(model, previous)
    return Path(out)


def _set_attention(model: nn.Module, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter(impl)
            return
        except Exception:  # pragma: no cover - older transformers: set the config fields
            pass
    for cfg in (model.config, model.config.vision_config, model.config.text_config):
        cfg._attn_implementation = impl


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``onnx.json`` of an exported directory, or ``None`` when ``path`` is not one."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


class OnnxTowers:
    """onnxruntime sessions of an exported directory: image tower per input side, text tower."""

    def __init__(self, directory: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        meta = read_manifest(self.directory)
        if meta is None:
            raise CheckpointNotFoundError(
                f"runtime 'onnx' needs a directory written by `clipground export onnx`; {self.directory} has no "
                f"{MANIFEST}")
        self.meta = meta
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._opts = opts
        self._ort = ort
        self._image: dict[int, Any] = {}
        self._text: Any = None

    @property
    def image_sizes(self) -> list[int]:
        return sorted(int(s) for s in self.meta["files"]["image"])

    def _session(self, name: str) -> Any:
        return self._ort.InferenceSession(str(self.directory / name), self._opts, providers=["CPUExecutionProvider"])

    def image_session(self, size: int) -> Any:
        if size not in self._image:
            name = self.meta["files"]["image"].get(str(size))
            if name is None:
                raise ConfigError(f"{self.directory} has no image tower exported at {size} px (it has "
                                  f"{self.image_sizes}); export it with `clipground export onnx --image-size {size}`")
            self._image[size] = self._session(name)
        return self._image[size]

    def run_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image tower's outputs (``IMAGE_OUTPUTS``) for preprocessed pixels."""
        sess = self.image_session(int(pixel_values.shape[-1]))
        outs = sess.run(list(IMAGE_OUTPUTS), {"pixel_values": pixel_values.detach().cpu().float().numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(IMAGE_OUTPUTS, outs)}

    def run_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text tower's outputs (``TEXT_OUTPUTS``) for token ids."""
        if self._text is None:
            self._text = self._session(self.meta["files"]["text"])
        outs = self._text.run(list(TEXT_OUTPUTS), {"input_ids": input_ids.cpu().numpy().astype("int64"),
                                                    "attention_mask": attention_mask.cpu().numpy().astype("int64")})
        return {k: torch.from_numpy(v) for k, v in zip(TEXT_OUTPUTS, outs)}
