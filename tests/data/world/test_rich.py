"""The default world kind: rendering families, held-out looks, the rich grammar and its paraphrases,
and that clipground.relations understands every form; plus the first world staying byte-identical."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from clipground.data.jsonl import read_jsonl
from clipground.data.world import TYPES, WorldConfig, generate_world, load_scene_objects
from clipground.data.world.config import RENDERED_SPLITS, training_looks
from clipground.data.world.grammar import (FORMS, HELD_OUT_FORMS, ORDINALS, PAIR_FORMS, NounPhrase, parse_rich,
                                           referents)
from clipground.relations import parse

#: What a world relation is called by clipground.relations.
RELATION_KEYS = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom",
                 "biggest": "biggest", "smallest": "smallest", "middle": "middle"}


def _sides(out: Path, split: str) -> dict[str, int]:
    coco = json.loads((out / f"instances_{split}.json").read_text())
    return {str(im["id"]): int(im["width"]) for im in coco["images"]}


def test_every_expression_checks_out_in_its_own_scene(rich_world: tuple[Path, WorldConfig]) -> None:
    out, cfg = rich_world
    w = json.loads((out / "world.json").read_text())
    n = 0
    for split in RENDERED_SPLITS + ("paraphrase",):
        objects, sides = load_scene_objects(out, split), _sides(out, split)
        for r in read_jsonl(out / f"{split}.jsonl"):
            m, side = r.meta, sides[r.image_id]
            p = parse_rich(r.expression)
            assert p is not None and p.type == m["type"] and p.relation == m["relation"], r.expression
            assert referents(p, objects[r.image_id], cfg.margin_at(side), cfg.size_ratio, (side, side)) == [m["target"]]
            assert parse_rich(f"the {m['subject']}").subject == p.subject  # meta holds the noun phrase as said
            assert (m["form"] in HELD_OUT_FORMS) == m["held_out_form"]
            if split in ("train", "val", "test", "compositional"):
                assert not m["held_out_form"], (split, r.expression)
            n += 1
    assert n > 400
    for split in RENDERED_SPLITS:
        c = w["counts"][split]
        assert c["checker_rejections"] == 0 and set(c["types"]) == set(TYPES)


def test_looks_vary_and_held_out_looks_appear_only_in_new_look(rich_world: tuple[Path, WorldConfig]) -> None:
    out, cfg = rich_world
    held = {f"{b}-{s}" for b, s in cfg.held_out_looks}
    train = {f"{b}-{s}" for b, s in training_looks(cfg)}
    for split in ("train", "val", "test", "compositional"):
        looks = {r.meta["look"] for r in read_jsonl(out / f"{split}.jsonl")}
        assert looks <= train and len(looks) >= 4
        assert len(set(_sides(out, split).values())) > 5  # scene sides vary within image_sizes
    new = {r.meta["look"] for r in read_jsonl(out / "new-look.jsonl")}
    assert new and new <= held
    # Every background and style of a held-out family is seen in training, in other families.
    for b, s in cfg.held_out_looks:
        assert any(b == tb for tb, _ in training_looks(cfg)) and any(s == ts for _, ts in training_looks(cfg))
    new_forms = [r.meta["held_out_form"] for r in read_jsonl(out / "new-look.jsonl")]
    assert sum(new_forms) > len(new_forms) / 3  # new-look also speaks in held-out phrasings


def test_paraphrase_split_re_says_test_expressions(rich_world: tuple[Path, WorldConfig]) -> None:
    out, _ = rich_world
    test = {(r.image_id, r.expression): r for r in read_jsonl(out / "test.jsonl")}
    twins = read_jsonl(out / "paraphrase.jsonl")
    assert len(twins) > len(test) / 2
    for t in twins:
        orig = test[(t.image_id, t.meta["template"])]
        assert t.image == orig.image and t.box == orig.box and t.meta["target"] == orig.meta["target"]
        assert t.meta["held_out_form"] and not orig.meta["held_out_form"] and t.expression != orig.expression


def _words(forms: list[str]) -> set[str]:
    return {w for f in forms for w in re.sub(r"\{[xyz]\}", " ", f).split()}


def test_held_out_forms_use_training_words_only() -> None:
    all_forms = [f for rels in FORMS.values() for fs in rels.values() for f in fs]
    train = [f for f in all_forms if f not in HELD_OUT_FORMS]
    held = [f for f in all_forms if f in HELD_OUT_FORMS]
    assert held and _words(held) <= _words(train)
    assert HELD_OUT_FORMS <= set(all_forms) and PAIR_FORMS <= set(all_forms)
    assert not PAIR_FORMS & HELD_OUT_FORMS


@pytest.mark.parametrize("typ,relation,form", [(t, r, f) for t, rels in FORMS.items() for r, fs in rels.items()
                                               for f in fs])
def test_relations_understands_every_form(typ: str, relation: str | None, form: str) -> None:
    """Every form of the rich grammar means the same to the world's parser and to the zero-shot
    relation parser (same relation, same noun phrases)."""
    x, y, z = "big red thing", "small blue square", "green star"
    text = form.format(x=x, y=y, z=z).replace("a big", "a big")
    world = parse_rich(text)
    assert world is not None and world.type == typ and world.relation == relation
    assert world.subject == NounPhrase(None, "red", "large")
    p = parse(text)
    if typ == "attribute":
        assert not p.is_spatial and p.subject == x
        return
    assert p.subject == x, text
    if typ == "ordinal":
        k, d = ORDINALS[relation]
        assert (p.relation, p.ordinal) == (d, k), text
    elif typ == "spatial":
        assert p.relation == RELATION_KEYS[relation], text
    else:
        assert p.relation == relation and p.object == y, text
        assert p.object2 == (z if relation == "between" else None)


def test_every_tokenizer_word_is_said_by_the_grammar_and_its_captions() -> None:
    from clipground.data.world import COLOUR_NAMES, SHAPES
    from clipground.data.world.grammar import GENERIC_NOUNS, SIZE_WORDS
    from clipground.training.world_tokenizer import CAPTION_WORDS, world_words

    said = _words([f for rels in FORMS.values() for fs in rels.values() for f in fs])
    said = {p for w in said for p in re.findall(r"\d+|\D+", w)}
    said |= set(SHAPES) | set(COLOUR_NAMES) | set(SIZE_WORDS) | set(GENERIC_NOUNS) | set(CAPTION_WORDS) | {"an"}
    assert set(world_words("rich")) == said


def _media_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".png", ".jsonl") and "new-look" not in p.name and "paraphrase" not in p.name:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_the_first_world_is_generated_byte_identically(tmp_path: Path) -> None:
    """``WorldConfig.v1()`` reproduces the first world's images and records exactly (the hash
    was taken from the code that generated the first world, before the rich world existed)."""
    generate_world(tmp_path, WorldConfig.v1(seed=0, n_train=20, n_val=20, n_test=20, n_compositional=20), progress=False)
    assert _media_hash(tmp_path) == "b677691dee081934f58e01b618f97fd3f614503d34a16a95c04ce0c715f89146"
