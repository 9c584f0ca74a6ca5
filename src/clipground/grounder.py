"""The user-facing API, shaped like SAM's predictor.

>>> g = Grounder.load(method="zero-shot", backbone="clipground/world-clip")
>>> g.set_image("scene.png")          # heavy: proposals + CLIP image features, once
>>> g.predict("the red circle").box   # cheap: one text encoding + a matrix product
[x1, y1, x2, y2]

The heavy per-image state can be taken out and put back (``get_image_state`` /
``set_image_state``), so a cache of states (the feature cache, a service's LRU) serves many
phrases without encoding the image again. ``Grounder.from_pretrained(dir)`` loads a trained
method saved by :meth:`Grounder.save_pretrained` (``grounder.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .backbone import DEFAULT_BACKBONE, ClipBackbone
from .phrases import check_phrase
from .errors import CheckpointNotFoundError, ClipgroundError
from .images import ImageInput, load_image
from .io import atomic_dir, write_json
from .memory import trim
from .methods import GroundingMethod, ImageState, Ranking, get_method_class
from .proposals import ProposalSource, get_proposals


@dataclass
class Prediction:
    """The grounding of one phrase in one image.

    Attributes:
        phrase: the expression as given.
        box: the chosen box, ``[x1, y1, x2, y2]`` float pixels of the displayed image.
        score: the method's score for that box (higher is better; scale is method-specific).
        boxes: all candidates ranked best first, ``(K, 4)`` xyxy pixels.
        scores: their scores ``(K,)``.
        image_size: ``(width, height)``.
        fallback: True when the method had no candidate and returned the whole image.
    """

    phrase: str
    box: list[float]
    score: float
    boxes: torch.Tensor
    scores: torch.Tensor
    image_size: tuple[int, int]
    fallback: bool = False

    def to_dict(self, top_k: int = 5) -> dict[str, Any]:
        """JSON-able dict with the box and the top-k candidates."""
        return {
            "phrase": self.phrase,
            "box": [round(v, 2) for v in self.box],
            "box_format": "xyxy",
            "score": float(self.score),
            "image_size": list(self.image_size),
            "fallback": self.fallback,
            "candidates": [
                {"box": [round(v, 2) for v in b], "score": float(s)}
                for b, s in zip(self.boxes[:top_k].tolist(), self.scores[:top_k].tolist())
            ],
        }

    def to_hf(self, top_k: int = 1) -> list[dict[str, Any]]:
        """The transformers ``zero-shot-object-detection`` pipeline's output shape."""
        out = []
        for b, s in zip(self.boxes[:top_k].tolist(), self.scores[:top_k].tolist()):
            out.append({"score": float(s), "label": self.phrase,
                        "box": {"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]}})
        if not out:
            b = self.box
            out.append({"score": float(self.score), "label": self.phrase,
                        "box": {"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]}})
        return out

    def to_supervision(self, top_k: int = 1):
        """A ``supervision.Detections`` (needs ``pip install supervision``)."""
        try:
            import supervision as sv
        except ImportError:
            raise ClipgroundError("to_supervision() needs the supervision package: pip install supervision") from None
        import numpy as np

        boxes = self.boxes[:top_k] if len(self.boxes) else torch.tensor([self.box])
        scores = self.scores[:top_k] if len(self.scores) else torch.tensor([self.score])
        return sv.Detections(
            xyxy=boxes.numpy().astype(np.float32),
            confidence=scores.numpy().astype(np.float32),
            class_id=np.zeros(len(boxes), dtype=int),
            data={"phrase": np.array([self.phrase] * len(boxes))},
        )


class Grounder:
    """Grounds phrases in one image at a time: ``set_image`` once, ``predict`` many times."""

    def __init__(self, method: GroundingMethod, proposals: ProposalSource | None = None):
        if method.uses_proposals and proposals is None:
            raise ClipgroundError(f"method {method.name!r} needs a proposal source")
        self.method = method
        self.proposals = proposals
        self.state: ImageState | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        method: str = "zero-shot",
        backbone: str | ClipBackbone = DEFAULT_BACKBONE,
        proposals: str | ProposalSource | None = "selective-search",
        device: str = "cpu",
        runtime: str = "torch",
        **method_options: Any,
    ) -> "Grounder":
        """Build a grounder from registered names.

        Args:
            method: a name from ``clipground methods``.
            backbone: CLIP hub id, local ``save_pretrained`` directory, bundled name, or a
                loaded :class:`ClipBackbone`.
            proposals: ``selective-search``, ``torchvision``, ``gt:instances.json``,
                ``file:proposals.jsonl``, or a :class:`ProposalSource`.
            runtime: ``torch`` or ``onnx`` (``backbone`` is then a ``clipground export onnx``
                directory; every method encodes through onnxruntime).
            method_options: fields of the method's config.
        """
        mcls = get_method_class(method)
        bb = (backbone if isinstance(backbone, ClipBackbone)
              else ClipBackbone.from_pretrained(backbone, device=device, runtime=runtime))
        config = mcls.Config.from_dict(method_options)
        m = mcls(bb, config)
        return cls(m, get_proposals(proposals) if mcls.uses_proposals else None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, proposals: str | ProposalSource | None = None,
                        device: str = "cpu", options: dict[str, Any] | None = None,
                        runtime: str = "torch", onnx_dir: str | os.PathLike | None = None) -> "Grounder":
        """Load a grounder saved by :meth:`save_pretrained`.

        ``path`` is a saved directory or a bundled trained world grounder
        (``clipground/world-<method>``). A directory without ``grounder.json`` (a plain CLIP
        checkpoint, hub id or bundled name) loads as the zero-shot method on that backbone, with
        ``options`` as its config.
        For a trained method, ``options`` may set only its inference options
        (``GroundingMethod.inference_options``, e.g. the fusion regressor's ``tta``), and
        ``runtime="onnx"`` needs ``onnx_dir``: the ``clipground export onnx`` directory of its
        backbone (for a plain checkpoint ``path`` itself is that directory).
        """
        from .backbone.hub import bundled_grounder_dir

        p = bundled_grounder_dir(str(path)) or Path(path)
        if not (p / "grounder.json").is_file():
            return cls.load("zero-shot", backbone=str(path), proposals=proposals or "selective-search", device=device,
                            runtime=runtime, **(options or {}))
        meta = json.loads((p / "grounder.json").read_text())
        mcls = get_method_class(meta["method"])
        fixed = sorted(set(options or {}) - set(mcls.inference_options))
        if fixed:
            allowed = ", ".join(mcls.inference_options) or "none"
            raise ClipgroundError(f"{p}: option(s) {fixed} are fixed by training; a trained {mcls.name} "
                                  f"accepts only its inference options ({allowed})")
        meta["config"] = {**meta["config"], **(options or {})}
        bb_ref = meta["backbone"]
        bb_path = p / "backbone" if mcls.saves_backbone and (p / "backbone").is_dir() else bb_ref
        bb = ClipBackbone.from_pretrained(bb_path, device=device)
        if runtime == "onnx":
            if onnx_dir is None:
                raise ClipgroundError(f"runtime 'onnx' for the trained grounder {p} needs the exported directory of "
                                      f"its backbone (`clipground export onnx --backbone {bb_path} --out DIR`)")
            bb.use_onnx(onnx_dir)
        bb.name = bb_ref
        m = mcls(bb, mcls.Config.from_dict(meta["config"]))
        weights = p / "model.safetensors"
        if weights.is_file():
            missing, unexpected = m.load_state_dict(load_file(str(weights)), strict=False)
            missing = [k for k in missing if not k.startswith("backbone.")]
            if missing or unexpected:
                raise CheckpointNotFoundError(f"{weights} does not match method {mcls.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        m.eval()
        if proposals is None and mcls.uses_proposals:
            pc = dict(meta.get("proposals") or {"name": "selective-search"})
            proposals = get_proposals(pc.pop("name"), **pc)
        return cls(m, get_proposals(proposals) if mcls.uses_proposals else None)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``grounder.json`` and ``model.safetensors`` (and the backbone if fine-tuned) atomically."""
        meta = {
            "method": self.method.name,
            "config": self.method.config.to_dict(),
            "backbone": self.method.backbone.name,
            "proposals": self.proposals.config() if self.proposals is not None else None,
            "format_version": 1,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.method.trainable_state_dict().items()}
        with atomic_dir(path) as tmp:
            write_json(tmp / "grounder.json", meta)
            if state:
                save_file(state, str(tmp / "model.safetensors"))
            if self.method.saves_backbone:
                self.method.backbone.save_pretrained(tmp / "backbone")

    # ----------------------------------------------------------------- inference
    @property
    def backbone(self) -> ClipBackbone:
        return self.method.backbone

    def set_image(self, image: ImageInput, image_key: str | None = None) -> "Grounder":
        """Load ``image`` and do the heavy per-image work (proposals, CLIP features) once.

        ``image_key`` names the image for file-keyed proposal sources when pixels are
        passed instead of a path.
        """
        img = load_image(image)
        if image_key is None and isinstance(image, (str, os.PathLike)):
            image_key = str(image)
        state = ImageState(image=img, key=image_key, feature_key=self.method.feature_key())
        if self.method.uses_proposals:
            state.proposals = self.proposals(img, image_key)
            trim()  # selective search's buffers are freed: give them back before the encode's peak
        with torch.inference_mode():
            self.method.encode_image(state)
        trim()
        self.state = state
        return self

    def image_states(self, images: Sequence[ImageInput], keys: Sequence[str | None] | None = None,
                     proposals: Sequence[Any] | None = None) -> list[ImageState]:
        """The heavy states of several images, their CLIP work batched across images.

        ``proposals`` (one :class:`~clipground.proposals.Proposals` per image, e.g. computed in
        data-loader workers) skip the proposal source. Each state equals what :meth:`set_image`
        computes for that image alone; hand them to :meth:`set_image_state`.
        """
        keys = list(keys) if keys is not None else [str(im) if isinstance(im, (str, os.PathLike)) else None
                                                    for im in images]
        states = []
        for i, (im, key) in enumerate(zip(images, keys)):
            img = load_image(im)
            st = ImageState(image=img, key=key, feature_key=self.method.feature_key())
            if self.method.uses_proposals:
                st.proposals = proposals[i] if proposals is not None else self.proposals(img, key)
            states.append(st)
        with torch.inference_mode():
            self.method.encode_images(states)
        trim()
        return states

    def reset_image(self) -> "Grounder":
        """Forget the current image (and free its features)."""
        self.state = None
        return self

    def get_image_state(self) -> ImageState:
        """The heavy per-image state of the current image (to keep and :meth:`set_image_state` later)."""
        if self.state is None:
            raise ClipgroundError("no image is set: call set_image(image) first")
        return self.state

    def set_image_state(self, state: ImageState) -> "Grounder":
        """Make ``state`` (from :meth:`get_image_state` or a feature cache) the current image.

        Refused when the state holds other features than this grounder's method computes
        (another method family, other views or patch grid, another backbone).
        """
        if not isinstance(state, ImageState):
            raise ClipgroundError(f"set_image_state() takes an ImageState, got {type(state).__name__}")
        want = self.method.feature_key()
        if state.feature_key != want:
            raise ClipgroundError(f"this image state holds features {state.feature_key} but method "
                                  f"{self.method.name!r} reads {want}; encode the image with set_image()")
        if self.method.uses_proposals and state.proposals is None:
            raise ClipgroundError(f"method {self.method.name!r} needs proposals, and this image state has none")
        self.state = state
        return self

    def predict_batch(self, phrases: Sequence[str]) -> list[Prediction]:
        """Ground several phrases in the current image (the method batches their text encoding)."""
        if self.state is None:
            raise ClipgroundError("call set_image(image) before predict()")
        if isinstance(phrases, str):
            raise ClipgroundError("predict_batch() takes a list of phrases; use predict() for one")
        phrases = [check_phrase(p) for p in phrases]
        w, h = self.state.size
        with torch.inference_mode():
            rankings: list[Ranking] = self.method.rank(self.state, phrases)
        out = []
        for phrase, r in zip(phrases, rankings):
            if len(r.boxes) == 0:
                out.append(Prediction(phrase, [0.0, 0.0, float(w), float(h)], 0.0, r.boxes, r.scores, (w, h), True))
            else:
                out.append(Prediction(phrase, r.boxes[0].tolist(), float(r.scores[0]), r.boxes, r.scores, (w, h)))
        return out

    def predict(self, phrase: str) -> Prediction:
        """Ground one phrase in the current image."""
        return self.predict_batch([phrase])[0]

    def __call__(self, image: ImageInput, phrases: str | Sequence[str]) -> Prediction | list[Prediction]:
        """One call: ``set_image`` then ``predict`` (a list of phrases gives a list)."""
        self.set_image(image)
        if isinstance(phrases, str):
            return self.predict(phrases)
        return self.predict_batch(list(phrases))


def load(method: str = "zero-shot", backbone: str = DEFAULT_BACKBONE, proposals: str | None = "selective-search",
         **kwargs: Any) -> Grounder:
    """Shortcut for :meth:`Grounder.load`."""
    return Grounder.load(method=method, backbone=backbone, proposals=proposals, **kwargs)


def trained_source(method: str, backbone: str | None = None) -> str | None:
    """What a method NAME means where a user may also pass a trained directory (CLI, service).

    ``None`` for a training-free method (build it on ``backbone``); a directory or bundled name
    to load with :meth:`Grounder.from_pretrained` otherwise: the name itself when it is a saved
    directory or a bundled grounder, and for a trainable method's bare name with the bundled world
    CLIP as backbone (or none given) its shipped ``clipground/world-<method>``. A trainable name on
    any other backbone is an error: untrained weights would answer silently wrong.
    """
    from .backbone.hub import WORLD_CLIP, bundled_grounder_dir, bundled_method_name

    if os.path.isdir(method) or bundled_grounder_dir(method) is not None:
        return method
    mcls = get_method_class(method)
    if mcls.recipe is None:
        return None
    name = bundled_method_name(method)
    if backbone in (None, WORLD_CLIP) and bundled_grounder_dir(name) is not None:
        return name
    where = (f"no bundled world checkpoint {name} in this install" if backbone in (None, WORLD_CLIP)
             else f"its bundled {name} runs only with --backbone {WORLD_CLIP}")
    raise CheckpointNotFoundError(
        f"method {method!r} must be trained ({where}): `clipground train --method {method} --train DATA "
        f"--out runs/{method}`, then pass runs/{method}/final as the method")
