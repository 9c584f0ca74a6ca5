"""Tests of world-SAM pretraining: prompts and targets, losses, CLI run + reload, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipground.data.world import generate_world, rle_decode
from clipground.errors import ConfigError, UnknownNameError
from clipground.segmenters import SamSegmenter, make_segmenter
from clipground.training.pretrain_sam import (
    WorldMaskDataset,
    build_sam,
    collate_masks,
    load_sam_pretrain_config,
    make_sam_loss_fn,
    mask_cases,
    mask_losses,
    pretrain_sam,
    score_segmenter,
)

TINY_WORLD = ["world.n_train=6", "world.n_val=3", "world.n_test=0", "world.n_compositional=0", "world.n_new_look=2",
              "world.max_objects=4"]
TINY_SAM = ["model.image_size=64", "model.patch_size=8", "model.vision_hidden=32", "model.vision_layers=2",
            "model.vision_heads=2", "model.global_attn_indexes=[1]", "model.hidden=16", "model.decoder_heads=2",
            "model.decoder_mlp=32", "model.iou_hidden=16", "batch_size=2", "data.objects_per_scene=3",
            "log_every=1", "progress=false", "warmup_steps=1", "eval.max_objects=6", "lr=3e-3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_sam_pretrain_config(None, TINY_WORLD).world
    return generate_world(tmp_path_factory.mktemp("world") / "w", cfg, progress=False)


def _cfg(tmp: Path, *extra: str):
    return load_sam_pretrain_config(None, TINY_WORLD + TINY_SAM + [f"train.output_dir={tmp / 'run'}", *extra])


def test_prompts_and_targets_follow_the_masks(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, processor = build_sam(cfg.model)
    ds = WorldMaskDataset(world, cfg.data, processor, seed=0)
    item = ds[0]
    k, low = cfg.data.objects_per_scene, 4 * cfg.model.image_size // cfg.model.patch_size
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["targets"].shape == (k, low, low) and item["boxes"].shape == (k, 4) and item["points"].shape == (k, 1, 2)
    assert item["kind"] in cfg.data.prompt_weights
    h, w = ds.rles[0][0]["size"]
    scale = 64 / max(h, w)
    masks = [rle_decode(r) for r in ds.rles[0]]
    for j in range(k):
        px, py = (item["points"][j, 0] / scale).round().long().tolist()
        owner = [m for m in masks if m[py, px]]
        assert len(owner) == 1, "every point prompt lies on exactly one object"
        m = owner[0]
        # the target is the same object's coverage of the decoder cells: its area matches the mask's
        cell = 64 / low
        assert float(item["targets"][j].sum()) * (cell / scale) ** 2 == pytest.approx(m.sum(), rel=0.1)
        ys, xs = np.nonzero(m)
        x1, y1, x2, y2 = (item["boxes"][j] / scale).tolist()
        bw, bh = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        assert abs(x1 - xs.min()) <= 0.1 * bw + 1e-3 and abs(y2 - ys.max() - 1) <= 0.1 * bh + 1e-3
    again = ds[0]
    assert torch.equal(again["targets"], item["targets"]) and torch.equal(again["boxes"], item["boxes"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["boxes"], item["boxes"])  # prompts are redrawn each epoch
    batch = collate_masks([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["targets"].shape == (2, k, low, low)


def test_mask_losses_reward_the_right_mask() -> None:
    t = torch.zeros(1, 8, 8)
    t[0, 2:6, 2:6] = 1
    good = (t * 20 - 10).unsqueeze(1)  # (1, 1, 8, 8): confident and right
    bad = (10 - t * 20).unsqueeze(1)  # inverted
    logits = torch.cat([good, bad, torch.zeros_like(good)], 1)  # three masks
    bce, dice, iou = mask_losses(logits, t)
    assert iou[0, 0] == 1 and iou[0, 1] == 0
    assert bce[0, 0] < bce[0, 2] < bce[0, 1] and dice[0, 0] < 0.01 < dice[0, 1]


def test_loss_fn_runs_every_prompt_kind(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    model, processor = build_sam(cfg.model)
    ds = WorldMaskDataset(world, cfg.data, processor, seed=0)
    loss_fn = make_sam_loss_fn(cfg.loss)
    for kind in ("box", "point", "point+box"):
        batch = collate_masks([ds[0], ds[1]])
        batch["kind"] = kind
        loss, logs = loss_fn(model, batch)
        loss.backward()
        assert torch.isfinite(loss) and 0 <= logs["best_iou"] <= 1


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match="prompt_weights"):
        load_sam_pretrain_config(None, ["data.prompt_weights={scribble: 1.0}"])
    with pytest.raises(ConfigError, match="multiple"):
        load_sam_pretrain_config(None, ["model.image_size=100"])


def test_cli_pretrain_sam_reload_and_segment(world: Path, tmp_path: Path) -> None:
    from clipground.cli.main import app

    out = tmp_path / "sam"
    args = ["pretrain", "--model", "sam", "--world", str(world), "--out", str(out), *TINY_WORLD, *TINY_SAM,
            f"train.output_dir={tmp_path / 'run'}", "max_steps=4", "eval_every=2", "save_every=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"] == 4 and set(recipe["metrics"]) == {"val_box_iou", "val_point_iou", "new-look_box_iou",
                                                               "new-look_point_iou"}
    assert "pretrain --model sam" in (out / "RECIPE.md").read_text()
    seg = make_segmenter("sam", sam_model=str(out), sam_prompt="box")  # the path every method takes
    cases = mask_cases(world, "val", 3, seed=0)
    with Image.open(cases[0].file) as im:
        prepared = seg.prepare(im.convert("RGB"))
    from clipground.segmenters import Seeds

    c = cases[0]
    mask = seg.segment(prepared, Seeds(np.zeros(c.mask.shape, np.float32), c.point, c.mask, c.box))
    assert mask.shape == c.mask.shape and mask.dtype == bool
    scores = score_segmenter(seg, cases)
    assert set(scores) == {"box_iou", "point_iou"} and all(0 <= v <= 1 for v in scores.values())
    bad = CliRunner().invoke(app, ["pretrain", "--model", "dino", "--world", str(world), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and isinstance(bad.exception, UnknownNameError) and "unknown --model" in str(bad.exception)


def test_killed_run_resumes_to_the_same_weights(world: Path, tmp_path: Path) -> None:
    full = pretrain_sam(world, tmp_path / "full", _cfg(tmp_path / "a", "max_steps=4", "save_every=2", "eval_every=0"),
                        progress=False)
    assert full.finished
    cfg = _cfg(tmp_path / "b", "max_steps=4", "save_every=2", "eval_every=0")
    killed = pretrain_sam(world, tmp_path / "resumed", cfg, progress=False, stop_after_steps=3)
    assert not killed.finished and not (tmp_path / "resumed").exists()
    assert pretrain_sam(world, tmp_path / "resumed", cfg, resume=True, progress=False).finished
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_mask_loss(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "max_steps=40", "eval_every=0", "save_every=0", "log_every=5", "data.prompt_weights={box: 1.0}",
               "data.max_scenes=2", "lr=1e-2", "lr_schedule=constant")
    assert pretrain_sam(world, tmp_path / "out", cfg, progress=False).finished
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["mask"] for r in rows if "mask" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_from_model_wraps_a_model_in_memory(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    model, processor = build_sam(cfg.model)
    seg = SamSegmenter.from_model(model.eval(), processor, prompt="point")
    prepared = seg.prepare(Image.new("RGB", (50, 40), (90, 90, 90)))
    from clipground.segmenters import Seeds

    m = seg.segment(prepared, Seeds(np.zeros((40, 50), np.float32), (10, 10), np.zeros((40, 50), bool), (5, 5, 20, 20)))
    assert m.shape == (40, 50)
