"""Load test of ``clipground serve`` on loopback: concurrent clients, good and bad requests.

Starts ``clipground serve`` as a subprocess on a free loopback port (the bundled world CLIP
unless ``--backbone``), then:

1. **warm-up**: cold images until the image cache is full (so memory has reached its bound),
   then ``--warmup-requests`` per client of the mixed load below (thread and allocator peaks);
2. **main**: ``--clients`` threads x ``--requests`` each, a seeded mix of cold images (new
   bytes), one-shot requests on recently seen images (cached), text-only requests on an
   image id (``/v1/images/{id}/ground``), and bad inputs of every kind the CLI refuses, each
   with the status it must get;
3. **health under load**: 4 cold requests at once, ``/health`` polled meanwhile.

Reports failures of good requests, bad requests answered with the wrong status (or without
a JSON message, or not at all), p50/p95 latency per kind, requests per second, and the
server's RSS before, after warm-up and at the end. Bounded in count (``--requests``) and time
(``--max-seconds``: clients stop early and the report says how many ran).

    python benchmarks/bench_serve.py                                   # 4 clients x 1000
    python benchmarks/bench_serve.py --clients 4 --requests 100 --max-seconds 120   # a short run
    python benchmarks/bench_serve.py --out results/serve_bench.json

Timings are wall-clock on whatever machine runs it (informative; no test asserts on them).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "train2017"
EXAMPLES = ROOT / "src" / "clipground" / "serve" / "static" / "examples"
PHRASES = ["the person", "a dog", "the red car", "the bus on the left", "the cup", "a white plate", "the cat",
           "the largest object", "the tree behind the bench", "a green umbrella", "the man on the right",
           "the bottle", "the pizza", "the train", "the clock on the wall", "the smallest animal",
           "the laptop", "the chair next to the table", "a bird", "the boat"]
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


class Images:
    """Base photos, and new (cold) variants of them: a few pixels changed, re-encoded as JPEG."""

    def __init__(self, folder: Path | None, seed: int):
        paths = sorted(folder.glob("*.jpg")) if folder and folder.is_dir() else []
        if not paths:
            paths = sorted(EXAMPLES.glob("*.jpg")) + sorted(EXAMPLES.glob("*.png"))
        self.base = [Image.open(p).convert("RGB") for p in paths]
        self.source = str(folder if paths and folder and str(paths[0]).startswith(str(folder)) else EXAMPLES)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.n = 0

    def cold(self) -> bytes:
        with self.lock:
            im = self.base[self.n % len(self.base)].copy()
            self.n += 1
            x, y = self.rng.randrange(im.width - 2), self.rng.randrange(im.height - 2)
            colour = tuple(self.rng.randrange(256) for _ in range(3))
        for dx in range(2):
            for dy in range(2):
                im.putpixel((x + dx, y + dy), colour)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def bad_requests(images: Images, max_upload_mb: float, max_pixels: int, max_phrases: int) -> list[tuple[str, int, dict]]:
    """(kind, expected status, httpx request kwargs) for every kind of bad input."""
    good = images.cold()
    big_flat = io.BytesIO()
    side = int((max_pixels * 1.2) ** 0.5) + 1
    Image.new("L", (side, side), 128).save(big_flat, "PNG")
    truncated = good[: len(good) // 3]
    files = lambda name, data: {"files": {"image": (name, data, "application/octet-stream")},  # noqa: E731
                                "data": {"phrases": ["the person"]}}
    return [
        ("empty", 422, files("empty.jpg", b"")),
        ("truncated", 422, files("cut.jpg", truncated)),
        ("text-as-png", 415, files("notes.png", b"just some text, not a picture\n" * 20)),
        ("svg", 415, files("drawing.svg", SVG)),
        ("bomb-header", 413, files("bomb.png", png_header_only(100_000, 100_000))),
        ("huge-pixels", 413, files("huge.png", big_flat.getvalue())),
        ("oversized-upload", 413, files("big.jpg", os.urandom(int((max_upload_mb + 0.5) * 2**20)))),
        ("too-many-phrases", 422, {"files": {"image": ("a.jpg", good)}, "data": {"phrases": ["x"] * (max_phrases + 1)}}),
        ("phrase-too-long", 422, {"files": {"image": ("a.jpg", good)}, "data": {"phrases": ["a" * 500]}}),
        ("control-char-phrase", 422, {"files": {"image": ("a.jpg", good)}, "data": {"phrases": ["red \x1b[31m"]}}),
        ("bad-json", 422, {"content": b'{"image": ', "headers": {"content-type": "application/json"}}),
        ("bad-base64", 422, {"json": {"image": "%%%", "phrases": ["x"]}}),
        ("unknown-method", 422, {"json": {"image": base64.b64encode(good).decode(), "phrases": ["x"], "method": "nope"}}),
        ("wrong-content-type", 415, {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("unknown-image-id", 404, {"json": {"phrases": ["x"]}}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1000, help="requests per client in the main phase")
    ap.add_argument("--max-seconds", type=float, default=1800, help="stop the main phase after this long")
    ap.add_argument("--cold", type=float, default=0.03, help="fraction of cold-image requests")
    ap.add_argument("--cached", type=float, default=0.22, help="fraction of one-shot requests on a recent image")
    ap.add_argument("--bad", type=float, default=0.2, help="fraction of bad requests (the rest: text-only)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-mb", type=float, default=48.0)
    ap.add_argument("--max-upload-mb", type=float, default=4.0)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up cold images (0: until the cache is full)")
    ap.add_argument("--warmup-requests", type=int, default=100, help="mixed warm-up requests per client")
    ap.add_argument("--health-rounds", type=int, default=3)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--method", default="zero-shot")
    ap.add_argument("--images", type=Path, default=COCO128, help="folder of JPEG photos (default: COCO128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_pixels, max_phrases = 16_000_000, 16
    cmd = [sys.executable, "-m", "clipground.cli.main", "serve", "--port", str(port), "--method", args.method,
           "--workers", str(args.workers), "--cache-mb", str(args.cache_mb), "--max-upload-mb", str(args.max_upload_mb),
           "--max-pixels", str(max_pixels), "--max-phrases", str(max_phrases), "--log-level", "warning"]
    if args.backbone:
        cmd += ["--backbone", args.backbone]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server = psutil.Process(proc.pid)
    try:
        report = run(args, url, server, max_pixels, max_phrases)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["command"] = " ".join([Path(sys.executable).name, "benchmarks/bench_serve.py"] + sys.argv[1:])
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


def rss_mb(p: psutil.Process) -> float:
    return round(p.memory_info().rss / 2**20, 1)


def run(args: argparse.Namespace, url: str, server: psutil.Process, max_pixels: int, max_phrases: int) -> dict[str, Any]:
    client = httpx.Client(timeout=120)
    deadline = time.monotonic() + 180
    while True:
        try:
            if client.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.status() == psutil.STATUS_ZOMBIE:
            raise SystemExit("server did not start")
        time.sleep(0.2)
    health = client.get(f"{url}/health").json()
    methods = client.get(f"{url}/v1/methods").json()
    rss_before = rss_mb(server)
    images = Images(args.images, args.seed)
    bad = bad_requests(images, args.max_upload_mb, max_pixels, max_phrases)
    recent: deque[tuple[bytes, str]] = deque(maxlen=4)  # well inside the cache: their ids stay valid
    lock = threading.Lock()

    # 1. warm-up: fill the cache with cold images
    warm = 0
    t0 = time.perf_counter()
    while True:
        data = images.cold()
        r = client.post(f"{url}/v1/ground", files={"image": ("w.jpg", data)}, data={"phrases": ["the person"]})
        if r.status_code != 200:
            raise SystemExit(f"warm-up request failed: {r.status_code} {r.text[:200]}")
        recent.append((data, r.json()["image_id"]))
        warm += 1
        cache = client.get(f"{url}/health").json()["cache"]
        if (args.warmup and warm >= args.warmup) or (not args.warmup and cache["evictions"] >= 4) or warm >= 400:
            break
    warm_s = time.perf_counter() - t0

    # 2. the mixed load: a short warm-up round (allocator and thread high-water marks), then the measured one
    lat: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    wrong: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    stop_at = time.monotonic() + args.max_seconds

    def check_good(kind: str, r: httpx.Response, phrases: list[str]) -> None:
        ok = r.status_code == 200
        if ok:
            body = r.json()
            w, h = body["image_size"]
            preds = body.get("predictions", [])
            ok = len(preds) == len(phrases) and all(0 <= p["box"][0] <= p["box"][2] <= w and
                                                     0 <= p["box"][1] <= p["box"][3] <= h for p in preds)
        if not ok:
            with lock:
                failures.append(f"{kind}: {r.status_code} {r.text[:160]}")

    def one(c: httpx.Client, rng: random.Random) -> None:
        u = rng.random()
        phrases = rng.sample(PHRASES, rng.randint(1, 3))
        if u < args.bad:
            kind, want, kw = bad[rng.randrange(len(bad))]
            path = f"/v1/images/{'0' * 64}/ground" if kind == "unknown-image-id" else "/v1/ground"
            t = time.perf_counter()
            try:
                r = c.post(url + path, **kw)
                status = r.status_code
                msg = r.json().get("error", {}).get("message") if status >= 400 else None
            except (httpx.TransportError, ValueError) as e:
                status, msg = f"no answer ({type(e).__name__})", None
            lat["bad"].append(time.perf_counter() - t)
            with lock:
                counts[f"bad:{kind}"] += 1
                if status != want or not msg:
                    wrong[kind][str(status)] += 1
            return
        u -= args.bad
        if u < args.cold:
            kind, data = "cold", images.cold()
        elif u < args.cold + args.cached:
            with lock:
                data, _ = recent[rng.randrange(len(recent))]
            kind = "cached"
        else:
            with lock:
                _, iid = recent[rng.randrange(len(recent))]
            t = time.perf_counter()
            try:
                r = c.post(f"{url}/v1/images/{iid}/ground", json={"phrases": phrases})
            except httpx.TransportError as e:
                with lock:
                    failures.append(f"text-only: no answer ({type(e).__name__})")
                return
            lat["text-only"].append(time.perf_counter() - t)
            with lock:
                counts["text-only"] += 1
            check_good("text-only", r, phrases)
            return
        t = time.perf_counter()
        try:
            r = c.post(f"{url}/v1/ground", files={"image": (f"{kind}.jpg", data)}, data={"phrases": phrases})
        except httpx.TransportError as e:
            with lock:
                failures.append(f"{kind}: no answer ({type(e).__name__})")
            return
        dt = time.perf_counter() - t
        if r.status_code == 200:
            body = r.json()
            # what the server did decides the bucket (a "cached" image may have been evicted)
            bucket = "cached" if body["cached"] else "cold"
            lat[bucket].append(dt)
            if kind == "cold":
                with lock:
                    recent.append((data, body["image_id"]))
        with lock:
            counts[kind] += 1
        check_good(kind, r, phrases)

    def client_loop(i: int, n_requests: int, seed: int) -> int:
        rng = random.Random(seed * 1000 + i)
        n = 0
        with httpx.Client(timeout=120) as c:
            for _ in range(n_requests):
                if time.monotonic() > stop_at:
                    break
                one(c, rng)
                n += 1
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as ex:
        warm_done = sum(ex.map(lambda i: client_loop(i, args.warmup_requests, args.seed + 7919), range(args.clients)))
    warm_s += time.perf_counter() - t0
    warm_failures, warm_wrong = len(failures), sum(sum(v.values()) for v in wrong.values())
    lat.clear(); failures.clear(); wrong.clear(); counts.clear()  # noqa: E702
    rss_warm = rss_mb(server)
    stop_at = time.monotonic() + args.max_seconds

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as ex:
        done = list(ex.map(lambda i: client_loop(i, args.requests, args.seed), range(args.clients)))
    main_s = time.perf_counter() - t0
    rss_main = rss_mb(server)

    # 3. /health while 4 heavy requests run
    health_lat: list[float] = []
    for _ in range(args.health_rounds):
        heavy = [images.cold() for _ in range(4)]
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(httpx.post, f"{url}/v1/ground", files={"image": ("h.jpg", d)},
                              data={"phrases": ["the person"]}, timeout=120) for d in heavy]
            time.sleep(0.05)
            while not all(f.done() for f in futs):
                t = time.perf_counter()
                h = client.get(f"{url}/health")
                health_lat.append(time.perf_counter() - t)
                if h.status_code != 200:
                    failures.append(f"health: {h.status_code}")
                time.sleep(0.02)
            for f in futs:
                if f.result().status_code != 200:
                    failures.append(f"heavy: {f.result().status_code}")
    rss_end = rss_mb(server)
    final = client.get(f"{url}/health").json()

    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    summary = {k: {"n": len(v), "p50_ms": ms(pct(v, 50)), "p95_ms": ms(pct(v, 95))} for k, v in sorted(lat.items())}
    p50 = {k: pct(v, 50) for k, v in lat.items()}
    n_main = sum(done)
    n_bad = sum(v for k, v in counts.items() if k.startswith("bad:"))
    return {
        "server": {"backbone": methods["methods"][0]["backbone"], "method": methods["default"],
                   "workers": args.workers, "cache_mb": args.cache_mb, "cpu_count": os.cpu_count(),
                   "images": images.source},
        "warmup": {"cold_images": warm, "mixed_requests": warm_done, "seconds": round(warm_s, 1),
                   "good_failures": warm_failures, "bad_wrong_status": warm_wrong},
        "main": {"clients": args.clients, "requests_per_client": args.requests, "requests_done": n_main,
                 "seconds": round(main_s, 1), "requests_per_s": round(n_main / main_s, 1) if main_s else None,
                 "counts": dict(sorted(counts.items())), "latency": summary},
        "good_failures": len(failures), "failure_samples": failures[:10],
        "bad_requests": n_bad, "bad_wrong_status": {k: dict(v) for k, v in wrong.items()},
        "ratio_cold_vs_cached_p50": round(p50["cold"] / p50["cached"], 1) if p50.get("cold") and p50.get("cached") else None,
        "ratio_cold_vs_text_only_p50": round(p50["cold"] / p50["text-only"], 1) if p50.get("cold") and p50.get("text-only") else None,
        "health_under_4_heavy": {"n": len(health_lat), "p50_ms": ms(pct(health_lat, 50)), "p95_ms": ms(pct(health_lat, 95)),
                                 "max_ms": ms(max(health_lat) if health_lat else None)},
        "rss_mb": {"before": rss_before, "after_warmup": rss_warm, "after_main": rss_main, "end": rss_end,
                   "growth_after_warmup_pct": round(100 * (rss_end - rss_warm) / rss_warm, 1)},
        "cache_end": final["cache"], "lanes_end": final["lanes"], "health_start": health["status"],
    }


def print_report(r: dict[str, Any]) -> None:
    m = r["main"]
    print(f"\nclipground serve load test ({r['command']})")
    print(f"  server: {r['server']}")
    w = r["warmup"]
    print(f"  warm-up: {w['cold_images']} cold images, then {w['mixed_requests']} mixed requests, in {w['seconds']} s "
          f"(good failing: {w['good_failures']}, bad with a wrong status: {w['bad_wrong_status']})")
    print(f"  main: {m['clients']} clients, {m['requests_done']} requests in {m['seconds']} s = {m['requests_per_s']} req/s")
    for k, v in m["latency"].items():
        print(f"    {k:10s} n={v['n']:5d}  p50 {v['p50_ms']} ms  p95 {v['p95_ms']} ms")
    print(f"  good requests failing: {r['good_failures']}  {r['failure_samples'][:3]}")
    print(f"  bad requests: {r['bad_requests']}, with a wrong status or no message: {r['bad_wrong_status'] or 'none'}")
    print(f"  cold / cached p50: {r['ratio_cold_vs_cached_p50']}x   cold / text-only p50: {r['ratio_cold_vs_text_only_p50']}x")
    h = r["health_under_4_heavy"]
    print(f"  /health while 4 heavy requests run: n={h['n']} p50 {h['p50_ms']} ms, p95 {h['p95_ms']} ms, max {h['max_ms']} ms")
    s = r["rss_mb"]
    print(f"  server RSS MB: before {s['before']}, after warm-up {s['after_warmup']}, after main {s['after_main']}, "
          f"end {s['end']} ({s['growth_after_warmup_pct']:+.1f}% since warm-up)")
    print(f"  cache at end: {r['cache_end']}")
    print(f"  wall time: {r['wall_s']} s")


if __name__ == "__main__":
    main()
