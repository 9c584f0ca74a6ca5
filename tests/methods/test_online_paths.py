"""The paths online users take (BLIP ITM Grad-CAM heatmaps, SAM segmentation), run offline.

Tiny randomly initialized BLIP and SAM checkpoints are built with transformers, written
with ``save_pretrained`` and loaded back through the same code path a downloaded
``Salesforce/blip-itm-base-coco`` / ``facebook/sam-vit-base`` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground import Grounder
from clipground.errors import CheckpointNotFoundError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue", "box", "circle", "left", "right", "a",
         "of", "on"] + list("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``BlipForImageTextRetrieval`` + ``BlipProcessor`` (BERT tokenizer from a small vocab)."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("blip")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"))
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision, projection_dim=16,
                                                 image_text_hidden_size=16)).eval()
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    out = root / "model"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``SamModel`` + ``SamProcessor`` (64 px input)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vc = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                         patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4, num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                              iou_head_hidden_dim=16)
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=vc, prompt_encoder_config=pc, mask_decoder_config=mc)).eval()
    ip = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                           mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    out = tmp_path_factory.mktemp("sam") / "model"
    model.save_pretrained(out)
    SamProcessor(image_processor=ip).save_pretrained(out)
    return out


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    img = Image.new("RGB", (90, 60), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 34, 34], fill=(220, 30, 30))
    d.ellipse([50, 20, 80, 50], fill=(30, 60, 220))
    img.save(tmp_path / "scene.png")
    return tmp_path / "scene.png"


def _inside(box: list[float], w: int, h: int) -> bool:
    return 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


def test_blip_gradcam_with_sam(scene: Path, tiny_clip_dir: Path, tiny_blip_dir: Path, tiny_sam_dir: Path) -> None:
    g = Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="blip", blip_model=str(tiny_blip_dir),
                      segmenter="sam", sam_model=str(tiny_sam_dir))
    preds = g(scene, ["the red box", "a blue circle on the right"])
    for p in preds:
        assert _inside(p.box, 90, 60) and not p.fallback
    heat = g.method.heatmaps(g.state, ["the red box"])[0]
    assert heat.shape == (60, 90) and np.isfinite(heat).all() and heat.max() > heat.min()
    # BLIP and SAM are tools, not saved weights: the saved method reloads them from their paths.
    g.save_pretrained(scene.parent / "saved")
    g2 = Grounder.from_pretrained(scene.parent / "saved")
    assert g2(scene, "the red box").box == preds[0].box


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_sam_prompts_with_clip_heatmap(scene: Path, tiny_clip_dir: Path, tiny_sam_dir: Path, prompt: str) -> None:
    g = Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="clip", segmenter="sam",
                      sam_model=str(tiny_sam_dir), sam_prompt=prompt)
    assert _inside(g(scene, "the red box").box, 90, 60)


def test_blip_gradcam_with_grabcut(scene: Path, tiny_clip_dir: Path, tiny_blip_dir: Path) -> None:
    g = Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="blip", blip_model=str(tiny_blip_dir),
                      segmenter="grabcut")
    assert _inside(g(scene, "the blue circle").box, 90, 60)


def test_missing_weights_fail_with_one_line(tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as e:
        Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="blip", blip_model="nobody/no-such-blip")
    msg = str(e.value)
    assert "\n" not in msg and "nobody/no-such-blip" in msg and "blip_model=DIR" in msg and "heatmap='clip'" in msg
    with pytest.raises(CheckpointNotFoundError) as e:
        Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="clip", segmenter="sam",
                      sam_model="nobody/no-such-sam")
    assert "sam_model=DIR" in str(e.value) and "segmenter='grabcut'" in str(e.value)
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir), heatmap="clip", segmenter="sam",
                      sam_model=str(tmp_path / "nope/"))
    # The defaults (BLIP heatmap + SAM, "auto" checkpoints) beside a non-bundled CLIP are the hub models.
    with pytest.raises(CheckpointNotFoundError, match="Salesforce/blip-itm-base-coco"):
        Grounder.load("heatmap-segment", backbone=str(tiny_clip_dir))


def test_auto_companions_follow_the_backbone() -> None:
    from clipground.backbone.hub import WORLD_BLIP, WORLD_CLIP, WORLD_SAM, companion_checkpoint

    assert companion_checkpoint("sam", WORLD_CLIP) == WORLD_SAM and companion_checkpoint("blip", WORLD_CLIP) == WORLD_BLIP
    assert companion_checkpoint("sam", "openai/clip-vit-base-patch32") == "facebook/sam-vit-base"
    assert companion_checkpoint("blip", "/some/dir") == "Salesforce/blip-itm-base-coco"
