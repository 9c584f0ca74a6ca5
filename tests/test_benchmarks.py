"""CI smoke run of the benchmark suite: every figure is produced (timings are not checked)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _load(path: Path = RUN, name: str = "clipground_bench_run"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_suite_smoke_tiny_quick(tmp_path):
    run = _load()
    out = tmp_path / "bench.md"
    assert run.main(["--model", "tiny", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("set_image K=32", "fastest mode", "image tower batch 1", "image tower batch 32",
                   "text tower batch 32", "per phrase", "5 phrases, one image", "eval, 3 images",
                   "training epoch", "Peak RSS", "parity"):
        assert needle in text, needle
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(r["ratio"] > 0 and math.isfinite(r["ratio"]) for r in data["rows"])
    assert all(v < 1e-4 for v in data["facts"]["onnx_fp32_max_abs_diff"].values())
    assert data["facts"]["batched_eval_same_answers"] is True
    assert set(data["facts"]["peak_rss_bytes"]) == {"eager", "onnxruntime int8"}
    assert (tmp_path / "bench.png").stat().st_size > 0
    if importlib.util.find_spec("ray") is not None:  # the dev extra installs it
        assert "2 Ray workers" in text and "Ray workers vs 1 process" in text
        assert data["facts"]["ray_eval_same_answers"] is True


def test_readme_block_is_replaced(tmp_path):
    run = _load()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n## Speed\nintro\n{run.README_START}\nold\n{run.README_END}\nafter\n")
    run.update_readme(readme, "new table\n")
    assert readme.read_text() == f"# x\n## Speed\nintro\n{run.README_START}\nnew table\n{run.README_END}\nafter\n"


def test_memory_breakdown_smoke(tiny_clip_dir, tmp_path):
    mem = _load(RUN.parent / "memory.py", "clipground_bench_memory")
    out = tmp_path / "memory.md"
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 40)).save(tmp_path / "im.png")
    assert mem.main(["--backbone", str(tiny_clip_dir), "--image", str(tmp_path / "im.png"), "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("| import torch |", "| set_image |", "| predict |", "model weights", "Peak RSS of the whole run"):
        assert needle in text, needle
