"""``clipground cache build|info``: the proposal + feature cache (see :mod:`clipground.cache`)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from ..backbone.hub import WORLD_CLIP
from .common import EngineOpt, RayAddressOpt, RayGpusOpt, RayWorkersOpt, quiet_transformers

cache_app = typer.Typer(help="Proposal + CLIP feature cache for fast training on a frozen backbone.",
                        no_args_is_help=True)


@cache_app.command("build")
def build(
    data: str = typer.Option(..., "--data", help="Annotations (any format `clipground eval` reads) or a world directory (all its splits' images)."),
    images: str | None = typer.Option(None, "--images", help="Image root for annotation formats with bare file names."),
    backbone: str = typer.Option(WORLD_CLIP, "--backbone", "-b", help="CLIP checkpoint (hub id, directory, bundled name)."),
    proposals: str = typer.Option("selective-search", "--proposals", "-p", help="Proposal source: selective-search, torchvision, gt:INSTANCES.json, file:PROPOSALS.jsonl."),
    out: str = typer.Option(..., "--out", help="Cache directory (resumed if it holds an unfinished build of the same inputs)."),
    kind: str = typer.Option("regions", "--kind", help="regions (proposal views, for the proposal scorers) or dense (patch tokens, for the fusion regressor and locator)."),
    views: str = typer.Option("crop,blur", "--views", help="regions: proposal views to embed (comma-separated: crop, blur, circle)."),
    patches: bool = typer.Option(False, "--patches", help="regions: also store whole-image patch embeddings."),
    tiles: int = typer.Option(1, "--tiles", help="dense: also encode TxT tiles for a T-times finer patch grid."),
    input_size: int = typer.Option(0, "--input-size", help="dense: encode the whole image at this side (0: the checkpoint's own)."),
    dense: str = typer.Option("final", "--dense", help="dense: patch embeddings, final or value (MaskCLIP value path)."),
    prompt: str = typer.Option("{}", "--prompt", help="Template the expressions are put in before text encoding."),
    noun_phrases: bool = typer.Option(True, "--noun-phrases/--no-noun-phrases", help="Also embed each expression's subject/object noun phrases (what `clipground train` caches)."),
    shard_size: int = typer.Option(64, "--shard-size", help="Images per shard (the unit of resumption)."),
    split: str | None = typer.Option(None, "--split", help="Keep only records of this split."),
    limit: int | None = typer.Option(None, "--limit", help="Use at most this many records."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Overwrite a cache built from different inputs (default: refuse)."),
    engine: str = EngineOpt,
    ray_address: str | None = RayAddressOpt,
    ray_workers: int = RayWorkersOpt,
    ray_gpus: float = RayGpusOpt,
) -> None:
    """Run the proposal source and the frozen CLIP once per image; store boxes and features.

    The cache is keyed by a fingerprint of the backbone weights, the proposal config, the
    preprocessing and the data (image paths, sizes, mtimes). Building into a directory
    that holds a different cache fails unless --rebuild; a killed build resumes.
    """
    from pathlib import Path

    from ..backbone import ClipBackbone
    from ..cache import CacheSpec, FeatureCache
    from ..data.loaders import load_records
    from ..distributed import engine_from_options
    from ..proposals import get_proposals

    quiet_transformers()
    ray_engine = engine_from_options(engine, ray_address, ray_workers, ray_gpus)
    console = Console(stderr=True)
    p = Path(data)
    if p.is_dir() and (p / "world.json").is_file():
        records = []
        for s in ("train", "val", "test", "compositional"):
            if (p / f"{s}.jsonl").is_file() and (split is None or split == s):
                records += load_records(p / f"{s}.jsonl").records
        records = records[:limit] if limit else records
        console.print(f"world {p}: {len(records)} records")
    else:
        res = load_records(data, images=images, split=split, limit=limit)
        records = res.records
        console.print(f"{data}: {res.summary()}")
    if not records:
        from ..errors import BadAnnotationError

        raise BadAnnotationError(f"no usable records in {data}: nothing to cache")
    spec = CacheSpec(kind=kind, views=tuple(v.strip() for v in views.split(",") if v.strip()), patches=patches,
                     tiles=tiles, input_size=input_size, dense=dense, prompt=prompt, shard_size=shard_size,
                     noun_phrases=noun_phrases)
    bb = ClipBackbone.from_pretrained(backbone)
    existed = (Path(out) / "index.json").is_file()
    source = get_proposals(proposals) if kind == "regions" else None
    loader = None
    if ray_engine is not None:
        from functools import partial

        loader = partial(worker_models, backbone, source, "cuda" if ray_engine.gpus > 0 else "cpu")
    cache = FeatureCache.build(out, records, bb, source, spec, rebuild=rebuild, engine=ray_engine, loader=loader)
    s = cache.summary()
    verb = "resumed/reused" if existed else "built"
    console.print(f"{verb} {s['kind']} feature cache {out}: {s['images']} images, {s['texts']} expressions"
                  + (f" ({s['skipped_texts']} too long for the text encoder, skipped)" if s["skipped_texts"] else "")
                  + f", {s['bytes'] / 1e6:.1f} MB, fingerprint {s['fingerprint'][:16]}")


def worker_models(backbone: str, proposals, device: str = "cpu"):
    """What a Ray actor of ``cache build`` loads once: its own backbone, and the proposal source."""
    from ..backbone import ClipBackbone

    quiet_transformers()
    return ClipBackbone.from_pretrained(backbone, device=device), proposals


@cache_app.command("info")
def info(path: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Print a cache's summary (JSON): fingerprint, counts, completeness, size."""
    from ..cache import FeatureCache

    print(json.dumps(FeatureCache.open(path, require_complete=False).summary(), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
