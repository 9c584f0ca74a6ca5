"""Features methods read from CLIP: region views, dense patch grids (tiled, finer, value path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipground.backbone import ClipBackbone
from clipground.backbone.features import (DenseView, dense_features, dense_geometry, patch_grid, region_features,
                                          square_views, view_embeddings)
from clipground.errors import ClipgroundError


@pytest.fixture
def scene() -> Image.Image:
    img = Image.new("RGB", (64, 48), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([40, 5, 60, 25], fill=(220, 30, 30))
    return img


def test_tiled_features_assemble_a_finer_grid(tiny_clip_dir: Path, scene: Image.Image) -> None:
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)  # 32 px input, 8 px patches: a 4x4 grid
    view = DenseView(tiles=2)
    crops, geom = square_views(bb, scene, view)
    assert len(crops) == 5 and all(v.size == (32, 32) for v in crops[1:]) and geom.scale_x == 64
    f = dense_features(bb, [scene], view)
    assert f["grid"] == (8, 8) == patch_grid(bb, view) and f["patches"].shape[1] == 64
    # The top-right tile's own patches sit in rows 0-3, columns 4-7 of the assembled grid.
    direct = bb.encode_images([crops[2]]).patch_tokens[0].reshape(4, 4, -1)
    grid = f["patches"][0].reshape(8, 8, -1)
    assert torch.allclose(grid[:4, 4:], direct, atol=1e-5)
    assert not torch.allclose(grid[:4, :4], direct, atol=1e-3)


def test_input_size_and_value_path(tmp_path: Path, tiny_clip_dir: Path, scene: Image.Image) -> None:
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    # At the native side the resize path is the checkpoint's own preprocessing of the square.
    native = dense_features(bb, [scene], DenseView())
    same = dense_features(bb, [scene], DenseView(input_size=32))
    assert torch.allclose(same["patches"], native["patches"], atol=1e-4)
    # Twice the side: a 8x8 grid through interpolated positions, the whole square kept.
    view = DenseView(input_size=64, dense="value")
    f = dense_features(bb, [scene], view)
    assert f["grid"] == (8, 8) == patch_grid(bb, view) and f["patches"].shape[1] == 64
    assert f["geometry"][0] == dense_geometry(bb, scene.size, view)
    assert f["geometry"][0].scale_x == 64 and f["geometry"][0].offset_x == 0
    final = dense_features(bb, [scene], DenseView(input_size=64))
    assert torch.allclose(final["patches"], f["patches"]) and not torch.allclose(final["patch_embeds"], f["patch_embeds"])
    # The value path skips the last block's attention mixing: in a one-block CLIP a patch's value
    # embedding depends on that patch alone. Painting the far corner changes the final embedding of
    # patch 0 but not its value embedding.
    from clipground.testing import make_tiny_clip

    one = ClipBackbone.from_pretrained(make_tiny_clip(tmp_path / "one_block", layers=1))
    other = scene.copy()
    ImageDraw.Draw(other).rectangle([48, 36, 63, 47], fill=(30, 60, 220))
    fv, ff, v0, f0 = (dense_features(one, [im], DenseView(input_size=64, dense=d))["patch_embeds"][0, 0]
                      for im, d in ((other, "value"), (other, "final"), (scene, "value"), (scene, "final")))
    assert torch.allclose(fv, v0, atol=1e-5) and not torch.allclose(ff, f0, atol=1e-4)
    for bad in ({"tiles": 2, "input_size": 64}, {"dense": "mean"}, {"input_size": -1}):
        with pytest.raises(ClipgroundError):
            DenseView(**bad)


def test_region_features_hold_every_view_and_the_whole_image(tiny_clip_dir: Path, scene: Image.Image) -> None:
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    boxes = torch.tensor([[40.0, 5.0, 61.0, 26.0], [0.0, 0.0, 20.0, 20.0]])
    f = region_features(bb, scene, boxes, ("crop", "blur"), patches=True)
    assert f["view_embeds"].shape == (2, 2, bb.embed_dim) and f["image_embed"].shape == (bb.embed_dim,)
    assert torch.allclose(f["image_embed"], bb.encode_images([scene]).embeds[0], atol=1e-5)
    # The views-only path (the zero-shot scorer's) gives the same embeddings up to batching.
    v = view_embeddings(bb, scene, boxes, ("crop", "blur"))
    assert torch.allclose(v, f["view_embeds"], atol=1e-5)
    assert view_embeddings(bb, scene, torch.zeros(0, 4), ("crop",)).shape == (1, 0, bb.embed_dim)
