"""Proposals from a torchvision detector (Faster R-CNN by default).

Weights come from torchvision's own download for online users; offline, a missing
weight file is a clear one-line error. Detections of all classes are pooled and made
class-agnostic (the phrase, not the detector, decides the category).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import CheckpointNotFoundError
from .base import ProposalSource, register_proposals

_MODELS: dict[str, torch.nn.Module] = {}


@register_proposals
@dataclass
class TorchvisionDetector(ProposalSource):
    """A torchvision detection model (``model`` is a name from ``torchvision.models.detection``)."""

    name = "torchvision"
    model: str = "fasterrcnn_resnet50_fpn_v2"
    score_threshold: float = 0.05
    nms_iou: float | None = 0.7

    def _load(self) -> torch.nn.Module:
        if self.model in _MODELS:
            return _MODELS[self.model]
        import torchvision.models.detection as det

        if not hasattr(det, self.model):
            raise CheckpointNotFoundError(f"torchvision has no detection model {self.model!r}")
        try:
            m = getattr(det, self.model)(weights="DEFAULT", box_score_thresh=self.score_threshold)
        except Exception as e:  # URLError/OSError/RuntimeError from the weight download
            raise CheckpointNotFoundError(
                f"cannot get weights for torchvision detector {self.model!r} ({type(e).__name__}); they download "
                f"from torchvision on first use: run once with internet, or put the file in $TORCH_HOME/hub/checkpoints"
            ) from None
        m.eval()
        _MODELS[self.model] = m
        return m

    @torch.inference_mode()
    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.functional import pil_to_tensor

        m = self._load()
        x = pil_to_tensor(image).float() / 255.0
        out = m([x])[0]
        return out["boxes"], out["scores"]
