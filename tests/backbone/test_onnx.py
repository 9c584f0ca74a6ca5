"""ONNX towers: exported graphs match the eager towers, and every method encodes through them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from clipground.backbone import ClipBackbone  # noqa: E402
from clipground.backbone.onnx_runtime import export_onnx, read_manifest  # noqa: E402
from clipground.errors import ConfigError  # noqa: E402
from clipground.grounder import Grounder  # noqa: E402
from clipground.testing import run_cli  # noqa: E402

TEXTS = ["the red circle", "a man on the left of the big dog", "dog"]


def _images(n: int = 5) -> list[Image.Image]:
    rs = np.random.RandomState(0)
    return [Image.fromarray((rs.rand(40 + 7 * i, 50, 3) * 255).astype(np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def exported(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(ClipBackbone.from_pretrained(tiny_clip_dir), out, image_sizes=[32, 64])
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("dense", ["final", "value"])
@pytest.mark.parametrize("size", [None, 64])
def test_image_tower_parity(tiny_clip_dir, exported, dense, size):
    eager = ClipBackbone.from_pretrained(tiny_clip_dir)
    onnx = ClipBackbone.from_pretrained(exported, runtime="onnx")
    assert onnx.runtime == "onnx" and eager.runtime == "torch"
    ims = _images()
    a = eager.encode_images(ims, batch_size=2, size=size, dense=dense)  # batches of 2 and 1: dynamic batch
    b = onnx.encode_images(ims, batch_size=2, size=size, dense=dense)
    assert a.grid == b.grid
    for x, y in [(a.embeds, b.embeds), (a.patch_tokens, b.patch_tokens), (a.patch_embeds, b.patch_embeds)]:
        assert x.shape == y.shape
        assert _max_diff(x, y) < 1e-4


def test_text_tower_parity(tiny_clip_dir, exported):
    eager = ClipBackbone.from_pretrained(tiny_clip_dir)
    onnx = ClipBackbone.from_pretrained(exported, runtime="onnx")
    for texts in (TEXTS, TEXTS[:1], TEXTS * 11):  # other batch sizes and padded lengths than the export's
        a, b = eager.encode_texts(texts), onnx.encode_texts(texts)
        assert _max_diff(a.embeds, b.embeds) < 1e-4
        assert _max_diff(a.tokens, b.tokens) < 1e-4
        assert torch.equal(a.mask, b.mask) and torch.equal(a.words, b.words)


def test_onnx_is_really_used(tiny_clip_dir, exported):
    """Changing the PyTorch image weights changes eager output but not the onnxruntime one."""
    onnx = ClipBackbone.from_pretrained(exported, runtime="onnx")
    ref = onnx.encode_images(_images(2)).embeds
    with torch.no_grad():
        onnx.model.visual_projection.weight.copy_(torch.randn_like(onnx.model.visual_projection.weight))
    assert _max_diff(onnx.encode_images(_images(2)).embeds, ref) < 1e-6
    onnx.use_onnx(None)
    assert _max_diff(onnx.encode_images(_images(2)).embeds, ref) > 1e-3


def test_int8_export_close_and_smaller(tiny_clip_dir, exported, tmp_path):
    q = export_onnx(ClipBackbone.from_pretrained(tiny_clip_dir), tmp_path / "int8", quantize="int8")
    meta = read_manifest(q)
    assert meta["quantize"] == "int8" and all(".int8." in n for n in meta["files"]["image"].values())
    eager = ClipBackbone.from_pretrained(tiny_clip_dir)
    qb = ClipBackbone.from_pretrained(q, runtime="onnx")
    a, b = eager.encode_images(_images()).embeds, qb.encode_images(_images()).embeds
    cos = (a * b).sum(-1)
    assert cos.min() > 0.9  # quantised: close, not equal
    texts = ["the red square", "a blue circle on the left", "x"]
    ta, tb = eager.encode_texts(texts).embeds, qb.encode_texts(texts).embeds
    assert (ta * tb).sum(-1).min() > 0.9 and not torch.equal(ta, tb)  # the int8 text tower too
    assert (q / meta["files"]["text"]).stat().st_size < (exported / "text.onnx").stat().st_size


def test_missing_export_size_is_a_clear_error(exported):
    onnx = ClipBackbone.from_pretrained(exported, runtime="onnx")
    with pytest.raises(ConfigError, match="--image-size 48"):
        onnx.encode_images(_images(1), size=48)


def test_methods_use_onnx_without_change(tiny_clip_dir, exported):
    """The zero-shot method ranks the same way on both runtimes (no method code knows of ONNX)."""
    from clipground.proposals import SelectiveSearch

    im = _images(1)[0].resize((96, 80))
    preds = []
    for kw in ({"backbone": str(tiny_clip_dir)}, {"backbone": str(exported), "runtime": "onnx"}):
        g = Grounder.load("zero-shot", proposals=SelectiveSearch(top_k=6), views=("crop", "blur"), **kw)
        g.set_image(im)
        preds.append(g.predict_batch(TEXTS))
    for p, q in zip(*preds):
        assert p.box == q.box and abs(p.score - q.score) < 1e-4


def test_export_cli_and_predict_runtime(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    code, stdout, err = run_cli(["export", "onnx", "-b", str(tiny_clip_dir), "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "image_32.onnx").is_file() and (out / "text.onnx").is_file()
    assert json.loads((out / "onnx.json").read_text())["source"] == str(tiny_clip_dir)
    img = tmp_path / "im.png"
    _images(1)[0].resize((96, 80)).save(img)
    code, stdout, err = run_cli(["predict", str(img), "the dog", "-b", str(out), "--runtime", "onnx", "--json", "-"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(stdout)["predictions"][0]["phrase"] == "the dog"
    code, _, err = run_cli(["predict", str(img), "the dog", "-b", str(tiny_clip_dir), "--runtime", "onnx"],
                           monkeypatch, capsys)
    assert code != 0 and "export onnx" in err
