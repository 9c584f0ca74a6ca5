"""Evaluation outputs: ``metrics.json``, ``metrics.md``, ``predictions.jsonl`` and figures.

* ``metrics.json``: every number plus the protocol (method, backbone, proposals, IoU
  threshold, kept/dropped counts); :func:`load_result` reads it back.
* ``metrics.md``: Markdown tables, Acc@0.5 first.
* ``examples.png``: a grid of images, predicted box red, true box green, the expression
  as title, marked correct / wrong.
* ``metrics.png``: Acc@0.5 per bucket (length, spatial, type, split).

:func:`comparison_markdown` and :func:`plot_comparison` put several results side by side
(method x split x type), e.g. for the README results table.

Every file is written atomically (:mod:`clipground.io`).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write, save_figure
from .evaluate import EvalResult, item_to_json

#: Display names, in display order (Acc@0.5 first: the field's headline number).
METRIC_NAMES = {
    "acc@0.5": "Acc@0.5",
    "acc@0.75": "Acc@0.75",
    "miou": "mean IoU",
    "p@1": "P@1 (IoU>=0.5)",
    "p@5": "P@5 (IoU>=0.5)",
    "p@10": "P@10 (IoU>=0.5)",
    "proposal_recall@0.5": "proposal recall@0.5 (upper bound)",
    "mean_proposals": "proposals per image",
    "fallback_rate": "no-candidate fallbacks",
    "refused_rate": "refused phrases (scored as misses)",
    "count": "expressions scored",
}
_RATES = {"acc@0.5", "acc@0.75", "p@1", "p@5", "p@10", "proposal_recall@0.5", "fallback_rate", "refused_rate"}
BREAKDOWN_TITLES = {"length": "by expression length (words)", "spatial": "spatial vs non-spatial",
                    "type": "by expression type", "split": "by split", "split_type": "by split and type"}


def format_value(key: str, v: float) -> str:
    """Rates as percentages, mean IoU with 3 decimals, counts as integers."""
    if key in _RATES:
        return f"{100 * v:.1f}%"
    if key == "miou":
        return f"{v:.3f}"
    if key == "count":
        return str(int(v))
    return f"{v:.1f}"


def metric_rows(result: EvalResult) -> list[tuple[str, str]]:
    """``(display name, formatted value)`` of the overall metrics, Acc@0.5 first."""
    return [(METRIC_NAMES[k], format_value(k, result.metrics[k])) for k in METRIC_NAMES if k in result.metrics]


def breakdown_columns(result: EvalResult) -> list[str]:
    """Metric keys shown per bucket."""
    cols = ["acc@0.5", "acc@0.75", "miou"]
    if "proposal_recall@0.5" in result.metrics:
        cols.append("proposal_recall@0.5")
    return cols


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def describe_protocol(result: EvalResult) -> list[str]:
    """Lines stating how the numbers were obtained."""
    p, c = result.protocol, result.counts
    props = p.get("proposals")
    prop_txt = "none (method predicts boxes directly)" if not props else (
        props.get("name", "") + (f":{props['path']}" if props.get("path") else ""))
    lines = [
        f"method: {p.get('method', '')}",
        f"backbone: {p.get('backbone', '')}",
        f"proposals: {prop_txt}",
        f"hit criterion: {p.get('hit_criterion', 'IoU >= 0.5')}",
    ]
    ds = p.get("dataset")
    if ds:
        lines.append(f"data: {ds.get('path', '')} ({ds.get('format', '')}, split {ds.get('split') or 'all'}): "
                     f"kept {ds.get('kept')} items, dropped {ds.get('dropped')} whose image is missing"
                     + (f", {ds['invalid']} invalid" if ds.get("invalid") else "")
                     + (f", {ds['outside']} whose box lies outside the image" if ds.get("outside") else "")
                     + (f"; clipped {ds['clipped']} boxes to their image" if ds.get("clipped") else ""))
    lines.append(f"scored {c.get('scored', 0)} expressions on {c.get('images', 0)} images"
                 + (f"; {c['refused']} phrases the model refused, scored as misses" if c.get("refused") else "")
                 + (f"; {c['failed_items']} expressions on images that failed to load, not scored"
                    if c.get("failed_items") else ""))
    return lines


def metrics_markdown(result: EvalResult) -> str:
    """The report as Markdown: protocol, overall table (Acc@0.5 first), breakdown tables."""
    out = [f"# Evaluation: {result.label}", ""]
    out += [f"- {line}" for line in describe_protocol(result)]
    out += ["", _md_table(["metric", "value"], metric_rows(result)), ""]
    cols = breakdown_columns(result)
    for name, buckets in result.breakdown.items():
        out += [f"## {BREAKDOWN_TITLES.get(name, name)}", ""]
        rows = [[b, str(int(v["count"]))] + [format_value(k, v[k]) for k in cols if k in v] for b, v in buckets.items()]
        out += [_md_table(["bucket", "n"] + [METRIC_NAMES[k].split(" (")[0] for k in cols], rows), ""]
    if result.failures:
        out += ["## failures", ""]
        out += [f"- {f['image']}: {f['error']} ({f['items']} expressions)" for f in result.failures[:50]]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- files
def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        save_figure(fig, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- figures
def plot_metrics(result: EvalResult, path: str | os.PathLike) -> Path:
    """Bar chart of Acc@0.5 per bucket, one panel per breakdown."""
    plt = _pyplot()
    parts = [(k, v) for k, v in result.breakdown.items() if v and k != "split_type"]
    fig, axes = plt.subplots(1, max(1, len(parts)), figsize=(3.6 * max(1, len(parts)), 3.4), squeeze=False)
    for ax, (name, buckets) in zip(axes[0], parts):
        names = list(buckets)
        vals = [100 * buckets[b]["acc@0.5"] for b in names]
        bars = ax.bar(range(len(names)), vals, color="#4c72b0")
        ax.set_xticks(range(len(names)), [f"{b}\n(n={int(buckets[b]['count'])})" for b in names], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(BREAKDOWN_TITLES.get(name, name), fontsize=9)
        ax.set_ylabel("Acc@0.5 (%)")
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    if not parts:
        axes[0][0].text(0.5, 0.5, "no scored expressions", ha="center")
    fig.suptitle(f"{result.label}: Acc@0.5 {100 * result.metrics.get('acc@0.5', 0):.1f}% "
                 f"(n={int(result.metrics.get('count', 0))})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    _save_fig(fig, path)
    return path


def plot_examples(result: EvalResult, path: str | os.PathLike, max_side: int = 384) -> Path | None:
    """Grid of example images: predicted box red, true box green, title = expression + verdict.

    Returns ``None`` (and writes nothing) when the result has no picked examples.
    """
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ..images import load_image
    from ..viz import GT_COLOR, PRED_COLOR

    picks = [result.items[i] for i in result.examples if i < len(result.items)]
    if not picks:
        return None
    plt = _pyplot()
    ncols = min(4, len(picks))
    nrows = (len(picks) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    cache: dict[str, tuple[Image.Image, float]] = {}
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, picks):
        if it.image not in cache:
            try:
                img = load_image(it.image)
            except Exception:  # an example image that vanished must not break the report
                continue
            scale = min(1.0, max_side / max(img.size))
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            cache[it.image] = (img, scale)
        img, scale = cache[it.image]
        ax.imshow(img)
        for box, color in ((it.target, GT_COLOR), (it.box, PRED_COLOR)):
            if not box:  # a refused phrase has no predicted box
                continue
            x1, y1, x2, y2 = (v * scale for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, edgecolor=[c / 255 for c in color]))
        verdict = "refused" if it.refused else "correct" if it.correct else "wrong"
        title = textwrap.shorten(it.expression, 70, placeholder="...")
        ax.set_title("\n".join(textwrap.wrap(f"[{verdict}, IoU {it.iou:.2f}] {title}", 34)), fontsize=7,
                     color="#1a7f37" if it.correct else "#c0392b")
    fig.suptitle(f"{result.label}: red = predicted, green = ground truth", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    _save_fig(fig, path)
    return path


# --------------------------------------------------------------------------- writing a run
def write_report(result: EvalResult, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md``, ``predictions.jsonl`` (and the PNGs) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics.json": out / "metrics.json", "metrics.md": out / "metrics.md"}
    atomic_write(files["metrics.json"], json.dumps(result.to_json(), indent=2, sort_keys=False) + "\n")
    atomic_write(files["metrics.md"], metrics_markdown(result) + "\n")
    if result.items:
        files["predictions.jsonl"] = out / "predictions.jsonl"
        atomic_write(files["predictions.jsonl"], "".join(json.dumps(item_to_json(it)) + "\n" for it in result.items))
    if plots:
        files["metrics.png"] = plot_metrics(result, out / "metrics.png")
        ex = plot_examples(result, out / "examples.png")
        if ex is not None:
            files["examples.png"] = ex
    return files


def load_result(path: str | os.PathLike) -> EvalResult:
    """Read a ``metrics.json`` (or the folder holding it) back into an :class:`EvalResult`."""
    from ..errors import BadAnnotationError

    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    try:
        return EvalResult.from_json(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise BadAnnotationError(f"cannot read evaluation results from {p} ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- comparisons
def comparison_rows(results: Sequence[EvalResult], metric: str = "acc@0.5") -> tuple[list[str], list[dict[str, Any]]]:
    """Rows ``{method, split, n, all, <type>...}`` (values are fractions or None) and the type columns.

    One row per result and split: a result covering several splits gives one row per split.
    """
    types: list[str] = []
    for r in results:
        for t in r.breakdown.get("type", {}):
            if t not in types:
                types.append(t)
    rows = []
    for r in results:
        split_buckets = r.breakdown.get("split")
        if split_buckets:
            for s, v in split_buckets.items():
                st = r.breakdown.get("split_type", {})
                row = {"method": r.label, "split": s, "n": int(v["count"]), "all": v.get(metric)}
                for t in types:
                    row[t] = st.get(f"{s}/{t}", {}).get(metric)
                rows.append(row)
        else:
            splits = r.splits
            row = {"method": r.label, "split": splits[0] if len(splits) == 1 else "-",
                   "n": int(r.metrics.get("count", 0)), "all": r.metrics.get(metric)}
            for t in types:
                row[t] = r.breakdown.get("type", {}).get(t, {}).get(metric)
            rows.append(row)
    return types, rows


def comparison_markdown(results: Sequence[EvalResult], metric: str = "acc@0.5") -> str:
    """A Markdown table, method x split rows and overall + per-type columns of ``metric``."""
    types, rows = comparison_rows(results, metric)
    name = METRIC_NAMES.get(metric, metric).split(" (")[0]
    header = ["method", "split", "n", f"{name} all"] + [f"{name} {t}" for t in types]
    body = [[r["method"], r["split"], str(r["n"])] + ["-" if r[c] is None else format_value(metric, r[c])
                                                      for c in ["all"] + types] for r in rows]
    return _md_table(header, body)


def plot_comparison(results: Sequence[EvalResult], path: str | os.PathLike, metric: str = "acc@0.5") -> Path:
    """Grouped bar chart: one group per column (all, types), one bar per method x split row."""
    plt = _pyplot()
    types, rows = comparison_rows(results, metric)
    cols = ["all"] + types
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(cols) * max(1, len(rows)) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(rows))
    scale = 100 if metric in _RATES else 1
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        vals = [scale * r[c] if r[c] is not None else 0 for c in cols]
        ax.bar(xs, vals, width, label=f"{r['method']} ({r['split']})")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric) + (" (%)" if scale == 100 else ""))
    if scale == 100:
        ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    _save_fig(fig, path)
    return path
