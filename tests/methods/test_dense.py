"""Tests of the dense methods: the trained locator, and heatmap + GrabCut (weight-free path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord
from clipground.methods.dense import HeatmapSegment, Locator, _moments
from clipground.segmenters import GrabCutSegmenter, ThresholdSegmenter, box_from_heatmap, component_at, make_seeds
from clipground.cache import CacheSpec, FeatureCache
from clipground.training.dense_data import DenseDataset
from clipground.training.losses import box_coverage
from clipground.training.recipes.locator import (
    LocatorRecipeConfig,
    fit,
    load_instance_masks,
    mask_to_input,
    resolve_masks,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def make_scenes(root: Path, n: int = 8, size: tuple[int, int] = (48, 36)) -> list[GroundingRecord]:
    """Coloured rectangles on grey, one record per rectangle (non-square images on purpose)."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(n):
        img = Image.new("RGB", size, (128, 128, 128))
        d = ImageDraw.Draw(img)
        for j, (name, rgb) in enumerate(COLOURS.items()):
            w, h = (int(v) for v in torch.randint(6, 14, (2,), generator=g))
            x = 2 + j * 15 + int(torch.randint(0, 2, (1,), generator=g))
            y = int(torch.randint(0, size[1] - h, (1,), generator=g))
            d.rectangle([x, y, x + w - 1, y + h - 1], fill=rgb)
            recs.append(GroundingRecord(str(root / f"{i}.png"), f"the {name} box", [x, y, x + w, y + h],
                                        image_id=str(i), split="train"))
        img.save(root / f"{i}.png")
    return recs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- pieces


def test_box_coverage_is_exact_area() -> None:
    boxes = torch.tensor([[0.1, 0.25, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]])
    cov = box_coverage(boxes, 8, 10)
    # Sum of coverage x cell area = box area.
    assert cov[0].sum().item() / 80 == pytest.approx(0.5 * 0.25, abs=1e-6)
    assert torch.allclose(cov[1], torch.ones(8, 10))
    assert cov[0, 0].sum() == 0 and cov[0, 2, 1] == 1.0 and cov[0, 2, 0] == pytest.approx(0.0)


def test_moment_box_of_uniform_rectangle() -> None:
    prob = box_coverage(torch.tensor([[0.25, 0.5, 0.75, 0.875]]), 64, 64)
    m = _moments(prob, power=4.0)[0]
    assert m.tolist() == pytest.approx([0.5, 0.6875, 0.5, 0.375], abs=0.01)


def test_instance_masks_match_by_box(tmp_path: Path) -> None:
    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 2, 10, 8], "segmentation": [[4, 2, 13, 2, 13, 9, 4, 9]]},
                            {"id": 2, "image_id": 1, "bbox": [20, 10, 8, 8], "segmentation": [[20, 10, 27, 10, 20, 17]]}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    recs = [GroundingRecord(str(tmp_path / "a.png"), "x", [20, 10, 28, 18]),
            GroundingRecord(str(tmp_path / "a.png"), "y", [0, 0, 5, 5])]
    m = load_instance_masks(recs, tmp_path / "inst.json")
    assert m[1] is None and m[0] is not None and m[0].shape == (20, 40)
    assert m[0][12, 21] and not m[0][3, 5]  # the triangle, not the rectangle
    t = mask_to_input(m[0], 0.0, 40.0, (16, 16))  # 40x20 padded to 40x40, then 16x16
    assert t.shape == (16, 16) and float(t[8:, :].sum()) == 0 and float(t.max()) > 0.5


def test_components_and_seeds() -> None:
    mask = np.zeros((20, 30), bool)
    mask[2:6, 2:6] = True
    mask[10:18, 10:25] = True
    assert component_at(mask, (3, 3)).sum() == 16
    assert component_at(mask, (0, 19)).sum() == 8 * 15  # peak outside: largest component
    heat = np.zeros((20, 30), np.float32)
    heat[10:18, 10:25] = 1.0
    heat[12, 12] = 2.0
    s = make_seeds(heat, 0.4)
    assert s.peak == (12, 12) and s.box == (10.0, 10.0, 25.0, 18.0)


def test_grabcut_refines_a_blurry_heatmap_to_the_object() -> None:
    img = Image.new("RGB", (80, 60), (120, 120, 120))
    ImageDraw.Draw(img).rectangle([20, 15, 49, 39], fill=(230, 40, 40))  # box [20, 15, 50, 40]
    yy, xx = np.mgrid[0:60, 0:80]
    heat = np.exp(-(((xx - 32) / 14.0) ** 2 + ((yy - 25) / 10.0) ** 2)).astype(np.float32)  # off-centre, blurry
    seg = GrabCutSegmenter(iters=5)
    box, seeds = box_from_heatmap(heat, seg, seg.prepare(img), threshold=0.5)
    thr_box, _ = box_from_heatmap(heat, ThresholdSegmenter(), {}, threshold=0.5)
    from clipground.boxes import iou

    gt = torch.tensor([[20.0, 15.0, 50.0, 40.0]])
    iou_cut, iou_thr = float(iou(torch.tensor([box]), gt)), float(iou(torch.tensor([thr_box]), gt))
    assert iou_cut > 0.9 and iou_cut > iou_thr + 0.2
    # A heatmap much wider than a small object: GrabCut carves the object out of it.
    img = Image.new("RGB", (80, 60), (120, 120, 120))
    ImageDraw.Draw(img).rectangle([30, 20, 39, 29], fill=(40, 40, 230))  # box [30, 20, 40, 30]
    ImageDraw.Draw(img).rectangle([60, 40, 69, 49], fill=(40, 200, 40))  # a distractor
    heat = np.exp(-(((xx - 36) / 20.0) ** 2 + ((yy - 26) / 16.0) ** 2)).astype(np.float32)
    box, _ = box_from_heatmap(heat, seg, seg.prepare(img), threshold=0.5)
    thr_box, _ = box_from_heatmap(heat, ThresholdSegmenter(), {}, threshold=0.5)
    gt = torch.tensor([[30.0, 20.0, 40.0, 30.0]])
    iou_cut, iou_thr = float(iou(torch.tensor([box]), gt)), float(iou(torch.tensor([thr_box]), gt))
    assert iou_cut > 0.8 and iou_thr < 0.2


def test_heatmap_segment_grabcut_end_to_end(tmp_path: Path, tiny_clip_dir: Path) -> None:
    recs = make_scenes(tmp_path, n=1)
    g = Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="clip", segmenter="grabcut")
    assert isinstance(g.method, HeatmapSegment) and g.proposals is None
    preds = g(recs[0].image, ["the red box", "the blue box"])
    for p in preds:
        w, h = p.image_size
        assert (w, h) == (48, 36)
        assert 0 <= p.box[0] < p.box[2] <= w and 0 <= p.box[1] < p.box[3] <= h
    heat = g.method.heatmaps(g.state, ["the red box"])[0]
    assert heat.shape == (36, 48)
    # Grad-CAM variant runs through the same contract (backward inside predict's inference mode).
    g2 = Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="clip-gradcam", segmenter="threshold")
    p = g2(recs[0].image, "the green box")
    assert 0 <= p.box[0] < p.box[2] <= 48
    # A non-trainable method still saves/loads its configuration.
    g2.save_pretrained(tmp_path / "hs")
    g3 = Grounder.from_pretrained(tmp_path / "hs")
    assert g3.method.config.heatmap == "clip-gradcam"
    assert g3(recs[0].image, "the green box").box == p.box


# --------------------------------------------------------------------------- locator


def test_locator_trains_and_round_trips(tmp_path: Path, tiny_clip_dir: Path) -> None:
    recs = make_scenes(tmp_path)
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cfg = LocatorRecipeConfig()
    spec = CacheSpec.dense_of(Locator(bb, cfg.model).view, noun_phrases=False)
    cache = FeatureCache.build(tmp_path / "cache", recs, bb, None, spec, progress=False)
    m = cfg.model
    m.dim, m.heads, m.adapter_layers, m.refiner_channels = 32, 2, 1, 8
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps, t.log_every, t.save_every, t.eval_every = 80, 8, 5e-3, 0, 1, 0, 0
    t.progress, t.output_dir = False, str(tmp_path / "run")
    method, result = fit(cfg, bb, recs, cache, recs, cache)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 80
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    # Validation is the one evaluator on the cached states: the same numbers as `clipground eval`.
    from clipground.evaluation import evaluate

    ref = evaluate(Grounder(method), recs, progress=False, examples=0)
    assert result.last_eval["acc@0.5"] == pytest.approx(ref.metrics["acc@0.5"], abs=1 / len(recs) + 1e-9)
    assert result.last_eval["count"] == len(recs)

    g = Grounder(method)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert isinstance(g2.method, Locator)
    phrases = ["the red box", "the green box"]
    a = g.set_image(recs[3].image).predict_batch(phrases)
    b = g2.set_image(recs[3].image).predict_batch(phrases)
    for pa, pb in zip(a, b):
        assert max(abs(x - y) for x, y in zip(pa.box, pb.box)) < 1e-6 and abs(pa.score - pb.score) < 1e-6
        assert 0 <= pa.box[0] < pa.box[2] <= 48 and 0 <= pa.box[1] < pa.box[3] <= 36
    maps = g2.method.heatmaps(g2.state, phrases)
    assert maps.shape == (2, 36, 48) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    fresh = Locator(bb, method.config)
    diff = max((p - q).abs().max().item() for p, q in zip(fresh.net.parameters(), g2.method.net.parameters()))
    assert diff > 1e-3


def test_locator_recipe_with_masks(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.training.recipes import TrainArgs, get_recipe

    recs = make_scenes(tmp_path, n=2)
    write_jsonl(recs, tmp_path / "train.jsonl", relative_to=tmp_path)
    anns, images = [], []
    for i in range(2):
        images.append({"id": i, "file_name": f"{i}.png", "width": 48, "height": 36})
        for k, r in enumerate(recs[3 * i : 3 * i + 3]):
            x1, y1, x2, y2 = r.box
            anns.append({"id": 10 * i + k, "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    (tmp_path / "instances_train.json").write_text(json.dumps({"images": images, "annotations": anns}))
    args = TrainArgs(method="locator", train=str(tmp_path / "train.jsonl"), backbone=str(tiny_clip_dir),
                     out=str(tmp_path / "run"),
                     overrides=["max_steps=3", "batch_size=4", "progress=false", "dim=16", "heads=2",
                                "refiner_channels=4", "adapter_layers=1"])
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cache = FeatureCache.build(tmp_path / "cache", recs, bb, None, CacheSpec(kind="dense", noun_phrases=False),
                               progress=False)
    ds = DenseDataset(cache, recs, bb)
    masks = resolve_masks("auto", str(tmp_path / "train.jsonl"), "train", recs, ds, (16, 16))
    assert masks is not None and len(masks) == 6
    # A filled-rectangle polygon mask agrees with the box raster (up to polygon edge pixels).
    norm = torch.tensor([recs[0].box]) / 48
    assert (masks[0].float() - box_coverage(norm, 16, 16)[0]).abs().mean() < 0.05
    assert resolve_masks("none", str(tmp_path / "train.jsonl"), "train", recs, ds, (16, 16)) is None
    final = get_recipe("locator")(args)
    assert (final / "model.safetensors").is_file()
    assert Grounder.from_pretrained(final)(recs[0].image, "the red box").box
