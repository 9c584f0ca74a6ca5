"""``clipground predict`` on good input: a real COCO photo end to end (annotated PNG and
JSON), EXIF-rotated photos predicted in the displayed frame, and odd-but-valid image
modes accepted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipground.images import load_image
from clipground.testing import run_cli

PHOTO = "000000000009.jpg"  # a COCO128 photo (640x480, several objects)


def _inside(box, w: int, h: int) -> bool:
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_predict_real_photo_writes_png_and_json(shared_data, tiny_clip_dir, tmp_path):
    photo = shared_data / "coco128" / "train2017" / PHOTO
    if not photo.is_file():
        pytest.skip(f"{photo} missing")
    out_png, out_json = tmp_path / "out" / "pred.png", tmp_path / "out" / "pred.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "clipground.cli.main", "predict", str(photo), "the dog", "a person on the left",
         "-b", str(tiny_clip_dir), "--out", str(out_png), "--json", str(out_json)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr

    ref = load_image(photo)
    w, h = ref.size
    payload = json.loads(out_json.read_text())
    assert payload["image_size"] == [w, h]
    assert [p["phrase"] for p in payload["predictions"]] == ["the dog", "a person on the left"]
    for p in payload["predictions"]:
        assert p["box_format"] == "xyxy" and _inside(p["box"], w, h), p["box"]
        assert not p["fallback"] and p["candidates"]
        assert all(_inside(c["box"], w, h) for c in p["candidates"])

    drawn = Image.open(out_png)
    assert drawn.format == "PNG" and drawn.size == (w, h)
    a, b = np.asarray(drawn.convert("RGB")).astype(int), np.asarray(ref).astype(int)
    changed = np.abs(a - b).sum(-1) > 0
    assert changed.any()
    # The drawing is where the JSON box is: the box's left edge (mid-height) was painted.
    x1, y1, x2, y2 = payload["predictions"][0]["box"]
    cy, xi = int((y1 + y2) / 2), int(round(x1))
    assert changed[cy, max(0, xi - 2): xi + 3].any()


def _rotated_jpeg(path: Path, orientation: int) -> Path:
    """Stored 240x160 (w x h) photo-like image with an EXIF orientation tag."""
    rs = np.random.RandomState(1)
    a = (rs.rand(160, 240, 3) * 60 + 90).astype(np.uint8)
    a[20:60, 150:230] = (220, 30, 30)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", [6, 8])
def test_predict_exif_rotated_box_in_displayed_frame(orientation, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    img = _rotated_jpeg(tmp_path / f"rot{orientation}.jpg", orientation)
    displayed = ImageOps.exif_transpose(Image.open(img))
    assert displayed.size == (160, 240)
    # One proposal that only exists in the displayed frame (y2=230 > stored height 160):
    # if the image were not rotated it would be clipped, and the box would differ.
    props = tmp_path / "props.json"
    target = [20.0, 120.0, 140.0, 230.0]
    props.write_text(json.dumps({img.name: {"boxes": [target]}}))
    code, out, err = run_cli(["predict", str(img), "the red thing", "-b", str(tiny_clip_dir), "-p", f"file:{props}",
                              "--json", "-"], monkeypatch, capsys)
    assert code == 0, err
    pred = json.loads(out)
    assert pred["image_size"] == [160, 240]
    assert pred["predictions"][0]["box"] == target

    # With selective search every candidate lies inside the displayed (not the stored) frame.
    code, out, err = run_cli(["predict", str(img), "the red thing", "-b", str(tiny_clip_dir), "--json", "-",
                              "--top-k", "1000"], monkeypatch, capsys)
    assert code == 0, err
    pred = json.loads(out)["predictions"][0]
    assert all(_inside(c["box"], 160, 240) for c in pred["candidates"])
    assert any(c["box"][3] > 160 for c in pred["candidates"])  # some reach below the stored height


def _odd_images(d: Path) -> dict[str, Path]:
    import cv2

    out = {}
    cm = Image.new("CMYK", (64, 48), (0, 0, 0, 40))
    cm.paste((0, 255, 255, 0), (10, 10, 40, 40))
    cm.save(out.setdefault("cmyk", d / "cmyk.jpg"), quality=95)
    g16 = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    cv2.imwrite(str(out.setdefault("gray16", d / "g16.png")), g16)
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([200, 200, 200, 30, 30, 220] + [0] * 762)
    pal.paste(1, (10, 10, 40, 40))
    pal.save(out.setdefault("palette", d / "pal.png"))
    pal.save(out.setdefault("palette_t", d / "palt.png"), transparency=0)
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (10, 10, 40, 40))
    rgba.save(out.setdefault("rgba", d / "rgba.png"))
    Image.new("LA", (64, 48), (90, 128)).save(out.setdefault("la", d / "la.png"))
    Image.new("L", (64, 48), 90).save(out.setdefault("gray", d / "gray.png"))
    return out


def test_predict_accepts_odd_image_modes(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    for name, path in _odd_images(tmp_path).items():
        code, out, err = run_cli(["predict", str(path), "the square", "-b", str(tiny_clip_dir), "--json", "-"],
                                 monkeypatch, capsys)
        assert code == 0, f"{name}: {err}"
        pred = json.loads(out)
        assert pred["image_size"] == [64, 48], name
        assert _inside(pred["predictions"][0]["box"], 64, 48), name
