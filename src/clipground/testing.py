"""Test helpers: tiny randomly initialized CLIP checkpoints, and the in-process CLI runner.

The checkpoints go through exactly the path real ones take: built with transformers,
written with ``save_pretrained``, read back with ``from_pretrained``. The tokenizer is a
byte-level CLIP BPE vocabulary without merges (every character is a token), built
offline. :func:`run_cli` and :func:`assert_one_error_line` are shared by the CLI tests;
:func:`write_box_scene` draws the small three-object scene the method tests ground in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .io import atomic_write


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (the standard reversible mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_char_tokenizer(path: str | os.PathLike, max_length: int = 32):
    """Write a character-level ``CLIPTokenizer`` (vocab.json, merges.txt) and return it loaded."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    atomic_write(path / "vocab.json", json.dumps(vocab))
    atomic_write(path / "merges.txt", "#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)
    return tok


def tiny_clip_config(image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2,
                     projection_dim: int = 16, vocab_size: int = 514, max_text: int = 64, **vision_overrides):
    """A ``CLIPConfig`` small enough to run in milliseconds."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, vocab_size=vocab_size, max_position_embeddings=max_text,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size, **vision_overrides),
        projection_dim=projection_dim,
    )


def make_tiny_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32, **config_kwargs) -> Path:
    """Create and ``save_pretrained`` a tiny random CLIP (model, tokenizer, image processor)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    import tempfile

    path = Path(path)
    tok = write_char_tokenizer(tempfile.mkdtemp(prefix="cg_tok_"), max_length=config_kwargs.get("max_text", 64))
    torch.manual_seed(seed)
    cfg = tiny_clip_config(image_size=image_size, vocab_size=len(tok), **config_kwargs)
    model = CLIPModel(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=ip, tokenizer=tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_clip_b32(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialized CLIP ViT-B/32 (same compute as the real one) for benchmarks."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    import tempfile

    path = Path(path)
    tok = write_char_tokenizer(tempfile.mkdtemp(prefix="cg_tok_"), max_length=77)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(image_size=224, patch_size=32),
        projection_dim=512,
    )
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run_cli(args: list[str], monkeypatch: Any, capsys: Any) -> tuple[int, str, str]:
    """Run the ``clipground`` entry point in-process (pytest's ``monkeypatch`` and ``capsys``
    fixtures); return ``(exit code, stdout, stderr)``."""
    import sys

    from .cli.main import main

    monkeypatch.setattr(sys, "argv", ["clipground", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int | None, err: str, *needles: str) -> str:
    """Exit code non-zero, no traceback, exactly one non-empty stderr line ``error: ...``
    containing every ``needle``; returns that line."""
    assert code not in (0, None), f"expected a non-zero exit, got {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


#: The three objects of :func:`write_box_scene` (xyxy pixels of a 64x48 image) and their colours.
SCENE_BOXES = [[4.0, 6.0, 20.0, 22.0], [26.0, 4.0, 40.0, 30.0], [44.0, 14.0, 60.0, 40.0]]
SCENE_COLOURS = [(220, 30, 30), (30, 60, 220), (30, 200, 40)]  # red, blue, green


def write_box_scene(root: str | os.PathLike, shape: str = "rectangle") -> tuple[Path, Path]:
    """Write ``scene.png`` (a red, a blue and a green ``rectangle`` or ``ellipse`` at
    :data:`SCENE_BOXES` on grey) and its COCO ``instances.json`` into ``root``; return both paths."""
    from PIL import Image, ImageDraw

    root = Path(root)
    img = Image.new("RGB", (64, 48), (90, 90, 90))
    draw = getattr(ImageDraw.Draw(img), shape)
    for (x1, y1, x2, y2), rgb in zip(SCENE_BOXES, SCENE_COLOURS):
        draw([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    img.save(root / "scene.png")
    coco = {"images": [{"id": 1, "file_name": "scene.png", "width": 64, "height": 48}],
            "annotations": [{"id": i + 1, "image_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                             "category_id": 1} for i, b in enumerate(SCENE_BOXES)],
            "categories": [{"id": 1, "name": "box"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root / "scene.png", root / "instances.json"
