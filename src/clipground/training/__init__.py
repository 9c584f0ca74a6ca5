"""Training: one accelerate-based, resumable loop (:class:`Trainer`) shared by every
trainable method, config dataclasses loadable from YAML with ``key=value`` overrides, and
the world-CLIP pretraining recipe (:mod:`clipground.training.pretrain`).
"""

from .config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config, to_dict
from .trainer import EpochPermutationSampler, Trainer, TrainResult, plot_learning_curve

__all__ = [
    "ConfigError",
    "EpochPermutationSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "from_dict",
    "load_config",
    "plot_learning_curve",
    "to_dict",
]
