"""The method contract, checked for every registered method (a new one is covered without a new test).

Each method is built by name on the tiny test CLIP, grounds phrases through ``set_image`` /
``predict`` / ``predict_batch``, hands its heavy image state out and back, saves and loads
through ``save_pretrained`` / ``from_pretrained`` with identical answers, and refuses a bad
phrase with the typed error. Every proposal source that works offline is checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipground import Grounder
from clipground.errors import BadPhraseError, ClipgroundError
from clipground.methods import METHODS
from clipground.testing import SCENE_BOXES, write_box_scene

PHRASES = ["the red box", "a blue box on the left", "the green box right of the red box"]
BOXES = SCENE_BOXES


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An image with three boxes, its COCO instances file and a precomputed-proposals file."""
    root = tmp_path_factory.mktemp("contract")
    write_box_scene(root)
    (root / "props.json").write_text(json.dumps({"scene.png": {"boxes": BOXES + [[0.0, 0.0, 64.0, 48.0]]}}))
    return root / "scene.png", root / "instances.json", root / "props.json"


#: Options that keep a method off extra hub weights beside a tiny CLIP (BLIP/SAM beside tiny
#: checkpoints: tests/methods/test_online_paths.py).
WEIGHT_FREE = {"heatmap-segment": {"heatmap": "clip", "segmenter": "grabcut"}}


def _same(a, b) -> None:
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pa.phrase == pb.phrase and pa.fallback == pb.fallback
        assert pa.box == pytest.approx(pb.box, abs=1e-5) and pa.score == pytest.approx(pb.score, abs=1e-5)
        assert torch.allclose(pa.boxes, pb.boxes, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_keeps_the_contract(name: str, scene, tiny_clip_dir: Path, tmp_path: Path) -> None:
    image, instances, _ = scene
    mcls = METHODS[name]
    torch.manual_seed(0)
    g = Grounder.load(name, backbone=str(tiny_clip_dir), proposals=f"gt:{instances}" if mcls.uses_proposals else None,
                      **WEIGHT_FREE.get(name, {}))
    g.method.eval()
    g.set_image(image)
    batch = g.predict_batch(PHRASES)
    _same([g.predict(p) for p in PHRASES], batch)
    for p in batch:
        w, h = p.image_size
        assert (w, h) == (64, 48) and 0 <= p.box[0] <= p.box[2] <= w and 0 <= p.box[1] <= p.box[3] <= h
        assert p.to_dict()["box_format"] == "xyxy" and p.to_hf()[0]["label"] == p.phrase
    # The heavy state goes out and comes back: the same answers without encoding the image again.
    state = g.get_image_state()
    g.reset_image()
    with pytest.raises(ClipgroundError, match="set_image"):
        g.predict(PHRASES[0])
    _same(g.set_image_state(state).predict_batch(PHRASES), batch)
    # Saved and loaded through the path real checkpoints take: identical boxes.
    g.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "grounder.json").is_file()
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert type(g2.method) is mcls and g2.method.config == g.method.config
    _same(g2.set_image(image).predict_batch(PHRASES), batch)
    # A bad phrase is the typed error, not a traceback from the model.
    for bad in ("", "   ", None, "x" * 1000):
        with pytest.raises(BadPhraseError):
            g2.predict(bad)  # type: ignore[arg-type]
    # trainable <=> it names a recipe, and that recipe exists.
    if mcls.trainable:
        from clipground.training.recipes import get_recipe

        assert callable(get_recipe(name))


@pytest.mark.parametrize("source", ["selective-search", "gt", "file"])
def test_every_offline_proposal_source_feeds_a_method(source: str, scene, tiny_clip_dir: Path, tmp_path: Path) -> None:
    image, instances, props = scene
    spec = {"selective-search": "selective-search", "gt": f"gt:{instances}", "file": f"file:{props}"}[source]
    g = Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals=spec)
    preds = g(str(image), PHRASES)
    got = g.get_image_state().proposals
    assert len(got) > 0 and got.boxes.shape[1] == 4 and len(got.scores) == len(got)
    assert all(len(p.boxes) == len(got) for p in preds)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert g2.proposals.config() == g.proposals.config()
    _same(g2(str(image), PHRASES), preds)
