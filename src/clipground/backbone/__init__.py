"""CLIP-family backbones: loading, preprocessing and batched encoding."""

from .clip import BUNDLED, DEFAULT_BACKBONE, ClipBackbone, ImageFeatures, TextFeatures, resolve_checkpoint

__all__ = ["BUNDLED", "DEFAULT_BACKBONE", "ClipBackbone", "ImageFeatures", "TextFeatures", "resolve_checkpoint"]
