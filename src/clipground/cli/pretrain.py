"""``clipground pretrain``: pretrain a small world model, the CLIP (:mod:`clipground.training.pretrain`)
the SAM (:mod:`clipground.training.pretrain_sam`) or the BLIP (:mod:`clipground.training.pretrain_blip`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def pretrain(
    world: str = typer.Option(..., "--world", help="Synthetic world directory (generated if it does not exist)."),
    out: str = typer.Option(..., "--out", help="Where the final save_pretrained checkpoint is written."),
    config: str | None = typer.Option(None, "--config", help="YAML config, e.g. configs/pretrain_world_clip.yaml."),
    model: str = typer.Option("clip", "--model", help="Which world model: clip (CLIPModel), sam (SamModel) or blip (BlipForImageTextRetrieval)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    overrides: list[str] = typer.Argument(None, help="Config overrides key=value (e.g. max_steps=100 train.lr=5e-4)."),
) -> None:
    """Pretrain a small world model on the world's train split: the CLIP (region captions and
    whole scenes), with --model sam the promptable segmenter (masks, box and point prompts), with
    --model blip the image-text matcher whose Grad-CAM heatmap heatmap-segment reads.

    Checkpoints, metrics.jsonl and learning_curve.png go to train.output_dir; OUT gets the
    model, processor and RECIPE.md (load with CLIPModel/SamModel/BlipForImageTextRetrieval + processor .from_pretrained).
    Several processes: accelerate launch --multi_gpu --num_processes N -m clipground.cli.main pretrain ...
    """
    from rich.console import Console

    from ..errors import UnknownNameError
    from .common import quiet_transformers

    quiet_transformers()
    if model == "clip":
        from ..training.pretrain import load_pretrain_config as load_cfg
        from ..training.pretrain import pretrain as run_pretrain
    elif model == "sam":
        from ..training.pretrain_sam import load_sam_pretrain_config as load_cfg
        from ..training.pretrain_sam import pretrain_sam as run_pretrain
    elif model == "blip":
        from ..training.pretrain_blip import load_blip_pretrain_config as load_cfg
        from ..training.pretrain_blip import pretrain_blip as run_pretrain
    else:
        raise UnknownNameError(f"unknown --model {model!r}; choose from clip, sam, blip")
    cfg = load_cfg(config, list(overrides or []))
    # --resume is left out of the recorded command: a resumed run ends with the same weights.
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    command = "clipground " + " ".join(shlex.quote(a) for a in argv) if argv else "clipground pretrain"
    result = run_pretrain(world, out, cfg, resume=resume, command=command)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    con = Console(stderr=True)
    if not result.finished:
        con.print(f"stopped at step {result.step}/{result.total_steps}; continue with --resume")
        raise typer.Exit(1)
    metrics = ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.last_eval.items()))
    con.print(f"saved {Path(out)} after {result.step} steps in {result.wall_time_s / 60:.1f} min; {metrics}")


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` to the ``clipground`` app."""
    app.command("pretrain")(pretrain)
