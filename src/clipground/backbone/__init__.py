"""CLIP-family backbones: loading, preprocessing, batched encoding and every feature methods read.

* :mod:`.clip`: :class:`ClipBackbone` (load, preprocess, tokenize, encode, fine-tune blocks);
* :mod:`.hub`: checkpoint names to files (bundled, local, hub; fails fast offline);
* :mod:`.views`: how a proposal box is shown to CLIP (crop, blur, circle);
* :mod:`.geometry`: where the model's input square sits in the original image;
* :mod:`.features`: region, dense and text features, shared by methods and the feature cache.
"""

from .clip import DEFAULT_BACKBONE, ClipBackbone, ImageFeatures, TextFeatures
from .hub import BUNDLED, resolve_checkpoint

__all__ = ["BUNDLED", "DEFAULT_BACKBONE", "ClipBackbone", "ImageFeatures", "TextFeatures", "resolve_checkpoint"]
