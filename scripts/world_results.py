#!/usr/bin/env python
"""The synthetic-world results table: one command, README-ready Markdown and a PNG.

    python scripts/world_results.py [--config configs/world_results.yaml] [--world runs/world-v2]
        [--out results/world] [--only NAME ...] [--limit N] [--update-readme]

1. Makes sure the config's synthetic world (its ``world`` section, default ``WorldConfig()``)
   exists in ``--world``.
2. Evaluates every entry of the config (a training-free method on a backbone, or a trained
   method directory) on the world's ``test`` and ``compositional`` splits with
   :func:`clipground.evaluation.evaluate`; a trained entry whose directory does not exist
   yet is listed as "not trained yet: <command>" and skipped.
3. Writes to ``--out``: the full evaluation report of every entry and split
   (``OUT/<entry>/<split>/``, :func:`~clipground.evaluation.write_report`),
   ``world_results.json``, ``world_results.md`` (entry x split rows; Acc@0.5 overall and by
   expression type, mean IoU, proposal recall@0.5), ``world_results.png`` (grouped bars by
   type) and copies of trained entries' learning curves.
4. With ``--update-readme``, replaces the block between ``<!-- WORLD-RESULTS:BEGIN -->`` and
   ``<!-- WORLD-RESULTS:END -->`` in README.md (inserted after ``<!-- RESULTS -->`` when absent).

A finished entry/split is not evaluated again while nothing it depends on changed (the
entry, the world, ``--limit``, the checkpoint files and the clipground source); so a killed
run resumes, and ``--only NEW_ENTRY`` adds one row while the table keeps the other current
rows. ``--force`` re-evaluates everything selected.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from clipground.data.jsonl import read_jsonl
from clipground.data.world import TYPES, WorldConfig, ensure_world, load_world_config
from clipground.errors import ClipgroundError
from clipground.evaluation import EvalResult, evaluate, load_result, write_report
from clipground.evaluation.report import format_value
from clipground.io import atomic_write, save_figure

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path("configs/world_results.yaml")
DEFAULT_WORLD = Path("runs/world-v2")
DEFAULT_OUT = Path("results/world")
DEFAULT_SPLITS = ("test", "compositional", "new-look", "paraphrase")
BEGIN, END, ANCHOR = "<!-- WORLD-RESULTS:BEGIN -->", "<!-- WORLD-RESULTS:END -->", "<!-- RESULTS -->"
CURVE_NAMES = ("learning_curve.png",)
_ENTRY_KEYS = {"name", "method", "backbone", "dir", "proposals", "options", "runtime", "train_command", "main"}
RUNTIMES = ("torch", "onnx")


class WorldResultsError(ClipgroundError):
    """The results config, a command-line argument or the README is unusable."""


# --------------------------------------------------------------------------- config
@dataclass
class Entry:
    """One row group of the table: a training-free method on a backbone, or a trained method dir.

    Attributes:
        name: row label (unique in the config).
        method: registered method name (training-free entries).
        backbone: CLIP checkpoint of a ``method`` entry.
        dir: directory saved by ``clipground train`` (``Grounder.from_pretrained``).
        proposals: ``gt`` (the world's ``instances_{split}.json``), or any ``--proposals`` spec;
            ``None``: selective search for ``method`` entries, as trained for ``dir`` entries.
        options: method config fields of a ``method`` entry; for a ``dir`` entry, the trained
            method's inference options only (e.g. the fusion regressor's ``tta``).
        runtime: what runs a ``method`` entry's CLIP towers: ``torch``, or ``onnx`` (``backbone`` is
            then a ``clipground export onnx`` directory).
        train_command: how to create ``dir`` (or an ``onnx`` entry's ``backbone``), shown while it
            does not exist.
        main: the method's row in the main table (its best configuration; one per method); the
            full table with every entry (ablations, older configurations) is ``world_results.md``.
    """

    name: str
    method: str | None = None
    backbone: str | None = None
    dir: str | None = None
    proposals: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"
    train_command: str | None = None
    main: bool = False

    @property
    def slug(self) -> str:
        """File-system-safe form of the name (the entry's report folder)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "entry"


def parse_config(data: Any, source: str = "config") -> tuple[list[str], list[Entry]]:
    """Splits and entries of a parsed config; raises :class:`WorldResultsError` on mistakes."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise WorldResultsError(f"{source}: expected a mapping with an 'entries' list")
    splits = data.get("splits", list(DEFAULT_SPLITS))
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise WorldResultsError(f"{source}: 'splits' must be a non-empty list of split names")
    entries: list[Entry] = []
    for i, d in enumerate(data["entries"]):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"].strip():
            raise WorldResultsError(f"{source}: entry {i + 1} needs a 'name'")
        unknown = set(d) - _ENTRY_KEYS
        if unknown:
            raise WorldResultsError(f"{source}: entry {d['name']!r} has unknown key(s) {sorted(unknown)}; "
                                    f"known: {sorted(_ENTRY_KEYS)}")
        e = Entry(**{k: v for k, v in d.items()})
        e.options = dict(e.options or {})
        if (e.method is None) == (e.dir is None):
            raise WorldResultsError(f"{source}: entry {e.name!r} needs exactly one of 'method' or 'dir'")
        if e.method is not None and not e.backbone:
            raise WorldResultsError(f"{source}: entry {e.name!r} needs a 'backbone'")
        if e.runtime not in RUNTIMES or (e.runtime != "torch" and e.method is None):
            raise WorldResultsError(f"{source}: entry {e.name!r}: 'runtime' must be one of {', '.join(RUNTIMES)} "
                                    f"(onnx only for a 'method' entry)")
        if not isinstance(e.main, bool):
            raise WorldResultsError(f"{source}: entry {e.name!r}: 'main' must be true or false")
        entries.append(e)
    for attr in ("name", "slug"):
        seen = [getattr(e, attr) for e in entries]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise WorldResultsError(f"{source}: entry names must be unique (and differ in more than punctuation): {dup}")
    return splits, entries


def world_config(path: str | os.PathLike) -> WorldConfig:
    """The world a results config is evaluated on: its ``world`` mapping of
    :class:`~clipground.data.world.WorldConfig` fields (default: ``WorldConfig()``)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        return WorldConfig.from_json(data.get("world") or {})
    except (OSError, yaml.YAMLError) as e:
        raise WorldResultsError(f"cannot read results config {p}: {e}") from None
    except (ClipgroundError, TypeError) as e:
        raise WorldResultsError(f"{p}: bad 'world' section ({e})") from None


def load_config(path: str | os.PathLike) -> tuple[list[str], list[Entry]]:
    """Read the YAML list of entries (see ``configs/world_results.yaml``)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise WorldResultsError(f"cannot read results config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise WorldResultsError(f"{p} is not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_config(data, str(p))


def proposal_spec(entry: Entry, split: str, world: Path) -> str | None:
    """The ``--proposals`` spec of an entry on one split (``gt`` means that split's own boxes)."""
    spec = entry.proposals
    if spec is None:
        return "selective-search" if entry.method is not None else None
    if spec == "gt":
        return f"gt:{world / f'instances_{split}.json'}"
    return spec.replace("{split}", split)


# --------------------------------------------------------------------------- fingerprints
def _dir_stamp(path: Path) -> list[list[Any]]:
    """``[relpath, size, mtime_ns]`` of every file under ``path`` (changes when a checkpoint does)."""
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def _checkpoint_stamp(ref: str | None) -> Any:
    """Stamp of a backbone reference: its files when local or bundled, else the hub id."""
    if not ref:
        return None
    from clipground.backbone import BUNDLED

    p = Path(BUNDLED.get(ref, ref)).expanduser()
    return _dir_stamp(p) if p.is_dir() else ref


_SOURCE_HASH: str | None = None


def source_hash() -> str:
    """Hash of the installed clipground source: results of changed code are never reused."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        import clipground

        root = Path(clipground.__file__).parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE_HASH = h.hexdigest()
    return _SOURCE_HASH


def entry_dir(entry: Entry) -> Path:
    """A trained entry's directory: a bundled name (``clipground/world-<method>``) is the shipped copy."""
    from clipground.backbone.hub import bundled_grounder_dir

    return bundled_grounder_dir(str(entry.dir)) or Path(str(entry.dir))


def fingerprint(entry: Entry, split: str, world: Path, limit: int | None, backbone_override: str | None) -> str:
    """Everything an entry/split result depends on, hashed."""
    if entry.dir is not None:
        d = entry_dir(entry)
        ckpt: Any = _dir_stamp(d)
        try:
            ckpt = [ckpt, _checkpoint_stamp(json.loads((d / "grounder.json").read_text())["backbone"])]
        except (OSError, ValueError, KeyError):
            pass
    else:
        ckpt = _checkpoint_stamp(backbone_override or entry.backbone)
    world_sha = hashlib.sha256((world / "world.json").read_bytes()).hexdigest()
    data = {"entry": asdict(entry), "split": split, "limit": limit, "world": world_sha,
            "backbone_override": backbone_override if entry.method else None, "checkpoint": ckpt,
            "source": source_hash(), "proposals": proposal_spec(entry, split, world)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- evaluation
@dataclass
class Outcome:
    """What happened to one entry: ``ok``, ``not-trained``, ``skipped`` or ``error``."""

    entry: Entry
    status: str
    message: str = ""
    results: dict[str, EvalResult] = field(default_factory=dict)
    reports: dict[str, Path] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    curve: Path | None = None


def _report_dir(out: Path, entry: Entry, split: str) -> Path:
    return out / entry.slug / split


def cached_result(out: Path, entry: Entry, split: str, fp: str) -> EvalResult | None:
    """The stored result of this entry/split if its fingerprint matches, else ``None``."""
    d = _report_dir(out, entry, split)
    try:
        if json.loads((d / "fingerprint.json").read_text())["fingerprint"] != fp:
            return None
        return load_result(d)
    except (OSError, ValueError, KeyError, TypeError, ClipgroundError):
        return None


class _Builder:
    """Builds grounders, sharing loaded backbones between training-free entries."""

    def __init__(self, backbone_override: str | None):
        self.override = backbone_override
        self.backbones: dict[str, Any] = {}
        self.sources: dict[str, Any] = {}

    def proposals(self, spec: str | None) -> Any:
        """One source per spec for the whole run, each image's boxes computed once (selective search
        is deterministic, so entries sharing a spec see exactly the boxes they would alone)."""
        from clipground.proposals import get_proposals

        if spec is None:
            return None
        if spec not in self.sources:
            self.sources[spec] = get_proposals(spec).memoized()
        return self.sources[spec]

    def __call__(self, entry: Entry, proposals: str | None) -> Any:
        from clipground.backbone import ClipBackbone
        from clipground.grounder import Grounder
        from clipground.methods import get_method_class

        if entry.dir is not None:
            return Grounder.from_pretrained(entry.dir, proposals=self.proposals(proposals), options=entry.options)
        get_method_class(entry.method)  # an unknown name fails before any checkpoint is loaded
        ref = self.override or entry.backbone
        key = (ref, entry.runtime)
        if key not in self.backbones:
            self.backbones[key] = ClipBackbone.from_pretrained(ref, runtime=entry.runtime)
        return Grounder.load(entry.method, backbone=self.backbones[key], proposals=self.proposals(proposals),
                             **entry.options)


def find_curve(entry: Entry) -> Path | None:
    """A trained entry's learning-curve PNG (in its dir or the run dir above it)."""
    if entry.dir is None:
        return None
    d = entry_dir(entry)
    for folder in (d, d.parent):
        for name in CURVE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def run_entry(entry: Entry, splits: Sequence[str], world: Path, out: Path, build: _Builder, *, limit: int | None,
              evaluate_missing: bool, force: bool, progress: bool, console: Console, plots: bool = True) -> Outcome:
    """Evaluate (or reuse) one entry on every split; never raises a :class:`ClipgroundError`."""
    if entry.dir is not None and not entry_dir(entry).is_dir():
        cmd = entry.train_command or f"clipground train ... --out {Path(entry.dir).parent}"
        return Outcome(entry, "not-trained", f"not trained yet: {cmd}")
    if entry.runtime == "onnx" and not Path(str(entry.backbone)).is_dir():
        cmd = entry.train_command or f"clipground export onnx ... --out {entry.backbone}"
        return Outcome(entry, "not-trained", f"not exported yet: {cmd}")
    outcome = Outcome(entry, "ok", curve=find_curve(entry))
    grounder = None
    try:
        for split in splits:
            fp = fingerprint(entry, split, world, limit, build.override)
            res = None if force else cached_result(out, entry, split, fp)
            if res is not None:
                outcome.results[split], outcome.reused[split] = res, True
                outcome.reports[split] = _report_dir(out, entry, split)
                console.print(f"  {split}: reused {_report_dir(out, entry, split)} "
                              f"(Acc@0.5 {format_value('acc@0.5', res.metrics['acc@0.5'])})")
                continue
            if not evaluate_missing:
                return Outcome(entry, "skipped", "not selected by --only and no current result to reuse")
            records = read_jsonl(world / f"{split}.jsonl")[: limit or None]
            spec = proposal_spec(entry, split, world)
            if grounder is None:
                try:
                    grounder = build(entry, spec)
                except (ValueError, TypeError) as e:  # e.g. an option value the method rejects
                    raise WorldResultsError(f"cannot build entry {entry.name!r}: {e}") from None
            elif grounder.method.uses_proposals and spec is not None:
                grounder.proposals = build.proposals(spec)
            console.print(f"  {split}: {len(records)} expressions ...")
            res = evaluate(grounder, records, progress=progress, label=entry.name)
            d = _report_dir(out, entry, split)
            write_report(res, d, plots=plots)
            atomic_write(d / "fingerprint.json", json.dumps({"fingerprint": fp}) + "\n")
            outcome.results[split], outcome.reused[split], outcome.reports[split] = res, False, d
            failed = res.counts.get("failed_items", 0)
            console.print(f"  {split}: Acc@0.5 {format_value('acc@0.5', res.metrics['acc@0.5'])} "
                          f"in {res.timing.get('seconds', 0):.1f} s -> {d}"
                          + (f" [yellow]({failed} expressions failed, see metrics.md)[/yellow]" if failed else ""))
    except ClipgroundError as e:
        return Outcome(entry, "error", str(e))
    finally:
        del grounder
        gc.collect()
    return outcome


# --------------------------------------------------------------------------- table, figure, text
def table_rows(outcomes: Sequence[Outcome], splits: Sequence[str]) -> list[dict[str, Any]]:
    """One row per evaluated entry x split: ``acc``, per-type ``acc``, ``miou``, ``recall``, ``n``."""
    rows = []
    for o in outcomes:
        for split in splits:
            r = o.results.get(split)
            if r is None:
                continue
            types = r.breakdown.get("type", {})
            rows.append({
                "name": o.entry.name, "split": split, "n": int(r.metrics.get("count", 0)),
                "acc": r.metrics.get("acc@0.5"),
                "types": {t: types[t]["acc@0.5"] if t in types else None for t in TYPES},
                "type_n": {t: int(types[t]["count"]) if t in types else 0 for t in TYPES},
                "miou": r.metrics.get("miou"),
                "recall": r.metrics.get("proposal_recall@0.5"),
            })
    return rows


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: Acc@0.5 overall and by type (the type columns), mean IoU, proposal recall (ceiling)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else format_value("acc@0.5", v)

    head = ["method", "split", "n", "Acc@0.5"] + list(TYPES) + ["mean IoU", "proposal recall@0.5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [r["name"], r["split"], str(r["n"]), f"**{pct(r['acc'])}**"] + [pct(r["types"][t]) for t in TYPES]
        cells += ["-" if r["miou"] is None else format_value("miou", r["miou"]), pct(r["recall"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(rows: Sequence[dict[str, Any]], outcomes: Sequence[Outcome], splits: Sequence[str]) -> str:
    """Markdown: one row per ``main`` entry (a method's best configuration), Acc@0.5 on each split,
    the ``new-look`` minus ``test`` gap and the mean IoU on ``test``."""
    def pct(v: float | None) -> str:
        return "-" if v is None else format_value("acc@0.5", v)

    cell = {(r["name"], r["split"]): r for r in rows}
    gap = "test" in splits and "new-look" in splits
    head = ["method (configuration)"] + [f"{s}" for s in splits] + (["new-look - test"] if gap else [])
    head += ["mean IoU (test)"] if "test" in splits else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]
    for o in outcomes:
        if not o.entry.main:
            continue
        accs = [cell[(o.entry.name, s)]["acc"] if (o.entry.name, s) in cell else None for s in splits]
        cells = [o.entry.name] + [pct(a) for a in accs]
        if gap:
            t, n = accs[list(splits).index("test")], accs[list(splits).index("new-look")]
            cells.append("-" if t is None or n is None else f"{100 * (n - t):+.1f}")
        if "test" in splits:
            r = cell.get((o.entry.name, "test"))
            cells.append("-" if r is None or r["miou"] is None else format_value("miou", r["miou"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], splits: Sequence[str], path: Path) -> Path:
    """Grouped bars, one panel per split: groups = overall + expression types, one bar per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["all"] + list(TYPES)
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.0), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(names))
    for ax, split in zip(axes[0], splits):
        by_name = {r["name"]: r for r in rows if r["split"] == split}
        for i, name in enumerate(names):
            r = by_name.get(name)
            if r is None:
                continue
            vals = [r["acc"]] + [r["types"][t] for t in TYPES]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            ax.bar([x for x, v in zip(xs, vals) if v is not None], [100 * v for v in vals if v is not None], width,
                   color=cmap(i % 10), label=name)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, 100)
        ax.set_title(f"{split}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if not by_name:
            ax.text(len(groups) / 2 - 0.5, 50, "no results", ha="center")
    axes[0][0].set_ylabel("Acc@0.5 (%)")
    if names:
        handles = {}
        for ax in axes[0]:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.suptitle("Synthetic world: Acc@0.5 by expression type", fontsize=11)
    fig.tight_layout()
    if names:
        fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(names)), fontsize=8, frameon=False)
    try:
        save_figure(fig, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def world_description(world: Path, splits: Sequence[str], limit: int | None, backbones: Sequence[str] = ()) -> str:
    """Seed, image size, held-out pairs and per-split counts of the world, the backbones (no dates)."""
    w = json.loads((world / "world.json").read_text(encoding="utf-8"))
    cfg = w["config"]
    default = ("the default world (`WorldConfig()`" if cfg == WorldConfig().to_json() else
               "the first world (`WorldConfig.v1()`: one look, the first grammar" if cfg == WorldConfig.v1().to_json()
               else "a non-default world (")
    parts = []
    for s in splits:
        c = w["counts"].get(s)
        if c is None:  # a split the world's summary does not count (an older world file)
            parts.append(f"`{s}`")
            continue
        types = ", ".join(f"{t} {c['types'].get(t, 0)}" for t in TYPES)
        parts.append(f"`{s}` {c['scenes']} scenes / {c['expressions']} expressions ({types})")
    held = ", ".join(f"{c} {s}" for c, s in w["held_out_pairs"])
    text = (f"Evaluated on {default}: seed {w['seed']}, {cfg['image_size']}x{cfg['image_size']} px, "
            f"{cfg['min_objects']}-{cfg['max_objects']} objects per scene): " + "; ".join(parts) + ". "
            f"The `compositional` split's targets are held-out colour-shape pairs never seen in training "
            f"scenes ({held}).")
    if "new-look" in splits and cfg.get("held_out_looks"):
        looks = ", ".join("-".join(x) for x in cfg["held_out_looks"])
        text += (f" The `new-look` split's scenes are drawn in rendering families (background-shapes) never used in "
                 f"training ({looks}).")
    if "paraphrase" in splits:
        text += " The `paraphrase` split re-says the `test` scenes' expressions in sentence forms held out of training."
    if backbones:
        text += " Backbone of the training-free entries: " + ", ".join(f"`{b}`" for b in backbones) + "."
    if limit:
        text += f" **Only the first {limit} expressions of each split were evaluated (`--limit {limit}`).**"
    return text


EXPLAIN = ("Acc@0.5: share of expressions whose predicted box overlaps the target with IoU >= 0.5, overall and "
           "per expression type (the `attribute` ... `ordinal` columns). Proposal recall@0.5: share of targets covered by any candidate box, the ceiling "
           "of a method that picks one proposal (`-` for proposal-free methods; ground-truth boxes give 100%).")


def render_section(rows: Sequence[dict[str, Any]], outcomes: Sequence[Outcome], *, heading: str, description: str,
                   command: str, png: str | None, curves: dict[str, str], splits: Sequence[str] = DEFAULT_SPLITS,
                   full_table: str | None = None) -> str:
    """The Markdown block shared by ``world_results.md`` and the README.

    With ``main`` entries the block opens with the main table (one row per method); then the full
    table of every entry follows, or, with ``full_table`` (a link), only a pointer to it.
    """
    has_main = any(o.entry.main for o in outcomes)
    out = [heading, "", description, ""]
    if has_main:
        out += [main_table(rows, outcomes, splits), "", "Acc@0.5 of each method's best configuration (named in "
                "its row); `new-look - test`: points lost on the held-out rendering families.", ""]
    if full_table is not None and has_main:
        out += [f"Every configuration and ablation, with Acc@0.5 by expression type, mean IoU and proposal "
                f"recall: [the full table]({full_table}).", ""]
    else:
        if has_main:
            out += ["### Every entry", ""]
        out += [results_table(rows) if rows else "_No entry has results yet._", "", EXPLAIN, ""]
    if png:
        out += [f"![Acc@0.5 by expression type]({png})", ""]
    if curves:
        out += ["Learning curves: " + ", ".join(f"[{n}]({p})" for n, p in curves.items()) + ".", ""]
    trained = [o for o in outcomes if o.status == "ok" and o.entry.dir and o.entry.train_command]
    if trained:
        out += ["The trained entries were made (before this command) by:", ""]
        out += [f"- {o.entry.name}: `{o.entry.train_command}`" for o in trained]
        out.append("")
    pending = [o for o in outcomes if o.status != "ok"]
    if pending:
        out += ["Entries without results:", ""]
        for o in pending:
            msg = o.message.replace("not trained yet: ", "not trained yet: `", 1) + "`" if o.status == "not-trained" \
                else f"{o.status}: {o.message}"
            out.append(f"- {o.entry.name}: {msg}")
        out.append("")
    out += ["Produced by:", "", "```bash", command, "```"]
    return "\n".join(out)


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with the results block replaced (or inserted after the ``<!-- RESULTS -->`` line)."""
    wrapped = f"{BEGIN}\n{block.strip()}\n{END}"
    has_b, has_e = text.count(BEGIN), text.count(END)
    if has_b or has_e:
        if has_b != 1 or has_e != 1 or text.index(BEGIN) > text.index(END):
            raise WorldResultsError(f"README has unbalanced {BEGIN} / {END} markers; fix them by hand")
        return text[: text.index(BEGIN)] + wrapped + text[text.index(END) + len(END):]
    if ANCHOR not in text:
        raise WorldResultsError(f"README has no {ANCHOR} line to put the results after")
    i = text.index(ANCHOR) + len(ANCHOR)
    return text[:i] + "\n\n" + wrapped + "\n" + text[i:]


def _rel(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in forward slashes (links in Markdown)."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML list of entries (default %(default)s)")
    p.add_argument("--world", type=Path, default=DEFAULT_WORLD, help="world directory; the default world is "
                   "generated there if missing (default %(default)s)")
    p.add_argument("--existing-world", action="store_true", help="use the complete world already in --world "
                   "whatever its config, instead of (re)generating the default one (tests, experiments)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="evaluate only these entries (others keep their "
                   "current results in the table)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of each split")
    p.add_argument("--backbone-override", metavar="DIR", help="use this CLIP for every training-free entry (tests)")
    p.add_argument("--force", action="store_true", help="re-evaluate even when a current result exists")
    p.add_argument("--update-readme", action="store_true", help="rewrite the results block of --readme")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="README to update (default %(default)s)")
    p.add_argument("--no-report-plots", action="store_true", help="skip the per-entry metrics/examples PNGs (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole pipeline; returns the exit status (1 if an entry failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        return _main(args, argv, console)
    except ClipgroundError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return e.exit_code


def _main(args: argparse.Namespace, argv: list[str], console: Console) -> int:
    from clipground.cli.common import quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        raise WorldResultsError(f"--limit must be >= 1, got {args.limit}")
    splits, entries = load_config(args.config)
    if args.only:
        known = {e.name for e in entries}
        bad = [n for n in args.only if n not in known]
        if bad:
            raise WorldResultsError(f"--only: unknown entr{'y' if len(bad) == 1 else 'ies'} {bad}; known: {sorted(known)}")
    world = args.world
    if args.existing_world:
        if load_world_config(world) is None:
            raise WorldResultsError(f"--existing-world: {world} holds no complete world")
    else:
        console.print(f"world: ensuring the config's world in {world} ...")
        ensure_world(world, world_config(args.config), progress=not args.quiet)
    for s in splits:
        if not (world / f"{s}.jsonl").is_file():
            raise WorldResultsError(f"{world} has no split {s!r} ({world / f'{s}.jsonl'} is missing)")

    out: Path = args.out
    build = _Builder(args.backbone_override)
    outcomes: list[Outcome] = []
    timings: dict[str, float] = {}
    for i, entry in enumerate(entries, 1):
        console.rule(f"[{i}/{len(entries)}] {entry.name}")
        t1 = time.perf_counter()
        selected = not args.only or entry.name in args.only
        o = run_entry(entry, splits, world, out, build, limit=args.limit, evaluate_missing=selected,
                      force=args.force and selected, progress=not args.quiet, console=console,
                      plots=not args.no_report_plots)
        timings[entry.name] = round(time.perf_counter() - t1, 2)
        if o.status != "ok":
            console.print(f"  [yellow]{o.status}[/yellow]: {o.message}", highlight=False)
        outcomes.append(o)

    rows = table_rows(outcomes, splits)
    curves: dict[str, Path] = {}  # entry name -> its curve's copy; entries of one run share one copy
    copies: dict[Path, Path] = {}
    for o in outcomes:
        if o.status == "ok" and o.curve is not None:
            src = o.curve.resolve()
            if src not in copies:
                copies[src] = out / f"learning_curve_{o.entry.slug}.png"
                atomic_write(copies[src], src.read_bytes())
            curves[o.entry.name] = copies[src]
    listed: dict[Path, str] = {}  # each copy listed once, under its first entry
    for n, p in curves.items():
        listed.setdefault(p, n)
    main_names = {o.entry.name for o in outcomes if o.entry.main}
    png = plot_results([r for r in rows if r["name"] in main_names] or rows, splits, out / "world_results.png")
    command = shlex.join(["python", "scripts/world_results.py", *argv])
    used = [o.entry for o in outcomes if o.status == "ok" and o.entry.method is not None]
    backbones = list(dict.fromkeys(args.backbone_override or e.backbone for e in used))
    description = world_description(world, splits, args.limit, backbones)
    md = render_section(rows, outcomes, heading="# Results in the synthetic world", description=description,
                        command=command, png=png.name, curves={n: p.name for p, n in listed.items()}, splits=splits)
    atomic_write(out / "world_results.md", md + "\n")
    total = round(time.perf_counter() - t0, 2)
    summary = {
        "command": command,
        "world": str(world),
        "world_config": json.loads((world / "world.json").read_text())["config"],
        "splits": list(splits),
        "limit": args.limit,
        "backbone_override": args.backbone_override,
        "seconds": total,
        "entries": [{
            "name": o.entry.name, "spec": asdict(o.entry), "status": o.status, "message": o.message,
            "seconds": timings[o.entry.name],
            "learning_curve": str(curves[o.entry.name]) if o.entry.name in curves else None,
            "splits": {s: {"report": str(o.reports[s]), "reused": o.reused[s], "metrics": r.metrics,
                           "by_type": r.breakdown.get("type", {}), "protocol": r.protocol, "timing": r.timing}
                       for s, r in o.results.items()},
        } for o in outcomes],
        "table": rows,
    }
    atomic_write(out / "world_results.json", json.dumps(summary, indent=2, default=str) + "\n")

    if args.update_readme:
        readme: Path = args.readme
        try:
            text = readme.read_text(encoding="utf-8")
        except OSError as e:
            raise WorldResultsError(f"cannot read {readme}: {e.strerror or e}") from None
        base = readme.parent
        block = render_section(rows, outcomes, heading="## Results in the synthetic world", description=description,
                               command=command, png=_rel(png, base),
                               curves={n: _rel(p, base) for p, n in listed.items()}, splits=splits,
                               full_table=_rel(out / "world_results.md", base))
        atomic_write(readme, replace_readme_block(text, block))
        console.print(f"updated {readme}")

    print(results_table(rows) if rows else "(no results)", flush=True)
    console.print(f"wrote {out / 'world_results.md'}, {out / 'world_results.json'}, {png} in {total:.1f} s")
    return 1 if any(o.status == "error" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
