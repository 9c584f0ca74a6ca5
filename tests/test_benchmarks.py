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


def _load():
    spec = importlib.util.spec_from_file_location("clipground_bench_run", RUN)
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


def test_readme_block_is_replaced(tmp_path):
    run = _load()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n## Speed\nintro\n{run.README_START}\nold\n{run.README_END}\nafter\n")
    run.update_readme(readme, "new table\n")
    assert readme.read_text() == f"# x\n## Speed\nintro\n{run.README_START}\nnew table\n{run.README_END}\nafter\n"
