"""The mask views in grounding: ``alpha`` (region-aware CLIP) and ``fgvp`` (blur outside the mask), the
region-clip method, SAM segments as masks, and the region-aware backbone under a trained proposal scorer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clipground import Grounder
from clipground.backbone import ClipBackbone
from clipground.backbone.alpha import RegionClipBackbone, box_masks
from clipground.backbone.features import region_features, view_embeddings
from clipground.backbone.views import blur_view, fgvp_view
from clipground.errors import ConfigError
from clipground.methods.region_clip import RegionClipScorer
from clipground.proposals import get_proposals
from clipground.testing import SCENE_BOXES, write_box_scene

BOXES = SCENE_BOXES
PHRASES = ["the red box", "the blue box", "the green box"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_box_scene(tmp_path_factory.mktemp("region_scene"), shape="ellipse")


@pytest.fixture(scope="module")
def trained_region(tiny_clip_dir: Path) -> RegionClipBackbone:
    """A region-aware tiny CLIP with non-zero mask channel and adapters (as if trained)."""
    rb = RegionClipBackbone.from_backbone(ClipBackbone.from_pretrained(tiny_clip_dir))
    rb.setup_training()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in rb.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return rb.freeze()


def test_fgvp_with_box_masks_is_the_blur_view(scene, tiny_clip_dir: Path) -> None:
    img = Image.open(scene[0]).convert("RGB")
    boxes = torch.tensor(BOXES)
    for b, m in zip(BOXES, box_masks(boxes, img.size)):
        assert fgvp_view(img, m).tobytes() == blur_view(img, b).tobytes()
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    v = view_embeddings(bb, img, boxes, ("blur", "fgvp"))
    assert torch.allclose(v[0], v[1], atol=1e-6)
    # with a segment it differs: the box corners outside the ellipse are blurred too
    seg = box_masks(boxes, img.size).clone()
    seg[:, :, :] &= torch.zeros_like(seg[0]).index_fill_(1, torch.arange(0, 32), True)[None]
    seg[seg.flatten(1).sum(1) == 0] = box_masks(boxes, img.size)[seg.flatten(1).sum(1) == 0]
    v2 = view_embeddings(bb, img, boxes, ("fgvp",), masks=seg)
    assert not torch.allclose(v2[0], v[1], atol=1e-4)


def test_alpha_view_is_one_forward_per_mask_and_ranks(scene, trained_region: RegionClipBackbone) -> None:
    img = Image.open(scene[0]).convert("RGB")
    boxes = torch.tensor(BOXES)
    v = view_embeddings(trained_region, img, boxes, ("alpha", "crop"))
    direct = trained_region.encode_regions(img, list(box_masks(boxes, img.size)))
    assert torch.allclose(v[0], direct, atol=1e-6)
    f = region_features(trained_region, img, boxes, ("crop", "alpha"))  # what the feature cache stores
    assert torch.allclose(f["view_embeds"][1], direct, atol=1e-5)
    g = Grounder.load("zero-shot", backbone=trained_region, proposals=f"gt:{scene[1]}", views=("alpha",),
                      relations=False)
    preds = g(str(scene[0]), PHRASES)
    t = trained_region.text_embeds(PHRASES)
    for p, sims in zip(preds, t @ direct.t()):  # the score of a box is its alpha embedding's cosine
        assert p.box == BOXES[int(sims.argmax())] and p.score == pytest.approx(float(sims.max()), abs=1e-5)


def test_region_clip_method_on_a_plain_and_a_region_backbone(scene, tiny_clip_dir: Path,
                                                            trained_region: RegionClipBackbone, tmp_path: Path) -> None:
    plain = ClipBackbone.from_pretrained(tiny_clip_dir)
    m = RegionClipScorer(plain, RegionClipScorer.Config(rank=4, target_modules=("q_proj",)))
    assert isinstance(m.backbone, RegionClipBackbone) and m.backbone.adapter.rank == 4
    assert not isinstance(plain, RegionClipBackbone)  # the plain backbone was copied, not changed
    # On a region-aware backbone the method takes its adapter as it is.
    m2 = RegionClipScorer(trained_region)
    assert m2.backbone is trained_region and m2.config.rank == trained_region.adapter.rank
    g = Grounder(m2, get_proposals(f"gt:{scene[1]}"))
    before = g(str(scene[0]), PHRASES)
    g.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "backbone" / "region_clip.json").is_file()
    assert (tmp_path / "saved" / "backbone" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = Grounder.from_pretrained(tmp_path / "saved")
    after = loaded(str(scene[0]), PHRASES)
    for a, b in zip(before, after):
        assert a.box == b.box and torch.allclose(a.scores, b.scores, atol=1e-6)
    with pytest.raises(ConfigError, match="masks"):
        RegionClipScorer(trained_region, RegionClipScorer.Config(masks="grabcut"))


def test_sam_segments_as_masks(scene, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """``masks=sam``: every proposal's mask is SAM's segment for its box prompt, kept inside the box."""
    from clipground.segmenters import Segmenter, segment_boxes

    class Disc(Segmenter):  # a stand-in promptable segmenter: the disc inscribed in the prompt box
        def segment(self, prepared, seeds):
            import numpy as np

            w, h = prepared["size"]
            x1, y1, x2, y2 = seeds.box
            yy, xx = np.mgrid[0:h, 0:w] + 0.5
            cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, min(x2 - x1, y2 - y1) / 2
            return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r

    img = Image.open(scene[0]).convert("RGB")
    boxes = torch.tensor(BOXES)
    segs = segment_boxes(Disc(), img, boxes)
    rects = box_masks(boxes, img.size)
    assert segs.shape == rects.shape and bool((segs <= rects).all()) and bool((segs.sum((1, 2)) < rects.sum((1, 2))).all())
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    g = Grounder.load("zero-shot", backbone=bb, proposals=f"gt:{scene[1]}", views=("fgvp",), masks="sam")
    g.method._segmenter = Disc()
    g.set_image(str(scene[0]))
    want = view_embeddings(bb, img, boxes, ("fgvp",), masks=segs)
    assert torch.allclose(g.get_image_state().features["view_embeds"], want, atol=1e-6)
    assert g.method.feature_key()["masks"].startswith("sam:")


def test_region_backbone_under_a_trained_scorer(scene, trained_region: RegionClipBackbone, tiny_clip_dir: Path) -> None:
    """The region-aware CLIP as a backbone option of the frozen proposal scorers: its alpha view is a feature."""
    from clipground.methods import get_method_class

    cls = get_method_class("proposal-classifier")
    m = cls(trained_region, cls.Config(views=("crop", "alpha"), hidden=16))
    g = Grounder(m, get_proposals(f"gt:{scene[1]}"))
    g.set_image(str(scene[0]))
    ve = g.get_image_state().features["view_embeds"]
    assert ve.shape[:2] == (2, 3)
    img = Image.open(scene[0]).convert("RGB")
    assert torch.allclose(ve[1], trained_region.encode_regions(img, list(box_masks(torch.tensor(BOXES), img.size))),
                          atol=1e-5)
    with pytest.raises(ConfigError, match="region-aware"):
        cls(ClipBackbone.from_pretrained(tiny_clip_dir), cls.Config(views=("alpha",)))
