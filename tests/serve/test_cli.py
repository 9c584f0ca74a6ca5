"""``clipground serve`` as users start it: a subprocess, offline, on the bundled default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_offline_on_the_bundled_default():
    from clipground.backbone.hub import WORLD_CLIP
    from clipground.serve import DEFAULT_METHODS

    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "clipground.cli.main", "serve", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # generous: the CPU may be shared
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not answer /health"
            time.sleep(0.2)
        methods = httpx.get(url + "/v1/methods").json()
        assert [m["id"] for m in methods["methods"]] == list(DEFAULT_METHODS)
        assert {m["backbone"] for m in methods["methods"]} == {WORLD_CLIP}
        assert httpx.get(url + "/").status_code == 200
        scene = SRC / "clipground" / "serve" / "static" / "examples" / "world-3.png"
        r = httpx.post(url + "/v1/ground", files={"image": (scene.name, scene.read_bytes())},
                       data={"phrases": ["the square"]}, timeout=300)
        assert r.status_code == 200 and r.json()["image_size"] == [128, 128]
    finally:
        proc.terminate()
        proc.wait(20)
