"""``clipground train --method NAME``: train any method that has a recipe."""

from __future__ import annotations

import typer
from rich.console import Console

from ..backbone.hub import WORLD_CLIP
from .common import quiet_transformers


def train(
    method: str = typer.Option(..., "--method", "-m", help="Trainable method name (see `clipground methods`)."),
    train_data: str = typer.Option(..., "--train", help="Training annotations (any format `clipground eval` reads) or a world directory."),
    val_data: str | None = typer.Option(None, "--val", help="Validation annotations."),
    images: str | None = typer.Option(None, "--images", help="Image root for annotation formats with bare file names."),
    backbone: str = typer.Option(WORLD_CLIP, "--backbone", "-b", help="CLIP checkpoint (hub id, directory, bundled name)."),
    proposals: str = typer.Option("selective-search", "--proposals", "-p", help="Proposal source for proposal-based methods."),
    out: str = typer.Option("runs/train", "--out", help="Output directory; the trained method is saved in OUT/final."),
    config: str | None = typer.Option(None, "--config", help="YAML config of the recipe."),
    cache: str | None = typer.Option(None, "--cache", help="Feature cache directory (built if missing)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    overrides: list[str] = typer.Argument(None, help="Config overrides key=value."),
) -> None:
    """Train a grounding method and save it for `Grounder.from_pretrained(OUT/final)`."""
    from ..training.recipes import TrainArgs, get_recipe

    quiet_transformers()
    args = TrainArgs(method=method, train=train_data, val=val_data, images=images, backbone=backbone,
                     proposals=proposals, out=out, config=config, overrides=list(overrides or []),
                     resume=resume, cache=cache)
    saved = get_recipe(method)(args)
    Console().print(f"saved trained method to {saved}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
