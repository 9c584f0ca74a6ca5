"""Proposal sources: selective search, torchvision detectors, precomputed files, ground truth."""

from .base import PROPOSALS, ProposalSource, Proposals, get_proposals, register_proposals
from .detector import TorchvisionDetector
from .files import GroundTruthBoxes, PrecomputedProposals
from .selective_search import SelectiveSearch

__all__ = [
    "PROPOSALS",
    "ProposalSource",
    "Proposals",
    "get_proposals",
    "register_proposals",
    "SelectiveSearch",
    "TorchvisionDetector",
    "GroundTruthBoxes",
    "PrecomputedProposals",
]
