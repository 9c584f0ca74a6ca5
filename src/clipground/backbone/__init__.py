"""CLIP-family backbones: loading, preprocessing, batched encoding and every feature methods read.

* :mod:`.clip`: :class:`ClipBackbone` (load, preprocess, tokenize, encode, fine-tune blocks);
* :mod:`.hub`: checkpoint names to files (bundled, local, hub; fails fast offline);
* :mod:`.views`: how a proposal box is shown to CLIP (crop, blur, circle);
* :mod:`.geometry`: where the model's input square sits in the original image;
* :mod:`.features`: region, dense and text features, shared by methods and the feature cache.

Names are imported lazily, so reading :mod:`.hub`'s constants (the CLI's defaults) does not
import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"DEFAULT_BACKBONE": ".clip", "ClipBackbone": ".clip", "ImageFeatures": ".clip", "TextFeatures": ".clip",
         "BUNDLED": ".hub", "resolve_checkpoint": ".hub"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
