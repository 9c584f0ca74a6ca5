"""The ``roi`` view: box embeddings pooled from one whole-image encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground.backbone import ClipBackbone
from clipground.backbone.features import (RoiView, box_cover, pool_boxes, roi_embeddings, view_embeddings,
                                          view_embeddings_batch)
from clipground.errors import ConfigError
from clipground.grounder import Grounder
from clipground.proposals import ProposalSource


def _scene(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rs = np.random.RandomState(seed)
    img = Image.fromarray((rs.rand(size[1], size[0], 3) * 80 + 80).astype(np.uint8))
    ImageDraw.Draw(img).rectangle([40, 5, 60, 25], fill=(220, 30, 30))
    return img


BOXES = torch.tensor([[0.0, 0.0, 32.0, 24.0], [40.0, 5.0, 60.0, 25.0], [10.0, 30.0, 12.0, 31.0], [0.0, 0.0, 64.0, 48.0]])


def test_box_cover_is_area_per_cell() -> None:
    c = box_cover(torch.tensor([[0.5, 0.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), (2, 3))
    assert torch.allclose(c[0], torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert c[1].sum() > 0 and c[1][1, 1] > 0  # a degenerate box still covers its cell


def test_pool_one_cell_is_that_patch() -> None:
    pe = torch.randn(6, 5)
    out = pool_boxes(pe, (2, 3), torch.tensor([[1 / 3, 0.5, 2 / 3, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    assert torch.allclose(out[0], torch.nn.functional.normalize(pe[4], dim=0), atol=1e-6)
    whole = torch.nn.functional.normalize(torch.nn.functional.normalize(pe, dim=-1).mean(0), dim=0)
    assert torch.allclose(out[1], whole, atol=1e-6)


class _Counting:
    """Wraps a backbone's image encoders (whole lists and streams) to count the images they encode."""

    def __init__(self, bb: ClipBackbone):
        self.n = 0
        self.calls = 0
        orig, orig_stream = bb.encode_images, bb.encode_image_embeds

        def wrapped(images, *a, **kw):
            self.n += len(images)
            self.calls += 1
            return orig(images, *a, **kw)

        def counted(images):
            for im in images:
                self.n += 1
                yield im

        def streamed(images, *a, **kw):
            self.calls += 1
            return orig_stream(counted(images), *a, **kw)

        bb.encode_images = wrapped  # type: ignore[method-assign]
        bb.encode_image_embeds = streamed  # type: ignore[method-assign]


def test_roi_encodes_once_whatever_k(tiny_clip_dir: Path) -> None:
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    count = _Counting(bb)
    boxes = torch.cat([BOXES] * 8)  # K = 32
    e = view_embeddings(bb, _scene(), boxes, ("roi",))
    assert e.shape == (1, 32, bb.embed_dim) and count.n == 1
    assert torch.allclose(e.norm(dim=-1), torch.ones(1, 32), atol=1e-5)
    count.n = 0
    view_embeddings(bb, _scene(), boxes, ("crop", "blur"))
    assert count.n == 64


def test_a_box_on_the_left_half_pools_only_left_half_patches() -> None:
    """Pooling reads only the patches a box covers: changing the right half changes nothing."""
    torch.manual_seed(0)
    grid = (4, 6)
    pe = torch.randn(24, 8)
    left = torch.tensor([[0.0, 0.0, 0.5, 1.0]])  # normalized xyxy: the left half of the input
    got = pool_boxes(pe, grid, left)[0]
    cells = pe.reshape(4, 6, 8)
    expect = torch.nn.functional.normalize(torch.nn.functional.normalize(cells[:, :3], dim=-1).reshape(-1, 8).mean(0), dim=0)
    assert torch.allclose(got, expect, atol=1e-6)
    right_changed = cells.clone()
    right_changed[:, 3:] = torch.randn(4, 3, 8)
    assert torch.equal(pool_boxes(right_changed.reshape(24, 8), grid, left)[0], got)
    left_changed = cells.clone()
    left_changed[:, 2] = torch.randn(4, 8)
    assert not torch.allclose(pool_boxes(left_changed.reshape(24, 8), grid, left)[0], got, atol=1e-3)
    weights = box_cover(left * torch.tensor([6.0, 4.0, 6.0, 4.0]), grid)[0]
    assert weights[:, 3:].sum() == 0 and torch.all(weights[:, :3] == 1)


def test_roi_pools_the_patches_of_the_box(tiny_clip_dir: Path) -> None:
    """The pooled embedding is the cover-weighted mean of the encoded square's patch embeddings."""
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    im = _scene()
    roi = RoiView(size=64, dense="final")
    got = roi_embeddings(bb, [im], [BOXES], roi)[0]
    sq = Image.new("RGB", (64, 64), tuple(int(round(255 * c)) for c in bb.processor.image_processor.image_mean))
    sq.paste(im, (0, 0))
    f = bb.encode_images([sq], size=64, dense="final")
    assert f.grid == (8, 8)
    pe = torch.nn.functional.normalize(f.patch_embeds[0], dim=-1).reshape(8, 8, -1)
    top_left = torch.nn.functional.normalize(pe[:3, :4].reshape(-1, pe.shape[-1]).mean(0), dim=0)
    assert torch.allclose(got[0], top_left, atol=1e-5)  # box 0 covers cells rows 0-2, cols 0-3 exactly
    assert not torch.allclose(got[1], got[0], atol=1e-3)
    other = roi_embeddings(bb, [im], [BOXES], RoiView(size=64, dense="value"))[0]
    assert not torch.allclose(other, got, atol=1e-3)


def test_batched_views_match_single_images(tiny_clip_dir: Path) -> None:
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    ims = [_scene(i, (64 + 8 * i, 48)) for i in range(3)]
    boxes = [BOXES, BOXES[:2], torch.zeros(0, 4)]
    views = ("crop", "roi", "blur")
    together = view_embeddings_batch(bb, ims, boxes, views)
    for im, b, t in zip(ims, boxes, together):
        alone = view_embeddings(bb, im, b, views)
        assert t.shape == alone.shape == (3, len(b), bb.embed_dim)
        assert torch.allclose(t, alone, atol=1e-5)


class _Fixed(ProposalSource):
    name = "fixed"

    def raw(self, image, image_key=None):
        return BOXES.clone(), torch.arange(len(BOXES), 0, -1).float()


def test_zero_shot_accepts_roi_and_rejects_it_elsewhere(tiny_clip_dir: Path) -> None:
    g = Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals=_Fixed(min_size=0), views=["roi", "crop"], roi_size=64)
    g.set_image(_scene())
    p = g.predict("the red square")
    assert len(p.boxes) == len(BOXES)
    assert g.state.features["view_embeds"].shape[0] == 2
    assert g.method.feature_key()["roi"] == {"size": 64, "dense": "value"}
    with pytest.raises(ConfigError):
        Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals=_Fixed(min_size=0), views=["roi"], roi_dense="nope")
    from clipground.backbone.views import check_view_kinds

    with pytest.raises(ConfigError):
        check_view_kinds(["roi"])  # the rendered-view users (cache, trained scorers) do not take it
