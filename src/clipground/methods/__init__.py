"""Grounding methods, one module per family, registered by name."""

from .base import METHODS, GroundingMethod, ImageState, MethodConfig, Ranking, get_method_class, register_method
from .zero_shot import ZeroShotConfig, ZeroShotScorer
from .regression import FusionRegressor, FusionRegressorConfig
from .dense import HeatmapSegment, HeatmapSegmentConfig, Locator, LocatorConfig
from . import trained_scorers  # noqa: F401  (registers proposal-classifier, clip-finetune, flyp, proposal-attention)
from . import region_clip  # noqa: F401  (registers region-clip)

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
