"""Tests of the proposal sources: selective search geometry and ranking, file-keyed
ground-truth / precomputed boxes (COCO, JSON, JSONL; lookup by relative path, base name
and COCO id), malformed files, and the offline torchvision detector error."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground import boxes as B
from clipground.errors import BadAnnotationError, CheckpointNotFoundError, UnknownNameError
from clipground.proposals import (
    GroundTruthBoxes,
    PrecomputedProposals,
    SelectiveSearch,
    TorchvisionDetector,
    get_proposals,
)

RECT = [50.0, 40.0, 130.0, 100.0]  # xyxy of the drawn rectangle


def _scene(scale: int = 1) -> Image.Image:
    """200x150 noisy grey image with one solid red rectangle at RECT (times ``scale``)."""
    rs = np.random.RandomState(0)
    a = (rs.rand(150, 200, 3) * 40 + 100).astype(np.uint8)
    im = Image.fromarray(a)
    ImageDraw.Draw(im).rectangle([RECT[0], RECT[1], RECT[2] - 1, RECT[3] - 1], fill=(220, 30, 30))
    if scale > 1:
        im = im.resize((200 * scale, 150 * scale), Image.NEAREST)
    return im


# --------------------------------------------------------------------------- selective search


@pytest.mark.parametrize("top_k", [5, 16])
def test_selective_search_contract(top_k):
    im = _scene()
    p = SelectiveSearch(top_k=top_k)(im)
    assert 0 < len(p) <= top_k
    assert p.boxes.shape == (len(p), 4) and p.scores.shape == (len(p),)
    b = p.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 200).all() and (b[:, 3] <= 150).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()  # xyxy, not xywh
    assert (p.scores[:-1] >= p.scores[1:]).all()  # sorted best first


def test_selective_search_finds_drawn_rectangle():
    p = SelectiveSearch(top_k=16)(_scene())
    ious = B.iou(p.boxes, [RECT])[:, 0]
    assert ious.max() > 0.9


def test_selective_search_scales_boxes_back():
    # Searched at max_side=200 on an 800x600 image: boxes must come back in full-size pixels.
    p = SelectiveSearch(top_k=16, max_side=200)(_scene(scale=4))
    assert B.iou(p.boxes, [[v * 4 for v in RECT]])[:, 0].max() > 0.9
    assert (p.boxes[:, 2] <= 800).all() and (p.boxes[:, 3] <= 600).all()


def test_selective_search_is_deterministic():
    im = _scene()
    a, b = SelectiveSearch(top_k=32)(im), SelectiveSearch(top_k=32)(im)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_selective_search_quality_mode_and_tiny_image():
    assert len(SelectiveSearch(top_k=8, mode="quality")(_scene())) > 0
    tiny = SelectiveSearch(top_k=8)(Image.new("RGB", (3, 3), (10, 20, 30)))
    assert tiny.boxes.shape[1:] == (4,)  # may be empty (min_size), but never malformed


def test_unknown_source():
    with pytest.raises(UnknownNameError, match="selective-search"):
        get_proposals("nope")


# --------------------------------------------------------------------------- files

IMG = Image.new("RGB", (640, 480))


def _coco(path: Path) -> Path:
    data = {
        "images": [
            {"id": 309, "file_name": "000000000309.jpg", "width": 640, "height": 480},
            {"id": 7, "file_name": "sub/dir/photo.jpg", "width": 640, "height": 480},
            {"id": 8, "file_name": "other/dir/photo.jpg", "width": 640, "height": 480},
            {"id": 9, "file_name": "empty.jpg", "width": 640, "height": 480},
        ],
        "annotations": [
            {"id": 1, "image_id": 309, "bbox": [10, 20, 30, 40], "category_id": 1},
            {"id": 2, "image_id": 309, "bbox": [100, 100, 50, 50], "category_id": 1},
            {"id": 3, "image_id": 7, "bbox": [1, 2, 100, 200], "category_id": 1},
            {"id": 4, "image_id": 8, "bbox": [5, 5, 10, 10], "category_id": 1},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def _sorted(boxes: torch.Tensor) -> list[list[float]]:
    return sorted(boxes.tolist())


def test_gt_reads_coco_and_converts_xywh(tmp_path):
    src = get_proposals(f"gt:{_coco(tmp_path / 'inst.json')}")
    assert isinstance(src, GroundTruthBoxes)
    p = src(IMG, "/data/coco/train2017/000000000309.jpg")
    assert _sorted(p.boxes) == [[10, 20, 40, 60], [100, 100, 150, 150]]


def test_gt_lookup_by_relative_path_base_name_and_coco_id(tmp_path):
    src = get_proposals(f"gt:{_coco(tmp_path / 'inst.json')}")
    # exact relative path and a longer path ending with it
    assert _sorted(src(IMG, "sub/dir/photo.jpg").boxes) == [[1, 2, 101, 202]]
    assert _sorted(src(IMG, "/root/images/other/dir/photo.jpg").boxes) == [[5, 5, 15, 15]]
    # ambiguous base name: no guess
    assert len(src(IMG, "/elsewhere/photo.jpg")) == 0
    # unambiguous base name anywhere
    assert len(src(IMG, "/somewhere/else/000000000309.jpg")) == 2
    # COCO 2014 naming finds the 2017 file by image id
    assert len(src(IMG, "/coco/train2014/COCO_train2014_000000000309.jpg")) == 2
    # known image without annotations, unknown image
    assert len(src(IMG, "empty.jpg")) == 0 and len(src(IMG, "unknown.jpg")) == 0


def test_gt_needs_a_path(tmp_path):
    src = get_proposals(f"gt:{_coco(tmp_path / 'inst.json')}")
    with pytest.raises(BadAnnotationError, match="path"):
        src(IMG, None)


def test_file_json_object(tmp_path):
    f = tmp_path / "props.json"
    f.write_text(json.dumps({"a/b.jpg": {"boxes": [[0, 0, 50, 50], [10, 10, 200, 100]], "scores": [0.2, 0.9]}}))
    p = get_proposals(f"file:{f}")(IMG, "/x/a/b.jpg")
    assert p.boxes.tolist() == [[10, 10, 200, 100], [0, 0, 50, 50]]  # ranked by score
    assert p.scores.tolist() == pytest.approx([0.9, 0.2])


def test_file_jsonl_xywh_and_default_scores(tmp_path):
    f = tmp_path / "props.jsonl"
    rows = [
        {"image": "000000000025.jpg", "boxes": [[10, 10, 20, 30], [0, 0, 100, 100]], "box_format": "xywh"},
        {"image": "c.jpg", "boxes": []},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = get_proposals(f"file:{f}")
    assert isinstance(src, PrecomputedProposals)
    p = src(IMG, "COCO_train2014_000000000025.jpg")  # found by COCO id
    assert p.boxes.tolist() == [[10, 10, 30, 40], [0, 0, 100, 100]]  # file order kept without scores
    assert len(src(IMG, "c.jpg")) == 0


def test_file_top_k_applies(tmp_path):
    f = tmp_path / "props.json"
    boxes = [[i, i, i + 20, i + 20] for i in range(0, 100, 5)]
    f.write_text(json.dumps({"a.jpg": {"boxes": boxes}}))
    p = get_proposals(f"file:{f}", top_k=3)(IMG, "a.jpg")
    assert p.boxes.tolist() == boxes[:3]


_COCO_OK_IMAGES = [{"id": 1, "file_name": "a.jpg"}]


@pytest.mark.parametrize(
    "kind,name,text,match",
    [
        ("gt", "bad.json", "{not json", "not valid JSON"),
        ("gt", "empty.json", "", "not valid JSON"),
        ("gt", "list.json", "[1, 2, 3]", "not a COCO instances file"),
        ("gt", "noann.json", json.dumps({"images": _COCO_OK_IMAGES}), "annotations"),
        ("gt", "short.json", json.dumps({"images": _COCO_OK_IMAGES, "annotations": [{"image_id": 1, "bbox": [1, 2, 3]}]}), "bbox"),
        ("gt", "strbox.json", json.dumps({"images": _COCO_OK_IMAGES, "annotations": [{"image_id": 1, "bbox": "abc"}]}), "bbox"),
        ("gt", "unk.json", json.dumps({"images": _COCO_OK_IMAGES, "annotations": [{"image_id": 2, "bbox": [1, 2, 3, 4]}]}), "unknown image_id"),
        ("gt", "nan.json", '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "bbox": [NaN, 2, 3, 4]}]}', "non-finite"),
        ("file", "bad.json", "{not json", "not valid JSON"),
        ("file", "str.json", json.dumps("hello"), "top level"),
        ("file", "listval.json", json.dumps({"a.jpg": [[1, 2, 3, 4]]}), "malformed"),
        ("file", "noboxes.json", json.dumps({"a.jpg": {"scores": [1]}}), "boxes"),
        ("file", "three.json", json.dumps({"a.jpg": {"boxes": [[1, 2, 3]]}}), "malformed"),
        ("file", "mismatch.json", json.dumps({"a.jpg": {"boxes": [[1, 2, 30, 40]], "scores": [1, 2]}}), "scores"),
        ("file", "nan.json", '{"a.jpg": {"boxes": [[NaN, 2, 30, 40]]}}', "non-finite"),
        ("file", "badline.jsonl", '{"image": "a.jpg", "boxes": []}\n{oops\n', "line 2"),
        ("file", "listline.jsonl", "[1, 2]\n", "malformed"),
        ("file", "noimage.jsonl", '{"boxes": [[1, 2, 30, 40]]}\n', "image"),
        ("file", "fmt.jsonl", '{"image": "a.jpg", "boxes": [[1, 2, 30, 40]], "box_format": "cxcywh"}\n', "box_format"),
    ],
)
def test_malformed_annotation_files(tmp_path, kind, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(BadAnnotationError, match=match) as ei:
        get_proposals(f"{kind}:{f}")(IMG, "a.jpg")
    assert "\n" not in str(ei.value) and name in str(ei.value)


@pytest.mark.parametrize("kind", ["gt", "file"])
def test_missing_annotation_file(tmp_path, kind):
    with pytest.raises(BadAnnotationError, match="not found"):
        get_proposals(f"{kind}:{tmp_path / 'missing.json'}")(IMG, "a.jpg")


def test_binary_annotation_file(tmp_path):
    f = tmp_path / "bin.json"
    f.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(BadAnnotationError, match="not valid JSON"):
        get_proposals(f"gt:{f}")(IMG, "a.jpg")


# --------------------------------------------------------------------------- torchvision


def test_torchvision_offline_gives_clear_error(tmp_path, monkeypatch):
    """No cached weights and no network: one clear CheckpointNotFoundError, no hang.

    The download itself is replaced by a URLError so the test never touches the network
    (and never downloads 170 MB on a machine that has it)."""
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def offline(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    det = TorchvisionDetector()
    with pytest.raises(CheckpointNotFoundError) as ei:
        det(IMG, None)
    msg = str(ei.value)
    assert det.model in msg and "TORCH_HOME" in msg and "URLError" in msg and "\n" not in msg
    assert calls and calls[0].startswith("https://")  # the real download path was taken
    assert not list((tmp_path / "torch_home").rglob("*.pth"))  # nothing half-written left as a weight file


def test_torchvision_unknown_model():
    with pytest.raises(CheckpointNotFoundError, match="no detection model"):
        TorchvisionDetector(model="not_a_detector")(IMG, None)


def test_memoized_source_computes_each_keyed_image_once():
    from PIL import Image

    from clipground.proposals import get_proposals

    src = get_proposals("selective-search")
    calls = []
    memo = src.memoized()
    raw = type(src).raw

    def counting(self, image, key):
        calls.append(key)
        return raw(self, image, key)

    img = Image.new("RGB", (64, 48), (30, 30, 30))
    img.paste((200, 40, 40), (10, 10, 30, 30))
    import unittest.mock as mock

    with mock.patch.object(type(src), "raw", counting):
        a, b = memo(img, "a.png"), memo(img, "a.png")
        fresh = src(img, "a.png")
        memo(img, None), memo(img, None)  # unkeyed images are never memoized
    assert calls == ["a.png", "a.png", None, None]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.boxes, fresh.boxes)
    assert memo.config() == src.config() and not hasattr(src, "_memo")
