"""Tests of scene rendering (clipground.data.world.render), on generated worlds and single scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.random import PCG64, Generator
from PIL import Image

from clipground.data.jsonl import read_jsonl
from clipground.data.world import (
    COLOURS,
    SPLITS,
    WorldConfig,
    check_expression,
    describe,
    held_out_pairs,
    load_scene_objects,
    render_scene,
)


def test_boxes_masks_colours_and_sizes(world: tuple[Path, WorldConfig]) -> None:
    out, cfg = world
    n = cfg.image_size
    small_sides, large_sides = [], []
    for split in ("train", "val", "test", "compositional"):
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


def test_held_out_pairs_only_in_compositional(world: tuple[Path, WorldConfig], world_json: dict) -> None:
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


def test_render_scales_with_image_size() -> None:
    cfg = WorldConfig.v1(image_size=224)
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
