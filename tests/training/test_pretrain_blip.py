"""Tests of world-BLIP pretraining: checked negatives, ITC targets, loss, CLI run + reload, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipground.data.world import check_expression, generate_world, load_world_config
from clipground.errors import ConfigError
from clipground.heatmaps import BlipItmHeatmap
from clipground.training.pretrain_blip import (
    BlipMatcher,
    MatchCollator,
    WorldMatchDataset,
    build_blip,
    load_blip_pretrain_config,
    make_blip_loss_fn,
    pretrain_blip,
    swap_one_word,
)
from clipground.training.world_tokenizer import build_world_bert_tokenizer, world_words

TINY_WORLD = ["world.n_train=8", "world.n_val=3", "world.n_test=0", "world.n_compositional=0", "world.n_new_look=2",
              "world.max_objects=5"]
TINY_BLIP = ["model.image_size=32", "model.patch_size=8", "model.vision_hidden=32", "model.vision_layers=2",
             "model.vision_heads=2", "model.text_hidden=32", "model.text_layers=2", "model.text_heads=2",
             "model.projection_dim=16", "batch_size=3", "log_every=1", "progress=false", "warmup_steps=1",
             "eval.max_records=6"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_blip_pretrain_config(None, TINY_WORLD).world
    return generate_world(tmp_path_factory.mktemp("world") / "w", cfg, progress=False)


def _cfg(tmp: Path, *extra: str):
    return load_blip_pretrain_config(None, TINY_WORLD + TINY_BLIP + [f"train.output_dir={tmp / 'run'}", *extra])


def test_world_bert_tokenizer_keeps_world_words_whole() -> None:
    tok = build_world_bert_tokenizer("rich")
    for w in world_words("rich"):
        assert len(tok.tokenize(w)) == 1, w
    assert tok.tokenize("the 2nd big thing") == ["the", "2nd", "big", "thing"]
    assert "[UNK]" not in tok.tokenize("a zebra-like quokka")  # unknown words become letters, not [UNK]


def test_swap_one_word_changes_exactly_one_word() -> None:
    rng = np.random.default_rng(0)
    for text in ("the big red circle left of the blue star", "the leftmost square", "the second triangle from the top"):
        out = swap_one_word(text, rng)
        assert out is not None and sum(a != b for a, b in zip(text.split(), out.split())) == 1
    assert swap_one_word("the thing", rng) is None


def test_items_are_checked_by_the_world_checker(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, proc = build_blip(cfg.model)
    ds = WorldMatchDataset(world, cfg.data, proc, seed=0)
    wcfg = load_world_config(world)
    negatives = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["labels"][: item["n_pos"]] == [1] * item["n_pos"]
        for text, lab in zip(item["texts"], item["labels"]):
            n = len(check_expression(text, ds.objects[i], wcfg, ds.sides[i]))
            assert n == (1 if lab else 0), (text, lab, n)
        negatives += item["labels"].count(0)
    assert negatives >= len(ds)  # most scenes get their checked negatives
    assert ds[0]["texts"] == ds[0]["texts"]
    batch = MatchCollator(proc, ds)([ds[0], ds[1], ds[2]])
    t = batch["itc_targets"]
    assert t.shape == (3, len(batch["positive_index"])) and bool((t.sum(0) >= 1).all())
    for c, j in enumerate(batch["positive_index"].tolist()):
        assert t[int(batch["text_scene"][j]), c] == 1  # each positive is true of its own scene


def test_loss_runs_and_backpropagates(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    model, proc = build_blip(cfg.model)
    ds = WorldMatchDataset(world, cfg.data, proc, seed=0)
    batch = MatchCollator(proc, ds)([ds[0], ds[1]])
    loss, logs = make_blip_loss_fn(cfg.loss)(BlipMatcher(model), batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["itm"] > 0 and model.itm_head.weight.grad is not None


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        load_blip_pretrain_config(None, ["model.image_size=100"])
    with pytest.raises(ConfigError, match="negative"):
        load_blip_pretrain_config(None, ["data.hard_negatives=0", "data.easy_negatives=0"])


def test_cli_pretrain_blip_reload_as_heatmap(world: Path, tmp_path: Path) -> None:
    from clipground.cli.main import app

    out = tmp_path / "blip"
    args = ["pretrain", "--model", "blip", "--world", str(world), "--out", str(out), *TINY_WORLD, *TINY_BLIP,
            f"train.output_dir={tmp_path / 'run'}", "max_steps=3", "eval_every=0", "save_every=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"] == 3 and "val_peak_hit" in recipe["metrics"] and "new-look_itm_acc" in recipe["metrics"]
    heat = BlipItmHeatmap(str(out))  # the loader heatmap-segment's blip heatmap uses
    img = Image.new("RGB", (50, 40), (90, 90, 90))
    maps = heat(heat.prepare(img), ["the red circle", "a star"])
    assert len(maps) == 2 and maps[0].shape == (40, 50) and np.isfinite(maps[0]).all()


def test_killed_run_resumes_to_the_same_weights(world: Path, tmp_path: Path) -> None:
    common = ("max_steps=4", "save_every=2", "eval_every=0")
    assert pretrain_blip(world, tmp_path / "full", _cfg(tmp_path / "a", *common), progress=False).finished
    cfg = _cfg(tmp_path / "b", *common)
    assert not pretrain_blip(world, tmp_path / "resumed", cfg, progress=False, stop_after_steps=3).finished
    assert pretrain_blip(world, tmp_path / "resumed", cfg, resume=True, progress=False).finished
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
