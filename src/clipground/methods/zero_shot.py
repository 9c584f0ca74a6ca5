"""Zero-shot proposal scoring with CLIP (no training).

Each proposal is shown to CLIP in isolation and compared with the phrase
(:mod:`clipground.methods.view_scoring`):

* ``crop``: cosine similarity of the cropped box and the phrase, the baseline of the
  design documents (also "CPT-less" ReCLIP ablations);
* ``blur``: everything outside the box blurred (ReCLIP, Subramanian et al., ACL 2022);
* ``circle``: a red ellipse drawn around the box (Red Circle, Shtedritski et al., ICCV 2023).

Views are ensembled by averaging their cosine similarities; with ``relations=True`` the
ReCLIP-style resolver of :mod:`clipground.relations` handles the spatial words.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .view_scoring import ViewScorer, ViewScorerConfig


@dataclass
class ZeroShotConfig(ViewScorerConfig):
    """Options of :class:`ZeroShotScorer` (see :class:`~clipground.methods.view_scoring.ViewScorerConfig`)."""


@register_method
class ZeroShotScorer(ViewScorer):
    """Rank proposals by CLIP similarity of their isolated views to the phrase."""

    name = "zero-shot"
    Config = ZeroShotConfig
