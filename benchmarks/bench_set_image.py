"""Benchmark: why ``set_image`` once + ``predict`` per phrase beats re-encoding per phrase.

On one real photo (COCO128; a generated 640x480 image when the data is missing) with a
randomly initialized CLIP ViT-B/32 (the real model's compute; no weights are needed for
timing), the zero-shot method and exactly 32 selective-search proposals, it measures in
one run:

* ``set_image``: proposals + rendering every proposal view + encoding them (once per image);
* ``predict``: one phrase against the cached features, median over distinct phrases (text
  embeddings are memoized per phrase, so every timed phrase is new);
* the naive loop a user would write without the split: for each phrase re-render and
  re-encode every proposal view, encode the text, score;
* the ratio naive / predict (PASS when >= 10x) and peak memory (``tracemalloc`` for Python
  objects, measured in a separate pass so it does not slow the timings, and
  ``getrusage`` max RSS for the whole process, which includes torch's tensors).

Usage::

    python benchmarks/bench_set_image.py [--image PATH] [--phrases 20] [--naive-phrases 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipground.backbone import ClipBackbone
from clipground.grounder import Grounder
from clipground.backbone.views import render_views
from clipground.images import load_image
from clipground.methods.zero_shot import ZeroShotConfig, ZeroShotScorer
from clipground.proposals import SelectiveSearch
from clipground.testing import make_clip_b32
from clipground.io import write_json

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "coco128" / "train2017" / "000000000009.jpg"
NUM_PROPOSALS = 32
MIN_SPEEDUP = 10.0

# Distinct, mostly non-spatial phrases (spatial ones would add the relation resolver's own
# noun-phrase encodings, which is not what this benchmark isolates).
PHRASES = [
    "a bowl of broccoli", "the orange slices", "a white plate", "the green vegetables", "a glass of water",
    "the wooden table", "a piece of bread", "the dark container", "a small spoon", "the yellow food",
    "a bright red tomato", "the round dish", "a napkin", "the lunch box", "some rice",
    "a carrot stick", "the pink dessert", "a cup of coffee", "the metal fork", "a slice of cake",
    "the blue tray", "a green apple", "the cheese", "a sandwich", "the meat",
]


def generated_image(w: int = 640, h: int = 480) -> Image.Image:
    """A deterministic photo-sized stand-in with a few solid shapes on a noisy background."""
    rs = np.random.RandomState(0)
    im = Image.fromarray((rs.rand(h, w, 3) * 60 + 90).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for i in range(8):
        x, y = rs.randint(0, w - 120), rs.randint(0, h - 120)
        d.rectangle([x, y, x + rs.randint(30, 120), y + rs.randint(30, 120)], fill=tuple(int(c) for c in rs.randint(0, 255, 3)))
    return im


def naive_predict(backbone: ClipBackbone, image: Image.Image, boxes: torch.Tensor, phrase: str,
                  views: tuple[str, ...], prompt: str) -> tuple[list[float], float]:
    """What grounding costs without the split: render + encode every view, per phrase."""
    with torch.inference_mode():
        rendered = render_views(image, boxes, views)
        imgs = [im for k in views for im in rendered[k]]
        emb = backbone.encode_images(imgs).embeds.reshape(len(views), len(boxes), -1)
        text = backbone.encode_texts([prompt.format(phrase)]).embeds  # no memo: a fresh encoding
        sims = torch.einsum("vkd,td->tk", emb, text)[0] / len(views)
        best = int(sims.argmax())
    return boxes[best].tolist(), float(sims[best])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=None, help="photo to use (default: a COCO128 photo)")
    ap.add_argument("--phrases", type=int, default=20, help="distinct phrases timed for predict")
    ap.add_argument("--naive-phrases", type=int, default=3, help="phrases timed for the naive loop (each is slow)")
    ap.add_argument("--set-image-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phrases + 1 > len(PHRASES) or args.naive_phrases > args.phrases:
        ap.error(f"--phrases must be < {len(PHRASES)} and >= --naive-phrases")

    path = args.image or (DEFAULT_PHOTO if DEFAULT_PHOTO.is_file() else None)
    image = load_image(path) if path is not None else generated_image()
    source = str(path) if path is not None else "generated 640x480 (shared data missing)"

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ckpt = make_clip_b32(Path(tempfile.mkdtemp(prefix="cg_b32_")) / "clip")
    backbone = ClipBackbone.from_pretrained(ckpt)
    method = ZeroShotScorer(backbone, ZeroShotConfig())
    g = Grounder(method, SelectiveSearch(top_k=NUM_PROPOSALS))
    views, prompt = tuple(method.config.views), method.config.prompt

    # --- set_image (first call is the warm-up)
    g.set_image(image)
    n_props = len(g.state.proposals)
    if n_props != NUM_PROPOSALS:
        print(f"error: selective search gave {n_props} proposals, need exactly {NUM_PROPOSALS}", file=sys.stderr)
        return 2
    set_times, set_cpu = [], []
    for _ in range(args.set_image_repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        g.set_image(image)
        set_times.append(time.perf_counter() - t0)
        set_cpu.append(time.process_time() - c0)
    boxes = g.state.proposals.boxes

    # --- predict: a warm-up phrase, then distinct new phrases (none in the text memo)
    warm, timed = PHRASES[0], PHRASES[1 : 1 + args.phrases]
    g.predict(warm)
    pred_times, pred_cpu, preds = [], [], {}
    for p in timed:
        assert p not in backbone._text_cache, "a timed phrase must not be memoized"
        t0, c0 = time.perf_counter(), time.process_time()
        preds[p] = g.predict(p)
        pred_times.append(time.perf_counter() - t0)
        pred_cpu.append(time.process_time() - c0)

    # --- naive loop on new phrases (encoders are already warm from set_image / predict)
    naive_times, naive_cpu, agree = [], [], 0
    for p in timed[: args.naive_phrases]:
        t0, c0 = time.perf_counter(), time.process_time()
        box, _ = naive_predict(backbone, image, boxes, p, views, prompt)
        naive_times.append(time.perf_counter() - t0)
        naive_cpu.append(time.process_time() - c0)
        agree += int(np.allclose(box, preds[p].box))

    # --- memory, in its own pass (tracemalloc slows Python code down)
    tracemalloc.start()
    g.set_image(image)
    g.predict("a phrase only for the memory pass")
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    set_med, pred_med, naive_med = statistics.median(set_times), statistics.median(pred_times), statistics.median(naive_times)
    med_cpu = {k: statistics.median(v) for k, v in (("set_image", set_cpu), ("predict", pred_cpu), ("naive", naive_cpu))}
    speedup = naive_med / pred_med
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ok = speedup >= MIN_SPEEDUP
    res = {
        "image": source,
        "image_size": list(image.size),
        "backbone": "random-init CLIP ViT-B/32 (openai/clip-vit-base-patch32 architecture)",
        "method": "zero-shot",
        "views": list(views),
        "proposals": n_props,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load,
        "process_cpu_s_median": med_cpu,
        "set_image_s": {"median": set_med, "all": set_times},
        "predict_s": {"median": pred_med, "min": min(pred_times), "max": max(pred_times), "n_phrases": len(pred_times)},
        "naive_per_phrase_s": {"median": naive_med, "all": naive_times},
        "speedup_naive_over_predict": speedup,
        "naive_agrees_with_predict": f"{agree}/{len(naive_times)}",
        "pass": ok,
        "python_peak_bytes_tracemalloc": py_peak,
        "process_max_rss_bytes": rss,
    }

    print(f"image: {source} ({image.size[0]}x{image.size[1]}); CLIP ViT-B/32 (random init), zero-shot, "
          f"views={','.join(views)}, {n_props} proposals, {torch.get_num_threads()} torch threads")
    print(f"{'step':<32}{'wall median':>13}{'CPU median':>13}   notes")
    print(f"{'set_image (once per image)':<32}{set_med * 1e3:>11.1f}ms{med_cpu['set_image'] * 1e3:>11.1f}ms"
          f"   {len(set_times)} runs after a warm-up")
    print(f"{'predict (per new phrase)':<32}{pred_med * 1e3:>11.1f}ms{med_cpu['predict'] * 1e3:>11.1f}ms"
          f"   {len(pred_times)} phrases, wall {min(pred_times) * 1e3:.1f}-{max(pred_times) * 1e3:.1f} ms")
    print(f"{'naive re-encode (per phrase)':<32}{naive_med * 1e3:>11.1f}ms{med_cpu['naive'] * 1e3:>11.1f}ms"
          f"   {len(naive_times)} phrases, same top box as predict {agree}/{len(naive_times)}")
    print(f"CPU time counts all threads; 1-min load average during the run: {load:.1f} on {os.cpu_count()} cores")
    print(f"speedup naive / predict: {speedup:.1f}x (need >= {MIN_SPEEDUP:.0f}x): {'PASS' if ok else 'FAIL'}")
    print(f"peak Python memory (tracemalloc): {py_peak / 2**20:.1f} MiB; process max RSS: {rss / 2**20:.0f} MiB")
    if args.json:
        write_json(args.json, res, sort_keys=False)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
