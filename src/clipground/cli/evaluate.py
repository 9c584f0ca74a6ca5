"""``clipground eval``: score a method on an annotation file of any supported format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import (BackboneOpt, EngineOpt, MethodOpt, OptionOpt, ProposalsOpt, RayAddressOpt, RayGpusOpt, RayWorkersOpt,
                     RuntimeOpt, ShardSizeOpt, build_grounder, grounder_loader)


def eval_command(
    annotations: Path = typer.Argument(..., help="Annotation file: refs(umd).p, *.pth (ReSC/TransVG), MDETR/COCO/VG JSON, or clipground JSONL."),
    format: str = typer.Option("auto", "--format", "-f", help="auto, jsonl, refer, resc, mdetr, coco, visual-genome."),
    images: Path | None = typer.Option(None, "--images", "-i", help="Image folder the annotations' file names are relative to."),
    split: str | None = typer.Option(None, "--split", "-s", help="Keep only this split (e.g. val)."),
    limit: int | None = typer.Option(None, "--limit", "-n", help="Evaluate at most this many expressions (after dropping missing images)."),
    method: str = MethodOpt,
    backbone: str = BackboneOpt,
    proposals: str = ProposalsOpt,
    option: list[str] = OptionOpt,
    runtime: str = RuntimeOpt,
    out: Path = typer.Option(Path("eval_out"), "--out", help="Folder for metrics.json, metrics.md, predictions.jsonl and PNGs."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json to stdout instead of tables."),
    examples: int = typer.Option(16, "--examples", help="Example images in examples.png (0: none)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write metrics.png and examples.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    label: str | None = typer.Option(None, "--label", help="Name of this run in comparison tables (default: the method)."),
    num_workers: int = typer.Option(0, "--num-workers", "-j", help="Data-loader worker processes decoding images and running proposals alongside the CLIP forward (0: none)."),
    image_batch: int = typer.Option(1, "--image-batch", help="Images whose views are encoded in one batch (results equal one at a time)."),
    engine: str = EngineOpt,
    ray_address: str | None = RayAddressOpt,
    ray_workers: int = RayWorkersOpt,
    ray_gpus: float = RayGpusOpt,
    shard_size: int = ShardSizeOpt,
) -> None:
    """Evaluate a grounding method: Acc@0.5 (IoU), Acc@0.75, mean IoU, P@1/5/10, proposal recall, breakdowns."""
    from ..data.loaders import load_records
    from ..distributed import engine_from_options
    from ..errors import ClipgroundError
    from ..evaluation import evaluate, write_report
    from ..evaluation.report import BREAKDOWN_TITLES, METRIC_NAMES, breakdown_columns, describe_protocol, format_value, metric_rows

    err = Console(stderr=True)
    console = err if json_out else Console()
    ray_engine = engine_from_options(engine, ray_address, ray_workers, ray_gpus)
    loaded = load_records(annotations, format=format, images=images, split=split, limit=limit)
    console.print(loaded.summary(), soft_wrap=True, markup=False)
    if not loaded.records:
        where = f" (e.g. {loaded.missing_example})" if loaded.missing_example else ""
        raise ClipgroundError(f"nothing to evaluate: none of the {loaded.total} items in {annotations} has its image "
                              f"on disk{where}; point --images at the image folder")
    grounder = build_grounder(method, backbone, proposals, option, runtime)
    result = evaluate(grounder, loaded, progress=progress, examples=examples, label=label,
                      num_workers=num_workers, image_batch=image_batch, engine=ray_engine,
                      loader=grounder_loader(ray_engine, method, backbone, proposals, option, runtime),
                      shard_dir=out / ".shards", shard_size=shard_size)
    files = write_report(result, out, plots=plots)

    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for line in describe_protocol(result):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        t = Table(title=escape(result.label))
        t.add_column("metric")
        t.add_column("value", justify="right")
        for name, value in metric_rows(result):
            t.add_row(name, value)
        console.print(t)
        cols = breakdown_columns(result)
        for name, buckets in result.breakdown.items():
            bt = Table(title=BREAKDOWN_TITLES.get(name, name))
            bt.add_column("bucket")
            bt.add_column("n", justify="right")
            for k in cols:
                bt.add_column(METRIC_NAMES[k].split(" (")[0], justify="right")
            for b, v in buckets.items():
                bt.add_row(escape(b), str(int(v["count"])), *[format_value(k, v[k]) for k in cols if k in v])
            console.print(bt)
    for f in result.failures[:5]:
        err.print(f"warning: {f['image']}: {f['error']}", highlight=False, soft_wrap=True, markup=False)
    if len(result.failures) > 5:
        err.print(f"warning: {len(result.failures) - 5} more failures listed in {files['metrics.md']}")
    err.print(f"wrote {', '.join(str(p) for p in files.values())}", highlight=False, soft_wrap=True, markup=False)
    if not result.items and result.failures:
        raise ClipgroundError(f"no expression could be scored: {result.counts['failed_items']} failed "
                              f"(first: {result.failures[0]['image']}: {result.failures[0]['error']})")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
