"""The proposal contract: image -> candidate boxes with objectness, after NMS, top-K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torchvision.ops import nms, remove_small_boxes

from .. import boxes as B
from ..errors import UnknownNameError


@dataclass
class Proposals:
    """Candidate boxes for one image: ``boxes (K, 4)`` xyxy pixels, ``scores (K,)`` objectness."""

    boxes: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class ProposalSource:
    """Base class. Subclasses implement :meth:`raw`; :meth:`__call__` cleans and ranks.

    Attributes:
        top_k: keep at most this many boxes (highest objectness first).
        nms_iou: class-agnostic NMS threshold (``None`` or >= 1 disables NMS).
        min_size: drop boxes smaller than this many pixels on a side.
    """

    name: ClassVar[str] = ""
    needs_image_key: ClassVar[bool] = False
    top_k: int = 64
    nms_iou: float | None = 0.9
    min_size: float = 4.0

    def raw(self, image: Image.Image, image_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return unfiltered ``(boxes xyxy, scores)`` for ``image``."""
        raise NotImplementedError

    def memoized(self) -> "ProposalSource":
        """A copy that computes each keyed image's proposals once and returns them again when the
        same ``image_key`` comes back (for runs that revisit the same image files, such as a results
        table evaluating many methods; keys must name unchanged images)."""
        import copy

        twin = copy.copy(self)
        object.__setattr__(twin, "_memo", {})
        return twin

    def __call__(self, image: Image.Image, image_key: str | None = None) -> Proposals:
        memo = getattr(self, "_memo", None)
        if memo is not None and image_key is not None:
            if image_key not in memo:
                memo[image_key] = self._propose(image, image_key)
            return memo[image_key]
        return self._propose(image, image_key)

    def _propose(self, image: Image.Image, image_key: str | None) -> Proposals:
        w, h = image.size
        boxes, scores = self.raw(image, image_key)
        boxes = B.clip_to_image(B.as_boxes(boxes), w, h) if len(boxes) else torch.zeros(0, 4)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        if len(boxes):
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores = boxes[keep], scores[keep]
        if len(boxes) and self.nms_iou is not None and self.nms_iou < 1:
            keep = nms(boxes, scores, self.nms_iou)
            boxes, scores = boxes[keep], scores[keep]
        order = scores.argsort(descending=True, stable=True)[: self.top_k]
        return Proposals(boxes[order].contiguous(), scores[order].contiguous())

    def config(self) -> dict[str, Any]:
        """JSON-able description (saved with trained methods and cache fingerprints)."""
        from dataclasses import asdict

        return {"name": self.name, **asdict(self)}


PROPOSALS: dict[str, type[ProposalSource]] = {}


def register_proposals(cls: type[ProposalSource]) -> type[ProposalSource]:
    """Class decorator: make a proposal source available by its ``name``."""
    PROPOSALS[cls.name] = cls
    return cls


def get_proposals(name: str | ProposalSource | None, **kwargs: Any) -> ProposalSource | None:
    """Build a proposal source by name (``selective-search``, ``gt:PATH``, ``file:PATH``, ``torchvision``)."""
    if name is None or isinstance(name, ProposalSource):
        return name
    if ":" in name:  # "gt:instances.json", "file:props.jsonl"
        kind, path = name.split(":", 1)
        kwargs.setdefault("path", path)
        name = kind
    if name not in PROPOSALS:
        raise UnknownNameError(f"unknown proposal source {name!r}; choose from {sorted(PROPOSALS)}")
    return PROPOSALS[name](**kwargs)
