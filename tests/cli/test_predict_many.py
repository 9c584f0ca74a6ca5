"""``clipground predict`` over a folder, a glob and a JSONL manifest: one JSONL line per image,
the same answers as predicting each image alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipground.batching import expand_inputs, is_batch_input
from clipground.errors import BadImageError
from clipground.testing import run_cli


def _photos(tmp_path, n: int = 3):
    rs = np.random.RandomState(1)
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(n):
        im = Image.fromarray((rs.rand(56, 72 + 8 * i, 3) * 60 + 90).astype(np.uint8))
        ImageDraw.Draw(im).rectangle([5 + i, 5, 30 + i, 30], fill=(200, 40, 40))
        im.save(d / f"p{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_expand_inputs(tmp_path):
    d = _photos(tmp_path)
    assert [j.image for j in expand_inputs(d)] == [str(d / f"p{i}.png") for i in range(3)]
    assert [j.image for j in expand_inputs(str(d / "p[01].png"))] == [str(d / "p0.png"), str(d / "p1.png")]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "photos/p2.png", "phrases": ["a", "b"]}) + "\n\n")
    jobs = expand_inputs(m)
    assert jobs[0].image == str(tmp_path / "photos" / "p2.png") and jobs[0].phrases == ["a", "b"]
    assert is_batch_input(d) and is_batch_input(m) and is_batch_input(str(d / "*.png"))
    assert not is_batch_input(d / "p0.png")
    m.write_text(json.dumps({"image": 3}) + "\n")
    with pytest.raises(BadImageError, match="m.jsonl:1"):
        expand_inputs(m)
    with pytest.raises(BadImageError, match="no image matches"):
        expand_inputs(str(d / "*.jpg"))


def test_predict_folder_glob_manifest_equal_single(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    d = _photos(tmp_path)
    base = ["-b", str(tiny_clip_dir), "--no-progress"]
    singles = {}
    for i in range(3):
        code, out, err = run_cli(["predict", str(d / f"p{i}.png"), "the red square", "a shape",
                                  "-b", str(tiny_clip_dir), "--json", "-"], monkeypatch, capsys)
        assert code == 0, err
        singles[str(d / f"p{i}.png")] = json.loads(out)
    out_file = tmp_path / "preds.jsonl"
    code, out, err = run_cli(["predict", str(d), "the red square", "a shape", "--json", str(out_file),
                              "--image-batch", "2", *base], monkeypatch, capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["image"] for x in lines] == sorted(singles)
    for x in lines:
        ref = singles[x["image"]]
        assert [p["box"] for p in x["predictions"]] == [p["box"] for p in ref["predictions"]]
        for p, q in zip(x["predictions"], ref["predictions"]):
            assert abs(p["score"] - q["score"]) < 1e-5
    code, out, err = run_cli(["predict", str(d / "p*.png"), "the red square", "a shape", "--json", "-", *base],
                             monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(x)["image"] for x in out.splitlines()] == sorted(singles)

    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps({"image": f"photos/p{i}.png", "phrases": ["a shape"] * (i + 1)})
                           for i in range(3)) + "\n" + json.dumps({"image": "photos/gone.png", "phrases": ["x"]}) + "\n")
    code, out, err = run_cli(["predict", str(m), "--json", "-", *base], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [len(r.get("predictions", [])) for r in rows] == [1, 2, 3, 0]
    assert "not found" in rows[3]["error"] and "gone.png" in err


def test_predict_many_needs_phrases(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    d = _photos(tmp_path)
    code, _, err = run_cli(["predict", str(d), "-b", str(tiny_clip_dir)], monkeypatch, capsys)
    assert code != 0 and "no phrase" in err and "Traceback" not in err
