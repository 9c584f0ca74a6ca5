"""The backbone loads through save_pretrained/from_pretrained and matches transformers."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from clipground.backbone import ClipBackbone, resolve_checkpoint
from clipground.phrases import check_phrase
from clipground.errors import BadPhraseError, CheckpointNotFoundError


def _images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40 + 7 * i, 50, 3, generator=g) * 255).byte().numpy()) for i in range(3)]


def test_embeddings_match_transformers(tiny_clip_dir):
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    ref = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
    imgs = _images()
    texts = ["the red circle", "a man on the left", "dog"]
    with torch.no_grad():
        pix = proc.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        out = ref(pixel_values=pix, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    ours_img = bb.encode_images(imgs, batch_size=2).embeds
    ours_txt = bb.encode_texts(texts, batch_size=2).embeds
    assert (ours_img - out.image_embeds).abs().max() < 1e-5
    assert (ours_txt - out.text_embeds).abs().max() < 1e-5
    # memoized text path gives the same numbers
    assert (bb.text_embeds(texts) - out.text_embeds).abs().max() < 1e-5


def test_patch_features_shapes(tiny_clip_dir):
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    f = bb.encode_images(_images())
    h, w = f.grid
    assert f.patch_tokens.shape[:2] == (3, h * w)
    assert f.patch_embeds.shape == (3, h * w, bb.embed_dim)


def test_frozen_and_eval(tiny_clip_dir):
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_save_roundtrip(tiny_clip_dir, tmp_path):
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    bb.save_pretrained(tmp_path / "copy")
    bb2 = ClipBackbone.from_pretrained(tmp_path / "copy")
    assert torch.equal(bb.text_embeds(["a cup"]), bb2.text_embeds(["a cup"]))


def test_missing_local_dir_is_clear(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        resolve_checkpoint(tmp_path / "empty")


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointNotFoundError) as e:
        ClipBackbone.from_pretrained("openai/clip-vit-base-patch32")
    msg = str(e.value)
    assert "openai/clip-vit-base-patch32" in msg and "local" in msg and "\n" not in msg


def test_phrase_checks(tiny_clip_dir):
    for bad in ["", "   ", "\n\t"]:
        with pytest.raises(BadPhraseError):
            check_phrase(bad)
    with pytest.raises(BadPhraseError, match="too long"):
        check_phrase("word " * 500)
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    with pytest.raises(BadPhraseError, match="tokens"):
        bb.encode_texts(["x" * 200])  # character tokenizer: 200 tokens > 64 context
    assert check_phrase("  the   red  cup ") == "the red cup"
