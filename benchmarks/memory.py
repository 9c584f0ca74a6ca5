"""What the resident memory of one ``clipground predict`` is made of, step by step.

Runs the steps of ``clipground predict IMAGE PHRASE`` in this fresh process (import torch, the
CLI's imports, loading the grounder, proposals, ``set_image``, ``predict``), samples the
resident set size every millisecond, and prints the peak reached in each step, then what the
resident pages belong to at the end (``/proc/self/smaps``: the memory-mapped weights, the
heap, torch's and CUDA's shared libraries, ...). The model is the random-init CLIP ViT-B/32
of ``benchmarks/run.py`` unless ``--backbone`` names one. Linux only.

Usage::

    python benchmarks/memory.py                       # prints the table
    python benchmarks/memory.py --out results/memory.md

Shared-library pages count once they are touched, and how many the kernel maps around each
touch depends on what the page cache holds: the figures move by some tens of MiB between runs.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHOTO = REPO.parent / "shared" / "data" / "coco128" / "train2017" / "000000000009.jpg"

_phase = ["python"]
_peaks: dict[str, float] = {}
_stop = threading.Event()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _sample() -> None:
    while not _stop.is_set():
        r, p = _rss_mib(), _phase[0]
        if r > _peaks.get(p, 0.0):
            _peaks[p] = r
        time.sleep(0.001)


def _mappings() -> dict[str, float]:
    """Resident MiB per mapping name (anonymous memory as ``[anon]``)."""
    agg: collections.Counter[str] = collections.Counter()
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not line[0].isupper() or (len(parts) >= 5 and "-" in parts[0]):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                agg[name] += int(parts[1])
    return {k: v / 1024 for k, v in agg.items()}


def _group(path: str, weights: str) -> str:
    if path == weights:
        return "model weights (model.safetensors, memory-mapped)"
    if path in ("[heap]", "[anon]"):
        return "heap and anonymous memory (Python objects, tensors, allocator)"
    for key, label in (("/nvidia/", "CUDA libraries (torch's CUDA build; unused on a CPU)"),
                       ("libtorch_cuda", "CUDA libraries (torch's CUDA build; unused on a CPU)"),
                       ("/triton/", "triton (imported by torch._dynamo, which torchvision.ops imports)"),
                       ("/torch/", "torch's own libraries"), ("/cv2/", "OpenCV"),
                       ("/torchvision", "torchvision")):
        if key in path:
            return label
    return "other shared libraries and files"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default=None, help="CLIP directory (default: a random-init ViT-B/32)")
    ap.add_argument("--image", type=Path, default=PHOTO if PHOTO.is_file() else None)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="cg_mem_")
    backbone = args.backbone
    if backbone is None:  # built in another process, so this one holds only what predict holds
        backbone = str(Path(tmp.name) / "b32")
        subprocess.run([sys.executable, "-c", f"from clipground.testing import make_clip_b32; "
                        f"make_clip_b32({backbone!r})"], check=True, capture_output=True)
    _stop.clear()
    _peaks.clear()
    sampler = threading.Thread(target=_sample, daemon=True)
    sampler.start()
    steps: list[tuple[str, str]] = []

    def step(name: str, what: str) -> None:
        _phase[0] = name
        steps.append((name, what))

    step("import torch", "import torch")
    import torch  # noqa: F401

    step("CLI imports", "import clipground.cli.main (transformers, torchvision, OpenCV, typer, rich)")
    import clipground.cli.main  # noqa: F401
    from clipground.grounder import Grounder
    from clipground.images import load_image

    if args.image is None:
        sys.path.insert(0, str(HERE))
        import bench_set_image

        args.image = Path(tmp.name) / "photo.png"
        bench_set_image.generated_image().save(args.image)
    step("load grounder", "Grounder.load: model (weights memory-mapped, read on first use), processor")
    g = Grounder.load("zero-shot", backbone=backbone, proposals="selective-search")
    step("proposals", "decode the photo, selective search (100 boxes)")
    img = load_image(args.image)
    g.proposals(img, str(args.image))
    step("set_image", "set_image: proposals again, 200 crop/blur views through the image tower")
    g.set_image(args.image)
    step("predict", "predict: the text tower, the ranking")
    g.predict_batch(["the red cup"])
    _phase[0] = "end"
    time.sleep(0.01)
    _stop.set()
    sampler.join()
    maps = _mappings()
    weights = str(Path(backbone) / "model.safetensors")

    lines = [f"Command: `python benchmarks/memory.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`",
             "", f"Model: {backbone if args.backbone else 'random-init CLIP ViT-B/32'}; image: {args.image.name}; "
             f"torch {torch.__version__}.", "",
             "| step | what | peak RSS so far (MiB) | added by the step (MiB) |", "|---|---|---:|---:|"]
    prev = _peaks.get("python", 0.0)
    for name, what in steps:
        peak = max(_peaks.get(name, prev), prev)
        lines.append(f"| {name} | {what} | {peak:.0f} | {peak - prev:+.0f} |")
        prev = peak
    groups: collections.Counter[str] = collections.Counter()
    for path, mib in maps.items():
        groups[_group(path, weights)] += mib
    lines += ["", "Resident at the end, by what the pages belong to:", "", "| part | MiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in groups.most_common()]
    lines += ["", f"Peak RSS of the whole run: {max(_peaks.values()):.0f} MiB "
                  f"({max(_peaks.values()) * 2**20 / 1e9:.2f} GB)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from clipground.io import atomic_write

        atomic_write(args.out, text)
        print(f"wrote {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
