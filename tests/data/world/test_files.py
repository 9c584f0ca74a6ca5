"""Tests of the world on disk (clipground.data.world.files): layout, determinism, COCO, RLE."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from clipground.data.jsonl import read_jsonl
from clipground.data.world import (
    COLOURS,
    SHAPES,
    SPLITS,
    WorldConfig,
    ensure_world,
    generate_world,
    load_world_config,
    rle_decode,
    rle_encode,
)
from clipground.io import TMP_PREFIX, file_mode


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_layout_and_world_json(world: tuple[Path, WorldConfig], world_json: dict) -> None:
    out, cfg = world
    for s in SPLITS:
        assert (out / f"{s}.jsonl").is_file()
        assert (out / f"instances_{s}.json").is_file()
    for s in ("train", "val", "test", "compositional"):
        assert len(list((out / "images" / s).glob("*.png"))) == 20
    assert not list((out / "images" / "new-look").glob("*.png"))  # a v1 world has no held-out looks
    assert world_json["config"] == cfg.to_json()
    assert world_json["seed"] == 0
    assert world_json["vocabulary"]["shapes"] == list(SHAPES)
    assert set(world_json["vocabulary"]["colours"]) == set(COLOURS)
    assert world_json["counts"]["train"]["scenes"] == 20
    assert load_world_config(out) == cfg
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(TMP_PREFIX + "*"))
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {file_mode()}


def test_same_seed_is_byte_identical_and_other_seed_differs(world: tuple[Path, WorldConfig], tmp_path: Path) -> None:
    out, cfg = world
    again = tmp_path / "again"
    generate_world(again, dataclasses.replace(cfg, seed=0), progress=False)
    assert _hashes(again) == _hashes(out)

    other = tmp_path / "other"
    generate_world(other, dataclasses.replace(cfg, seed=1), progress=False)
    h0, h1 = _hashes(out), _hashes(other)
    assert h0.keys() == h1.keys()
    differing = [k for k in h0 if h0[k] != h1[k]]
    assert sum(k.endswith(".png") for k in differing) >= 70  # nearly every image differs
    assert all(h0[f"{s}.jsonl"] != h1[f"{s}.jsonl"] for s in ("train", "val", "test", "compositional"))


def test_split_does_not_depend_on_other_split_sizes(world: tuple[Path, WorldConfig], tmp_path: Path) -> None:
    out, _ = world
    small = tmp_path / "small"
    generate_world(small, WorldConfig.v1(seed=0, n_train=5, n_val=20, n_test=3, n_compositional=2), progress=False)
    a, b = _hashes(out), _hashes(small)
    for k in b:
        if k.startswith("images/val/") or k in ("val.jsonl", "instances_val.json"):
            assert a[k] == b[k], k
    # a shorter train split is a prefix of the longer one
    assert all(a[k] == b[k] for k in b if k.startswith("images/train/"))


def test_coco_instances_match_records(world: tuple[Path, WorldConfig]) -> None:
    out, _ = world
    for split in ("train", "val", "test", "compositional"):
        coco = json.loads((out / f"instances_{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPES)
        cat = {c["id"]: c["name"] for c in coco["categories"]}
        ids = [a["id"] for a in coco["annotations"]]
        assert len(ids) == len(set(ids))
        images = {im["id"]: im for im in coco["images"]}
        for im in coco["images"]:
            assert (out / im["file_name"]).is_file() and im["width"] == im["height"] == 128
        by_image: dict[int, list] = {}
        for a in sorted(coco["annotations"], key=lambda a: a["id"]):
            assert a["image_id"] in images and a["iscrowd"] == 0
            assert cat[a["category_id"]] == a["attributes"]["shape"]
            assert a["area"] == int(rle_decode(a["segmentation"]).sum())
            by_image.setdefault(a["image_id"], []).append(a)
        for r in read_jsonl(out / f"{split}.jsonl"):
            x, y, w, h = by_image[int(r.image_id)][r.meta["target"]]["bbox"]
            assert r.box == [x, y, x + w, y + h]


def test_ensure_world_reuses_and_redoes(tmp_path: Path) -> None:
    cfg = WorldConfig(seed=3, n_train=4, n_val=2, n_test=2, n_compositional=2)
    out = ensure_world(tmp_path / "w", cfg, progress=False)
    before = _hashes(out)
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    ensure_world(out, cfg, progress=False)
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp  # reused, not regenerated
    # an interrupted generation (no world.json, half-written split) is redone
    (out / "world.json").unlink()
    (out / "train.jsonl").write_text("garbage\n")
    ensure_world(out, cfg, progress=False)
    assert _hashes(out) == before
    # another config regenerates and removes images of scenes that no longer exist
    ensure_world(out, WorldConfig(seed=3, n_train=2, n_val=2, n_test=2, n_compositional=2), progress=False)
    assert len(list((out / "images" / "train").glob("*.png"))) == 2
    assert json.loads((out / "world.json").read_text())["config"]["n_train"] == 2


def test_rle_roundtrip() -> None:
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (16, 16), (1, 1)):
        for _ in range(5):
            m = rng.random(shape) < 0.5
            rle = rle_encode(m)
            assert rle["size"] == list(shape) and sum(rle["counts"]) == m.size
            assert np.array_equal(rle_decode(rle), m)
    full = np.ones((3, 4), bool)
    assert rle_encode(full)["counts"][0] == 0 and np.array_equal(rle_decode(rle_encode(full)), full)
