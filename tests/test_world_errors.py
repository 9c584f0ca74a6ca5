"""Tests of ``scripts/world_errors.py`` (error analysis on the synthetic world)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("world_errors_script", REPO / "scripts" / "world_errors.py")
we = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = we
spec.loader.exec_module(we)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipground.data.world import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("world_errors")
    generate_world(root / "world", WorldConfig.v1(n_train=0, n_val=0, n_test=40, n_compositional=0), progress=False)
    return root / "world"


def test_misses_are_sorted_by_what_the_box_landed_on(world: Path, tmp_path: Path, capsys) -> None:
    records = [json.loads(x) for x in (world / "test.jsonl").read_text().splitlines()]
    from clipground.data.world import load_scene_objects, parse_expression

    scenes = load_scene_objects(world, "test")
    perfect = [{"index": i, "expression": r["expression"], "box": r["box"]} for i, r in enumerate(records)]
    res = we.analyse(perfect, records, scenes)
    assert not res["misses"] and all(hit == n for hit, n in res["relation"].values())
    # Answer every phrase with a box of another object that fits its subject (and is not its
    # reference object, which a relation's subject may also fit), where there is one.
    wrong, expected = [], 0
    for i, r in enumerate(records):
        e = parse_expression(r["expression"])
        others = [o.box for o in scenes[str(r["image_id"])] if e.subject.matches(o) and list(o.box) != r["box"]
                  and not (e.object is not None and e.object.matches(o))]
        if others:
            wrong.append({"index": i, "expression": r["expression"], "box": list(others[0])})
            expected += 1
    assert expected > 5
    res = we.analyse(wrong, records, scenes)
    assert sum(res["misses"].values()) == expected
    assert {what for _, what in res["misses"]} == {"another candidate"}
    assert all(n >= 2 for (_, n) in res["candidates"])
    # The command line prints the same and refuses predictions of another split file.
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(json.dumps(p) for p in wrong))
    assert we.main([str(pred), "--world", str(world)]) == 0
    assert "another candidate" in capsys.readouterr().out
    pred.write_text(json.dumps({**wrong[0], "expression": "something else"}))
    with pytest.raises(SystemExit, match="not of this split"):
        we.main([str(pred), "--world", str(world)])


def test_word_similarity_compares_the_words_token_states(tiny_clip_dir: Path) -> None:
    same, other = we.word_similarity(str(tiny_clip_dir), [("left", "left"), ("left", "right")])
    assert same[2] == pytest.approx(1.0, abs=1e-5)
    assert other[2] < 0.999
