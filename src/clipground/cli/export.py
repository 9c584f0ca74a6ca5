"""``clipground export onnx``: the CLIP towers as ONNX graphs for ``--runtime onnx``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .common import BackboneOpt, quiet_transformers

export_app = typer.Typer(help="Export models for other runtimes.", no_args_is_help=True)


@export_app.command("onnx")
def onnx_command(
    backbone: str = BackboneOpt,
    out: Path = typer.Option(..., "--out", help="Directory to write (the checkpoint, the ONNX graphs, onnx.json)."),
    quantize: str = typer.Option("none", "--quantize", help="none (fp32) or int8 (onnxruntime dynamic quantisation)."),
    image_size: list[int] = typer.Option(None, "--image-size", help="Image tower input side (repeatable; default: the checkpoint's own). Another side uses interpolated position embeddings (e.g. the roi view's roi_size)."),
) -> None:
    """Export the image tower (pooled embedding, patch tokens) and the text tower with dynamic batch."""
    from ..backbone import ClipBackbone
    from ..backbone.onnx_runtime import export_onnx

    quiet_transformers()
    bb = ClipBackbone.from_pretrained(backbone)
    path = export_onnx(bb, out, image_sizes=list(image_size or []) or None, quantize=quantize)
    files = sorted(p.name for p in path.glob("*.onnx"))
    Console().print(f"wrote {path}: {', '.join(files)}; use it with --backbone {path} --runtime onnx",
                    highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
