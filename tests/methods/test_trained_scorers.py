"""The four trained proposal scorers: train a few steps from the cache, loss goes down,
save/load gives identical outputs, frozen training never calls the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.cache import CacheSpec, FeatureCache
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord
from clipground.methods import get_method_class
from clipground.methods.trained_scorers import box_geometry, collate_feature_items, noun_phrases
from clipground.proposals import get_proposals
from clipground.training import checkpoint as C
from clipground.training.losses import multi_positive_ce
from clipground.training.recipes import TrainArgs, get_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}
METHODS = ["proposal-classifier", "proposal-attention", "clip-finetune", "flyp"]


def rect_data(root: Path, n: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Coloured rectangles: a JSONL of one record per rectangle and a proposals file with
    every rectangle plus three random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    records, props = [], {}
    for i in range(n):
        img = Image.new("RGB", (64, 48), (40, 40, 40))
        d = ImageDraw.Draw(img)
        order = torch.randperm(3, generator=g).tolist()
        boxes = []
        for slot, k in enumerate(order):
            name, rgb = list(COLOURS.items())[k]
            x = 2 + 20 * slot + int(torch.randint(0, 4, (1,), generator=g))
            y = int(torch.randint(0, 28, (1,), generator=g))
            box = [float(x), float(y), float(x + 14), float(y + 16)]
            d.rectangle([x, y, x + 13, y + 15], fill=rgb)
            boxes.append(box)
            records.append(GroundingRecord(str(root / f"im{i}.png"), f"the {name} box", box, str(i), f"{i}_{k}",
                                           "train", {"type": "attribute"}))
        img.save(root / f"im{i}.png")
        extra = (torch.rand(3, 4, generator=g) * torch.tensor([30, 20, 30, 20]) + torch.tensor([0, 0, 34, 28])).tolist()
        props[str(root / f"im{i}.png")] = {"boxes": boxes + extra}
    write_jsonl(records, root / "ann.jsonl")
    (root / "props.json").write_text(json.dumps(props))
    return root / "ann.jsonl", root / "props.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return rect_data(tmp_path_factory.mktemp("rects"))


def _train(method, data, clip, out, steps=20, extra=(), resume=False, cache=None, val=None):
    ann, props = data
    over = [f"max_steps={steps}", "batch_size=4", "log_every=1", "save_every=0", "progress=false", "warmup_steps=0",
            "seed=3", "data.train_proposals=4"]
    small = {"proposal-classifier": ["hidden=32"], "proposal-attention": ["d_model=32", "layers=1", "heads=2"],
             "clip-finetune": ["hidden=32"], "flyp": []}
    over += [f"model.{x}" for x in small[method]]
    if method in ("clip-finetune", "flyp"):
        over += ["lr=1e-3", "model.vision_blocks=1", "model.text_blocks=1"]
    else:
        over += ["lr=3e-3", "dropout=0.0"]
    args = TrainArgs(method=method, train=str(ann), val=val, backbone=str(clip), proposals=f"file:{props}",
                     out=str(out), overrides=over + list(extra), resume=resume, cache=str(cache or out / "cache"))
    return get_recipe(method)(args)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _predict(g: Grounder, image: str, phrases: list[str]):
    g.set_image(image)
    return g.predict_batch(phrases)


@pytest.mark.parametrize("method,extra", [(m, ()) for m in METHODS]
                         + [("proposal-attention", ("model.resolver_prior=true",)),
                            ("proposal-classifier", ("model.views=roi,crop", "model.roi_dense=final"))])
def test_trains_from_cache_and_round_trips(method, extra, data, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    final = _train(method, data, tiny_clip_dir, out, extra=extra)
    losses = _losses(out)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (final / "grounder.json").is_file()
    card = (final / "RECIPE.md").read_text()  # the command that re-creates it travels with it
    assert f"clipground train --method {method} --train {data[0]}" in card and "| acc" not in card
    assert (final / "learning_curve.png").is_file()
    assert (final / "model.safetensors").is_file() == (method != "flyp")  # flyp has no head: CLIP is the model
    assert (final / "backbone").is_dir() == get_method_class(method).saves_backbone
    # The fine-tuned scorers render views from pixels: their cache holds boxes and texts, no views.
    spec = json.loads((out / "cache" / "train" / "index.json").read_text())["spec"]
    assert spec["views"] == ([] if method in ("clip-finetune", "flyp") else json.loads((final / "grounder.json")
                                                                                        .read_text())["config"]["views"])

    # Rebuild the trained model from the base backbone + the trainer's last checkpoint and
    # compare with what Grounder.from_pretrained(final) reads back.
    props = get_proposals(f"file:{data[1]}")
    mcls = get_method_class(method)
    cfg = json.loads((final / "grounder.json").read_text())["config"]
    m = mcls(ClipBackbone.from_pretrained(tiny_clip_dir), mcls.Config.from_dict(cfg))
    ck = load_file(str(C.find_latest_checkpoint(out) / C.WEIGHTS_FILE))
    m.load_state_dict(ck, strict=False)
    m.eval()
    ref = Grounder(m, props)
    loaded = Grounder.from_pretrained(final, proposals=props)
    image = str(Path(data[0]).parent / "im1.png")
    phrases = ["the red box", "the blue box"]
    a, b = _predict(ref, image, phrases), _predict(loaded, image, phrases)
    for pa, pb in zip(a, b):
        assert pa.box == pb.box
        assert torch.allclose(pa.scores, pb.scores, atol=1e-5)
    if mcls.saves_backbone:  # the fine-tuned backbone really changed and was saved
        base = ClipBackbone.from_pretrained(tiny_clip_dir).model.state_dict()
        tuned = loaded.backbone.model.state_dict()
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
        ln = [k for k in base if "layer_norm" in k or "layernorm" in k]
        assert ln and all(torch.equal(base[k], tuned[k]) for k in ln)  # LayerNorms stayed frozen


def test_frozen_training_reads_only_the_cache(data, tiny_clip_dir, tmp_path, monkeypatch):
    ann, props = data
    from clipground.data.jsonl import read_jsonl

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    FeatureCache.build(tmp_path / "cache" / "train", read_jsonl(ann), bb, get_proposals(f"file:{props}"),
                       CacheSpec(views=("crop", "blur")), progress=False)

    def boom(*a, **k):
        raise AssertionError("the backbone ran during frozen-feature training")

    monkeypatch.setattr(ClipBackbone, "forward_image", boom)
    monkeypatch.setattr(ClipBackbone, "forward_text", boom)
    monkeypatch.setattr("clipground.backbone.features.iter_views", boom)
    _train("proposal-attention", data, tiny_clip_dir, tmp_path / "run", steps=3, cache=tmp_path / "cache")


def test_resume_matches_uninterrupted(data, tiny_clip_dir, tmp_path):
    ann, props = data
    full = _train("proposal-classifier", data, tiny_clip_dir, tmp_path / "a", steps=8, extra=["save_every=4"],
                  cache=tmp_path / "cache")
    # A run killed after its step-4 checkpoint, then resumed.
    from clipground.training.recipes.scorers import load_scorer_config

    _train("proposal-classifier", data, tiny_clip_dir, tmp_path / "b", steps=8, extra=["save_every=4"],
           cache=tmp_path / "cache")
    ckpts = sorted((tmp_path / "b" / "checkpoints").glob("step-*"))
    for c in ckpts[1:]:
        import shutil

        shutil.rmtree(c)
    (tmp_path / "b" / "checkpoints" / "latest").write_text(ckpts[0].name + "\n")
    resumed = _train("proposal-classifier", data, tiny_clip_dir, tmp_path / "b", steps=8, extra=["save_every=4"],
                     resume=True, cache=tmp_path / "cache")
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_scorer_config("flyp", None, []).train.lr == 1e-5  # method defaults apply


@pytest.mark.parametrize("method", ["proposal-classifier", "flyp"])
def test_validation_is_the_one_evaluator(method, data, tiny_clip_dir, tmp_path):
    """The recipe's validation numbers are `clipground.evaluation.evaluate` of the trained method
    (frozen: on the validation cache's states; fine-tuned: re-encoding each image live)."""
    from clipground.data.jsonl import read_jsonl
    from clipground.evaluation import evaluate

    ann, props = data
    final = _train(method, data, tiny_clip_dir, tmp_path / "run", steps=4, val=str(ann))
    last = json.loads((tmp_path / "run" / "final_metrics.json").read_text())["val"]
    g = Grounder.from_pretrained(final, proposals=get_proposals(f"file:{props}"))
    ref = evaluate(g, read_jsonl(ann), progress=False, examples=0)
    assert last["count"] == ref.metrics["count"] == len(read_jsonl(ann))
    assert last["acc@0.5"] == pytest.approx(ref.metrics["acc@0.5"])
    assert last["acc@0.5/attribute"] == pytest.approx(ref.breakdown["type"]["attribute"]["acc@0.5"])
    assert (tmp_path / "run" / "cache" / "val" / "index.json").is_file()


def test_recall_ceiling_is_reported(data, tiny_clip_dir, tmp_path):
    from clipground.data.jsonl import read_jsonl
    from clipground.training.recipes.scorers import FeatureDataset

    ann, props = data
    recs = read_jsonl(ann)
    recs.append(GroundingRecord(recs[0].image, "the red box", [50.0, 40.0, 63.0, 47.0]))  # no proposal there
    cache = FeatureCache.build(tmp_path / "c", recs, ClipBackbone.from_pretrained(tiny_clip_dir),
                               get_proposals(f"file:{props}"), progress=False)
    ds = FeatureDataset(cache, recs, pos_iou=0.5)
    assert ds.stats.no_positive == 1 and ds.stats.used == len(recs) - 1
    assert ds.stats.recall == pytest.approx((len(recs) - 1) / len(recs))
    one = FeatureDataset(cache, recs, pos_iou=0.5, sentences="one")
    assert len(one) == len(recs) - 1  # every object has a single sentence here
    item = ds[0]
    assert item["labels"].sum() >= 1 and item["views"].shape[1:] == (2, cache.index["embed_dim"])


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec(views=("roi", "crop"), roi_dense="final")])
def test_cached_and_live_features_agree(spec, data, tiny_clip_dir, tmp_path):
    from clipground.data.jsonl import read_jsonl
    from clipground.training.recipes.scorers import FeatureDataset, LiveFeatures

    ann, props = data
    recs = read_jsonl(ann)[:6]
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cache = FeatureCache.build(tmp_path / "c", recs, bb, get_proposals(f"file:{props}"), spec, progress=False)
    a = FeatureDataset(cache, recs, 0.5)
    b = FeatureDataset(LiveFeatures(bb, cache.views, boxes_from=cache, roi=cache.spec.roi), recs, 0.5)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for k in ("views", "geom", "image", "labels"):
            assert torch.equal(x[k], y[k]), k
        assert torch.allclose(x["text"], y["text"], atol=1e-6)


def test_helpers():
    assert noun_phrases("the red circle left of the blue square") == ("red circle", "blue square")
    assert noun_phrases("the second star from the left") == ("star", None)
    assert noun_phrases("a red circle") == ("red circle", None)
    g = box_geometry(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), (100, 200))
    assert torch.allclose(g, torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.04]]))
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # the 5.0 is padding
    expected = torch.logsumexp(logits[0, :3], 0) - torch.logsumexp(logits[0, :2], 0)
    assert torch.allclose(multi_positive_ce(logits, labels, mask), expected[None])
    items = [{"views": torch.ones(k, 2, 3), "geom": torch.zeros(k, 7), "text": torch.ones(3), "tokens": torch.ones(n, 5),
              "image": torch.ones(3)} for k, n in ((2, 4), (5, 1))]
    b = collate_feature_items(items)
    assert b["views"].shape == (2, 5, 2, 3) and b["mask"].sum().item() == 7 and b["tmask"].sum().item() == 5


def test_unfreeze_keeps_layernorms_frozen(tiny_clip_dir):
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    names = bb.unfreeze_blocks(1, -1)
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert trainable == set(names) and not any("norm" in n for n in trainable)
    assert any(n.startswith("vision_model.encoder.layers.1.") for n in trainable)
    assert not any(n.startswith("vision_model.encoder.layers.0.") for n in trainable)
    assert any(n.startswith("text_model.embeddings.") for n in trainable) and "logit_scale" not in trainable


@pytest.mark.slow  # selective search + CLIP on a real 600x600 photo: ~30 s on the 2-core machine
def test_real_refcocog_format_flows_through(shared_data, tiny_clip_dir, tmp_path):
    """`cache build` then `train` on the real RefCOCOg split file (ReSC .pth) and COCO photos."""
    from typer.testing import CliRunner

    from clipground.cli.main import app

    ann = shared_data / "refcoco" / "gref_umd_val.pth"
    images = shared_data / "coco" / "train2014"
    if not ann.is_file() or not images.is_dir():
        pytest.skip("RefCOCOg annotations or COCO images missing from ../shared/data")
    common = ["--images", str(images), "--backbone", str(tiny_clip_dir), "--proposals", "selective-search"]
    r = CliRunner().invoke(app, ["cache", "build", "--data", str(ann), *common, "--out", str(tmp_path / "cache" / "train")])
    assert r.exit_code == 0, r.output
    index = tmp_path / "cache" / "train" / "index.json"
    built = index.read_bytes()
    idx = json.loads(built)
    assert idx["complete"] and len(idx["images"]) == 1
    from clipground.cache import FeatureCache
    from clipground.data.loaders import load_records

    recs = load_records(str(ann), images=str(images)).records
    cache = FeatureCache.open(tmp_path / "cache" / "train")
    assert len(recs) == 4 and all(cache.has_text(r.expression) for r in recs)  # + their noun phrases
    r = CliRunner().invoke(app, ["train", "--method", "proposal-classifier", "--train", str(ann), *common,
                                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                                 "max_steps=3", "batch_size=2", "progress=false", "save_every=0", "hidden=16"])
    assert r.exit_code == 0, r.output
    assert index.read_bytes() == built  # the cache built by `cache build` was reused as is
    summary = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert summary["train"]["records"] == 4 and 0 < summary["train"]["proposal_recall"] <= 1
    g = Grounder.from_pretrained(tmp_path / "run" / "final")
    p = g(str(images / "COCO_train2014_000000000309.jpg"), "the teddy bear")
    assert len(p.box) == 4 and g.proposals.name == "selective-search"


def test_resolver_prior_is_the_zero_shot_answer_and_trains(data, tiny_clip_dir, tmp_path):
    """proposal-attention with ``resolver_prior``: the prior it is given ranks the proposals as the
    zero-shot scorer does (size words kept in the noun phrase), and its learned weight on the
    prior is trained and saved (the save/load round trip is in the parametrized test above)."""
    from clipground.methods.zero_shot import ZeroShotScorer

    props = get_proposals(f"file:{data[1]}")
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    cfg = get_method_class("proposal-attention").Config(d_model=32, layers=1, heads=2, resolver_prior=True)
    pa = get_method_class("proposal-attention")(bb, cfg)
    zs = ZeroShotScorer(bb, ZeroShotScorer.Config(size_words=False))
    image = str(Path(data[0]).parent / "im2.png")
    phrases = ["the red box", "the leftmost box", "the second box from the right", "the blue box left of the red box"]
    g_pa, g_zs = Grounder(pa, props).set_image(image), Grounder(zs, props).set_image(image)
    items = pa.feature_items(g_pa.state, phrases)
    for it, z in zip(items, zs.rank(g_zs.state, phrases)):
        assert float(it["prior"].max()) == pytest.approx(1.0)
        boxes = g_pa.state.proposals.boxes
        assert torch.equal(boxes[int(it["prior"].argmax())], z.boxes[0])

    out = tmp_path / "run"
    final = _train("proposal-attention", data, tiny_clip_dir, out, extra=["model.resolver_prior=true"])
    assert json.loads((final / "grounder.json").read_text())["config"]["resolver_prior"] is True
    assert all(torch.isfinite(torch.tensor(_losses(out))))
    loaded = Grounder.from_pretrained(final, proposals=props)
    assert float(loaded.method.prior_weight) != 1.0  # initialised at 1, moved by training


def test_fine_tuned_scorers_reuse_any_cache_of_the_same_boxes(data, tiny_clip_dir, tmp_path, capsys):
    """clip-finetune / flyp read only boxes and texts: a frozen scorer's cache of the same images,
    proposals and backbone serves them, whatever views it embeds; another proposal set does not."""
    _train("proposal-classifier", data, tiny_clip_dir, tmp_path / "a", steps=2, cache=tmp_path / "c")
    before = (tmp_path / "c" / "train" / "index.json").read_text()
    capsys.readouterr()
    _train("flyp", data, tiny_clip_dir, tmp_path / "b", steps=2, cache=tmp_path / "c")
    assert "reusing the boxes and texts" in capsys.readouterr().out
    assert (tmp_path / "c" / "train" / "index.json").read_text() == before
    from clipground.data.jsonl import read_jsonl

    recs = read_jsonl(data[0])
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    assert FeatureCache.open_for_boxes(tmp_path / "c" / "train", recs, bb, get_proposals(f"file:{data[1]}")) is not None
    assert FeatureCache.open_for_boxes(tmp_path / "c" / "train", recs, bb, get_proposals("selective-search")) is None
    assert FeatureCache.open_for_boxes(tmp_path / "c" / "train", recs[:3], bb, get_proposals(f"file:{data[1]}")) is None
