"""Fixtures of the service tests: the tiny CLIP's methods loaded once, apps built around them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service tests need the serve extra (fastapi)")
pytest.importorskip("multipart", reason="the service tests need python-multipart")

#: Two methods, so side-by-side and per-method cache entries are exercised.
TEST_METHODS = ["zero-shot", "heatmap-segment:heatmap=clip:segmenter=threshold"]


def png_bytes(size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB", fmt: str = "PNG",
              **save: Any) -> bytes:
    """A noise image of ``size`` (w, h) in ``mode`` encoded as ``fmt``."""
    a = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    im = Image.fromarray(a)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="session")
def served_methods(tiny_clip_dir: Path) -> dict:
    """The test methods on the tiny CLIP, loaded once and shared by every app."""
    from clipground.serve.app import load_methods
    from clipground.serve.config import ServeConfig

    return load_methods(ServeConfig(methods=TEST_METHODS, backbone=str(tiny_clip_dir)))


@pytest.fixture(scope="session")
def make_client(served_methods: dict, tiny_clip_dir: Path) -> Callable[..., Any]:
    """``make_client(**config)``: a TestClient of an app with those ServeConfig fields."""
    from fastapi.testclient import TestClient

    from clipground.serve import ServeConfig, create_app

    def make(**kw: Any) -> TestClient:
        cfg = ServeConfig(methods=TEST_METHODS, backbone=str(tiny_clip_dir), **kw)
        return TestClient(create_app(cfg, methods=served_methods))

    return make


@pytest.fixture(scope="module")
def client(make_client: Callable[..., Any]) -> Any:
    with make_client(max_pixels=1_000_000, max_upload_mb=1.0, max_phrases=4) as c:
        yield c
