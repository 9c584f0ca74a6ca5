"""Tests of expression generation (clipground.data.world.expressions) on a generated world."""

from __future__ import annotations

from pathlib import Path

from clipground.data.jsonl import read_jsonl
from clipground.data.world import SPLITS, TYPES, WorldConfig, check_expression, load_scene_objects, parse_expression


def test_every_expression_is_unique_and_parses_to_its_meta(world: tuple[Path, WorldConfig]) -> None:
    out, cfg = world
    n = 0
    for split in ("train", "val", "test", "compositional"):
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


def test_no_checker_rejections_and_types_balanced(world_json: dict) -> None:
    for split in ("train", "val", "test", "compositional"):
        c = world_json["counts"][split]
        assert c["checker_rejections"] == 0  # generator and independent checker agree
        assert set(c["types"]) == set(TYPES) and min(c["types"].values()) >= 3
        assert max(c["types"].values()) <= 1.5 * min(c["types"].values())
        assert c["expressions"] == sum(c["types"].values())


def test_all_types_and_many_relations_present(world: tuple[Path, WorldConfig]) -> None:
    out, _ = world
    recs = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert {r.meta["type"] for r in recs} == set(TYPES)
    assert len({r.meta["relation"] for r in recs}) >= 12
    per_scene: dict[str, int] = {}
    for r in recs:
        per_scene[r.image_id] = per_scene.get(r.image_id, 0) + 1
    assert len(per_scene) == 60 and max(per_scene.values()) <= 4 and min(per_scene.values()) >= 1
    assert len({r.expression for r in recs if r.meta["type"] == "attribute"}) > 5
