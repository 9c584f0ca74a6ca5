"""Tests of the fusion regressor: geometry, training on cached features, save/load, the recipe/CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.backbone.features import DenseView
from clipground.cache import CacheSpec, FeatureCache
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord
from clipground.methods.regression import FusionRegressor, cxcywh_to_xyxy
from clipground.training.dense_data import DenseDataset
from clipground.training.recipes import TrainArgs, get_recipe
from clipground.training.recipes.regression import FusionRecipeConfig, fit

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


def dense_cache(bb: ClipBackbone, recs: list[GroundingRecord], root: Path, **view) -> FeatureCache:
    """A dense feature cache of ``recs`` as the fusion recipe builds it."""
    return FeatureCache.build(root, recs, bb, None, CacheSpec.dense_of(DenseView(**view), noun_phrases=False),
                              progress=False)


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
    cache = dense_cache(bb, recs, tmp_path / "cache")
    assert cache.dense_arrays()["patches"].shape[0] == 8 and len(cache.texts) == 3
    # The cache is reused, not recomputed: a second build finds it complete and reads the same tensors.
    again = dense_cache(bb, recs, tmp_path / "cache")
    assert torch.equal(again.dense_arrays()["patches"], cache.dense_arrays()["patches"])
    # Targets live in the padded square: a 48x36 image has side 48.
    ds = DenseDataset(cache, recs, bb)
    assert torch.allclose(ds.boxes[0], torch.tensor(recs[0].box) / 48)

    small_cfg.train.output_dir = str(tmp_path / "run")
    method, result = fit(small_cfg, bb, recs, cache, recs, cache)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 100
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert result.last_eval["miou"] > 0.0 and result.last_eval["count"] == len(recs)

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
    # Features were cached once, under OUT/cache/{train,val}.
    for split in ("train", "val"):
        assert FeatureCache.open(tmp_path / "run" / "cache" / split).kind == "dense"


def test_recipe_rejects_bad_override(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.errors import ClipgroundError

    recs = make_scenes(tmp_path, n=2)
    write_jsonl(recs, tmp_path / "train.jsonl", relative_to=tmp_path)
    args = TrainArgs(method="fusion-regressor", train=str(tmp_path / "train.jsonl"), backbone=str(tiny_clip_dir),
                     out=str(tmp_path / "run"), overrides=["no_such_key=1"])
    with pytest.raises(ClipgroundError):
        get_recipe("fusion-regressor")(args)


def test_flip_augmentation_keeps_expressions_true(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clipground.mirror import add_flips, load_keyed_image

    recs = make_scenes(tmp_path, n=2)
    aug = add_flips(recs, ["h", "v"])
    assert len(aug) == 3 * len(recs)
    for r in aug:
        img = load_keyed_image(r.image)
        x1, y1, x2, y2 = (int(v) for v in r.box)
        colour = r.expression.split()[1]
        assert img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOURS[colour]  # the box still holds its object
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cache = dense_cache(bb, aug, tmp_path / "cache")
    patches = cache.dense_arrays()["patches"]
    assert len(cache.images) == 6 and not torch.equal(patches[0], patches[2])


def test_tiled_and_fine_grid_models_train_predict_and_refuse_another_cache(
        tmp_path: Path, tiny_clip_dir: Path, small_cfg: FusionRecipeConfig) -> None:
    from clipground.errors import ClipgroundError

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)  # 32 px input, 8 px patches: a 4x4 grid
    recs = make_scenes(tmp_path, n=2)
    small_cfg.model.tiles, small_cfg.train.max_steps, small_cfg.train.batch_size = 2, 2, 4
    small_cfg.train.output_dir = str(tmp_path / "run")
    method, _ = fit(small_cfg, bb, recs, dense_cache(bb, recs, tmp_path / "c_tiles", tiles=2))
    p = Grounder(method)(recs[0].image, "the red box")
    assert 0 <= p.box[0] < p.box[2] <= 48
    with pytest.raises(ClipgroundError, match="tiles"):
        fit(small_cfg, bb, recs, dense_cache(bb, recs, tmp_path / "c_plain"))
    # A merged fine-grid model trains, predicts and round-trips; a cache of another view is refused.
    small_cfg.model.tiles = 1
    m = small_cfg.model
    m.input_size, m.dense, m.merge, m.peak = 64, "value", 2, True
    small_cfg.train.max_steps = 3
    method, _ = fit(small_cfg, bb, recs, dense_cache(bb, recs, tmp_path / "c_fine", input_size=64, dense="value"))
    assert method.fusion.img_pos.shape[0] == 1 + 16  # 8x8 patches merged 2x2
    g = Grounder(method)
    g.save_pretrained(tmp_path / "saved")
    g2 = Grounder.from_pretrained(tmp_path / "saved")
    assert g2.method.config.input_size == 64 and g2.method.config.merge == 2 and g2.method.config.peak
    a, b = g(recs[0].image, "the red box"), g2(recs[0].image, "the red box")
    assert max(abs(x - y) for x, y in zip(a.box, b.box)) < 1e-5 and 0 <= a.box[0] < a.box[2] <= 48
    with pytest.raises(ClipgroundError, match="input_size"):
        fit(small_cfg, bb, recs, dense_cache(bb, recs, tmp_path / "c_final", input_size=64))


def test_peak_head_answers_with_the_best_patch_box() -> None:
    from clipground.methods.regression import FusionHead, FusionRegressorConfig
    from clipground.training.dense_data import DenseBatch
    from clipground.training.recipes.regression import FusionLossConfig, fusion_loss

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
    batch = DenseBatch(*x, target, target * 100, torch.full((b,), 100.0), torch.zeros(b), torch.full((b, 2), 100))

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
    method, _ = fit(small_cfg, bb, recs, dense_cache(bb, recs, tmp_path / "cache"))
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
    cache = dense_cache(bb, recs, tmp_path / "cache")
    method, _ = fit(small_cfg, bb, recs, cache)
    ds = DenseDataset(cache, recs, bb, words=True)
    assert ds.txt_words is not None and ds.txt_words.shape[:2] == ds.txt_tokens.shape[:2]
    batch = ds.collate(list(range(len(recs))))
    with torch.no_grad():
        norm = method.fusion(*batch.inputs(), batch.txt_words).boxes.clamp(0, 1)
        train_px = norm * batch.scale[:, None] + batch.offset[:, None]  # clipped to the image below
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
        want = torch.minimum(train_px[i].clamp(min=0), torch.tensor([48.0, 36.0, 48.0, 36.0]))
        assert max(abs(a - b) for a, b in zip(p.box, want.tolist())) < 1e-3


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
