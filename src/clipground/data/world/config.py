"""The world's vocabulary and :class:`WorldConfig`, everything that determines a world.

Objects are drawn from a closed vocabulary: shapes ``circle, square, triangle, star,
hexagon``; colours ``red, green, blue, yellow, purple, orange``; sizes ``small`` and
``large``. A world has four splits, ``train``, ``val``, ``test`` and ``compositional``.
A few (colour, shape) pairs are held out (:func:`held_out_pairs`): they never appear in
train/val/test scenes, and every compositional scene contains one and names it as the
target, so the compositional split measures whether a method combines colour and shape
words it has only seen apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from numpy.random import PCG64, Generator, SeedSequence

from ...errors import ClipgroundError

#: Bumped whenever generation changes so that :func:`~clipground.data.world.ensure_world` regenerates.
VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
#: Canonical RGB of each colour name: saturated and far apart in hue on a dark background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 210),
    "orange": (250, 140, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
#: Expression types, stored in each record's ``meta["type"]``.
TYPES: tuple[str, ...] = ("attribute", "spatial", "relational", "ordinal")
#: Index of each split in scene ids and in per-scene seeds.
SPLIT_INDEX: dict[str, int] = {s: i for i, s in enumerate(SPLITS)}
#: Scene ids are ``SPLIT_INDEX[split] * ID_STRIDE + i``, unique across splits.
ID_STRIDE = 100_000


class WorldConfigError(ClipgroundError):
    """The synthetic-world configuration is invalid (size out of range, bad counts, ...)."""


@dataclass
class WorldConfig:
    """Everything that determines a synthetic world; equal configs give identical files.

    Pixel quantities (``small_px``, ``large_px``, ``margin_px``) are given at 128 px and
    scaled linearly with ``image_size``.
    """

    seed: int = 0
    image_size: int = 128
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 500
    n_compositional: int = 300
    min_objects: int = 2
    max_objects: int = 8
    min_expressions: int = 1
    max_expressions: int = 4
    small_px: tuple[float, float] = (14.0, 20.0)
    large_px: tuple[float, float] = (30.0, 40.0)
    p_large: float = 0.4
    max_rotation_deg: float = 10.0
    colour_jitter: int = 10
    clutter: int = 3  # at most this many distractor specks/lines per scene
    texture: float = 8.0  # amplitude (grey levels) of the low-frequency background texture
    noise: float = 2.0  # std (grey levels) of per-pixel Gaussian noise
    margin_px: float = 10.0  # clear gap needed in centre coordinate / distance comparisons
    size_ratio: float = 1.2  # clear ratio needed between sizes for biggest/smallest
    n_held_out: int = 4  # (colour, shape) pairs held out for the compositional split
    held_out_pairs: tuple[tuple[str, str], ...] | None = None  # explicit pairs; None = drawn from seed

    def validate(self) -> None:
        """Raise :class:`WorldConfigError` with a one-line reason if the config is unusable."""
        if not 128 <= self.image_size <= 224:
            raise WorldConfigError(f"image_size must be between 128 and 224, got {self.image_size}")
        for s in SPLITS:
            n = getattr(self, f"n_{s}")
            if not 0 <= n < ID_STRIDE:
                raise WorldConfigError(f"n_{s} must be between 0 and {ID_STRIDE - 1}, got {n}")
        if not 2 <= self.min_objects <= self.max_objects <= 8:
            raise WorldConfigError(f"need 2 <= min_objects <= max_objects <= 8, got {self.min_objects}, {self.max_objects}")
        if not 1 <= self.min_expressions <= self.max_expressions:
            raise WorldConfigError("need 1 <= min_expressions <= max_expressions")
        lo_s, hi_s = self.small_px
        lo_l, hi_l = self.large_px
        if not (6 <= lo_s <= hi_s < lo_l <= hi_l <= 48):
            raise WorldConfigError("need 6 <= small_px[0] <= small_px[1] < large_px[0] <= large_px[1] <= 48")
        if not 0 <= self.p_large <= 1:
            raise WorldConfigError("p_large must be in [0, 1]")
        if self.clutter < 0 or self.texture < 0 or self.noise < 0 or self.colour_jitter < 0:
            raise WorldConfigError("clutter, texture, noise and colour_jitter must be >= 0")
        if self.margin_px <= 0 or self.size_ratio <= 1:
            raise WorldConfigError("margin_px must be > 0 and size_ratio > 1")
        if self.held_out_pairs is None:
            if not 1 <= self.n_held_out <= min(len(SHAPES), len(COLOURS)):
                raise WorldConfigError(f"n_held_out must be between 1 and {len(SHAPES)}")
        else:
            pairs = [tuple(p) for p in self.held_out_pairs]
            if not pairs:
                raise WorldConfigError("held_out_pairs must not be empty")
            for p in pairs:
                if len(p) != 2 or p[0] not in COLOURS or p[1] not in SHAPES:
                    raise WorldConfigError(f"held-out pair {list(p)} is not [colour, shape]")
            if len(set(pairs)) != len(pairs):
                raise WorldConfigError("held_out_pairs contains duplicates")

    @property
    def scale(self) -> float:
        """Factor from 128-px reference quantities to this image size."""
        return self.image_size / 128.0

    @property
    def margin(self) -> float:
        """Positional margin in pixels at this image size."""
        return self.margin_px * self.scale

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists), as stored in ``world.json``."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WorldConfig":
        """Inverse of :meth:`to_json`; unknown keys are an error."""
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise WorldConfigError(f"unknown world config fields: {sorted(extra)}")
        for k in ("small_px", "large_px"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        if d.get("held_out_pairs") is not None:
            d["held_out_pairs"] = tuple(tuple(p) for p in d["held_out_pairs"])
        return cls(**d)


def held_out_pairs(cfg: WorldConfig) -> list[tuple[str, str]]:
    """The held-out (colour, shape) pairs: explicit, or drawn from the seed.

    Drawn pairs use distinct colours and distinct shapes, so every colour and every shape
    still appears in training scenes (only their combination is new).
    """
    if cfg.held_out_pairs is not None:
        return sorted((str(c), str(s)) for c, s in cfg.held_out_pairs)
    rng = Generator(PCG64(SeedSequence([cfg.seed, 7_777])))
    cols = rng.permutation(len(COLOUR_NAMES))[: cfg.n_held_out]
    shps = rng.permutation(len(SHAPES))[: cfg.n_held_out]
    return sorted((COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(cols, shps))
