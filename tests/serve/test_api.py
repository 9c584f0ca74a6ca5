"""The HTTP API on the tiny CLIP: answers in both shapes, the image cache, every bad input
the CLI refuses (answered 4xx with the CLI's own words), limits, busy and timeout answers,
concurrent requests, and the access rule."""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipground.errors import ConfigError
from clipground.grounder import Grounder
from clipground.images import load_image
from clipground.serve import ServeConfig, create_app
from clipground.testing import assert_one_error_line, run_cli

from .conftest import TEST_METHODS, png_bytes

STATIC = Path(__file__).resolve().parents[2] / "src" / "clipground" / "serve" / "static"


def _ground(client, data: bytes, phrases, name: str = "img.png", **fields):
    return client.post("/v1/ground", files={"image": (name, data, "application/octet-stream")},
                       data={"phrases": phrases, **fields})


def _error(r, status: int, code: str | None = None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == status
    assert body["error"]["message"].strip()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


# --------------------------------------------------------------------------- good answers


def test_health_and_methods(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["methods"] == TEST_METHODS and h["default_method"] == TEST_METHODS[0]
    m = client.get("/v1/methods").json()
    assert [x["id"] for x in m["methods"]] == TEST_METHODS
    assert m["methods"][0]["default"] and not m["methods"][1]["default"]
    assert "zero-shot" in m["registered"]


def test_ground_gives_both_shapes_and_matches_the_library(client, served_methods):
    data = png_bytes(seed=1)
    r = _ground(client, data, ["the red square", "a circle"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [64, 48] and body["method"] == "zero-shot"
    assert [p["phrase"] for p in body["predictions"]] == ["the red square", "a circle"]
    g = Grounder(served_methods["zero-shot"].grounder.method, served_methods["zero-shot"].grounder.proposals)
    g.set_image(Image.open(io.BytesIO(data)))
    want = g.predict_batch(["the red square", "a circle"])
    for got, p in zip(body["predictions"], want):
        assert got["box"] == p.to_dict()["box"]
        assert got["score"] == pytest.approx(p.score, abs=1e-5)
        assert len(got["candidates"]) == min(5, len(p.boxes))
    hf = body["hf"]
    assert {d["label"] for d in hf} == {"the red square", "a circle"}
    assert [d["score"] for d in hf] == sorted((d["score"] for d in hf), reverse=True)
    for d in hf:
        p = next(x for x in want if x.phrase == d["label"])
        assert d == p.to_hf(top_k=1)[0] | {"score": pytest.approx(p.score, abs=1e-5)}


def test_json_base64_and_data_url_give_the_same_answer(client):
    data = png_bytes(seed=2)
    a = _ground(client, data, ["the blue one"]).json()
    b64 = base64.b64encode(data).decode()
    b = client.post("/v1/ground", json={"image": b64, "phrases": ["the blue one"]}).json()
    c = client.post("/v1/ground", json={"image": "data:image/png;base64," + b64, "phrase": "the blue one"}).json()
    assert a["image_id"] == b["image_id"] == c["image_id"]
    assert a["predictions"] == b["predictions"] == c["predictions"]


def test_second_method_and_top_k(client):
    data = png_bytes(seed=3)
    r = _ground(client, data, ["the thing"], method=TEST_METHODS[1], top_k="1")
    assert r.status_code == 200, r.text
    assert r.json()["method"] == TEST_METHODS[1] and len(r.json()["predictions"][0]["candidates"]) <= 1


def test_uploaded_image_is_cached_and_text_only_requests_reuse_it(client):
    data = png_bytes(seed=4)
    up = client.post("/v1/images", files={"image": ("x.png", data, "image/png")})
    assert up.status_code == 200, up.text
    iid = up.json()["image_id"]
    assert re.fullmatch(r"[0-9a-f]{64}", iid) and up.json()["cached"] is False
    again = client.post("/v1/images", files={"image": ("x.png", data, "image/png")}).json()
    assert again["image_id"] == iid and again["cached"] is True
    r = client.post(f"/v1/images/{iid}/ground", json={"phrases": ["the left one", "the right one"]})
    assert r.status_code == 200 and r.json()["cached"] is True
    one_shot = _ground(client, data, ["the left one", "the right one"]).json()
    assert one_shot["cached"] is True and one_shot["predictions"] == r.json()["predictions"]
    # another method on the same image computes its own state once, then reuses it
    m2 = {"phrases": ["the left one"], "method": TEST_METHODS[1]}
    first = client.post(f"/v1/images/{iid}/ground", json=m2).json()
    second = client.post(f"/v1/images/{iid}/ground", json=m2).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["predictions"] == second["predictions"]


def test_unknown_image_id_is_404(client):
    _error(client.post(f"/v1/images/{'0' * 64}/ground", json={"phrase": "x"}), 404, "unknown_image")
    _error(client.post("/v1/images/../../etc/ground", json={"phrase": "x"}), 404)
    _error(client.post("/v1/images/abc/ground", json={"phrase": "x"}), 404, "unknown_image")


def test_lru_evicts_least_recently_used_within_budget(make_client):
    with make_client(cache_mb=0.01) as c:  # 10 KB: under one 64x48 image (9 KB) and its features
        ids = [c.post("/v1/images", files={"image": ("a.png", png_bytes(seed=s), "image/png")}).json()["image_id"]
               for s in (10, 11, 12)]
        stats = c.get("/health").json()["cache"]
        assert stats["evictions"] >= 2 and stats["images"] == 1
        _error(c.post(f"/v1/images/{ids[0]}/ground", json={"phrase": "x"}), 404, "unknown_image")
        assert c.post(f"/v1/images/{ids[2]}/ground", json={"phrase": "x"}).status_code == 200


def test_concurrent_requests_on_two_images_get_their_own_answers(client):
    a, b = png_bytes((64, 48), seed=20), png_bytes((40, 56), seed=21)
    want = {k: _ground(client, d, ["the top one"]).json() for k, d in (("a", a), ("b", b))}
    barrier = threading.Barrier(4)

    def call(k: str):
        barrier.wait()
        return k, _ground(client, a if k == "a" else b, ["the top one"]).json()

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(call, ["a", "b", "a", "b"]))
    for k, body in got:
        assert body["image_id"] == want[k]["image_id"]
        assert body["image_size"] == ([64, 48] if k == "a" else [40, 56])
        assert body["predictions"] == want[k]["predictions"]


def test_cold_concurrent_requests_on_new_images(make_client):
    with make_client() as c:
        imgs = [png_bytes((48 + 8 * i, 40), seed=30 + i) for i in range(4)]
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda d: _ground(c, d, ["the thing"]), imgs))
        for d, r in zip(imgs, got):
            assert r.status_code == 200, r.text
            assert r.json()["image_size"] == list(Image.open(io.BytesIO(d)).size)


# --------------------------------------------------------------------------- image formats


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _png16() -> bytes:
    a = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    im = Image.fromarray((np.random.RandomState(5).rand(30, 60, 3) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


ODD_BUT_VALID = {
    "cmyk.jpg": (_cmyk, (40, 30)),
    "16bit.png": (_png16, (40, 30)),
    "palette.png": (lambda: png_bytes((40, 30), mode="P"), (40, 30)),
    "alpha.png": (lambda: png_bytes((40, 30), mode="RGBA"), (40, 30)),
    "la.png": (lambda: png_bytes((40, 30), mode="LA"), (40, 30)),
    "grey.png": (lambda: png_bytes((40, 30), mode="L"), (40, 30)),
    "exif6.jpg": (lambda: _exif(6), (30, 60)),  # stored 60x30, shown rotated
    "exif3.jpg": (lambda: _exif(3), (60, 30)),
    "photo.webp": (lambda: png_bytes((40, 30), fmt="WEBP"), (40, 30)),
    "photo.gif": (lambda: png_bytes((40, 30), mode="P", fmt="GIF"), (40, 30)),
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_answered_in_displayed_orientation(client, tmp_path, name):
    make, shown = ODD_BUT_VALID[name]
    data = make()
    r = _ground(client, data, ["the object"], name=name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == list(shown)
    for p in body["predictions"]:
        x1, y1, x2, y2 = p["box"]
        assert 0 <= x1 < x2 <= shown[0] and 0 <= y1 < y2 <= shown[1]
    # the server holds exactly the pixels the CLI's loader gives for the same file
    path = tmp_path / name
    path.write_bytes(data)
    cached = client.app.state.service.cache.get(body["image_id"]).image
    assert cached.mode == "RGB" and np.array_equal(np.asarray(cached), np.asarray(load_image(path)))


# --------------------------------------------------------------------------- bad images


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _big_flat_png() -> bytes:  # 1100 x 1000 = 1.1 MP, over the test server's 1 MP; compresses to a few KB
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'

BAD_IMAGES = {
    # name: (bytes, status, code, words the message must hold)
    "empty.png": (lambda: b"", 422, "bad_image", "empty (0 bytes)"),
    "truncated.png": (lambda: png_bytes((64, 48))[:300], 422, "bad_image", "truncated or corrupt"),
    "truncated.jpg": (lambda: png_bytes((64, 48), fmt="JPEG")[:400], 422, "bad_image", "truncated or corrupt"),
    "notes.png": (lambda: b"this is a text file, not a picture\n" * 4, 415, "unsupported_image", "not an image file"),
    "drawing.svg": (lambda: SVG, 415, "unsupported_image", "not an image file"),
    "drawing.png": (lambda: SVG, 415, "unsupported_image", "not an image file"),
    "bomb.png": (lambda: _png_header_only(100_000, 100_000), 413, "image_too_large", "over the limit"),
    "huge.png": (_big_flat_png, 413, "image_too_large", "over the limit of 1000000"),
    "doc.pdf": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_image", "not an image"),
    "eps.eps": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415, "unsupported_image", "not an image"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
@pytest.mark.parametrize("route", ["/v1/ground", "/v1/images"])
def test_bad_images_answered_4xx_with_a_message(client, name, route):
    make, status, code, words = BAD_IMAGES[name]
    r = client.post(route, files={"image": (name, make(), "image/png")}, data={"phrases": ["the thing"]})
    msg = _error(r, status, code)
    assert words in msg and name in msg, msg


@pytest.mark.parametrize("name", ["empty.png", "truncated.png", "notes.png", "drawing.svg"])
def test_bad_image_message_is_the_cli_message(client, tmp_path, monkeypatch, capsys, name):
    """``clipground predict FILE`` and the service say the same words for the same bytes."""
    make = BAD_IMAGES[name][0]
    path = tmp_path / name
    path.write_bytes(make())
    code, _, err = run_cli(["predict", str(path), "the thing"], monkeypatch, capsys)
    line = assert_one_error_line(code, err)
    served = _error(client.post("/v1/ground", files={"image": (name, make(), "image/png")},
                                data={"phrases": ["the thing"]}), BAD_IMAGES[name][1])
    assert line == "error: " + served.replace(name, str(path))


def test_json_image_errors(client):
    _error(client.post("/v1/ground", json={"image": "!!not base64!!", "phrase": "x"}), 422, "bad_request")
    _error(client.post("/v1/ground", json={"image": 12, "phrase": "x"}), 422, "bad_request")
    _error(client.post("/v1/ground", json={"phrase": "x"}), 422, "bad_request")
    _error(client.post("/v1/ground", json={"image": "", "phrase": "x"}), 422, "bad_image")
    msg = _error(client.post("/v1/ground", json={"image": base64.b64encode(SVG).decode(), "filename": "../../x.svg",
                                                 "phrase": "x"}), 415, "unsupported_image")
    assert "x.svg" in msg and ".." not in msg


# --------------------------------------------------------------------------- bad requests


def test_upload_over_the_byte_limit_is_413(client):
    big = b"\x89PNG" + b"0" * (1024 * 1024 + 10)
    _error(_ground(client, big, ["x"]), 413, "upload_too_large")

    def chunks():  # no Content-Length: the body is counted as it streams
        for _ in range(40):
            yield b"0" * 32768

    r = client.post("/v1/ground", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    _error(r, 413, "upload_too_large")


@pytest.mark.parametrize("phrases, code, words", [
    (["a", "b", "c", "d", "e"], "too_many_phrases", "limit is 4"),
    (["x" * 401], "bad_phrase", "too long"),
    (["   "], "bad_phrase", "empty"),
    (["red \x1b[31m circle"], "bad_phrase", "U+001B"),
    ([], "bad_phrase", "one or more phrases"),
])
def test_bad_phrases_are_422(client, phrases, code, words):
    r = client.post("/v1/ground", json={"image": base64.b64encode(png_bytes()).decode(), "phrases": phrases})
    assert words in _error(r, 422, code)


def test_bad_phrase_types_and_options_are_422(client):
    img = base64.b64encode(png_bytes()).decode()
    _error(client.post("/v1/ground", json={"image": img, "phrases": [1, 2]}), 422, "bad_phrase")
    _error(client.post("/v1/ground", json={"image": img, "phrases": {"a": 1}}), 422, "bad_phrase")
    _error(client.post("/v1/ground", json={"image": img}), 422, "bad_phrase")
    _error(client.post("/v1/ground", json={"image": img, "phrase": "x", "method": "nope"}), 422, "unknown_method")
    _error(client.post("/v1/ground", json={"image": img, "phrase": "x", "method": ["a"]}), 422, "unknown_method")
    for k in ("many", 0, 1000, 1.5, True):
        _error(client.post("/v1/ground", json={"image": img, "phrase": "x", "top_k": k}), 422, "bad_option")
    _error(client.post("/v1/ground", files={"image": ("a.png", png_bytes(), "image/png"),
                                            "phrases": ("p.txt", b"x", "text/plain")}), 422, "bad_phrase")


def test_malformed_bodies_are_4xx(client):
    _error(client.post("/v1/ground", content=b"{", headers={"content-type": "application/json"}), 422, "bad_request")
    _error(client.post("/v1/ground", content=b"[" * 100000, headers={"content-type": "application/json"}), 422)
    _error(client.post("/v1/ground", json=[1, 2]), 422, "bad_request")
    _error(client.post("/v1/ground", content=b"hello", headers={"content-type": "text/plain"}), 415)
    _error(client.post("/v1/ground", content=b"hello"), 415)
    _error(client.post("/v1/ground", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}), 422)
    _error(client.post("/v1/ground", data={"phrases": ["x"]}), 422, "bad_request")  # no file
    _error(client.post("/v1/ground", headers={"content-length": "abc"}), 400)
    _error(client.get("/v1/ground"), 405)
    _error(client.get("/v1/nothing-here"), 404, "not_found")


# --------------------------------------------------------------------------- load: busy, timeout, health


def _blocking(client, release: threading.Event, started: threading.Event):
    service = client.app.state.service
    real = service._encode

    def encode(served):
        inner = real(served)

        def run(image):
            started.set()
            release.wait(300)
            return inner(image)
        return run

    service._encode = encode
    return real


def test_full_queue_is_429_and_health_answers_meanwhile(make_client):
    with make_client(workers=1, queue=0) as c:
        release, started = threading.Event(), threading.Event()
        _blocking(c, release, started)
        with ThreadPoolExecutor(1) as ex:
            slow = ex.submit(_ground, c, png_bytes(seed=40), ["x"])
            assert started.wait(300)
            h = c.get("/health")  # the only worker is busy: /health still answers
            assert h.status_code == 200 and h.json()["lanes"]["image"]["running"] == 1
            r = _ground(c, png_bytes(seed=41), ["x"])
            assert "busy" in _error(r, 429, "busy") and r.headers.get("retry-after") == "1"
            release.set()
            assert slow.result(300).status_code == 200
        assert c.get("/health").json()["lanes"]["image"]["refused"] == 1


def test_request_over_the_timeout_is_503(make_client):
    with make_client(timeout_s=0.3) as c:
        release, started = threading.Event(), threading.Event()
        _blocking(c, release, started)
        try:
            assert "did not finish" in _error(_ground(c, png_bytes(seed=42), ["x"]), 503, "timeout")
        finally:
            release.set()


# --------------------------------------------------------------------------- access


def test_public_bind_needs_an_api_key(served_methods, tiny_clip_dir):
    with pytest.raises(ConfigError, match="API key"):
        create_app(ServeConfig(methods=TEST_METHODS, backbone=str(tiny_clip_dir), host="0.0.0.0"), served_methods)
    with pytest.raises(ConfigError, match="API key"):
        create_app(ServeConfig(methods=TEST_METHODS, backbone=str(tiny_clip_dir), host="example.org"), served_methods)


def test_cli_refuses_public_bind_without_key(monkeypatch, capsys):
    monkeypatch.delenv("CLIPGROUND_API_KEY", raising=False)
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--port", "1"], monkeypatch, capsys)
    assert_one_error_line(code, err, "refusing to serve on 0.0.0.0", "--api-key")


def test_api_key_is_required_when_set(make_client):
    from fastapi.testclient import TestClient

    from clipground.serve import create_app as make

    c0 = make_client(api_key="s3cret-key-123")
    service = c0.app.state.service
    cfg = ServeConfig(methods=TEST_METHODS, backbone=service.config.backbone, host="0.0.0.0", api_key="s3cret-key-123")
    with TestClient(make(cfg, methods=service.methods)) as c:
        _error(c.get("/v1/methods"), 401, "unauthorized")
        _error(c.get("/v1/methods", headers={"X-API-Key": "wrong"}), 401)
        _error(_ground(c, png_bytes(), ["x"]), 401)
        assert c.get("/v1/methods", headers={"X-API-Key": "s3cret-key-123"}).status_code == 200
        assert c.get("/v1/methods", headers={"Authorization": "Bearer s3cret-key-123"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the key


# --------------------------------------------------------------------------- page and docs are local


def test_page_docs_and_openapi_load_nothing_external(client):
    for path in ("/", "/docs", "/static/app.js", "/static/docs.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(([^)]+)\)|@import\s+["']([^"']+)""", r.text)
        for groups in refs:
            for ref in filter(None, groups):
                assert not re.match(r"^(https?:)?//", ref.strip()), f"{path} loads {ref}"
        assert "cdn" not in r.text.lower(), path
    spec = client.get("/openapi.json").json()
    assert {"/v1/ground", "/v1/images", "/v1/images/{image_id}/ground", "/health", "/v1/methods"} <= set(spec["paths"])
    ex = client.get("/v1/examples").json()["examples"]
    kinds = {e["kind"] for e in ex}
    assert {"world", "coco"} <= kinds
    for e in ex:
        assert client.get(e["url"]).status_code == 200 and e["phrases"]
    assert (STATIC / "examples" / "NOTICE.txt").is_file()
