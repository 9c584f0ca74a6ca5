"""``clipground world generate`` and ``clipground world show``: the synthetic world."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import typer

from ..errors import BadAnnotationError


def generate(
    out: Path = typer.Option(..., "--out", help="Directory to write the world into."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and options give byte-identical files."),
    size: int = typer.Option(128, "--size", help="Image side in pixels (128-224)."),
    n_train: int = typer.Option(3000, "--n-train", help="Training scenes."),
    n_val: int = typer.Option(300, "--n-val", help="Validation scenes."),
    n_test: int = typer.Option(500, "--n-test", help="Test scenes."),
    n_compositional: int = typer.Option(300, "--n-compositional", help="Scenes with held-out (colour, shape) pairs."),
    clutter: int = typer.Option(3, "--clutter", help="At most this many distractor specks/lines per scene."),
    texture: float = typer.Option(8.0, "--texture", help="Background texture amplitude (grey levels, 0 = flat)."),
    noise: float = typer.Option(2.0, "--noise", help="Pixel noise std (grey levels, 0 = none)."),
    looks: str = typer.Option("many", "--looks", help="many (rendering families per scene, held-out ones in new-look) or classic (the first world's single look)."),
    phrasing: str = typer.Option("rich", "--phrasing", help="rich (paraphrases of every relation and attribute) or v1 (the first grammar)."),
    n_new_look: int = typer.Option(300, "--n-new-look", help="Scenes in held-out rendering families (0 with --looks classic)."),
    force: bool = typer.Option(False, "--force", help="Regenerate even if OUT already holds this exact world."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Generate the synthetic referring-expression world (images, JSONL, COCO, world.json)."""
    from ..data.world import SPLITS, WorldConfig, ensure_world, generate_world, load_world_config

    cfg = WorldConfig(
        seed=seed,
        image_size=size,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_compositional=n_compositional,
        clutter=clutter,
        texture=texture,
        noise=noise,
        looks=looks,
        phrasing=phrasing,
        n_new_look=n_new_look,
    )
    cfg.validate()
    have = load_world_config(out)
    if not force and have is not None and have.to_json() == cfg.to_json():
        ensure_world(out, cfg, progress=not quiet)  # also redoes a world with missing split files
        typer.echo(f"{out}: already holds this world (use --force to regenerate)")
        return
    t0 = time.perf_counter()
    generate_world(out, cfg, progress=not quiet)
    dt = time.perf_counter() - t0
    import json

    counts = json.loads((out / "world.json").read_text())["counts"]
    for s in SPLITS:
        if s not in counts:  # paraphrase: the test scenes again
            typer.echo(f"{s:>13}: {counts['test'].get('paraphrase_expressions', 0)} expressions on the test scenes")
            continue
        c = counts[s]
        types = ", ".join(f"{k} {v}" for k, v in c["types"].items())
        typer.echo(f"{s:>13}: {c['scenes']} scenes, {c['expressions']} expressions ({types})")
    typer.echo(f"wrote {out} in {dt:.1f} s")


def show(
    world_dir: Path = typer.Argument(..., help="A world directory written by `clipground world generate`."),
    split: str = typer.Option("val", "--split", help="train, val, test, compositional, new-look or paraphrase."),
    n: int = typer.Option(8, "--n", help="Number of expressions to show."),
    start: int = typer.Option(0, "--start", help="Index of the first expression shown."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="Output image (PNG)."),
) -> None:
    """Draw a grid of scenes with the target box and the expression as the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ..data.jsonl import read_jsonl
    from ..data.world import SPLITS

    if split not in SPLITS:
        raise BadAnnotationError(f"unknown split {split!r} (use one of {', '.join(SPLITS)})")
    path = world_dir / f"{split}.jsonl"
    if not path.is_file():
        raise BadAnnotationError(f"no synthetic world at {world_dir} (run `clipground world generate --out {world_dir}`)")
    records = read_jsonl(path)[max(0, start) : max(0, start) + max(1, n)]
    if not records:
        raise BadAnnotationError(f"{path} has no expressions from index {start}")
    cols = min(4, len(records))
    rows = (len(records) + cols - 1) // cols
    fig = Figure(figsize=(3.0 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    for k, r in enumerate(records):
        ax = fig.add_subplot(rows, cols, k + 1)
        with Image.open(r.image) as im:
            ax.imshow(im.convert("RGB"))
        x1, y1, x2, y2 = r.box
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=2))
        ax.set_title("\n".join(textwrap.wrap(r.expression, 28)) + f"\n[{r.meta.get('type', '?')}]", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    from ..io import save_figure

    save_figure(fig, out, dpi=100)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``world`` command group to the main app."""
    world_app = typer.Typer(help="The synthetic referring-expression world (benchmark and pretraining data).", no_args_is_help=True)
    world_app.command("generate")(generate)
    world_app.command("show")(show)
    app.add_typer(world_app, name="world")
