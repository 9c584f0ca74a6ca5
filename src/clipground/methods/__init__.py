"""Grounding methods, one module per family, registered by name."""

from .base import METHODS, GroundingMethod, ImageState, MethodConfig, Ranking, get_method_class, register_method
from .zero_shot import ZeroShotConfig, ZeroShotScorer

__all__ = [
    "METHODS",
    "GroundingMethod",
    "ImageState",
    "MethodConfig",
    "Ranking",
    "get_method_class",
    "register_method",
    "ZeroShotConfig",
    "ZeroShotScorer",
]
