"""The world's vocabulary and :class:`WorldConfig`, everything that determines a world.

Objects are drawn from a closed vocabulary: shapes ``circle, square, triangle, star,
hexagon``; colours ``red, green, blue, yellow, purple, orange``; sizes ``small`` and
``large``. A world has six splits:

* ``train``, ``val``, ``test``: scenes in the training looks, expressions in the training
  phrasings;
* ``compositional``: a few (colour, shape) pairs are held out (:func:`held_out_pairs`): they
  never appear in the other splits' scenes, and every compositional scene contains one and
  names it as the target, so the split measures whether a method combines colour and shape
  words it has only seen apart;
* ``new-look``: scenes drawn in held-out rendering families (a background x shape-style
  combination never seen in training, each background and style seen in other combinations),
  described in the held-out phrasings where the grammar has one: a world that differs from
  training in look and phrasing;
* ``paraphrase``: the ``test`` scenes again, each expression re-said in a held-out phrasing
  (words seen in training, in a construction that is not), so paraphrased and template
  expressions can be compared on the same scenes and targets.

``looks="classic"`` and ``phrasing="v1"`` (:meth:`WorldConfig.v1`) generate the first world
exactly (one look, the first grammar), the world the first bundled CLIP was pretrained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from numpy.random import PCG64, Generator, SeedSequence

from ...errors import ClipgroundError

#: Bumped whenever generation changes so that :func:`~clipground.data.world.ensure_world` regenerates.
VERSION = 2

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
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional", "new-look", "paraphrase")
#: Splits whose scenes are rendered (``paraphrase`` re-describes the ``test`` scenes).
RENDERED_SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional", "new-look")
#: Backgrounds and shape styles of the rendering families (``looks="many"``).
BACKGROUNDS: tuple[str, ...] = ("dark", "light", "textured", "gradient")
STYLES: tuple[str, ...] = ("flat", "shaded", "outlined")
LOOKS = ("classic", "many")
PHRASINGS = ("v1", "rich")
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
    looks: str = "many"  # "classic": the first world's single look; "many": rendering families per scene
    phrasing: str = "rich"  # "v1": the first grammar; "rich": paraphrases of every relation and attribute
    n_new_look: int = 300  # scenes in held-out rendering families (looks="many")
    held_out_looks: tuple[tuple[str, str], ...] = (("light", "shaded"), ("textured", "outlined"), ("gradient", "flat"))
    image_sizes: tuple[int, int] = (96, 224)  # looks="many": each scene's side drawn from this range
    rotations: tuple[float, float] = (10.0, 35.0)  # looks="many": each scene's max rotation (degrees)

    @classmethod
    def v1(cls, **kwargs: Any) -> "WorldConfig":
        """The first world's settings (one look, the first grammar, no new-look scenes)."""
        return cls(**{"looks": "classic", "phrasing": "v1", "n_new_look": 0, **kwargs})

    @property
    def n_paraphrase(self) -> int:
        """``paraphrase`` has no scenes of its own (it re-describes ``test``)."""
        return 0

    def validate(self) -> None:
        """Raise :class:`WorldConfigError` with a one-line reason if the config is unusable."""
        if self.looks not in LOOKS:
            raise WorldConfigError(f"looks must be one of {', '.join(LOOKS)}, got {self.looks!r}")
        if self.phrasing not in PHRASINGS:
            raise WorldConfigError(f"phrasing must be one of {', '.join(PHRASINGS)}, got {self.phrasing!r}")
        if not 128 <= self.image_size <= 224:
            raise WorldConfigError(f"image_size must be between 128 and 224, got {self.image_size}")
        lo, hi = self.image_sizes
        if not 96 <= lo <= hi <= 224:
            raise WorldConfigError(f"image_sizes must lie in [96, 224], got {list(self.image_sizes)}")
        if not 0 <= self.rotations[0] <= self.rotations[1] <= 45:
            raise WorldConfigError(f"rotations must lie in [0, 45] degrees, got {list(self.rotations)}")
        looks = [tuple(x) for x in self.held_out_looks]
        for b, st in looks:
            if b not in BACKGROUNDS or st not in STYLES:
                raise WorldConfigError(f"held-out look {[b, st]} is not [background, style] "
                                       f"(backgrounds {', '.join(BACKGROUNDS)}; styles {', '.join(STYLES)})")
        if len(looks) >= len(BACKGROUNDS) * len(STYLES) or len(set(looks)) != len(looks):
            raise WorldConfigError("held_out_looks must be distinct and leave training looks")
        if self.looks == "classic" and self.n_new_look:
            raise WorldConfigError("a classic-look world has no held-out looks: set n_new_look=0")
        for s in RENDERED_SPLITS:
            n = getattr(self, f"n_{s.replace('-', '_')}")
            if not 0 <= n < ID_STRIDE:
                raise WorldConfigError(f"n_{s.replace('-', '_')} must be between 0 and {ID_STRIDE - 1}, got {n}")
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

    def margin_at(self, side: int) -> float:
        """Positional margin in pixels for a scene of side ``side`` (scenes vary with ``looks="many"``)."""
        return self.margin_px * (side / 128.0)

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
        for k in ("small_px", "large_px", "rotations"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        if "image_sizes" in d:
            d["image_sizes"] = tuple(int(v) for v in d["image_sizes"])
        for k in ("held_out_pairs", "held_out_looks"):
            if d.get(k) is not None:
                d[k] = tuple(tuple(p) for p in d[k])
        return cls(**d)


def training_looks(cfg: WorldConfig) -> list[tuple[str, str]]:
    """The (background, style) families of train/val/test/compositional scenes (``looks="many"``)."""
    held = {tuple(x) for x in cfg.held_out_looks}
    return [(b, s) for b in BACKGROUNDS for s in STYLES if (b, s) not in held]


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
