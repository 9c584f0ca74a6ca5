"""The web page in a real headless Chromium (Debian's ``chromium`` through Python playwright's
``executable_path``; nothing is downloaded): the server runs on a free loopback port with
the bundled world CLIP; a COCO128 photo is uploaded and a world scene picked, phrases are
typed, and the drawn boxes, the page's JSON and the API's own answer must agree.

Skips with a reason when no Chromium or no playwright is installed (``.ci/run`` installs
Chromium). ``CLIPGROUND_SCREENSHOT=path`` also writes the final screenshot there (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

STATIC = Path(__file__).resolve().parents[2] / "src" / "clipground" / "serve" / "static"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Generous waits (ms): on a loaded CPU an image encoding can take far longer than usual.
LONG = 300_000


def _chromium() -> str | None:
    env = os.environ.get("CLIPGROUND_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    """The service on the bundled world CLIP, in a thread on a free loopback port."""
    import uvicorn

    from clipground.serve import DEFAULT_METHODS, ServeConfig, create_app

    port = _free_port()
    app = create_app(ServeConfig(methods=list(DEFAULT_METHODS), port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run does it); set CLIPGROUND_CHROMIUM to use another")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _page_json(page) -> dict:
    return json.loads(page.locator("#json").text_content())


def _ground_and_wait(page, n_panels: int) -> None:
    page.click("#ground")
    page.wait_for_function(
        "n => document.querySelectorAll('.panel').length === n && "
        "document.getElementById('status').dataset.kind === 'done'", arg=n_panels, timeout=LONG)


def _api_answer(url: str, data: bytes, name: str, phrases: list[str], method: str) -> dict:
    r = httpx.post(f"{url}/v1/ground", files={"image": (name, data)}, data={"phrases": phrases, "method": method},
                   timeout=LONG / 1000)
    assert r.status_code == 200, r.text
    return r.json()


def test_page_grounds_a_coco_photo_and_a_world_scene(server_url, browser, tmp_path):
    external: list[str] = []
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(LONG)
    page.on("request", lambda req: external.append(req.url)
            if not req.url.startswith((server_url, "blob:", "data:")) else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server_url + "/")
    page.wait_for_selector("body[data-ready='1']")
    methods = page.eval_on_selector_all("#method-a option", "os => os.map(o => o.value)")
    assert len(methods) == 2

    # 1. a world scene from the bundled examples, with its suggested phrases
    page.select_option("#examples", label="world scene 2 (world)")
    page.wait_for_function("document.getElementById('image-name').textContent.startsWith('world-2.png')")
    world_phrases = [s for s in page.input_value("#phrases").split("\n") if s.strip()]
    assert world_phrases
    _ground_and_wait(page, 1)
    world = (STATIC / "examples" / "world-2.png").read_bytes()
    api = _api_answer(server_url, world, "world-2.png", world_phrases, methods[0])
    assert _page_json(page)["results"][methods[0]]["predictions"] == api["predictions"]
    assert page.locator(".panel .box.main").count() == len(world_phrases)

    # 2. a COCO128 photo uploaded through the file input, typed phrases, two methods side by side
    coco = STATIC / "examples" / "coco-471.jpg"
    page.set_input_files("#file", str(coco))
    phrases = ["the bus", "a person"]
    page.fill("#phrases", "\n".join(phrases))
    page.select_option("#method-b", methods[1])
    busy_before = int(page.evaluate("document.body.dataset.busyCount || '0'"))
    page.click("#ground")
    page.wait_for_function("document.getElementById('status').dataset.kind === 'done' && "
                           "document.querySelectorAll('.panel').length === 2", timeout=LONG)
    # the page showed its progress state while the new image was encoded (once per method)
    assert int(page.evaluate("document.body.dataset.busyCount")) >= busy_before + 2
    got = _page_json(page)["results"]
    assert set(got) == set(methods)
    assert page.locator(".panel[data-cached='0']").count() == 2  # both methods encoded the new image
    for m in methods:
        api = _api_answer(server_url, coco.read_bytes(), coco.name, phrases, m)
        assert got[m]["image_id"] == api["image_id"] and got[m]["image_size"] == api["image_size"] == [640, 427]
        assert got[m]["predictions"] == api["predictions"]
        for i, p in enumerate(api["predictions"]):
            b = page.locator(f".panel[data-method='{m}'] .box.main[data-phrase-index='{i}']")
            assert [float(v) for v in b.get_attribute("data-box").split(",")] == p["box"]
            assert b.is_visible() and p["phrase"] in b.text_content()

    # later phrases on the same image reuse the cached state
    page.fill("#phrases", "the bus")
    _ground_and_wait(page, 2)
    assert page.locator(".panel[data-cached='1']").count() == 2
    assert all(r["cached"] for r in _page_json(page)["results"].values())

    # the threshold slider hides boxes under it and marks the phrase "not found"
    page.fill("#phrases", "\n".join(phrases))
    _ground_and_wait(page, 2)
    first = f".panel[data-method='{methods[0]}']"
    slide = "(s, v) => { s.value = v === 'max' ? s.max : s.min; s.dispatchEvent(new Event('input')); }"
    page.eval_on_selector(f"{first} .threshold", slide, "max")
    assert page.locator(f"{first} .box.main.below").count() == 2 and page.locator(f"{first} li.not-found").count() == 2
    assert not page.locator(f"{first} .box.main").first.is_visible()
    page.eval_on_selector(f"{first} .threshold", slide, "min")
    assert page.locator(".box.main.below").count() == 0 and page.locator("li.not-found").count() == 0

    # download gives the JSON the page shows
    with page.expect_download() as dl:
        page.click("#download")
    saved = tmp_path / "download.json"
    dl.value.save_as(saved)
    assert json.loads(saved.read_text()) == _page_json(page)

    # hovering a phrase shows its candidates (the screenshot is taken in that state)
    page.hover(f"{first} .phrase-list li[data-phrase-index='0']")
    n_cands = len(got[methods[0]]["predictions"][0]["candidates"]) - 1
    assert page.locator(f"{first} .box.candidate.show").count() == n_cands >= 1
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("CLIPGROUND_SCREENSHOT")
    if target:
        shutil.copy(shot, target)
    page.mouse.move(0, 0)
    assert page.locator(".box.candidate.show").count() == 0
    assert not errors, errors
    assert not external, f"the page fetched external resources: {external}"
    page.close()
