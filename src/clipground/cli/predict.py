"""``clipground predict`` and ``clipground methods``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import BadPhraseError
from ..phrases import check_phrase, printable
from .common import (BackboneOpt, EngineOpt, MethodOpt, OptionOpt, ProposalsOpt, RayAddressOpt, RayGpusOpt, RayWorkersOpt,
                     RuntimeOpt, ShardSizeOpt, build_grounder)


#: What the table says for a phrase the method found no candidate for (``Prediction.fallback``).
FALLBACK_NOTE = "no candidate: whole image"


def predict(
    image: str = typer.Argument(..., help="Image file (JPEG, PNG, ...), a folder of images, a glob ('photos/*.jpg') or a JSONL manifest of {\"image\": ..., \"phrases\": [...]} lines."),
    phrases: list[str] = typer.Argument(None, help="One or more referring expressions (for a manifest: taken from it)."),
    method: str = MethodOpt,
    backbone: str = BackboneOpt,
    proposals: str = ProposalsOpt,
    option: list[str] = OptionOpt,
    runtime: str = RuntimeOpt,
    out: Path | None = typer.Option(None, "--out", help="Write the image with the predicted box(es) drawn (PNG)."),
    json_out: str | None = typer.Option(None, "--json", help="Write predictions as JSON to this file ('-' for stdout)."),
    top_k: int = typer.Option(5, "--top-k", help="Candidates listed per phrase in the JSON."),
    num_workers: int = typer.Option(0, "--num-workers", "-j", help="Several images: data-loader workers decoding images and running proposals (0: none)."),
    image_batch: int = typer.Option(8, "--image-batch", help="Several images: images whose views are encoded in one batch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Several images: show a progress bar (images/s)."),
    engine: str = EngineOpt,
    ray_address: str | None = RayAddressOpt,
    ray_workers: int = RayWorkersOpt,
    ray_gpus: float = RayGpusOpt,
    shard_size: int = ShardSizeOpt,
) -> None:
    """Ground each phrase in IMAGE and print the box (xyxy pixels) and score.

    With a folder, a glob or a manifest, every image is grounded (batched across images) and
    ``--json`` writes one JSON object per image per line (JSONL).
    """
    from ..batching import is_batch_input
    from ..distributed import engine_from_options
    from ..images import load_image
    from ..io import save_image, write_json

    ray_engine = engine_from_options(engine, ray_address, ray_workers, ray_gpus)
    if is_batch_input(image):
        _predict_many(image, phrases, method, backbone, proposals, option, runtime, out, json_out, top_k, num_workers,
                      image_batch, progress, ray_engine, shard_size)
        return
    if ray_engine is not None:
        from ..errors import ClipgroundError

        raise ClipgroundError("--engine ray grounds many images: give a folder, a glob or a JSONL manifest")
    # Validate the cheap things before loading a model: bad input fails in milliseconds.
    pixels = load_image(image)
    if not phrases:
        raise BadPhraseError("give at least one phrase after the image")
    phrases = [check_phrase(p) for p in phrases]
    g = build_grounder(method, backbone, proposals, option, runtime)
    g.set_image(pixels, image_key=str(image))
    preds = g.predict_batch(phrases)
    payload = _payload(g, str(image), g.state, preds, top_k)
    if json_out == "-":
        print(json.dumps(payload, indent=2))
    else:
        console = Console()
        t = Table(title=escape(printable(f"{image} ({g.state.size[0]}x{g.state.size[1]})")))
        any_fallback = any(p.fallback for p in preds)
        for col in ("phrase", "box (x1, y1, x2, y2)", "score") + (("note",) if any_fallback else ()):
            t.add_column(col)
        for p in preds:
            note = [FALLBACK_NOTE if p.fallback else ""] if any_fallback else []
            t.add_row(escape(p.phrase), ", ".join(f"{v:.1f}" for v in p.box), f"{p.score:.4f}", *note)
        console.print(t)
        if json_out:
            write_json(json_out, payload, sort_keys=False)
            console.print(f"wrote {json_out}")
    fallbacks = sum(p.fallback for p in preds)
    if fallbacks:
        print(f"warning: {fallbacks} of {len(preds)} phrase(s) had no candidate box in this "
              f"{g.state.size[0]}x{g.state.size[1]} image; the whole image is returned with score 0",
              file=sys.stderr)
    if out is not None:
        from ..viz import draw_prediction

        canvas = g.state.image
        for p in preds:
            canvas = draw_prediction(canvas, p.box, p.phrase, score=p.score)
        save_image(canvas, out)
        if json_out != "-":
            Console().print(f"wrote {out}")


def _payload(g, key: str, state, preds, top_k: int) -> dict:
    return {
        "image": key,
        "image_size": list(state.size),
        "method": g.method.name,
        "backbone": g.backbone.name,
        "proposals": g.proposals.name if g.proposals is not None else None,
        "predictions": [p.to_dict(top_k=top_k) for p in preds],
    }


def predict_lines(g, jobs, num_workers: int = 0, image_batch: int = 8, top_k: int = 5,
                  tick=None) -> list[str]:
    """One JSON line per job (``{"image", ...predictions}`` or ``{"image", "error"}``), in job order.

    The work of ``predict`` over many images, or of one shard of it on a Ray worker: the same
    function either way, so the merged file equals the single-process one.
    """
    from ..batching import iter_image_states

    lines: list[str] = []
    for bs in iter_image_states(g, [j.image for j in jobs], num_workers=num_workers, image_batch=image_batch):
        job = jobs[bs.index]
        if tick is not None:
            tick()
        if bs.error is not None:
            lines.append(json.dumps({"image": job.image, "error": bs.error}))
            continue
        g.set_image_state(bs.state)
        preds = g.predict_batch(job.phrases)
        lines.append(json.dumps(_payload(g, job.image, bs.state, preds, top_k)))
    return lines


def _predict_shard(g, shard) -> bytes:
    """A Ray worker's job: :func:`predict_lines` of one shard, as JSONL bytes."""
    jobs, num_workers, image_batch, top_k = shard
    return "".join(line + "\n" for line in predict_lines(g, jobs, num_workers, image_batch, top_k)).encode("utf-8")


def _predict_many(source: str, phrases: list[str] | None, method: str, backbone: str, proposals: str,
                  option: list[str], runtime: str, out: Path | None, json_out: str | None, top_k: int,
                  num_workers: int, image_batch: int, progress: bool, ray_engine=None, shard_size: int = 32) -> None:
    """``predict`` over a folder, glob or manifest: one JSONL line per image, in input order."""
    from tqdm.auto import tqdm

    from ..batching import expand_inputs
    from ..errors import ClipgroundError
    from ..io import atomic_write

    if out is not None:
        raise ClipgroundError("--out draws one image; with several images use --json FILE.jsonl")
    jobs = expand_inputs(source)
    given = [check_phrase(p) for p in (phrases or [])]
    for j in jobs:
        j.phrases = [check_phrase(p) for p in j.phrases] if j.phrases is not None else given
        if not j.phrases:
            raise BadPhraseError(f"no phrase for {j.image}: give phrases after the folder/glob, or list them in the manifest")
    g = build_grounder(method, backbone, proposals, option, runtime)
    console = Console()
    bar = tqdm(total=len(jobs), unit="img", desc="predicting", disable=not progress, leave=False)
    if ray_engine is None:
        text = "".join(line + "\n" for line in predict_lines(g, jobs, num_workers, image_batch, top_k,
                                                              tick=lambda: bar.update(1)))
        store = None
    else:
        text, store = _predict_on_ray(g, jobs, method, backbone, proposals, option, runtime, json_out, top_k,
                                      num_workers, image_batch, ray_engine, shard_size, bar)
    rate = bar.format_dict.get("rate")
    bar.close()
    rows = [json.loads(line) for line in text.splitlines()]
    t = Table(title=escape(printable(f"{source} ({len(jobs)} images)")))
    for col in ("image", "phrase", "box (x1, y1, x2, y2)", "score"):
        t.add_column(col)
    failed = 0
    for row in rows:
        if "error" in row:
            failed += 1
            print(f"warning: {printable(row['image'])}: {printable(row['error'])}", file=sys.stderr)
            continue
        for p in row["predictions"]:
            t.add_row(escape(printable(row["image"])), escape(p["phrase"]), ", ".join(f"{v:.1f}" for v in p["box"]),
                      f"{p['score']:.4f}")
    if json_out == "-":
        sys.stdout.write(text)
    else:
        console.print(t)
        if json_out:
            atomic_write(json_out, text)
            console.print(f"wrote {json_out}")
    if store is not None:
        store.remove()
    if progress and rate:
        print(f"{len(jobs)} images, {rate:.2f} images/s", file=sys.stderr)
    if failed == len(jobs):
        raise ClipgroundError(f"no image could be grounded ({failed} failed)")


def _predict_on_ray(g, jobs, method, backbone, proposals, option, runtime, json_out, top_k, num_workers, image_batch,
                    ray_engine, shard_size, bar):
    """The JSONL text of ``jobs`` computed in shards on Ray actors (kept in ``JSON.shards/`` to resume)."""
    from ..distributed import MemoryStore, ShardStore, run_fingerprint, run_shards, shard_bounds
    from .common import grounder_loader

    bounds = shard_bounds(len(jobs), shard_size, image_batch)
    shards = [(jobs[a:b], num_workers, image_batch, top_k) for a, b in bounds]
    fp = run_fingerprint(kind="predict", jobs=[(j.image, j.phrases) for j in jobs], bounds=bounds, method=method,
                         backbone=backbone, proposals=proposals, options=list(option or []), runtime=runtime,
                         top_k=top_k, image_batch=image_batch, num_workers=num_workers)
    store = ShardStore(f"{json_out}.shards", fp) if json_out and json_out != "-" else MemoryStore()
    if store.stale:
        print(f"warning: removed {store.stale} shard(s) of another run from {json_out}.shards", file=sys.stderr)
    blobs, _ = run_shards(ray_engine, store, grounder_loader(ray_engine, method, backbone, proposals, option, runtime),
                          _predict_shard, shards, tick=lambda i: bar.update(bounds[i][1] - bounds[i][0]))
    return b"".join(blobs).decode("utf-8"), store


def methods() -> None:
    """List the registered grounding methods and proposal sources."""
    from ..methods import METHODS
    from ..proposals import PROPOSALS

    console = Console()
    t = Table(title="methods")
    t.add_column("name")
    t.add_column("trainable")
    t.add_column("uses proposals")
    t.add_column("description")
    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        t.add_row(name, "yes" if cls.trainable else "no", "yes" if cls.uses_proposals else "no", doc)
    console.print(t)
    console.print("proposal sources: " + ", ".join(sorted(PROPOSALS)))


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("methods")(methods)
