"""The region-clip recipe: regions and their masks, the positives of the contrastive loss, hard boxes,
exact resume after a kill, and Visual-Genome-format regions built from real COCO128 annotations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.backbone.alpha import RegionClipBackbone
from clipground.data.records import GroundingRecord
from clipground.data.world import WorldConfig, generate_world
from clipground.errors import BadAnnotationError, ConfigError
from clipground.training.recipes import TrainArgs, get_recipe
from clipground.training.recipes.region_clip import (
    RegionData,
    RegionDataset,
    _iou,
    hard_boxes,
    load_region_config,
    make_collate,
    segment_mask,
)

TINY = ["batch_size=2", "log_every=1", "progress=false", "warmup_steps=1", "lr=3e-3", "model.rank=2",
        "data.hard_negatives=1", "data.jitter=0.05", "data.val_limit=4", "num_threads=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = WorldConfig.v1(seed=0, n_train=6, n_val=3, n_test=1, n_compositional=1, max_objects=4)
    return generate_world(tmp_path_factory.mktemp("rc_world") / "w", cfg, progress=False)


def _train(world: Path, clip: Path, out: Path, steps: int, extra: list[str] = (), resume: bool = False) -> Path:
    args = TrainArgs(method="region-clip", train=str(world), backbone=str(clip),
                     proposals=f"gt:{world}/instances_{{split}}.json", out=str(out),
                     overrides=[f"max_steps={steps}", *TINY, *extra], resume=resume)
    return get_recipe("region-clip")(args)


def test_world_regions_use_real_masks_and_every_object(world: Path) -> None:
    from clipground.data.jsonl import read_jsonl

    recs = read_jsonl(world / "train.jsonl")
    ds = RegionDataset(recs, RegionData(p_box=0.0, regions_per_image=0, hard_negatives=2), seed=0, world=world)
    coco = json.loads((world / "instances_train.json").read_text())
    assert ds.n_regions == len(coco["annotations"])  # every object, described or not
    assert ds.n_said == len({(r.image, r.meta["target"]) for r in recs})
    item = ds[0]
    n_said = len(item["phrases"])
    assert len(item["keys"]) == len(ds.regions[0]) and len(item["masks"]) <= len(item["keys"]) + 2
    # p_box=0: each described region's mask is its object's real segment, not its box
    for k in range(n_said):
        m = item["masks"][k]
        reg = ds.regions[0][item["keys"][k][1]]
        x1, y1, x2, y2 = (int(round(v)) for v in reg.box)
        assert m.sum() < (x2 - x1) * (y2 - y1) and m[:, :x1].sum() == 0 and m[:y1].sum() == 0
    again = ds[0]
    assert all(np.array_equal(a, b) for a, b in zip(item["masks"], again["masks"]))  # drawn from (seed, epoch, i)


def test_positives_hard_boxes_and_same_image(tiny_clip_dir: Path) -> None:
    from PIL import Image

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    img = Image.new("RGB", (40, 30))
    m = np.zeros((30, 40), bool)
    items = [{"image": img, "masks": [m, m, m], "phrases": ["red one", "blue one"], "keys": [(0, 0), (0, 1)]},
             {"image": img, "masks": [m, m], "phrases": ["red one"], "keys": [(1, 0), (1, 1)]}]
    b = make_collate(bb)(items)
    assert b["pixel_values"].shape == (5, 4, 32, 32)
    pos = b["positives"]  # phrases x regions: 3 x 5
    assert pos.tolist() == [[True, False, False, True, False],  # same text in another image is a positive
                            [False, True, False, False, False],
                            [True, False, False, True, False]]
    assert not pos[:, 2].any()  # the hard box (no key) is never a positive
    assert b["same_image"].tolist() == [[True] * 3 + [False] * 2, [True] * 3 + [False] * 2, [False] * 3 + [True] * 2]


def test_hard_boxes_overlap_no_region_and_segments_decode() -> None:
    rng = np.random.default_rng(0)
    regions = np.array([[10, 10, 30, 30], [60, 50, 90, 80], [5, 70, 25, 95.0]])
    hb = hard_boxes(rng, regions, (128, 128), 20)
    assert len(hb) >= 15
    assert all(float(_iou(np.asarray(b), regions).max()) < 0.4 for b in hb)
    poly = segment_mask([[2, 2, 8, 2, 8, 6, 2, 6]], (10, 8))
    assert poly[3, 5] and not poly[0, 0] and poly.shape == (8, 10)
    rle = {"size": [8, 10], "counts": [0, 80]}
    assert segment_mask(rle, (10, 8)).all()
    with pytest.raises(BadAnnotationError):
        segment_mask("nonsense", (10, 8))
    with pytest.raises(ConfigError):
        load_region_config(None, ["data.p_box=2"])
    with pytest.raises(ConfigError):
        load_region_config(None, ["model.views=[crop]"])


def test_killed_and_resumed_run_equals_an_uninterrupted_one(world: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    full = _train(world, tiny_clip_dir, tmp_path / "a", 6, ["save_every=3"])
    _train(world, tiny_clip_dir, tmp_path / "b", 6, ["save_every=3"])
    ckpts = sorted((tmp_path / "b" / "checkpoints").glob("step-*"))
    for c in ckpts[1:]:  # as if killed right after the step-3 checkpoint
        shutil.rmtree(c)
    (tmp_path / "b" / "checkpoints" / "latest").write_text(ckpts[0].name + "\n")
    resumed = _train(world, tiny_clip_dir, tmp_path / "b", 6, ["save_every=3"], resume=True)
    for f in ("adapter/adapter_model.safetensors", "mask_channel.safetensors"):
        wa, wb = load_file(str(full / "backbone" / f)), load_file(str(resumed / "backbone" / f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from clipground.training import checkpoint as C

    groups = C.read_checkpoint(C.find_latest_checkpoint(tmp_path / "a"), 0)["optimizer"]["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([3e-3 * 0.06, 3e-3])  # the mask conv's own rate
    trained = load_file(str(full / "backbone" / "mask_channel.safetensors"))
    assert any(float(v.abs().max()) > 0 for v in trained.values())  # the mask channel left zero
    losses = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in losses) == 6 and any("eval/acc@0.5" in r for r in losses)
    # the saved directory is the whole model: Grounder.from_pretrained gives the region-aware CLIP back
    g = Grounder.from_pretrained(full)
    assert g.method.name == "region-clip" and isinstance(g.backbone, RegionClipBackbone)
    summary = json.loads((tmp_path / "a" / "final_metrics.json").read_text())
    assert 0 < summary["trainable"]["share_of_vision"] < 1
    card = (full / "RECIPE.md").read_text()  # the one recipe card of `clipground train`, as every method's
    assert summary["command"] in card and "clipground train --method region-clip" in card
    assert "trainable share_of_vision" in card


def _vg_from_coco128(shared: Path, out: Path, n_images: int = 3) -> Path:
    """A Visual Genome ``region_descriptions.json`` of a few COCO128 photos: one region per instance,
    phrase = its category name, with the instance's polygons as the region's segmentation."""
    ann = json.loads((shared / "coco128" / "annotations" / "instances_train2017.json").read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    by_img: dict[int, list] = {}
    for a in ann["annotations"]:
        if isinstance(a.get("segmentation"), list) and a["area"] > 2000:
            by_img.setdefault(a["image_id"], []).append(a)
    chosen = [i for i in sorted(by_img) if len(by_img[i]) >= 2][:n_images]
    entries = []
    for i in chosen:
        regions = [{"region_id": a["id"], "image_id": i, "phrase": f"the {cats[a['category_id']]}",
                    "x": a["bbox"][0], "y": a["bbox"][1], "width": a["bbox"][2], "height": a["bbox"][3],
                    "segmentation": a["segmentation"]} for a in by_img[i]]
        regions[-1].pop("segmentation")  # one region with a box only: mask = box
        entries.append({"id": i, "regions": regions})
        src = shared / "coco128" / "train2017" / f"{i:012d}.jpg"
        (out / "VG_100K").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / "VG_100K" / f"{i}.jpg")
    path = out / "region_descriptions.json"
    path.write_text(json.dumps(entries))
    return path


def test_visual_genome_regions_from_real_coco128_train_one_step(shared_data: Path, tiny_clip_dir: Path,
                                                                 tmp_path: Path) -> None:
    from clipground.data.loaders import detect_format, load_records

    if not (shared_data / "coco128" / "annotations" / "instances_train2017.json").is_file():
        pytest.skip("COCO128 annotations missing from ../shared/data")
    vg = _vg_from_coco128(shared_data, tmp_path / "vg")
    assert detect_format(vg) == "visual-genome"
    res = load_records(vg)
    assert res.records and res.dropped == 0
    segs = [r for r in res.records if "segmentation" in r.meta]
    assert 0 < len(segs) < len(res.records)  # segments where given, boxes elsewhere
    ds = RegionDataset(res.records, RegionData(p_box=0.0, hard_negatives=2), seed=0)
    item = ds[0]
    assert len(item["phrases"]) >= 2 and len(item["masks"]) >= len(item["phrases"])
    out = tmp_path / "run"
    args = TrainArgs(method="region-clip", train=str(vg), backbone=str(tiny_clip_dir), out=str(out),
                     overrides=["max_steps=1", "batch_size=2", "progress=false", "save_every=0", "model.rank=2",
                                "data.hard_negatives=2", "num_threads=1"])
    final = get_recipe("region-clip")(args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and np.isfinite(rows[0]["loss"])
    assert (final / "backbone" / "region_clip.json").is_file()
