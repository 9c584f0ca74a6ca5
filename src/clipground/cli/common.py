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


def build_grounder(method: str, backbone: str, proposals: str, options: list[str] | None, runtime: str = "torch"):
    """A Grounder from CLI options; ``method`` may be a trained-method directory (with ``runtime``
    ``onnx``, ``backbone`` is then the export of its backbone)."""
    from ..grounder import Grounder

    quiet_transformers()
    if os.path.isdir(method):
        return Grounder.from_pretrained(method, proposals=None if proposals == "selective-search" else proposals,
                                        options=parse_options(options), runtime=runtime,
                                        onnx_dir=backbone if runtime == "onnx" else None)
    return Grounder.load(method=method, backbone=backbone, proposals=proposals, runtime=runtime,
                         **parse_options(options))
