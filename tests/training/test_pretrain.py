"""Tests of world-CLIP pretraining: tokenizer, regions, loss, CLI run + reload, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipground.data.world import WorldConfig, generate_world, load_scene_objects
from clipground.training import checkpoint as C
from clipground.training.config import ConfigError
from clipground.training.pretrain import (
    RegionCollator,
    RegionDataConfig,
    RegionSampler,
    WorldRegionDataset,
    _iou,
    claim_true,
    load_pretrain_config,
    multi_positive_loss,
    pretrain,
)
from clipground.training.world_tokenizer import build_world_tokenizer, world_words

TINY_WORLD = ["world.n_train=16", "world.n_val=10", "world.n_test=0", "world.n_compositional=4", "world.max_objects=5",
              "world.looks=classic", "world.phrasing=v1", "world.n_new_look=0"]
TINY_MODEL = ["vision_hidden=32", "vision_layers=1", "vision_heads=2", "text_hidden=32", "text_layers=1",
              "text_heads=2", "projection_dim=16", "model.image_size=32", "batch_size=2", "data.regions_per_scene=4",
              "log_every=1", "progress=false", "warmup_steps=1", "eval.hard_boxes=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("world")
    cfg = load_pretrain_config(None, TINY_WORLD).world
    return generate_world(d / "w", cfg, progress=False)


# --------------------------------------------------------------------------- tokenizer


def test_world_tokenizer_one_token_per_word_and_unknown_words() -> None:
    tok = build_world_tokenizer(model_max_length=24)
    for w in world_words():
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("The LARGE red   circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6
    assert tok.eos_token_id == max(tok.get_vocab().values())  # legacy argmax pooling also works
    odd = tok("the zebra-like ßquare ✓")["input_ids"]  # unknown words: byte tokens, no crash
    assert odd.count(tok.eos_token_id) == 1 and odd[-1] == tok.eos_token_id
    assert tok.decode(tok("a blue star")["input_ids"], skip_special_tokens=True) == "a blue star"


# --------------------------------------------------------------------------- regions & loss


def test_claims_and_multi_positive_targets() -> None:
    red_big_circle = ("object", ("circle", "red", "large"))
    assert claim_true(("object", ("circle", None, None)), red_big_circle)
    assert claim_true(("object", ("circle", "red", "large")), red_big_circle)
    assert not claim_true(("object", ("circle", "red", "small")), red_big_circle)
    assert not claim_true(("object", ("square", None, None)), red_big_circle)
    assert not claim_true(("part", ("circle", None, None)), red_big_circle)  # part caption vs whole object
    pair = ("pair", ("circle", "red", "large"), ("star", "blue", "small"))
    assert claim_true(("pair", ("star", None, None), ("circle", "red", None)), pair)
    assert not claim_true(("pair", ("star", None, None), ("star", None, None)), pair)
    assert not claim_true(("object", ("circle", None, None)), pair)


def test_multi_positive_loss_reduces_to_clip_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g)
    eye = torch.eye(6, dtype=torch.bool)
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(6))
           + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    assert multi_positive_loss(logits, eye).item() == pytest.approx(ref.item(), rel=1e-6)
    # Captions 0 and 1 are both true of regions 0 and 1 (e.g. "circle" for two circles):
    # the multi-positive loss prefers tied scores, the one-hot loss prefers the diagonal.
    t = eye.clone()
    t[0, 1] = t[1, 0] = True
    tied, split = torch.zeros(6, 6), torch.zeros(6, 6)
    tied[:2, :2] = 5.0
    split[:2, :2] = torch.tensor([[6.0, 4.0], [4.0, 6.0]])
    assert multi_positive_loss(tied, t) < multi_positive_loss(split, t)
    assert multi_positive_loss(split, eye) < multi_positive_loss(tied, eye)


def test_region_sampler_respects_overlap_rules(world: Path) -> None:
    scenes = load_scene_objects(world, "train")
    s = RegionSampler(RegionDataConfig(kind_weights={"object": 1, "part": 1, "loose": 1, "background": 1, "pair": 1}))
    seen = set()
    for k, objs in enumerate(scenes.values()):
        rng = np.random.default_rng(k)
        for r in s.sample(rng, objs, 128, 128, 12):
            seen.add(r.kind)
            ious = [_iou(r.box, o.box) for o in objs]
            if r.kind == "object":
                assert max(ious) > 0.6
                assert any(claim_true(r.claim, ("object", (o.shape, o.colour, o.size))) for o in objs)
            elif r.kind in ("part", "loose"):
                assert max(ious) < 0.4
            elif r.kind == "background":
                assert max(ious) < 0.05
            assert claim_true(r.claim, r.content)
            assert 0 <= r.box[0] < r.box[2] <= 128 and 0 <= r.box[1] < r.box[3] <= 128
    assert seen == {"object", "part", "loose", "background", "pair"}


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        load_pretrain_config(None, ["data.view_weights={zoom: 1}"])
    with pytest.raises(ConfigError):
        load_pretrain_config(None, ["world.image_size=20"])
    cfg = load_pretrain_config(Path(__file__).parents[2] / "configs" / "pretrain_world_clip.yaml", ["max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.train.mixed_precision == "no"


# --------------------------------------------------------------------------- runs


def test_cli_pretrain_generates_world_saves_and_reloads(tmp_path: Path) -> None:
    """`clipground pretrain` on a missing world dir: generates it, trains, saves a hub-style dir."""
    import typer
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from clipground.cli import pretrain as cli_pretrain
    from clipground.training.pretrain import as_backbone

    app = typer.Typer()
    cli_pretrain.register(app)
    app.command("noop")(lambda: None)  # keep `pretrain` a named subcommand
    world, out = tmp_path / "world", tmp_path / "model"
    args = ["pretrain", "--world", str(world), "--out", str(out), f"output_dir={tmp_path / 'run'}",
            "max_steps=3", "save_every=2", "eval_every=2", *TINY_WORLD, *TINY_MODEL]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (world / "world.json").is_file()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "RECIPE.md"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/val_acc" in x for x in rows) and any("loss" in x for x in rows)
    gate = [x for x in rows if "eval/val_acc" in x][-1]
    assert {"eval/val_acc_np", "eval/val_acc_hard", "eval/val_acc_crop", "eval/compositional_acc"} <= set(gate)

    model = CLIPModel.from_pretrained(out).eval()
    proc = CLIPProcessor.from_pretrained(out)
    assert type(AutoTokenizer.from_pretrained(out)).__name__.startswith("CLIPTokenizer")
    from PIL import Image

    img = Image.open(next((world / "images" / "train").iterdir())).convert("RGB")
    pv = proc(images=[img, img.crop((0, 0, 40, 60))], return_tensors="pt")["pixel_values"]
    assert pv.shape == (2, 3, 32, 32)
    tok = proc(text=["the red circle", "an unknown zebra"], padding=True, return_tensors="pt")
    with torch.no_grad():
        bb = as_backbone(model, proc)
        e_img, e_txt = bb.forward_image(pv).embeds, bb.forward_text(tok["input_ids"], tok["attention_mask"]).embeds
        out_ = model(**tok, pixel_values=pv)
    assert torch.allclose(out_.image_embeds, e_img, atol=1e-5) and torch.isfinite(e_txt).all()
    # Reloaded weights are the trained ones (the run's final checkpoint).
    ckpt = load_file(str(C.find_latest_checkpoint(tmp_path / "run") / C.WEIGHTS_FILE))
    sd = model.state_dict()
    assert max((sd[k] - v).abs().max().item() for k, v in ckpt.items()) < 1e-6


def test_pretrain_resume_after_kill_equals_uninterrupted(world: Path, tmp_path: Path) -> None:
    def cfg(run: Path):
        return load_pretrain_config(None, [f"output_dir={run}", "max_steps=6", "save_every=2", "eval_every=0",
                                           "eval.compositional=false", *TINY_MODEL])

    pretrain(world, tmp_path / "out_a", cfg(tmp_path / "a"), progress=False)
    stopped = pretrain(world, tmp_path / "out_b", cfg(tmp_path / "b"), progress=False, stop_after_steps=5)
    assert not stopped.finished and not (tmp_path / "out_b").exists()
    assert C.find_latest_checkpoint(tmp_path / "b").name == C.checkpoint_name(4)
    pretrain(world, tmp_path / "out_b", cfg(tmp_path / "b"), resume=True, progress=False)
    a = load_file(str(tmp_path / "out_a" / "model.safetensors"))
    b = load_file(str(tmp_path / "out_b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# --------------------------------------------------------------------------- whole scenes (world CLIP v2)

RICH_WORLD = ["world.n_train=12", "world.n_val=10", "world.n_test=0", "world.n_compositional=4", "world.n_new_look=0",
              "world.max_objects=5"]
SCENES = ["data.scenes=true", "data.dense_patch=1.0", "data.dense_pool=0.5", "data.p_generic=0.3",
          "data.p_synonym=0.5", "model.patch_size=8"]


@pytest.fixture(scope="module")
def rich_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rich_world")
    return generate_world(d / "w", load_pretrain_config(None, RICH_WORLD).world, progress=False)


def test_scene_items_label_every_patch_by_the_object_under_it(rich_world: Path) -> None:
    from clipground.training.pretrain import build_processor

    cfg = load_pretrain_config(None, RICH_WORLD + TINY_MODEL + SCENES)
    ds = WorldRegionDataset(rich_world, cfg.data, 0, grid=4)
    proc = build_processor(cfg.model, "rich")
    items = [ds[i] for i in range(3)]
    b = RegionCollator(proc)(items)
    n_crops = b["n_crops"]
    assert b["pixel_values"].shape[0] == n_crops + 3  # crops, then the whole scenes
    assert b["input_ids"].shape[0] == n_crops + sum(len(it["captions"]) for it in items) + 1  # + "background"
    for k, it in enumerate(items):
        cover = it["cover"].float()
        assert cover.shape == (len(it["captions"]), 16) and float(cover.max()) <= 1.0
        n = len(it["captions"])
        best, owner = cover.max(0)
        for p in range(16):
            row = b["patch_targets"][k, p]
            if best[p] >= 0.5:  # an object's patch: exactly the captions true of that object
                want = [claim_true(cl, it["contents"][int(owner[p])]) for cl in it["claims"]]
                assert row[:n].tolist() == want and not row[n] and b["patch_valid"][k, p]
            elif best[p] <= 0.05:  # background
                assert row[n] and not row[:n].any() and b["patch_valid"][k, p]
            else:
                assert not b["patch_valid"][k, p]
    texts = [c for it in items for c in it["captions"]]
    assert any(w in " ".join(texts).split() for w in ("thing", "shape", "object", "big", "little"))


def test_dense_pretraining_learns_and_resumes_exactly(rich_world: Path, tmp_path: Path) -> None:
    def cfg(run: Path):
        return load_pretrain_config(None, [f"output_dir={run}", "max_steps=6", "save_every=2", "eval_every=0",
                                           "eval.compositional=false", *RICH_WORLD, *TINY_MODEL, *SCENES])

    pretrain(rich_world, tmp_path / "out_a", cfg(tmp_path / "a"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("dense" in r and "pool" in r for r in rows if "loss" in r)
    gate = [r for r in rows if "eval/val_patch_hit" in r]
    assert gate and 0.0 <= gate[-1]["eval/val_patch_hit"] <= 1.0
    stopped = pretrain(rich_world, tmp_path / "out_b", cfg(tmp_path / "b"), progress=False, stop_after_steps=5)
    assert not stopped.finished
    pretrain(rich_world, tmp_path / "out_b", cfg(tmp_path / "b"), resume=True, progress=False)
    a = load_file(str(tmp_path / "out_a" / "model.safetensors"))
    b = load_file(str(tmp_path / "out_b" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    from transformers import CLIPModel, CLIPProcessor

    m, proc = CLIPModel.from_pretrained(tmp_path / "out_a"), CLIPProcessor.from_pretrained(tmp_path / "out_a")
    assert m.config.vision_config.patch_size == 8 and len(proc.tokenizer("the big red thing")["input_ids"]) == 6
