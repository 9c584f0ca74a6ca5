"""Tests for the synthetic referring-expression world (clipground.data.synthetic)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from numpy.random import PCG64, Generator
from PIL import Image
from typer.testing import CliRunner

from clipground.data.jsonl import read_jsonl
from clipground.data.synthetic import (
    COLOURS,
    SHAPES,
    SPLITS,
    TEMPLATES,
    TYPES,
    NounPhrase,
    SceneObject,
    WorldConfig,
    WorldConfigError,
    check_expression,
    describe,
    ensure_world,
    generate_world,
    held_out_pairs,
    load_scene_objects,
    load_world_config,
    parse_expression,
    render_scene,
    resolve,
    rle_decode,
    rle_encode,
)
from clipground.errors import ClipgroundError

SMALL = dict(n_train=20, n_val=20, n_test=20, n_compositional=20)


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, WorldConfig]:
    cfg = WorldConfig(seed=0, **SMALL)
    out = tmp_path_factory.mktemp("world")
    generate_world(out, cfg, progress=False)
    return out, cfg


@pytest.fixture(scope="module")
def world_json(world) -> dict:
    return json.loads((world[0] / "world.json").read_text())


def test_layout_and_world_json(world, world_json):
    out, cfg = world
    for s in SPLITS:
        assert (out / f"{s}.jsonl").is_file()
        assert (out / f"instances_{s}.json").is_file()
        assert len(list((out / "images" / s).glob("*.png"))) == 20
    assert world_json["config"] == cfg.to_json()
    assert world_json["seed"] == 0
    assert world_json["vocabulary"]["shapes"] == list(SHAPES)
    assert set(world_json["vocabulary"]["colours"]) == set(COLOURS)
    assert world_json["counts"]["train"]["scenes"] == 20
    assert load_world_config(out) == cfg
    assert not list(out.rglob("*.tmp"))


def test_same_seed_is_byte_identical_and_other_seed_differs(world, tmp_path):
    out, cfg = world
    again = tmp_path / "again"
    generate_world(again, WorldConfig(seed=0, **SMALL), progress=False)
    assert _hashes(again) == _hashes(out)

    other = tmp_path / "other"
    generate_world(other, WorldConfig(seed=1, **SMALL), progress=False)
    h0, h1 = _hashes(out), _hashes(other)
    assert h0.keys() == h1.keys()
    differing = [k for k in h0 if h0[k] != h1[k]]
    assert sum(k.endswith(".png") for k in differing) >= 70  # nearly every image differs
    assert all(h0[f"{s}.jsonl"] != h1[f"{s}.jsonl"] for s in SPLITS)


def test_split_does_not_depend_on_other_split_sizes(world, tmp_path):
    out, _ = world
    small = tmp_path / "small"
    generate_world(small, WorldConfig(seed=0, n_train=5, n_val=20, n_test=3, n_compositional=2), progress=False)
    a, b = _hashes(out), _hashes(small)
    for k in b:
        if k.startswith("images/val/") or k in ("val.jsonl", "instances_val.json"):
            assert a[k] == b[k], k
    # a shorter train split is a prefix of the longer one
    assert all(a[k] == b[k] for k in b if k.startswith("images/train/"))


def test_every_expression_is_unique_and_parses_to_its_meta(world):
    out, cfg = world
    n = 0
    for split in SPLITS:
        objects = load_scene_objects(out, split)
        for r in read_jsonl(out / f"{split}.jsonl"):
            objs = objects[r.image_id]
            m = r.meta
            assert check_expression(r.expression, objs, cfg) == [m["target"]], r.expression
            p = parse_expression(r.expression)
            assert p is not None and p.type == m["type"]
            assert str(p.subject) == m["subject"] and p.relation == m["relation"]
            assert (str(p.object) if p.object else None) == m["object"]
            assert r.box == list(objs[m["target"]].box)
            assert r.ref_id == f"{r.image_id}_{m['target']}" and str(m["scene_id"]) == r.image_id
            assert r.split == split and Path(r.image).is_file()
            n += 1
    assert n >= 4 * 20


def test_no_checker_rejections_and_types_balanced(world_json):
    for split in SPLITS:
        c = world_json["counts"][split]
        assert c["checker_rejections"] == 0  # generator and independent checker agree
        assert set(c["types"]) == set(TYPES) and min(c["types"].values()) >= 3
        assert max(c["types"].values()) <= 1.5 * min(c["types"].values())
        assert c["expressions"] == sum(c["types"].values())


def test_all_types_and_many_relations_present(world):
    out, _ = world
    recs = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert {r.meta["type"] for r in recs} == set(TYPES)
    assert len({r.meta["relation"] for r in recs}) >= 12
    per_scene: dict[str, int] = {}
    for r in recs:
        per_scene[r.image_id] = per_scene.get(r.image_id, 0) + 1
    assert len(per_scene) == 60 and max(per_scene.values()) <= 4 and min(per_scene.values()) >= 1
    assert len({r.expression for r in recs if r.meta["type"] == "attribute"}) > 5


def test_boxes_masks_colours_and_sizes(world):
    out, cfg = world
    n = cfg.image_size
    small_sides, large_sides = [], []
    for split in SPLITS:
        objects = load_scene_objects(out, split, masks=True)
        for image_id, objs in objects.items():
            assert cfg.min_objects <= len(objs) <= cfg.max_objects
            img = np.asarray(Image.open(out / "images" / split / f"{int(image_id):06d}.png").convert("RGB"))
            assert img.shape == (n, n, 3)
            union = np.zeros((n, n), int)
            for o in objs:
                m = o.mask
                assert m.shape == (n, n) and m.sum() == o.area > 0
                ys, xs = np.nonzero(m)
                assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight
                assert 0 <= o.box[0] < o.box[2] <= n and 0 <= o.box[1] < o.box[3] <= n
                union += m
                mean = img[m].astype(float).mean(0)
                nearest = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
                assert nearest == o.colour
                side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
                (small_sides if o.size == "small" else large_sides).append(side)
            assert union.max() == 1  # masks disjoint
            for i, a in enumerate(objs):  # boxes do not overlap
                for b in objs[i + 1 :]:
                    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
    assert small_sides and large_sides
    assert max(small_sides) < min(large_sides)
    assert min(small_sides) >= cfg.small_px[0] - 2 and max(large_sides) <= cfg.large_px[1] * 1.2 + 1


def test_held_out_pairs_only_in_compositional(world, world_json):
    out, cfg = world
    held = {tuple(p) for p in world_json["held_out_pairs"]}
    assert held == set(held_out_pairs(cfg)) and len(held) == cfg.n_held_out
    assert len({c for c, _ in held}) == len(held) and len({s for _, s in held}) == len(held)
    for split in ("train", "val", "test"):
        for objs in load_scene_objects(out, split).values():
            assert not any(o.pair in held for o in objs)
        assert not any(r.meta["compositional"] for r in read_jsonl(out / f"{split}.jsonl"))
    comp = load_scene_objects(out, "compositional")
    assert all(any(o.pair in held for o in objs) for objs in comp.values())
    recs = read_jsonl(out / "compositional.jsonl")
    assert {r.image_id for r in recs} == set(comp)
    for r in recs:
        t = comp[r.image_id][r.meta["target"]]
        assert t.pair in held and r.meta["compositional"] is True
        assert f"{t.colour} {t.shape}" in r.meta["subject"]


def test_coco_instances_match_records(world):
    out, _ = world
    for split in SPLITS:
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


def test_ensure_world_reuses_and_redoes(tmp_path):
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


def test_config_validation():
    with pytest.raises(WorldConfigError):
        WorldConfig(image_size=100).validate()
    with pytest.raises(ClipgroundError):
        WorldConfig(held_out_pairs=(("pink", "circle"),)).validate()
    with pytest.raises(WorldConfigError):
        WorldConfig(min_objects=1).validate()
    cfg = WorldConfig(held_out_pairs=(("red", "star"), ("blue", "circle")))
    cfg.validate()
    assert held_out_pairs(cfg) == [("blue", "circle"), ("red", "star")]
    assert WorldConfig.from_json(cfg.to_json()) == cfg


def test_render_scales_with_image_size():
    cfg = WorldConfig(image_size=224)
    for seed in range(5):
        scene = render_scene(Generator(PCG64(seed)), cfg)
        assert scene.image.shape == (224, 224, 3) and scene.size == (224, 224)
        for o in scene.objects:
            side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            lo, hi = cfg.small_px if o.size == "small" else cfg.large_px
            assert lo * cfg.scale - 2 <= side <= hi * cfg.scale * 1.2 + 1
        exprs = describe(scene, Generator(PCG64(seed)), cfg, n=4)
        for e in exprs:
            assert check_expression(e.text, scene.objects, cfg) == [e.target]


def test_rle_roundtrip():
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (16, 16), (1, 1)):
        for _ in range(5):
            m = rng.random(shape) < 0.5
            rle = rle_encode(m)
            assert rle["size"] == list(shape) and sum(rle["counts"]) == m.size
            assert np.array_equal(rle_decode(rle), m)
    full = np.ones((3, 4), bool)
    assert rle_encode(full)["counts"][0] == 0 and np.array_equal(rle_decode(rle_encode(full)), full)


# ------------------------------------------------------------------ checker semantics


def _obj(shape, colour, size, cx, cy, side=16.0):
    h = side / 2
    return SceneObject(shape, colour, size, (cx - h, cy - h, cx + h, cy + h), int(side * side))


CFG = WorldConfig()  # margin 10 px, size ratio 1.2


def test_parse_templates():
    assert parse_expression("The Red Circle.").subject == NounPhrase("circle", "red")
    assert parse_expression("large blue square").subject == NounPhrase("square", "blue", "large")
    p = parse_expression("the green star to the left of the small red circle")
    assert (p.type, p.relation, p.object) == ("relational", "left of", NounPhrase("circle", "red", "small"))
    assert parse_expression("the triangle on the left").relation == "leftmost"
    assert parse_expression("the third star from the left").relation == "third from the left"
    for bad in ("the red", "a blue thing", "the red circle near the square", "red circle circle", ""):
        assert parse_expression(bad) is None
    # every template instantiates to something that parses as its own type
    fill = {"np": "small red circle", "x": "red circle", "y": "large blue star"}
    for typ, temps in TEMPLATES.items():
        for t in temps:
            p = parse_expression(t.format(**fill))
            assert p is not None and p.type == typ, t


def test_checker_attribute_and_superlatives():
    objs = [_obj("circle", "red", "small", 20, 60), _obj("circle", "red", "small", 80, 60), _obj("square", "blue", "large", 50, 20, 34)]
    assert check_expression("the square", objs, CFG) == [2]
    assert check_expression("the red circle", objs, CFG) == [0, 1]  # ambiguous
    assert check_expression("the green circle", objs, CFG) == []
    assert check_expression("the leftmost circle", objs, CFG) == [0]
    assert check_expression("the circle on the right", objs, CFG) == [1]
    assert check_expression("the topmost circle", objs, CFG) == [0, 1]  # same height: no clear winner
    close = [_obj("star", "red", "small", 40, 50), _obj("star", "red", "small", 45, 90)]
    assert check_expression("the leftmost star", close, CFG) == [0, 1]  # 5 px < margin
    assert check_expression("the topmost star", close, CFG) == [0]
    sizes = [_obj("star", "red", "small", 20, 20, 16), _obj("star", "red", "large", 90, 90, 36), _obj("star", "red", "large", 40, 90, 32)]
    assert check_expression("the smallest star", sizes, CFG) == [0]
    assert check_expression("the biggest star", sizes, CFG) == [1, 2]  # 36 vs 32: ratio below 1.2


def test_checker_relations():
    objs = [_obj("circle", "red", "small", 20, 30), _obj("square", "blue", "small", 60, 30), _obj("circle", "red", "small", 100, 100)]
    assert check_expression("the circle left of the square", objs, CFG) == [0]
    assert check_expression("the circle to the right of the blue square", objs, CFG) == [2]
    assert check_expression("the circle below the square", objs, CFG) == [0, 2]  # circle 0 level with it: unclear
    assert check_expression("the circle above the square", objs, CFG) == []  # nothing clearly above
    assert check_expression("the square left of the circle", objs, CFG) == []  # landmark not unique
    assert check_expression("the circle left of the red square", objs, CFG) == []  # no such landmark
    assert check_expression("the circle closest to the square", objs, CFG) == [0]
    assert check_expression("the circle farthest from the square", objs, CFG) == [2]
    tie = [_obj("circle", "red", "small", 20, 30), _obj("circle", "red", "small", 100, 30), _obj("square", "blue", "small", 60, 30)]
    assert check_expression("the circle closest to the square", tie, CFG) == [0, 1]  # both 40 px away
    assert check_expression("the red circle above the square", tie, CFG) == []


def test_checker_ordinals():
    objs = [_obj("star", "red", "small", 20, 10), _obj("star", "red", "small", 45, 60), _obj("star", "red", "small", 50, 100), _obj("star", "red", "small", 90, 40)]
    assert check_expression("the second star from the left", objs, CFG) == [1, 2]  # 45 vs 50: too close
    assert check_expression("the third star from the left", objs, CFG) == [1, 2]
    assert check_expression("the second star from the right", objs, CFG) == [1, 2]
    assert check_expression("the second star from the top", objs, CFG) == [3]
    assert check_expression("the second star from the bottom", objs, CFG) == [1]
    row = [_obj("star", "red", "small", 80, 50), _obj("star", "red", "small", 20, 50), _obj("star", "red", "small", 50, 50)]
    assert check_expression("the second star from the left", row, CFG) == [2]
    assert check_expression("the third star from the left", row, CFG) == [0]
    assert check_expression("the second star from the top", row, CFG) == [0, 1, 2]
    assert check_expression("the third star from the left", row[:2], CFG) == []  # only two stars


def test_resolve_uses_given_margin():
    objs = [_obj("circle", "red", "small", 40, 50), _obj("circle", "red", "small", 46, 90)]
    p = parse_expression("the leftmost circle")
    assert resolve(p, objs, margin=10.0, size_ratio=1.2) == [0, 1]
    assert resolve(p, objs, margin=5.0, size_ratio=1.2) == [0]


# ------------------------------------------------------------------------------ CLI


def test_cli_generate_and_show(tmp_path):
    from clipground.cli import world as world_cli

    app = typer.Typer()
    world_cli.register(app)
    runner = CliRunner()
    out = tmp_path / "w"
    args = ["world", "generate", "--out", str(out), "--n-train", "3", "--n-val", "3", "--n-test", "2", "--n-compositional", "2", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "val: 3 scenes" in res.output and (out / "world.json").is_file()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already holds" in res.output
    grid = tmp_path / "grid.png"
    res = runner.invoke(app, ["world", "show", str(out), "--split", "val", "--n", "5", "--out", str(grid)])
    assert res.exit_code == 0, res.output
    with Image.open(grid) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    res = runner.invoke(app, ["world", "generate", "--out", str(tmp_path / "x"), "--size", "100"])
    assert isinstance(res.exception, ClipgroundError) and "128" in str(res.exception)
    res = runner.invoke(app, ["world", "show", str(tmp_path / "nothing")])
    assert isinstance(res.exception, ClipgroundError)
    assert not os.path.exists(tmp_path / "x" / "world.json")
