"""``clipground predict`` and ``clipground methods``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..phrases import check_phrase, printable
from .common import BackboneOpt, MethodOpt, OptionOpt, ProposalsOpt, RuntimeOpt, build_grounder


#: What the table says for a phrase the method found no candidate for (``Prediction.fallback``).
FALLBACK_NOTE = "no candidate: whole image"


def predict(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    phrases: list[str] = typer.Argument(..., help="One or more referring expressions."),
    method: str = MethodOpt,
    backbone: str = BackboneOpt,
    proposals: str = ProposalsOpt,
    option: list[str] = OptionOpt,
    runtime: str = RuntimeOpt,
    out: Path | None = typer.Option(None, "--out", help="Write the image with the predicted box(es) drawn (PNG)."),
    json_out: str | None = typer.Option(None, "--json", help="Write predictions as JSON to this file ('-' for stdout)."),
    top_k: int = typer.Option(5, "--top-k", help="Candidates listed per phrase in the JSON."),
) -> None:
    """Ground each phrase in IMAGE and print the box (xyxy pixels) and score."""
    from ..images import load_image
    from ..io import save_image, write_json

    # Validate the cheap things before loading a model: bad input fails in milliseconds.
    pixels = load_image(image)
    phrases = [check_phrase(p) for p in phrases]
    g = build_grounder(method, backbone, proposals, option, runtime)
    g.set_image(pixels, image_key=str(image))
    preds = g.predict_batch(phrases)
    payload = {
        "image": str(image),
        "image_size": list(g.state.size),
        "method": g.method.name,
        "backbone": g.backbone.name,
        "proposals": g.proposals.name if g.proposals is not None else None,
        "predictions": [p.to_dict(top_k=top_k) for p in preds],
    }
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
