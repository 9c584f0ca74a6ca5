"""The region-aware CLIP: zero-initialised mask channel, the mask's geometry, peft LoRA save/load, trainable share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipground.backbone import ClipBackbone
from clipground.backbone.alpha import (
    ADAPTER_DIR,
    ALPHA_MEAN,
    ALPHA_STD,
    MASK_WEIGHTS,
    REGION_FILE,
    AdapterConfig,
    RegionClipBackbone,
    add_lora,
    add_mask_channel,
    box_masks,
    preprocess_masks,
    trainable_share,
)
from clipground.errors import CheckpointNotFoundError, ConfigError


@pytest.fixture(scope="module")
def plain(tiny_clip_dir: Path) -> ClipBackbone:
    return ClipBackbone.from_pretrained(tiny_clip_dir)


def _scene(w: int = 64, h: int = 48) -> Image.Image:
    img = Image.new("RGB", (w, h), (90, 90, 90))
    d = ImageDraw.Draw(img)
    d.rectangle([4, 6, 20, 22], fill=(220, 30, 30))
    d.rectangle([30, 10, 50, 40], fill=(30, 60, 220))
    return img


def test_zero_initialised_mask_channel_leaves_clip_unchanged(plain: ClipBackbone) -> None:
    region = RegionClipBackbone.from_backbone(plain)
    img = _scene()
    pix = plain.preprocess([img])
    ref = plain.forward_image(pix)
    masks = box_masks(torch.tensor([[4.0, 6.0, 21.0, 23.0], [0.0, 0.0, 64.0, 48.0], [30.0, 10.0, 51.0, 41.0]]), img.size)
    with torch.no_grad():
        got = region.forward_image(region.preprocess_regions(img, list(masks)))
        plain_path = region.forward_image(pix)  # pixels without a mask: read as the whole image
    for f in (got, plain_path):
        assert (f.embeds - ref.embeds).abs().max().item() < 1e-6
        assert (f.patch_tokens - ref.patch_tokens).abs().max().item() < 1e-6
    # ... and the original backbone was not touched by making the copy
    assert not hasattr(plain.model.vision_model.embeddings.patch_embedding, "alpha")
    # The mask channel is live: a non-zero mask convolution makes different masks give different embeddings.
    with torch.no_grad():
        region.model.vision_model.embeddings.patch_embedding.alpha.weight.normal_(0, 0.05)
    e = region.encode_regions(img, list(masks))
    assert (e[0] - e[2]).abs().max().item() > 1e-3


@pytest.mark.parametrize("size", [(64, 48), (40, 72)])
@pytest.mark.parametrize("processor", ["shortest-edge + centre crop", "square resize"])
def test_mask_follows_the_pixels_geometry(plain: ClipBackbone, size: tuple[int, int], processor: str) -> None:
    """A mask of the image's left half is the left half of the mask channel, with the processor's resize
    and crop (Alpha-CLIP normalisation: 1 -> (1 - 0.5) / 0.26, 0 -> -0.5 / 0.26)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    proc = plain.processor
    if processor == "square resize":
        ip = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                crop_size={"height": 32, "width": 32})
        proc = CLIPProcessor(image_processor=ip, tokenizer=plain.processor.tokenizer)
    w, h = size
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    m = preprocess_masks(proc, [left, left.numpy().astype("uint8") * 255, ~left])
    assert m.shape == (3, 1, 32, 32)
    on, off = (1 - ALPHA_MEAN) / ALPHA_STD, (0 - ALPHA_MEAN) / ALPHA_STD
    a = m[0, 0]
    assert torch.allclose(a[:, :15], torch.full_like(a[:, :15], on), atol=1e-4)
    assert torch.allclose(a[:, 17:], torch.full_like(a[:, 17:], off), atol=1e-4)
    assert torch.equal(m[0], m[1])  # bool and uint8 masks are the same mask
    assert torch.allclose(m[2, 0, :, 17:], torch.full_like(a[:, 17:], on), atol=1e-4)
    # The pixels went through the same geometry: the red square's column sits left too.
    img = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(img).rectangle([0, 0, w // 2 - 1, h - 1], fill=(255, 255, 255))
    pix = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"][0, 0]
    assert bool((pix[:, :15] > 0).all()) and bool((pix[:, 17:] < 0).all())


def test_box_masks_cover_box_pixels() -> None:
    m = box_masks(torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.2, 7.2, 7.4, 7.4]]), (10, 8))
    assert m.shape == (2, 8, 10)
    assert m[0].sum() == 6 and bool(m[0, 1:3, 2:5].all())
    assert m[1].sum() == 1 and bool(m[1, 7, 7])  # a sub-pixel box keeps its pixel


def test_adapter_save_load_round_trip(plain: ClipBackbone, tmp_path: Path) -> None:
    region = RegionClipBackbone.from_backbone(plain, AdapterConfig(rank=4, target_modules=("q_proj", "v_proj"),
                                                                   layernorms=True))
    names = region.setup_training()
    assert any("lora_A" in n for n in names) and any("patch_embedding.alpha" in n for n in names)
    assert any("layer_norm" in n for n in names) and not any("text_model" in n for n in names)
    assert not any("k_proj" in n or "out_proj" in n for n in names)  # only the configured projections
    torch.manual_seed(1)
    with torch.no_grad():
        for p in region.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    region.freeze()
    img = _scene()
    masks = list(box_masks(torch.tensor([[4.0, 6.0, 21.0, 23.0], [30.0, 10.0, 51.0, 41.0]]), img.size))
    before = region.encode_regions(img, masks)
    region.save_pretrained(tmp_path / "rc")
    assert (tmp_path / "rc" / REGION_FILE).is_file() and (tmp_path / "rc" / MASK_WEIGHTS).is_file()
    assert (tmp_path / "rc" / ADAPTER_DIR / "adapter_config.json").is_file()  # a peft adapter directory
    loaded = ClipBackbone.from_pretrained(tmp_path / "rc")
    assert isinstance(loaded, RegionClipBackbone) and loaded.adapter == region.adapter
    after = loaded.encode_regions(img, masks)
    assert torch.equal(before, after)
    assert (before - RegionClipBackbone.from_backbone(plain).encode_regions(img, masks)).abs().max() > 1e-3
    # An incomplete directory is one clear error.
    (tmp_path / "rc" / MASK_WEIGHTS).unlink()
    with pytest.raises(CheckpointNotFoundError, match=MASK_WEIGHTS):
        ClipBackbone.from_pretrained(tmp_path / "rc")


def test_vit_b16_trainable_share_is_one_to_two_percent() -> None:
    """The default adapter (rank 16 on q, k, v, out of every block) + mask conv on the ViT-B/16 architecture
    (CLIPVisionConfig defaults with 16 px patches; no weights are materialised)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(vision_config=dict(patch_size=16), projection_dim=512))
    add_mask_channel(model)
    add_lora(model, AdapterConfig())
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "patch_embedding.alpha" in n)
    s = trainable_share(model)
    assert s["vision_params"] == 85_799_424  # ViT-B/16's vision tower
    assert s["trainable"] == 12 * 4 * 2 * 768 * 16 + 768 * 16 * 16  # LoRA A and B + the mask conv
    assert 0.01 <= s["share_of_vision"] <= 0.02, s


def test_bad_adapter_options_and_alpha_on_a_plain_clip(plain: ClipBackbone, tmp_path: Path) -> None:
    from clipground import Grounder

    with pytest.raises(ConfigError, match="target_modules"):
        AdapterConfig(target_modules=("fc1",))
    with pytest.raises(ConfigError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="region-aware backbone"):
        Grounder.load("zero-shot", backbone=plain, proposals="selective-search", views=("crop", "alpha"))
    with pytest.raises(ConfigError, match="already region-aware"):
        RegionClipBackbone.from_backbone(RegionClipBackbone.from_backbone(plain))
