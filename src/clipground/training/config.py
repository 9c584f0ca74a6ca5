"""Training configuration shared by every recipe: the optimiser, schedule and logging settings.

Every trainable method nests :class:`TrainConfig` in its recipe config; YAML files and
``key=value`` overrides are read by the one option parser, :mod:`clipground.options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..options import apply_overrides, coerce_value, from_dict, load_config, to_dict


MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16", "auto")


@dataclass
class TrainConfig:
    """Settings shared by every training run (optimiser, schedule, logging, checkpoints).

    ``max_steps > 0`` fixes the number of optimiser steps; otherwise ``epochs`` full passes
    over the training set are made. ``batch_size`` is per process. ``mixed_precision`` is
    ``no``, ``bf16``, ``fp16`` or ``auto`` (bf16 on a GPU that supports it, else ``no``).
    ``save_every``/``eval_every``/``log_every`` count optimiser steps (0 disables; a final
    checkpoint and evaluation are always made). ``num_threads``: CPU threads for torch (0:
    torch's default); on a shared CPU one thread per small run is often faster than
    oversubscribed cores.
    """

    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant | linear
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    keep_last: int = 2
    num_workers: int = 0
    num_threads: int = 0
    drop_last: bool = True
    progress: bool = True


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject values that cannot work (checked before any heavy work starts)."""
    if cfg.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                          f"got {cfg.mixed_precision!r}")
    if cfg.lr_schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"lr_schedule must be cosine, constant or linear, got {cfg.lr_schedule!r}")
    for name in ("batch_size", "grad_accum_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("set max_steps > 0 or epochs > 0")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.num_threads < 0:
        raise ConfigError(f"num_threads must be >= 0, got {cfg.num_threads}")


__all__ = [
    "ConfigError", "TrainConfig", "apply_overrides", "coerce_value", "from_dict", "load_config",
    "to_dict", "validate_train_config",
]
