"""Batched evaluation (data-loader workers, views of several images in one batch) equals the sequential one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipground.data.records import GroundingRecord
from clipground.evaluation import evaluate
from clipground.evaluation.evaluate import item_to_json
from clipground.grounder import Grounder
from clipground.proposals import SelectiveSearch


def _records(tmp_path, n: int = 5) -> list[GroundingRecord]:
    rs = np.random.RandomState(0)
    recs = []
    for i in range(n):
        im = Image.fromarray((rs.rand(60 + 4 * i, 80, 3) * 60 + 90).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = rs.randint(0, 50), rs.randint(0, 30)
            d.rectangle([x, y, x + rs.randint(10, 30), y + rs.randint(10, 30)],
                        fill=tuple(int(c) for c in rs.randint(0, 255, 3)))
        path = tmp_path / f"im{i}.png"
        im.save(path)
        for phrase in ("the red square", "a blue shape on the left", "the biggest thing"):
            recs.append(GroundingRecord(str(path), phrase, [5, 5, 40, 40], split="val"))
    recs.insert(4, GroundingRecord(str(tmp_path / "broken.png"), "nothing", [0, 0, 5, 5], split="val"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return recs


def _answers(result) -> list[dict]:
    return [item_to_json(it) for it in result.items]


@pytest.mark.parametrize("views", [("crop", "blur"), ("roi", "crop")])
def test_batched_eval_equals_sequential(tiny_clip_dir, tmp_path, views):
    recs = _records(tmp_path)
    g = Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals=SelectiveSearch(top_k=8), views=views)
    seq = evaluate(g, recs, progress=False, examples=0)
    bat = evaluate(g, recs, progress=False, examples=0, num_workers=2, image_batch=3)
    a, b = _answers(seq), _answers(bat)
    assert len(a) == len(b) == 15
    for x, y in zip(a, b):
        assert x["box"] == y["box"] and x["index"] == y["index"] and x["ranked_ious"] == y["ranked_ious"]
        assert abs(x["score"] - y["score"]) < 1e-5
    assert seq.metrics == bat.metrics
    assert seq.protocol == bat.protocol
    assert [f["image"] for f in seq.failures] == [f["image"] for f in bat.failures] == [str(tmp_path / "broken.png")]
    assert bat.timing["num_workers"] == 2 and bat.timing["image_batch"] == 3
    json.dumps(bat.to_json())


def test_batch_encodes_several_images_together(tiny_clip_dir, tmp_path):
    recs = [r for r in _records(tmp_path) if "broken" not in r.image]
    g = Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals=SelectiveSearch(top_k=8), views=("crop",))
    sizes = []
    orig = g.backbone.encode_image_embeds

    def counting(images, *a, **kw):
        images = list(images)
        sizes.append(len(images))
        return orig(images, *a, **kw)

    g.backbone.encode_image_embeds = counting
    res = evaluate(g, recs, progress=False, examples=0, image_batch=5)
    assert len(sizes) == 1 and sizes[0] == sum(it.n_proposals for it in res.items[::3])  # 5 images, one stream
