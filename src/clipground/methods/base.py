"""The method contract every grounding method follows, and the name registry.

A method is split like SAM's predictor: :meth:`GroundingMethod.encode_image` does the
heavy per-image work once (crops, CLIP image features, proposal features) and stores it
in an :class:`ImageState`; :meth:`GroundingMethod.rank` is the cheap per-phrase call that
returns candidate boxes ranked by score, and batches its own text encoding. Methods get
CLIP features only through :mod:`clipground.backbone` (the model, its views and
:mod:`~clipground.backbone.features`); none re-implements CLIP plumbing, and none imports
from another method.

A trainable method names its recipe (a module of :mod:`clipground.training.recipes`) on
the class, so ``trainable`` and the recipe cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..backbone import ClipBackbone
from ..backbone.features import RoiView
from ..errors import UnknownNameError
from ..options import from_dict
from ..proposals import Proposals


@dataclass
class ImageState:
    """Everything computed once per image: the image, its proposals and method features."""

    image: Image.Image
    key: str | None = None
    proposals: Proposals | None = None
    features: dict[str, Any] = field(default_factory=dict)
    #: What produced ``features`` (:meth:`GroundingMethod.feature_key`), so a state is only
    #: handed to a method that reads the same features.
    feature_key: dict[str, Any] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.image.size


@dataclass
class Ranking:
    """Candidate boxes for one phrase, best first: ``boxes (K, 4)`` xyxy pixels, ``scores (K,)``."""

    boxes: torch.Tensor
    scores: torch.Tensor


@dataclass
class MethodConfig:
    """Base config; each method subclasses it with its own fields (saved as JSON)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "MethodConfig":
        """Build the config from options of any origin (Python values, JSON, ``-o key=value`` strings),
        each coerced to its field's type by the one option parser (:mod:`clipground.options`)."""
        return from_dict(cls, d, what="option", owner=cls.__name__)


@dataclass
class RegionViewConfig(MethodConfig):
    """Options of methods that describe each proposal by CLIP views of it.

    Attributes:
        views: view kinds (``crop``, ``blur``, ``circle``: rendered per box; ``roi``: pooled
            from one whole-image encoding, see ``roi_size``/``roi_dense``).
        roi_size: ``roi`` view: side the whole image is encoded at (0: the checkpoint's own).
        roi_dense: ``roi`` view: pooled patch embeddings, ``value`` (MaskCLIP) or ``final``.
    """

    views: tuple[str, ...] = ("crop", "blur")
    roi_size: int = 0
    roi_dense: str = "value"

    @property
    def roi(self) -> RoiView:
        return RoiView(self.roi_size, self.roi_dense)


class GroundingMethod(nn.Module):
    """Base class. Subclasses set ``name``, ``Config``, and implement the two calls.

    Class attributes:
        name: registry name (``clipground methods`` lists them).
        Config: the method's :class:`MethodConfig` subclass.
        uses_proposals: whether :class:`~clipground.Grounder` must run a proposal source.
        recipe: module of :mod:`clipground.training.recipes` that trains it (``None``: not trainable).
        trainable: derived from ``recipe``.
        saves_backbone: whether a saved method must include the (fine-tuned) backbone.
        inference_options: config fields that only change inference, so a trained method
            loaded by ``Grounder.from_pretrained(dir, options=...)`` may override them.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    uses_proposals: ClassVar[bool] = True
    recipe: ClassVar[str | None] = None
    trainable: ClassVar[bool] = False
    saves_backbone: ClassVar[bool] = False
    inference_options: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.trainable = cls.recipe is not None

    def __init__(self, backbone: ClipBackbone, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.Config()

    def feature_key(self) -> dict[str, Any]:
        """What :meth:`encode_image` computes (kind, options, backbone name): states with another
        key are refused by :meth:`~clipground.Grounder.set_image_state`."""
        return {"kind": self.name, "config": self.config.to_dict(), "backbone": self.backbone.name}

    def encode_image(self, state: ImageState) -> None:
        """Heavy per-image work; store results in ``state.features``."""
        raise NotImplementedError

    def encode_images(self, states: list[ImageState]) -> None:
        """:meth:`encode_image` of several images; a method overrides it to share encoder batches
        across images (the results must not depend on which images come together)."""
        for s in states:
            self.encode_image(s)

    def rank(self, state: ImageState, phrases: list[str]) -> list[Ranking]:
        """Cheap per-phrase work: ranked candidate boxes for each phrase."""
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to save (everything except a frozen shared backbone)."""
        return {k: v for k, v in self.state_dict().items() if self.saves_backbone or not k.startswith("backbone.")}


METHODS: dict[str, type[GroundingMethod]] = {}


def register_method(cls: type[GroundingMethod]) -> type[GroundingMethod]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[GroundingMethod]:
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}; choose from {sorted(METHODS)} (see `clipground methods`)")
    return METHODS[name]
