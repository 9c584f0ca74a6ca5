"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import os

import typer

from ..backbone import DEFAULT_BACKBONE

BackboneOpt = typer.Option(
    DEFAULT_BACKBONE, "--backbone", "-b",
    help="CLIP checkpoint: hub id, local save_pretrained directory, or 'clipground/world-clip' (bundled, offline).",
)
MethodOpt = typer.Option("zero-shot", "--method", "-m", help="Grounding method (see `clipground methods`) or a trained method directory.")
ProposalsOpt = typer.Option(
    "selective-search", "--proposals", "-p",
    help="Proposal source: selective-search, torchvision, gt:INSTANCES.json, file:PROPOSALS.jsonl.",
)
RuntimeOpt = typer.Option(
    "torch", "--runtime",
    help="What runs the CLIP towers: torch, or onnx (--backbone is then a `clipground export onnx` directory).",
)
EngineOpt = typer.Option(
    "local", "--engine",
    help="What runs the images: local (this process) or ray (Ray Data actors, one model each; pip install 'clipground[ray]').",
)
RayAddressOpt = typer.Option(None, "--ray-address", help="--engine ray: an existing Ray cluster (default: start a local one).")
RayWorkersOpt = typer.Option(0, "--ray-workers", help="--engine ray: actors, one model each (0: one per --ray-gpus GPUs, else one per 4 CPUs).")
RayGpusOpt = typer.Option(0.0, "--ray-gpus", help="--engine ray: GPUs per actor (its model then runs on cuda).")
ShardSizeOpt = typer.Option(32, "--shard-size", help="--engine ray: images per shard (the unit of work and of resumption).")
OptionOpt = typer.Option(None, "--option", "-o", help="Method option key=value (repeatable), e.g. -o views=crop,blur.")


def parse_options(options: list[str] | None) -> dict[str, str]:
    """``-o key=value`` strings as a dict of raw strings; the method's config coerces each value
    to its field's type (``relations=no`` is ``False``), so there is one option parser."""
    from ..options import parse_assignments

    return parse_assignments(options, "option")


def quiet_transformers() -> None:
    """Silence transformers' progress bars and warnings in CLI output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_grounder(method: str, backbone: str, proposals: str, options: list[str] | None, runtime: str = "torch",
                   device: str = "cpu"):
    """A Grounder from CLI options; ``method`` may be a trained-method directory (with ``runtime``
    ``onnx``, ``backbone`` is then the export of its backbone)."""
    from ..grounder import Grounder, trained_source

    quiet_transformers()
    source = trained_source(method, backbone)
    if source is not None:
        return Grounder.from_pretrained(source, proposals=None if proposals == "selective-search" else proposals,
                                        device=device, options=parse_options(options), runtime=runtime,
                                        onnx_dir=backbone if runtime == "onnx" else None)
    return Grounder.load(method=method, backbone=backbone, proposals=proposals, runtime=runtime, device=device,
                         **parse_options(options))


def grounder_loader(engine, method: str, backbone: str, proposals: str, options: list[str] | None,
                    runtime: str = "torch"):
    """What each Ray actor calls once to build its own grounder (on its GPU with ``--ray-gpus``)."""
    from functools import partial

    device = "cuda" if engine is not None and engine.gpus > 0 else "cpu"
    return partial(build_grounder, method, backbone, proposals, list(options or []), runtime, device)
