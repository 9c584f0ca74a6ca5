"""Tests of the fusion regressor: geometry, training on cached features, save/load, the recipe/CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord
from clipground.heatmaps import InputGeometry, crop_fraction, pad_to_square, square_geometry
from clipground.methods.regression import FusionRegressor, cxcywh_to_xyxy
from clipground.training.recipes import TrainArgs, get_recipe
from clipground.training.recipes.regression import (
    CachedGroundingDataset,
    FusionRecipeConfig,
    build_feature_cache,
    train_fusion_regressor,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def make_scenes(root: Path, n: int = 8, size: tuple[int, int] = (48, 36)) -> list[GroundingRecord]:
    """Coloured rectangles on grey, one record per rectangle (non-square images on purpose)."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(n):
        img = Image.new("RGB", size, (128, 128, 128))
        d = ImageDraw.Draw(img)
        for j, (name, rgb) in enumerate(COLOURS.items()):
            w, h = (int(v) for v in torch.randint(6, 14, (2,), generator=g))
            x = 2 + j * 15 + int(torch.randint(0, 2, (1,), generator=g))
            y = int(torch.randint(0, size[1] - h, (1,), generator=g))
            d.rectangle([x, y, x + w - 1, y + h - 1], fill=rgb)
            recs.append(GroundingRecord(str(root / f"{i}.png"), f"the {name} box", [x, y, x + w, y + h],
                                        image_id=str(i), split="train"))
        img.save(root / f"{i}.png")
    return recs


def test_geometry_round_trip_and_crop_fraction() -> None:
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    sq, geom = pad_to_square(img, (0.0, 0.0, 0.0))
    assert sq.size == (60, 60) and sq.getpixel((10, 40)) == (0, 0, 0) and sq.getpixel((10, 10)) == (255, 0, 0)
    box = torch.tensor([[6.0, 3.0, 30.0, 27.0]])
    assert torch.allclose(geom.to_pixels(geom.to_normalized(box)), box)
    assert torch.allclose(geom.to_normalized(box), box / 60)
    # A processor that resizes to 256 and crops 224 only sees the centre 7/8 of the square.
    g2 = square_geometry(60, 30, fraction=224 / 256)
    assert g2.to_pixels(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), clip=False).tolist()[0] == pytest.approx(
        [60 / 16, 60 / 16, 60 - 60 / 16, 60 - 60 / 16])

    class P:  # minimal processor stand-in
        do_center_crop, crop_size, size = True, {"height": 224}, {"shortest_edge": 256}

    assert crop_fraction(P()) == pytest.approx(224 / 256)
    # grid_to_image samples the model grid at each pixel's position in the padded square.
    grid = torch.zeros(2, 2)
    grid[1, 0] = 1.0  # bottom-left quarter of the square = padding for a 60x30 image
    heat = InputGeometry(60.0, 60.0, 0.0, 0.0, 60, 30).grid_to_image(grid)
    assert heat.shape == (30, 60) and float(heat.max()) < 0.5


def test_box_parameterization_orders_corners() -> None:
    b = cxcywh_to_xyxy(torch.randn(100, 4))
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    b = cxcywh_to_xyxy(torch.randn(100, 4) * 30)  # saturated: may collapse, never invert
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_cfg() -> FusionRecipeConfig:
    cfg = FusionRecipeConfig()
    cfg.model.dim, cfg.model.layers, cfg.model.heads, cfg.model.head_hidden, cfg.model.dropout = 32, 1, 2, 32, 0.0
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps, t.log_every, t.save_every, t.eval_every = 100, 8, 1e-2, 0, 1, 0, 0
    t.progress = False
    return cfg


def test_train_loss_decreases_and_save_load_round_trip(tmp_path: Path, tiny_clip_dir: Path,
                                                       small_cfg: FusionRecipeConfig) -> None:
    recs = make_scenes(tmp_path)
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cache = build_feature_cache(bb, recs, cache_dir=tmp_path / "cache", progress=False)
    assert cache.patches.shape[0] == 8 and len(cache.texts) == 3
    # The cache is reused, not recomputed: a second build loads identical tensors from disk.
    again = build_feature_cache(bb, recs, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(again.patches, cache.patches)
    # Targets live in the padded square: a 48x36 image has side 48.
    ds = CachedGroundingDataset(cache, recs)
    assert torch.allclose(ds.boxes[0], torch.tensor(recs[0].box) / 48)

    small_cfg.train.output_dir = str(tmp_path / "run")
    method, result = train_fusion_regressor(small_cfg, bb, recs, recs, cache)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 100
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert result.last_eval["miou"] > 0.0

    g = Grounder(method)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert isinstance(g2.method, FusionRegressor)
    phrases = ["the red box", "the blue box", "a green thing"]
    for img in (recs[0].image, recs[5].image):
        a = g.set_image(img).predict_batch(phrases)
        b = g2.set_image(img).predict_batch(phrases)
        for pa, pb in zip(a, b):
            assert max(abs(x - y) for x, y in zip(pa.box, pb.box)) < 1e-6
            assert abs(pa.score - pb.score) < 1e-6
            w, h = pa.image_size
            assert 0 <= pa.box[0] < pa.box[2] <= w and 0 <= pa.box[1] < pa.box[3] <= h
    # The saved weights are the trained ones (not a fresh initialization).
    fresh = FusionRegressor(bb, method.config)
    diff = max((p - q).abs().max().item() for p, q in zip(fresh.fusion.parameters(), g2.method.fusion.parameters()))
    assert diff > 1e-3


def test_recipe_through_cli(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from typer.testing import CliRunner

    from clipground.cli.main import app

    recs = make_scenes(tmp_path, n=4)
    write_jsonl(recs, tmp_path / "train.jsonl", relative_to=tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  max_steps: 6\n  batch_size: 4\n  progress: false\n  eval_every: 0\nmodel:\n"
                   "  dim: 16\n  layers: 1\n  heads: 2\n  head_hidden: 16\n")
    res = CliRunner().invoke(app, ["train", "--method", "fusion-regressor", "--train", str(tmp_path),
                                   "--val", str(tmp_path / "train.jsonl"), "--backbone", str(tiny_clip_dir),
                                   "--out", str(tmp_path / "run"), "--config", str(cfg), "lr=1e-3"])
    assert res.exit_code == 0, res.output
    final = tmp_path / "run" / "final"
    assert (final / "grounder.json").is_file() and (tmp_path / "run" / "learning_curve.png").is_file()
    p = Grounder.from_pretrained(final)(recs[0].image, "the red box")
    assert len(p.box) == 4 and not p.fallback
    # Features were cached once, under OUT/feature_cache.
    assert list((tmp_path / "run" / "feature_cache").glob("img-*.safetensors"))


def test_recipe_rejects_bad_override(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.errors import ClipgroundError

    recs = make_scenes(tmp_path, n=2)
    write_jsonl(recs, tmp_path / "train.jsonl", relative_to=tmp_path)
    args = TrainArgs(method="fusion-regressor", train=str(tmp_path / "train.jsonl"), backbone=str(tiny_clip_dir),
                     out=str(tmp_path / "run"), overrides=["no_such_key=1"])
    with pytest.raises(ClipgroundError):
        get_recipe("fusion-regressor")(args)


def test_flip_augmentation_keeps_expressions_true(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.training.recipes.regression import add_flips, load_keyed_image

    recs = make_scenes(tmp_path, n=2)
    aug = add_flips(recs, ["h", "v"])
    assert len(aug) == 3 * len(recs)
    for r in aug:
        img = load_keyed_image(r.image)
        x1, y1, x2, y2 = (int(v) for v in r.box)
        colour = r.expression.split()[1]
        assert img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOURS[colour]  # the box still holds its object
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cache = build_feature_cache(bb, aug, progress=False)
    assert len(cache.images) == 6 and not torch.equal(cache.patches[0], cache.patches[2])


def test_tiled_features_assemble_a_finer_grid(tmp_path: Path, tiny_clip_dir: Path, small_cfg: FusionRecipeConfig) -> None:
    from clipground.methods.regression import encode_square_images, patch_grid, square_views

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)  # 32 px input, 8 px patches: a 4x4 grid
    img = Image.new("RGB", (64, 48), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([40, 5, 60, 25], fill=(220, 30, 30))
    views, geom = square_views(bb, img, tiles=2)
    assert len(views) == 5 and all(v.size == (32, 32) for v in views[1:]) and geom.scale_x == 64
    f = encode_square_images(bb, [img], tiles=2)
    assert f["grid"] == (8, 8) == patch_grid(bb, 2) and f["patches"].shape[1] == 64
    # The top-right tile's own patches sit in rows 0-3, columns 4-7 of the assembled grid.
    direct = bb.encode_images([views[2]]).patch_tokens[0].reshape(4, 4, -1)
    grid = f["patches"][0].reshape(8, 8, -1)
    assert torch.allclose(grid[:4, 4:], direct, atol=1e-5)
    assert not torch.allclose(grid[:4, :4], direct, atol=1e-3)
    # A tiled model trains and predicts end to end; a cache of another tiling is refused.
    recs = make_scenes(tmp_path, n=2)
    small_cfg.model.tiles, small_cfg.train.max_steps, small_cfg.train.batch_size = 2, 2, 4
    small_cfg.train.output_dir = str(tmp_path / "run")
    cache = build_feature_cache(bb, recs, progress=False, tiles=2)
    method, _ = train_fusion_regressor(small_cfg, bb, recs, [], cache)
    p = Grounder(method)(recs[0].image, "the red box")
    assert 0 <= p.box[0] < p.box[2] <= 48
    from clipground.errors import ClipgroundError

    with pytest.raises(ClipgroundError, match="tiles"):
        train_fusion_regressor(small_cfg, bb, recs, [], build_feature_cache(bb, recs, progress=False))


def test_input_size_value_embeds_and_merge(tmp_path: Path, tiny_clip_dir: Path, small_cfg: FusionRecipeConfig) -> None:
    from clipground.errors import ClipgroundError
    from clipground.methods.regression import dense_input, encode_square_images, patch_grid

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)  # 32 px input, 8 px patches: a 4x4 grid
    img = Image.new("RGB", (64, 48), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([40, 5, 60, 25], fill=(220, 30, 30))
    # At the native side the resize path is the checkpoint's own preprocessing of the square.
    native = encode_square_images(bb, [img])
    same = encode_square_images(bb, [img], input_size=32)
    assert torch.allclose(same["patches"], native["patches"], atol=1e-4)
    # Twice the side: a 8x8 grid through interpolated positions, the whole square kept.
    f = encode_square_images(bb, [img], input_size=64, dense="value")
    assert f["grid"] == (8, 8) == patch_grid(bb, input_size=64) and f["patches"].shape[1] == 64
    assert f["geometry"][0].scale_x == 64 and f["geometry"][0].offset_x == 0
    final = encode_square_images(bb, [img], input_size=64)
    assert torch.allclose(final["patches"], f["patches"]) and not torch.allclose(final["patch_embeds"], f["patch_embeds"])
    # The value path skips the last block's attention mixing: in a one-block CLIP a patch's value
    # embedding depends on that patch alone. Painting the far corner changes the final embedding of
    # patch 0 but not its value embedding.
    from clipground.testing import make_tiny_clip

    one = ClipBackbone.from_pretrained(make_tiny_clip(tmp_path / "one_block", layers=1))
    other = img.copy()
    ImageDraw.Draw(other).rectangle([48, 36, 63, 47], fill=(30, 60, 220))
    fv, ff, v0, f0 = (encode_square_images(one, [im], input_size=64, dense=d)["patch_embeds"][0, 0]
                      for im, d in ((other, "value"), (other, "final"), (img, "value"), (img, "final")))
    assert torch.allclose(fv, v0, atol=1e-5) and not torch.allclose(ff, f0, atol=1e-4)
    for bad in ({"tiles": 2, "input_size": 64}, {"dense": "mean"}, {"input_size": -1}):
        cfg = FusionRecipeConfig().model
        for k, v in bad.items():
            setattr(cfg, k, v)
        with pytest.raises(ClipgroundError):
            dense_input(cfg)
    # A merged fine-grid model trains, predicts and round-trips; a cache of another view is refused.
    recs = make_scenes(tmp_path, n=2)
    m = small_cfg.model
    m.input_size, m.dense, m.merge, m.peak = 64, "value", 2, True
    small_cfg.train.max_steps, small_cfg.train.batch_size = 3, 4
    small_cfg.train.output_dir = str(tmp_path / "run")
    cache = build_feature_cache(bb, recs, progress=False, input_size=64, dense="value")
    method, _ = train_fusion_regressor(small_cfg, bb, recs, [], cache)
    assert method.fusion.img_pos.shape[0] == 1 + 16  # 8x8 patches merged 2x2
    g = Grounder(method)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert g2.method.config.input_size == 64 and g2.method.config.merge == 2 and g2.method.config.peak
    a, b = g(recs[0].image, "the red box"), g2(recs[0].image, "the red box")
    assert max(abs(x - y) for x, y in zip(a.box, b.box)) < 1e-5 and 0 <= a.box[0] < a.box[2] <= 48
    with pytest.raises(ClipgroundError, match="input_size"):
        train_fusion_regressor(small_cfg, bb, recs, [], build_feature_cache(bb, recs, progress=False, input_size=64))


def test_peak_head_answers_with_the_best_patch_box() -> None:
    from clipground.methods.regression import FusionHead, FusionRegressorConfig
    from clipground.training.recipes.regression import Batch, FusionLossConfig, fusion_loss

    torch.manual_seed(0)
    cfg = FusionRegressorConfig(dim=16, layers=1, heads=2, head_hidden=16, dropout=0.0, peak=True)
    head = FusionHead(cfg, vision_width=8, text_width=8, embed_dim=8, num_patches=16, max_text=4)
    b = 3
    x = (torch.randn(b, 8), torch.randn(b, 16, 8), torch.randn(b, 16, 8), torch.randn(b, 8), torch.randn(b, 4, 8),
         torch.ones(b, 4, dtype=torch.bool))
    out = head(*x)
    assert out.cell_boxes is not None and out.cell_boxes.shape == (b, 16, 4)
    best = out.patch_logits.argmax(-1)
    assert torch.equal(out.boxes, out.cell_boxes[torch.arange(b), best])
    # Every patch box is a proper box whose centre lies within two cells of its patch.
    cb = out.cell_boxes
    assert (cb[..., 2] > cb[..., 0]).all() and (cb[..., 3] > cb[..., 1]).all()
    centre = (cb[..., :2] + cb[..., 2:]) / 2
    assert ((centre - head.centers).abs() <= 2 / 4 + 1e-6).all()
    # The loss only asks the patches the target covers for its box: a target inside the top-left
    # cell of the 4x4 grid gives box gradient to that patch's box and to no other.
    target = torch.tensor([[0.02, 0.03, 0.2, 0.21]]).repeat(b, 1)
    batch = Batch(*x, target, target * 100, torch.full((b,), 100.0), torch.zeros(b), torch.full((b, 2), 100))

    class Spy(torch.nn.Module):
        def __init__(self, inner: FusionHead):
            super().__init__()
            self.inner, self.out = inner, None

        def forward(self, *a: torch.Tensor):
            self.out = self.inner(*a)
            self.out.cell_boxes.retain_grad()
            return self.out

    spy = Spy(head)
    loss, metrics = fusion_loss(FusionLossConfig(quality=0.0, patch_map=0.0))(spy, batch)
    loss.backward()
    g = spy.out.cell_boxes.grad.abs().sum(-1)
    assert (g[:, 0] > 0).all() and (g[:, 1:] == 0).all() and metrics["patch_ce"] > 0


def test_test_time_mirrors_vote_on_boxes_mapped_back(tmp_path: Path, tiny_clip_dir: Path,
                                                     small_cfg: FusionRecipeConfig) -> None:
    from clipground.errors import ClipgroundError
    from clipground.mirror import flip_box, flip_expression, flip_image, vote_boxes

    recs = make_scenes(tmp_path, n=2)
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    small_cfg.train.max_steps, small_cfg.train.batch_size = 3, 4
    small_cfg.train.output_dir = str(tmp_path / "run")
    method, _ = train_fusion_regressor(small_cfg, bb, recs, [], build_feature_cache(bb, recs, progress=False))
    Grounder(method).save_pretrained(tmp_path / "saved")
    plain = Grounder.from_pretrained(tmp_path / "saved")
    tta = Grounder.from_pretrained(tmp_path / "saved", options={"tta": ["h", "v"]})
    assert tta.method.config.tta == ("h", "v") and plain.method.config.tta == ()
    img = Image.open(recs[0].image).convert("RGB")
    w, h = img.size
    phrase = "the red box left of the top blue box"
    # Each mirrored view is the plain model on the mirrored image and phrase, mapped back.
    p = plain(img, phrase)
    boxes, scores = [p.box], [p.score]
    for kind in ("h", "v"):
        p = plain(flip_image(img, kind), flip_expression(phrase, kind))
        boxes.append(flip_box(p.box, kind, w, h))
        scores.append(p.score)
    want, score = vote_boxes(torch.tensor(boxes), torch.tensor(scores))
    got = tta(img, phrase)
    assert max(abs(a - b) for a, b in zip(got.box, want.tolist())) < 1e-4 and abs(got.score - float(score)) < 1e-5
    with pytest.raises(ClipgroundError, match="fixed by training"):
        Grounder.from_pretrained(tmp_path / "saved", options={"dim": 8})


def test_relative_position_bias_starts_neutral_trains_and_keeps_padding_masked() -> None:
    from clipground.methods.regression import FusionHead, FusionRegressorConfig

    torch.manual_seed(0)
    kw = dict(dim=16, layers=2, heads=2, head_hidden=16, dropout=0.0, peak=True, merge=2)
    head = FusionHead(FusionRegressorConfig(**kw, rel_pos=True), 8, 8, 8, num_patches=16, max_text=4).eval()
    plain = FusionHead(FusionRegressorConfig(**kw), 8, 8, 8, num_patches=16, max_text=4).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "rel_bias"})
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 2:] = False
    x = (torch.randn(3, 8), torch.randn(3, 16, 8), torch.randn(3, 16, 8), torch.randn(3, 8), torch.randn(3, 4, 8), mask)
    # A zero bias is the plain encoder (padding still masked); a trained bias changes the answer.
    assert torch.allclose(head(*x).cell_boxes, plain(*x).cell_boxes, atol=1e-5)
    assert head.rel_bias.shape == (2, 2, 9) and head.rel_index.shape == (4, 4)  # 2x2 merged grid: 3x3 offsets
    with torch.no_grad():
        head.rel_bias.normal_()
    out = head(*x)
    assert not torch.allclose(out.patch_logits, plain(*x).patch_logits, atol=1e-3)
    out.patch_logits.sum().backward()
    assert head.rel_bias.grad.abs().sum() > 0
    # Padded text tokens stay invisible: changing them changes nothing.
    y = list(x)
    y[4] = x[4].clone()
    y[4][0, 2:] = 100.0
    assert torch.allclose(head(*y).boxes[0], out.boxes[0].detach(), atol=1e-5)


def test_word_embeddings_reach_the_head_the_same_way_in_training_and_inference(
        tmp_path: Path, tiny_clip_dir: Path, small_cfg: FusionRecipeConfig) -> None:
    from clipground.errors import ClipgroundError
    from clipground.training.recipes.regression import pixel_boxes

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    texts = ["the red box", "a much longer phrase about the blue box on the left"]
    f = bb.encode_texts(texts)
    ids = bb.tokenize(texts)["input_ids"]
    table = bb.model.text_model.embeddings.token_embedding.weight
    assert torch.allclose(f.words[1], table[ids[1]], atol=1e-6)
    # The cache's lookup-only path gives the same vectors on every real token.
    w = bb.word_embeddings(texts, f.tokens.shape[1])
    assert torch.allclose(w[f.mask], f.words[f.mask].float(), atol=1e-6)

    recs = make_scenes(tmp_path, n=3)
    small_cfg.model.words = True
    small_cfg.train.max_steps, small_cfg.train.batch_size = 5, 4
    small_cfg.train.output_dir = str(tmp_path / "run")
    cache = build_feature_cache(bb, recs, progress=False)
    assert cache.txt_words is not None and cache.txt_words.shape[:2] == cache.txt_tokens.shape[:2]
    method, _ = train_fusion_regressor(small_cfg, bb, recs, [], cache)
    ds = CachedGroundingDataset(cache, recs)
    batch = ds.collate(list(range(len(recs))))
    with torch.no_grad():
        train_px = pixel_boxes(method.fusion(*batch.inputs(), batch.txt_words).boxes, batch)
        # The words are read: other words under the same final states move the boxes.
        moved = method.fusion(*batch.inputs(), batch.txt_words.flip(0)).boxes
    assert (moved - method.fusion(*batch.inputs(), batch.txt_words).boxes).abs().max() > 1e-4
    with pytest.raises(ClipgroundError, match="word embeddings"):
        method.fusion(*batch.inputs())
    g = Grounder(method)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert g2.method.config.words and g2.method.fusion.word_in is not None
    for i, r in enumerate(recs):
        p = g2(r.image, r.expression)
        assert max(abs(a - b) for a, b in zip(p.box, train_px[i].tolist())) < 1e-3


def test_relation_resolver_picks_among_the_regressors_candidates(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.errors import ClipgroundError
    from clipground.methods.regression import FusionOutput, FusionRegressorConfig

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)  # a 4x4 patch grid
    # Three equally likely objects of the phrase's subject, whose boxes the patches 0, 3 and 13
    # predict; the plain regressor answers with patch 3's box whatever the phrase.
    cand = {0: [0.0, 0.0, 0.2, 0.2], 3: [0.8, 0.0, 1.0, 0.2], 13: [0.3, 0.8, 0.5, 1.0]}

    class Stub(torch.nn.Module):
        def forward(self, img_embed, patches, patch_embeds, txt_embed, txt_tokens, txt_mask, txt_words=None):
            n = txt_embed.shape[0]
            logits = torch.full((n, 16), -10.0)
            boxes = torch.tensor([[0.45, 0.45, 0.55, 0.55]]).repeat(n, 16, 1)
            for i, b in cand.items():
                logits[:, i] = 5.0
                boxes[:, i] = torch.tensor(b)
            return FusionOutput(boxes[:, 3], torch.zeros(n), logits, boxes)

    img = Image.new("RGB", (50, 50), (128, 128, 128))

    def answer(relations: bool, phrase: str) -> list[float]:
        m = FusionRegressor(bb, FusionRegressorConfig(dim=16, layers=1, heads=2, head_hidden=16, peak=True,
                                                      relations=relations))
        m.fusion = Stub()
        return [round(v / 50, 3) for v in Grounder(m)(img, phrase).box]

    assert answer(False, "the leftmost box") == cand[3]
    assert answer(True, "the leftmost box") == cand[0]
    assert answer(True, "the rightmost box") == cand[3]
    assert answer(True, "the bottommost box") == cand[13]
    assert answer(True, "the second box from the left") == cand[13]
    assert answer(True, "the red box") == cand[3]  # not spatial: the regressor's own answer
    with pytest.raises(ClipgroundError, match="peak"):
        FusionRegressor(bb, FusionRegressorConfig(dim=16, layers=1, heads=2, head_hidden=16, relations=True))
