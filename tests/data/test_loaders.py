"""Dataset loaders: every format gives absolute image paths and xyxy pixel boxes."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clipground.data import FORMATS, detect_format, load_records
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord
from clipground.errors import BadAnnotationError, UnknownNameError


def _img(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 130, 140)).save(path)
    return path


def _coco_instances():
    return {
        "images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 64, "height": 48},
                   {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 100, "image_id": 9, "bbox": [10, 5, 20, 30], "category_id": 1, "iscrowd": 0},
            {"id": 101, "image_id": 9, "bbox": [1.5, 2.5, 3.0, 4.0], "category_id": 2, "iscrowd": 0,
             "caption": "the small blue thing"},
            {"id": 102, "image_id": 25, "bbox": [0, 0, 60, 40], "category_id": 1, "iscrowd": 1},
            {"id": 103, "image_id": 25, "bbox": [4, 4, 8, 8], "category_id": 2, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cup"}],
    }


# ----------------------------------------------------------------------------- refer
def _refer_dir(tmp_path):
    d = tmp_path / "refcocog"
    d.mkdir()
    (d / "instances.json").write_text(json.dumps(_coco_instances()))
    refs = [
        {"ref_id": 1, "ann_id": 100, "image_id": 9, "split": "val", "category_id": 1,
         "sentences": [{"sent": "the dog on the left", "tokens": ["the", "dog"], "sent_id": 11},
                       {"sent": "a brown dog", "tokens": ["a"], "sent_id": 12}]},
        {"ref_id": 2, "ann_id": 103, "image_id": 25, "split": "train", "category_id": 2,
         "sentences": [{"sent": "cup", "tokens": ["cup"], "sent_id": 13}]},
    ]
    with open(d / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return d


def test_refer_one_record_per_sentence_with_xyxy_boxes(tmp_path):
    d = _refer_dir(tmp_path)
    images = tmp_path / "train2014"
    _img(images / "COCO_train2014_000000000009.jpg")
    res = load_records(d / "refs(umd).p", images=images)
    assert res.format == "refer"
    assert (res.kept, res.dropped, res.total) == (2, 1, 3)
    r = res.records[0]
    assert r.expression == "the dog on the left"
    assert r.box == [10.0, 5.0, 30.0, 35.0]  # xywh [10, 5, 20, 30] -> xyxy
    assert os.path.isabs(r.image) and r.image.endswith("COCO_train2014_000000000009.jpg")
    assert (r.image_id, r.ref_id, r.split, r.meta["category"]) == ("9", "1", "val", "dog")
    assert res.missing_example.endswith("COCO_train2014_000000000025.jpg")


def test_refer_split_filter_and_folder_detection(tmp_path):
    d = _refer_dir(tmp_path)
    assert detect_format(d) == "refer"
    res = load_records(d, split="train", require_images=False)
    assert [r.expression for r in res.records] == ["cup"]
    assert res.records[0].box == [4.0, 4.0, 12.0, 12.0]
    with pytest.raises(BadAnnotationError, match="splits present"):
        load_records(d, split="testB", require_images=False)


def test_refer_needs_instances(tmp_path):
    d = _refer_dir(tmp_path)
    (d / "instances.json").unlink()
    with pytest.raises(BadAnnotationError, match="instances.json"):
        load_records(d / "refs(umd).p")


def test_refer_reads_python2_pickles_with_utf8_text(tmp_path):
    from clipground.data.refer import read_pickle

    raw = "café".encode("utf-8")  # a Python 2 str: SHORT_BINSTRING holding UTF-8 bytes
    path = tmp_path / "py2.p"
    path.write_bytes(b"\x80\x02]q\x00U" + bytes([len(raw)]) + raw + b"a.")
    assert read_pickle(path) == ["café"]


# ----------------------------------------------------------------------------- ReSC .pth
def test_resc_five_field_items_xywh(tmp_path):
    items = [
        ("COCO_train2014_000000000009.jpg", "100.pth", [10.0, 5.0, 20.0, 30.0], "the dog", [("r1", ["dog"])]),
        ("COCO_train2014_000000000025.jpg", "103.pth", np.array([4, 4, 8, 8]), "a cup", []),
    ]
    path = tmp_path / "gref_umd_val.pth"
    torch.save(items, path)
    _img(tmp_path / "imgs" / "COCO_train2014_000000000009.jpg")
    res = load_records(path, images=tmp_path / "imgs")
    assert res.format == "resc" and (res.kept, res.dropped) == (1, 1)
    r = res.records[0]
    assert r.box == [10.0, 5.0, 30.0, 35.0]
    assert (r.split, r.image_id, r.ref_id, r.expression) == ("val", "9", "100", "the dog")
    all_ = load_records(path, require_images=False)
    assert all_.records[1].box == [4.0, 4.0, 12.0, 12.0]  # numpy box, xywh


def test_resc_three_and_four_field_variants(tmp_path):
    flickr = tmp_path / "flickr_test.pth"  # Flickr30k split files store xyxy boxes
    torch.save([("1000092795.jpg", [10, 20, 50, 60], "two young guys")], flickr)
    r = load_records(flickr, require_images=False).records[0]
    assert r.box == [10.0, 20.0, 50.0, 60.0] and r.split == "test" and r.expression == "two young guys"

    four = tmp_path / "unc_testA.pth"
    torch.save([("COCO_train2014_000000000009.jpg", torch.tensor([1.0, 2.0, 3.0, 4.0]), "man left", None)], four)
    r = load_records(four, require_images=False).records[0]
    assert r.box == [1.0, 2.0, 4.0, 6.0] and r.split == "testA"
    # explicit override of the name-based box convention
    r = load_records(four, require_images=False, box_format="xyxy").records[0]
    assert r.box == [1.0, 2.0, 3.0, 4.0]


def test_resc_rejects_non_split_files(tmp_path):
    corpus = tmp_path / "corpus.pth"
    torch.save({"word2idx": {}}, corpus)
    with pytest.raises(BadAnnotationError, match="expected a list"):
        load_records(corpus)
    bad = tmp_path / "unc_val.pth"
    torch.save([("a.jpg", "no box here")], bad)
    with pytest.raises(BadAnnotationError, match="item #0"):
        load_records(bad)
    junk = tmp_path / "junk_val.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(BadAnnotationError, match="not a readable"):
        load_records(junk)


# ----------------------------------------------------------------------------- MDETR
def test_mdetr_one_entry_per_expression(tmp_path):
    data = {
        "images": [
            {"id": 0, "file_name": "COCO_train2014_000000000009.jpg", "caption": "the dog on the left",
             "original_id": 9, "dataset_name": "refcocog", "height": 48, "width": 64},
            {"id": 1, "file_name": "COCO_train2014_000000000009.jpg", "caption": "brown dog",
             "original_id": 9, "dataset_name": "refcocog", "height": 48, "width": 64},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [10, 5, 20, 30], "category_id": 1, "original_id": 100, "tokens_positive": [[4, 7]]},
            {"id": 1, "image_id": 1, "bbox": [10, 5, 20, 30], "category_id": 1, "original_id": 100, "tokens_positive": [[6, 9]]},
        ],
        "categories": [{"id": 1, "name": "dog"}],
    }
    path = tmp_path / "finetune_refcocog_val.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "mdetr"
    res = load_records(path, require_images=False)
    assert [r.expression for r in res.records] == ["the dog on the left", "brown dog"]  # whole caption
    r = res.records[0]
    assert r.box == [10.0, 5.0, 30.0, 35.0]
    assert (r.image_id, r.ref_id, r.split) == ("9", "100", "val")


# ----------------------------------------------------------------------------- COCO
def test_coco_category_names_captions_and_crowd(tmp_path):
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(_coco_instances()))
    assert detect_format(path) == "coco"
    res = load_records(path, require_images=False)
    assert [r.expression for r in res.records] == ["dog", "the small blue thing", "cup"]  # crowd box skipped
    assert res.records[1].box == [1.5, 2.5, 4.5, 6.5]
    assert res.records[0].split == "val2017" and res.records[0].meta["category"] == "dog"


# ----------------------------------------------------------------------------- Visual Genome
def test_visual_genome_regions_and_subfolders(tmp_path):
    data = [
        {"id": 1, "regions": [
            {"region_id": 7, "image_id": 1, "phrase": "a man riding a bike", "x": 3, "y": 4, "width": 10, "height": 20},
            {"region_id": 8, "image_id": 1, "phrase": "bike wheel", "x": 0, "y": 0, "width": 5, "height": 5}]},
        {"id": 2, "regions": [
            {"region_id": 9, "image_id": 2, "phrase": "sky", "x": 0, "y": 0, "width": 0, "height": 5}]},  # degenerate
        {"id": 3, "regions": []},
    ]
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(data))
    _img(tmp_path / "vg" / "VG_100K_2" / "1.jpg")
    assert detect_format(path) == "visual-genome"
    res = load_records(path, images=tmp_path / "vg")
    assert (res.kept, res.dropped, res.invalid, res.total) == (2, 0, 1, 3)
    r = res.records[0]
    assert r.box == [3.0, 4.0, 13.0, 24.0] and r.image.endswith(os.path.join("VG_100K_2", "1.jpg"))
    assert (r.image_id, r.ref_id, r.expression) == ("1", "7", "a man riding a bike")


# ----------------------------------------------------------------------------- JSONL + generic behaviour
def test_jsonl_autodetect_limit_and_counts(tmp_path):
    _img(tmp_path / "a.png")
    recs = [GroundingRecord(str(tmp_path / "a.png"), f"thing {i}", [0, 0, 10 + i, 10]) for i in range(5)]
    recs.append(GroundingRecord(str(tmp_path / "missing.png"), "ghost", [0, 0, 5, 5]))
    path = tmp_path / "data.jsonl"
    write_jsonl(recs, path, relative_to=tmp_path)
    res = load_records(path, limit=3)
    assert res.format == "jsonl"
    assert (res.kept, res.dropped, len(res.records)) == (5, 1, 3)
    assert "kept 5 items, dropped 1 whose image is missing" in res.summary()
    assert res.records[2].box == [0.0, 0.0, 12.0, 10.0]


def test_errors_are_clear(tmp_path):
    with pytest.raises(BadAnnotationError, match="not found"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(BadAnnotationError, match="--format"):
        load_records(tmp_path / "x.txt")
    with pytest.raises(UnknownNameError, match="unknown annotation format"):
        load_records(tmp_path / "x.txt", format="yolo")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadAnnotationError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(BadAnnotationError, match="neither"):
        load_records(tmp_path / "other.json")
    (tmp_path / "broken_coco.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(BadAnnotationError, match="not a COCO instances file"):
        load_records(tmp_path / "broken_coco.json")
    assert set(FORMATS) == {"jsonl", "refer", "resc", "mdetr", "coco", "visual-genome"}


# ----------------------------------------------------------------------------- real data
def test_real_gref_umd_val_keeps_items_with_images(shared_data):
    res = load_records(shared_data / "refcoco" / "gref_umd_val.pth", images=shared_data / "coco" / "train2014")
    assert res.total == 4896
    assert (res.kept, res.dropped) == (4, 4892)
    assert all(r.split == "val" and r.image.endswith("COCO_train2014_000000000309.jpg") for r in res.records)
    first = res.records[0]
    assert first.expression == "the torso of a brown furry teddy bear wearing a red ribbon"
    assert first.box == pytest.approx([153.18, 213.25, 153.18 + 134.57, 213.25 + 213.02])
    with Image.open(first.image) as im:  # the box lies inside the real photo
        w, h = im.size
    assert all(r.box[2] <= w + 1 and r.box[3] <= h + 1 for r in res.records)
