"""Tests of the world's grammar, parser and checker (clipground.data.world.grammar)."""

from __future__ import annotations

from clipground.data.world import TEMPLATES, NounPhrase, SceneObject, WorldConfig, check_expression, parse_expression, referents


def _obj(shape: str, colour: str, size: str, cx: float, cy: float, side: float = 16.0) -> SceneObject:
    """A square-boxed object centred at ``(cx, cy)`` (no mask; area = box area)."""
    h = side / 2
    return SceneObject(shape, colour, size, (cx - h, cy - h, cx + h, cy + h), int(side * side))


CFG = WorldConfig.v1()  # margin 10 px, size ratio 1.2


def test_parse_templates() -> None:
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


def test_checker_attribute_and_superlatives() -> None:
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


def test_checker_relations() -> None:
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


def test_checker_ordinals() -> None:
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


def test_referents_uses_given_margin() -> None:
    objs = [_obj("circle", "red", "small", 40, 50), _obj("circle", "red", "small", 46, 90)]
    p = parse_expression("the leftmost circle")
    assert referents(p, objs, margin=10.0, size_ratio=1.2) == [0, 1]
    assert referents(p, objs, margin=5.0, size_ratio=1.2) == [0]
