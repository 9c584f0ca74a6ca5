"""Tests of :func:`clipground.images.load_image`: every kind of bad file is refused with a
:class:`BadImageError`, and every odd-but-valid image comes back as correct RGB pixels in
displayed orientation."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from clipground import images as I
from clipground.errors import BadImageError, ClipgroundError
from clipground.images import MAX_PIXELS, load_image


def _rgb(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return tuple(int(v) for v in np.asarray(img)[y, x])


def _close(a, b, tol: int = 2) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


def _noise(h: int = 120, w: int = 160) -> np.ndarray:
    return (np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` but has no pixel data (cheap huge image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    with pytest.raises(BadImageError, match="not a file"):
        load_image(tmp_path)


def test_text_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(BadImageError, match="cannot read"):
        load_image(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        load_image(p)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, fmt, keep):
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(_noise()).save(full, format=fmt)
    assert load_image(full).size == (160, 120)  # the intact file loads
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadImageError, match=str(cut.name)):
        load_image(cut)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_header_only_file(tmp_path, fmt):
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(_noise()).save(full, format=fmt)
    cut = tmp_path / f"head.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[:40])
    with pytest.raises(BadImageError):
        load_image(cut)


def test_errors_are_one_line_clipground_errors(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("nope")
    with pytest.raises(ClipgroundError) as ei:
        load_image(p)
    assert "\n" not in str(ei.value)


# --------------------------------------------------------------------------- size limit


def test_oversized_image_refused_naming_limit(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    p = png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(BadImageError, match=f"limit of {MAX_PIXELS}") as ei:
        load_image(p)
    assert f"{side}x{side}" in str(ei.value)


def test_decompression_bomb_refused_naming_limit(tmp_path):
    # Above PIL's own hard limit: PIL refuses at open time; the message still names ours.
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    side = int((3 * limit) ** 0.5)
    p = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(BadImageError, match=f"limit of {MAX_PIXELS}"):
        load_image(p)


def test_max_pixels_argument_and_module_limit(tmp_path, monkeypatch):
    p = tmp_path / "ok.png"
    Image.fromarray(_noise(100, 100)).save(p)
    assert load_image(p).size == (100, 100)
    with pytest.raises(BadImageError, match="limit of 9999"):
        load_image(p, max_pixels=9_999)
    arr = _noise(100, 100)
    with pytest.raises(BadImageError, match="limit of 9999"):
        load_image(arr, max_pixels=9_999)
    with pytest.raises(BadImageError, match="limit of 9999"):
        load_image(Image.fromarray(arr), max_pixels=9_999)


# --------------------------------------------------------------------------- odd modes


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    im = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # pure red in CMYK
    im.paste((255, 0, 255, 0), (16, 0, 32, 16))  # pure green in the right half
    im.save(p, quality=100)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (32, 16)
    assert _close(_rgb(out, 4, 8), (255, 0, 0), 8)
    assert _close(_rgb(out, 28, 8), (0, 255, 0), 8)


def test_16bit_gray_png(tmp_path):
    p = tmp_path / "g16.png"
    a = np.zeros((4, 3), np.uint16)
    a[:, 0], a[:, 1], a[:, 2] = 0, 32768, 65535
    cv2.imwrite(str(p), a)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    assert out.mode == "RGB"
    assert _close(_rgb(out, 0, 0), (0, 0, 0), 1)
    assert _close(_rgb(out, 1, 0), (128, 128, 128), 1)
    assert _close(_rgb(out, 2, 0), (255, 255, 255), 1)


def test_16bit_dark_gray_png_is_not_brightened(tmp_path):
    p = tmp_path / "dark16.png"
    cv2.imwrite(str(p), np.full((4, 4), 1000, np.uint16))  # 1000/65535 of white
    assert _close(_rgb(load_image(p), 0, 0), (4, 4, 4), 1)


def test_16bit_rgb_png(tmp_path):
    p = tmp_path / "rgb16.png"
    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = 65535, 32768  # R full, G half
    cv2.imwrite(str(p), bgr)
    assert _close(_rgb(load_image(p), 1, 1), (255, 128, 0), 1)


def _palette_image() -> Image.Image:
    im = Image.new("P", (8, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (4, 0, 8, 4))  # right half: index 1 (blue)
    return im


def test_palette_png(tmp_path):
    p = tmp_path / "pal.png"
    _palette_image().save(p)
    assert Image.open(p).mode == "P"
    out = load_image(p)
    assert _rgb(out, 1, 1) == (255, 0, 0) and _rgb(out, 6, 1) == (0, 0, 255)


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / "palt.png"
    _palette_image().save(p, transparency=1)  # index 1 (blue) is transparent
    im = Image.open(p)
    assert im.mode == "P" and "transparency" in im.info
    out = load_image(p)
    assert _rgb(out, 1, 1) == (255, 0, 0)
    assert _rgb(out, 6, 1) == (255, 255, 255)  # transparent shows as white background


def test_rgba_alpha(tmp_path):
    p = tmp_path / "rgba.png"
    im = Image.new("RGBA", (6, 2), (255, 0, 0, 255))
    im.paste((255, 0, 0, 0), (2, 0, 4, 2))
    im.paste((0, 0, 0, 128), (4, 0, 6, 2))
    im.save(p)
    out = load_image(p)
    assert _rgb(out, 0, 0) == (255, 0, 0)  # opaque
    assert _rgb(out, 2, 0) == (255, 255, 255)  # transparent -> white
    assert _close(_rgb(out, 4, 0), (127, 127, 127), 2)  # half black over white


def test_la_alpha(tmp_path):
    p = tmp_path / "la.png"
    im = Image.new("LA", (4, 2), (50, 255))
    im.paste((50, 0), (2, 0, 4, 2))
    im.save(p)
    out = load_image(p)
    assert _rgb(out, 0, 0) == (50, 50, 50)
    assert _rgb(out, 3, 0) == (255, 255, 255)


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)), ("1", 0, (0, 0, 0))])
def test_grayscale_and_bilevel(tmp_path, mode, value, expected):
    p = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 5), value).save(p)
    assert _rgb(load_image(p), 2, 2) == expected


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_gives_displayed_orientation(tmp_path, orientation):
    # Stored 200x100: left half red, right half blue.
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.size == (100, 200)  # width and height swapped
    top, bottom = _rgb(out, 50, 20), _rgb(out, 50, 180)
    if orientation == 6:  # displayed = stored rotated 90 degrees clockwise: left goes on top
        assert _close(top, (255, 0, 0), 10) and _close(bottom, (0, 0, 255), 10)
    else:  # 90 degrees counter-clockwise: right goes on top
        assert _close(top, (0, 0, 255), 10) and _close(bottom, (255, 0, 0), 10)


# --------------------------------------------------------------------------- in-memory inputs


def test_array_and_tensor_inputs_agree():
    a = _noise(20, 30)
    ref = np.asarray(load_image(a))
    assert ref.shape == (20, 30, 3) and (ref == a).all()
    assert (np.asarray(load_image(Image.fromarray(a))) == a).all()
    assert (np.asarray(load_image(torch.from_numpy(a).permute(2, 0, 1))) == a).all()  # CHW
    assert (np.asarray(load_image(a.astype(np.float32) / 255.0)) == a).all()
    assert (np.asarray(load_image(a.astype(np.uint16) * 257)) == a).all()
    gray = load_image(a[..., 0])
    assert _rgb(gray, 3, 4) == (a[4, 3, 0],) * 3


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((5, 5, 5), np.uint8), "not an image"),
        (np.zeros((2, 4, 4, 3), np.uint8), "not an image"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels|not an image|shape"),
        ("not/a/real/file.png", "not found"),
        (12345, "unsupported image input"),
    ],
)
def test_bad_in_memory_inputs(bad, match):
    with pytest.raises(BadImageError, match=match):
        load_image(bad)


def test_module_documents_limit():
    assert I.MAX_PIXELS > 0 and "BadImageError" in (I.__doc__ or "")
