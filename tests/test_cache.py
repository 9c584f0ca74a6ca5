"""Feature cache: correct contents, fingerprint refuses stale caches, killed builds resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipground.backbone import ClipBackbone
from clipground.backbone.features import DenseView, dense_features, region_features
from clipground.cache import CacheError, CacheSpec, FeatureCache, StaleCacheError
from clipground.data.records import GroundingRecord
from clipground.errors import ClipgroundError
from clipground.proposals import get_proposals

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}


def rect_data(root: Path, n: int = 7, seed: int = 0) -> tuple[list[GroundingRecord], Path]:
    """Images with coloured rectangles, one record per rectangle, and a proposals file
    holding every rectangle plus a few random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    records, props = [], {}
    for i in range(n):
        img = Image.new("RGB", (64, 48), (40, 40, 40))
        d = ImageDraw.Draw(img)
        boxes = []
        for k, (name, rgb) in enumerate(COLOURS.items()):
            x = 2 + 20 * k + int(torch.randint(0, 4, (1,), generator=g))
            y = int(torch.randint(0, 28, (1,), generator=g))
            box = [x, y, x + 14, y + 16]
            d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=rgb)
            boxes.append([float(v) for v in box])
            records.append(GroundingRecord(str(root / f"im{i}.png"), f"the {name} box", boxes[-1], str(i), f"{i}_{k}"))
        img.save(root / f"im{i}.png")
        extra = [[float(v) for v in (torch.rand(4, generator=g) * torch.tensor([30, 20, 30, 20]) + torch.tensor([0, 0, 34, 28]))]
                 for _ in range(3)]
        props[str(root / f"im{i}.png")] = {"boxes": boxes + extra}
    pf = root / "props.json"
    pf.write_text(json.dumps(props))
    return records, pf


@pytest.fixture()
def setup(tiny_clip_dir, tmp_path):
    records, pf = rect_data(tmp_path / "data")
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    return records, get_proposals(f"file:{pf}"), bb, tmp_path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_contents_match_live_features(setup):
    records, props, bb, tmp = setup
    cache = FeatureCache.build(tmp / "c", records, bb, props, CacheSpec(views=("crop", "blur"), patches=True, shard_size=3),
                               progress=False)
    assert cache.complete and len(cache) == 7
    # The expressions and their subject noun phrases ("the red box" -> "red box").
    assert cache.texts == ["blue box", "green box", "red box", "the blue box", "the green box", "the red box"]
    path = records[4].image
    e = cache.image(path)
    from clipground.images import load_image

    img = load_image(path)
    p = props(img, path)
    f = region_features(bb, img, p.boxes, ("crop", "blur"), patches=True)
    assert torch.equal(e.boxes, p.boxes) and torch.equal(e.scores, p.scores)
    assert torch.equal(e.view_embeds, f["view_embeds"]) and e.view_embeds.shape == (2, 6, bb.embed_dim)
    assert torch.equal(e.image_embed, f["image_embed"]) and torch.equal(e.features["patch_embeds"], f["patch_embeds"])
    assert e.size == img.size
    t = cache.text("the  green box")  # whitespace-normalized key
    ref = bb.encode_texts(["the green box"])
    assert torch.allclose(t.embed, ref.embeds[0], atol=1e-6)
    assert t.tokens.shape == (int(ref.mask.sum()), bb.text_width)
    # The ImageState filled from the cache is what zero-shot ranks with.
    state = cache.image_state(path)
    assert state.size == img.size and torch.equal(state.proposals.boxes, p.boxes)
    with pytest.raises(CacheError):
        cache.text("a purple box")
    with pytest.raises(CacheError):
        cache.image("/nowhere.png")


def test_interrupted_build_resumes_byte_identical(setup):
    records, props, bb, tmp = setup
    spec = CacheSpec(shard_size=2, text_shard_size=2)
    ref = FeatureCache.build(tmp / "ref", records, bb, props, spec, progress=False)

    class Killed(Exception):
        pass

    def kill_after(kind, done, total):
        if kind == "images" and done == 5:
            raise Killed

    with pytest.raises(Killed):
        FeatureCache.build(tmp / "part", records, bb, props, spec, progress=False, callback=kill_after)
    idx = json.loads((tmp / "part" / "index.json").read_text())
    assert len(idx["image_shards"]) == 2 and not idx["complete"]  # images 0-3 kept, image 4 lost
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(tmp / "part")
    seen = []
    FeatureCache.build(tmp / "part", records, bb, props, spec, progress=False, callback=lambda k, d, t: seen.append((k, d)))
    assert [d for k, d in seen if k == "images"] == [5, 6, 7]  # resumed at the first unfinished shard
    assert _files(tmp / "part") == _files(tmp / "ref")
    assert FeatureCache.open(tmp / "part", ref.fingerprint).complete


def test_stale_cache_is_refused_or_rebuilt(setup, tiny_clip_dir):
    records, props, bb, tmp = setup
    cache = FeatureCache.build(tmp / "c", records, bb, props, progress=False)
    fp = cache.fingerprint
    # Same inputs: reused as is.
    assert FeatureCache.build(tmp / "c", records, bb, props, progress=False).fingerprint == fp
    # Other weights under the same name.
    with torch.no_grad():
        bb.model.visual_projection.weight.add_(0.01)
    with pytest.raises(StaleCacheError, match="backbone"):
        FeatureCache.build(tmp / "c", records, bb, props, progress=False)
    # Other views, other proposals, changed image file.
    bb2 = ClipBackbone.from_pretrained(tiny_clip_dir)
    with pytest.raises(StaleCacheError, match="preprocessing"):
        FeatureCache.build(tmp / "c", records, bb2, props, CacheSpec(views=("crop",)), progress=False)
    with pytest.raises(StaleCacheError, match="proposals"):
        FeatureCache.build(tmp / "c", records, bb2, get_proposals("selective-search"), progress=False)
    st = os.stat(records[0].image)
    os.utime(records[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(StaleCacheError, match="data"):
        FeatureCache.build(tmp / "c", records, bb2, props, progress=False)
    with pytest.raises(StaleCacheError):
        FeatureCache.open(tmp / "c", expected_fingerprint="0" * 64)
    rebuilt = FeatureCache.build(tmp / "c", records, bb2, props, rebuild=True, progress=False)
    assert rebuilt.fingerprint != fp and rebuilt.complete


def test_a_change_in_the_last_vision_layer_misses_the_cache(setup, tiny_clip_dir):
    """The fingerprint hashes every weight: a backbone fine-tuned only in its last layers must not
    reuse features computed before (both kinds of cache)."""
    records, props, bb, tmp = setup
    for kind, src in (("regions", props), ("dense", None)):
        FeatureCache.build(tmp / kind, records, bb, src, CacheSpec(kind=kind), progress=False)
        tuned = ClipBackbone.from_pretrained(tiny_clip_dir)
        last = tuned.model.vision_model.encoder.layers[-1].mlp.fc2.weight
        with torch.no_grad():
            last[0, 0] += 1e-3  # one weight of the LAST vision layer
        with pytest.raises(StaleCacheError, match="backbone"):
            FeatureCache.build(tmp / kind, records, tuned, src, CacheSpec(kind=kind), progress=False)


def test_dense_cache_matches_live_features_resumes_and_feeds_the_grounder(setup, tiny_clip_dir):
    from clipground import Grounder
    from clipground.images import load_image
    from clipground.methods.regression import FusionRegressor, FusionRegressorConfig

    records, _, bb, tmp = setup
    view = DenseView(tiles=2)
    spec = CacheSpec.dense_of(view, shard_size=3, text_shard_size=2, noun_phrases=False)
    ref = FeatureCache.build(tmp / "ref", records, bb, None, spec, progress=False)
    assert ref.kind == "dense" and ref.texts == ["the blue box", "the green box", "the red box"]
    path = records[4].image
    live = dense_features(bb, [load_image(path)], view)
    e = ref.image(path)
    assert torch.allclose(e.features["patches"].float(), live["patches"][0], atol=1e-2)
    assert torch.equal(e.features["img_embed"], live["img_embed"][0])

    class Killed(Exception):
        pass

    def kill(kind, done, total):
        if kind == "images" and done == 4:
            raise Killed

    with pytest.raises(Killed):
        FeatureCache.build(tmp / "part", records, bb, None, spec, progress=False, callback=kill)
    FeatureCache.build(tmp / "part", records, bb, None, spec, progress=False)
    assert _files(tmp / "part") == _files(tmp / "ref")
    # A cached state serves the grounder as a live one does (up to the float16 storage).
    m = FusionRegressor(bb, FusionRegressorConfig(dim=16, layers=1, heads=2, head_hidden=16, tiles=2)).eval()
    g = Grounder(m)
    a = g.set_image(path).predict("the red box")
    b = g.set_image_state(ref.image_state(path, backbone=bb)).predict("the red box")
    assert max(abs(x - y) for x, y in zip(a.box, b.box)) < 0.5
    # ... and a state of other features is refused with a clear error.
    other = Grounder(FusionRegressor(bb, FusionRegressorConfig(dim=16, layers=1, heads=2, head_hidden=16)))
    with pytest.raises(ClipgroundError, match="reads"):
        other.set_image_state(ref.image_state(path, backbone=bb))


def test_a_corrupt_shard_is_a_clear_error(setup):
    records, props, bb, tmp = setup
    cache = FeatureCache.build(tmp / "c", records, bb, props, CacheSpec(shard_size=4), progress=False)
    (tmp / "c" / "images-00001.safetensors").write_bytes(b"not a safetensors file")
    fresh = FeatureCache.open(tmp / "c")
    with pytest.raises(CacheError, match="corrupt.*rebuild"):
        fresh.image(records[-1].image)
    assert torch.equal(fresh.image(records[0].image).boxes, cache.image(records[0].image).boxes)


def test_too_long_expressions_are_skipped_and_reported(setup):
    records, props, bb, tmp = setup
    long = GroundingRecord(records[0].image, "red " * bb.max_text_tokens, records[0].box)
    cache = FeatureCache.build(tmp / "c", records + [long], bb, props, progress=False)
    assert cache.skipped_texts == [" ".join(long.expression.split())]
    with pytest.raises(CacheError, match="too long"):
        cache.text(long.expression)


def test_cli_build_and_info(setup, tiny_clip_dir):
    from typer.testing import CliRunner

    from clipground.cli.main import app
    from clipground.data.jsonl import write_jsonl

    records, props, bb, tmp = setup
    write_jsonl(records, tmp / "data" / "ann.jsonl")
    pf = tmp / "data" / "props.json"
    args = ["cache", "build", "--data", str(tmp / "data" / "ann.jsonl"), "--backbone", str(tiny_clip_dir),
            "--proposals", f"file:{pf}", "--out", str(tmp / "cli")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(app, ["cache", "info", str(tmp / "cli")]).output)
    assert info["complete"] and info["images"] == 7 and info["texts"] == 6
    r = CliRunner().invoke(app, args[:-1] + [str(tmp / "cli"), "--views", "crop"])
    assert r.exit_code != 0 and isinstance(r.exception, StaleCacheError)


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(setup, tiny_clip_dir):
    """A real kill (SIGKILL in the middle of writing) loses nothing already written."""
    records, props, bb, tmp = setup
    from clipground.data.jsonl import write_jsonl

    write_jsonl(records, tmp / "ann.jsonl")
    pf = tmp / "data" / "props.json"
    script = textwrap.dedent(f"""
        import os, signal
        from clipground.backbone import ClipBackbone
        from clipground.cache import CacheSpec, FeatureCache
        from clipground.data.jsonl import read_jsonl
        from clipground.proposals import get_proposals
        def cb(kind, done, total):
            if kind == "images" and done == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        FeatureCache.build({str(tmp / 'killed')!r}, read_jsonl({str(tmp / 'ann.jsonl')!r}),
                           ClipBackbone.from_pretrained({str(tiny_clip_dir)!r}), get_proposals({'file:' + str(pf)!r}),
                           CacheSpec(shard_size=3), progress=False, callback=cb)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert len(json.loads((tmp / "killed" / "index.json").read_text())["image_shards"]) == 1
    from clipground.data.jsonl import read_jsonl

    recs = read_jsonl(tmp / "ann.jsonl")
    FeatureCache.build(tmp / "killed", recs, bb, props, CacheSpec(shard_size=3), progress=False)
    FeatureCache.build(tmp / "whole", recs, bb, props, CacheSpec(shard_size=3), progress=False)
    assert _files(tmp / "killed") == _files(tmp / "whole")
