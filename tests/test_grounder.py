"""Grounder API: set_image once, predict cheaply, outputs in the promised shapes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground import Grounder, list_methods
from clipground.errors import ClipgroundError
from clipground.proposals import ProposalSource


def _scene(tmp_path):
    img = Image.new("RGB", (160, 120), (230, 230, 230))
    d = ImageDraw.Draw(img)
    d.rectangle([10, 20, 50, 60], fill=(220, 30, 30))
    d.ellipse([100, 50, 140, 90], fill=(30, 30, 220))
    path = tmp_path / "scene.png"
    img.save(path)
    coco = {
        "images": [{"id": 1, "file_name": "scene.png", "width": 160, "height": 120}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 20, 41, 41], "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [100, 50, 41, 41], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "shape"}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    return path, tmp_path / "inst.json"


def test_predict_shapes_and_formats(tiny_clip_dir, tmp_path):
    path, inst = _scene(tmp_path)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=f"gt:{inst}")
    g.set_image(path)
    assert len(g.state.proposals) == 2
    p = g.predict("the red square")
    assert len(p.box) == 4 and p.box in p.boxes.tolist()
    assert p.boxes.shape == (2, 4) and torch.all(p.scores[:-1] >= p.scores[1:])
    hf = p.to_hf()
    assert set(hf[0]) == {"score", "label", "box"} and set(hf[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    batch = g.predict_batch(["the red square", "the blue circle"])
    assert batch[0].box == p.box and batch[0].score == pytest.approx(p.score, abs=1e-6)
    sv = pytest.importorskip("supervision")
    det = p.to_supervision()
    assert isinstance(det, sv.Detections) and det.xyxy.shape == (1, 4)


def test_inputs_all_give_same_result(tiny_clip_dir, tmp_path):
    path, _ = _scene(tmp_path)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals="selective-search")
    ref = g(path, "the red square").box
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    for inp in (pil, arr, torch.from_numpy(arr).permute(2, 0, 1)):
        assert g(inp, "the red square").box == ref


def test_set_image_encodes_once(tiny_clip_dir, tmp_path, monkeypatch):
    path, inst = _scene(tmp_path)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=f"gt:{inst}")
    g.set_image(path)
    calls = []
    orig = g.backbone.encode_images
    monkeypatch.setattr(g.backbone, "encode_images", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for phrase in ["red", "blue", "the leftmost shape", "shape"]:
        g.predict(phrase)
    assert calls == []  # predict never re-encodes images


def test_relation_resolver_switch(tiny_clip_dir, tmp_path):
    # temperature ~0: every box matches "shape" equally, so geometry alone decides
    path, inst = _scene(tmp_path)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=f"gt:{inst}", relations=True, temperature=1e-6)
    g.set_image(path)
    assert g.predict("the leftmost shape").box == [10.0, 20.0, 51.0, 61.0]
    assert g.predict("the rightmost shape").box == [100.0, 50.0, 141.0, 91.0]


def test_no_proposals_falls_back(tiny_clip_dir, tmp_path):
    path, _ = _scene(tmp_path)

    class Empty(ProposalSource):
        name = "empty"

        def raw(self, image, key):
            return torch.zeros(0, 4), torch.zeros(0)

    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=Empty())
    p = g(path, "anything")
    assert p.fallback and p.box == [0.0, 0.0, 160.0, 120.0]


def test_errors(tiny_clip_dir):
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals="selective-search")
    with pytest.raises(ClipgroundError, match="set_image"):
        g.predict("x")
    with pytest.raises(ClipgroundError, match="unknown method"):
        Grounder.load("nope", backbone=tiny_clip_dir)
    with pytest.raises(ClipgroundError, match="unknown proposal"):
        Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals="nope")
    assert "zero-shot" in list_methods()


def test_save_and_from_pretrained_zero_shot(tiny_clip_dir, tmp_path):
    path, inst = _scene(tmp_path)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=f"gt:{inst}", views=["crop", "circle"])
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert g2.method.config.views == ("crop", "circle")
    a, b = g(path, "the blue circle"), g2(path, "the blue circle")
    assert a.box == b.box and torch.allclose(a.scores, b.scores)


def test_trained_source_names(tiny_clip_dir, tmp_path):
    """A trainable method's bare name means its bundled world checkpoint (on the world CLIP only);
    a training-free one is built on the backbone; a directory is itself; never untrained weights."""
    from clipground.backbone.hub import WORLD_CLIP
    from clipground.errors import CheckpointNotFoundError
    from clipground.grounder import trained_source

    assert trained_source("zero-shot", str(tiny_clip_dir)) is None
    assert trained_source("proposal-attention", WORLD_CLIP) == "clipground/world-proposal-attention"
    assert trained_source("proposal-attention") == "clipground/world-proposal-attention"
    assert trained_source("clipground/world-proposal-attention", "anything") == "clipground/world-proposal-attention"
    assert trained_source(str(tmp_path), str(tiny_clip_dir)) == str(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="must be trained"):
        trained_source("proposal-attention", str(tiny_clip_dir))
    with pytest.raises(ClipgroundError, match="unknown method"):
        trained_source("no-such-method", WORLD_CLIP)
