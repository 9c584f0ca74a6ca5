"""A synthetic referring-expression world (in the spirit of CLEVR-Ref+).

No pretrained CLIP is reachable from our machines, so methods are proven in a world we
generate: flat-coloured shapes on a textured background, each scene with 2-8 objects and
1-4 referring expressions that each pick out exactly one object. It doubles as a
diagnostic benchmark that generates and evaluates in minutes on CPU.

Objects: shapes ``circle, square, triangle, star, hexagon``; colours ``red, green, blue,
yellow, purple, orange`` (with slight per-object jitter); sizes ``small`` (14-20 px) and
``large`` (30-40 px) at 128 px, scaled with the image size. Object boxes never overlap.

Expressions come from a small fixed grammar (see :data:`TEMPLATES`), in four types stored
in ``meta["type"]``: ``attribute``, ``spatial``, ``relational`` and ``ordinal``. Each
expression is accepted only if :func:`check_expression` -- an independent checker that
parses the *text* and evaluates its meaning over the scene objects -- finds exactly the
intended object. Positional comparisons need a clear margin (``margin_px``, 10 px at
128 px) and size comparisons a clear ratio (``size_ratio``), so answers are obvious to a
person.

Splits: ``train``, ``val``, ``test`` and ``compositional``. A few (colour, shape) pairs are
held out: they never appear in train/val/test scenes; every compositional scene contains
one and its expressions name it (colour and shape) as the target.

Layout written by :func:`generate_world`::

    OUT/images/{split}/{scene_id:06d}.png
    OUT/{split}.jsonl             GroundingRecords (image path relative to OUT)
    OUT/instances_{split}.json    COCO instances; masks as uncompressed COCO RLE
    OUT/world.json                config, vocabulary, held-out pairs, counts (written last)

Masks are stored in the COCO json as ``segmentation = {"size": [h, w], "counts": [...]}``
(uncompressed RLE, column-major, starting with a run of zeros), which pycocotools reads;
:func:`rle_decode` decodes it without pycocotools. Scene ids are unique across splits:
``split_index * 100000 + i`` (train 0, val 1, test 2, compositional 3).

Everything is seeded: each scene draws from its own ``PCG64(SeedSequence([seed, split,
i]))``, so a split's scenes do not depend on other splits' sizes and the same config
gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.random import PCG64, Generator, SeedSequence
from PIL import Image
from tqdm import tqdm

from ..errors import BadAnnotationError, ClipgroundError
from .jsonl import write_jsonl
from .records import GroundingRecord

__all__ = [
    "VERSION",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "SPLITS",
    "TYPES",
    "TEMPLATES",
    "WorldConfigError",
    "WorldConfig",
    "SceneObject",
    "Scene",
    "NounPhrase",
    "ParsedExpression",
    "Expression",
    "held_out_pairs",
    "render_scene",
    "describe",
    "parse_expression",
    "resolve",
    "check_expression",
    "generate_world",
    "ensure_world",
    "load_world_config",
    "load_scene_objects",
    "rle_encode",
    "rle_decode",
]

#: Bumped whenever generation changes so that :func:`ensure_world` regenerates.
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
TYPES: tuple[str, ...] = ("attribute", "spatial", "relational", "ordinal")
_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}
_ID_STRIDE = 100_000

# Canonical relation names (meta["relation"]) and the surface forms used for them.
_SUPERLATIVE_WORDS = ("leftmost", "rightmost", "topmost", "bottommost", "biggest", "smallest")
_POSITION_PHRASES = {"leftmost": "on the left", "rightmost": "on the right", "topmost": "at the top", "bottommost": "at the bottom"}
_RELATION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
    "closest to": ("closest to",),
    "farthest from": ("farthest from",),
}
_ORDINALS = {  # canonical relation -> (k, direction)
    "second from the left": (2, "left"),
    "third from the left": (3, "left"),
    "second from the right": (2, "right"),
    "second from the top": (2, "top"),
    "second from the bottom": (2, "bottom"),
}
_ORDINAL_WORDS = {2: "second", 3: "third"}

#: Every surface template, exactly. ``{np}``/``{x}``/``{y}`` are noun phrases
#: ``[small|large] [colour] shape`` (size before colour, both optional).
TEMPLATES: dict[str, list[str]] = {
    "attribute": ["the {np}", "a {np}", "{np}"],
    "spatial": [f"the {w} {{np}}" for w in _SUPERLATIVE_WORDS] + [f"the {{np}} {p}" for p in _POSITION_PHRASES.values()],
    "relational": [f"the {{x}} {p} the {{y}}" for ps in _RELATION_PHRASES.values() for p in ps],
    "ordinal": [f"the {_ORDINAL_WORDS[k]} {{np}} from the {d}" for k, d in _ORDINALS.values()],
}


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
            if not 0 <= n < _ID_STRIDE:
                raise WorldConfigError(f"n_{s} must be between 0 and {_ID_STRIDE - 1}, got {n}")
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


# --------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    """One object: attributes, its tight ``xyxy`` box, its mask and mask area (pixels).

    The box is ``[xmin, ymin, xmax + 1, ymax + 1]`` of the mask's pixels. ``mask`` is a full
    image ``(H, W)`` bool array, or ``None`` when loaded from annotations without masks.
    """

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]
    area: int
    rgb: tuple[int, int, int] = (0, 0, 0)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def center(self) -> tuple[float, float]:
        """Box centre ``(cx, cy)``: the position used by every spatial comparison."""
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass
class Scene:
    """A rendered scene: ``image`` is ``(H, W, 3)`` uint8 RGB."""

    image: np.ndarray = field(repr=False)
    objects: list[SceneObject]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


def _unit_polygon(shape: str) -> np.ndarray:
    """Shape outline centred on its box centre, largest half-extent 1 (unrotated)."""
    if shape == "circle":
        t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
        r = np.ones_like(t)
    elif shape == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        r = np.ones_like(t)
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        r = np.ones_like(t)
    elif shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        r = np.ones_like(t)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    else:  # pragma: no cover - guarded by the vocabulary
        raise ValueError(shape)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


_UNIT = {s: _unit_polygon(s) for s in SHAPES}


def _sample_pair(
    rng: Generator, pal_shapes: np.ndarray, pal_cols: np.ndarray, forbidden: set[tuple[str, str]]
) -> tuple[str, str]:
    """A (colour, shape) pair, usually from the scene's small palette (so repeats occur)."""
    for _ in range(20):
        s = int(rng.choice(pal_shapes)) if rng.random() < 0.7 else int(rng.integers(len(SHAPES)))
        c = int(rng.choice(pal_cols)) if rng.random() < 0.7 else int(rng.integers(len(COLOUR_NAMES)))
        pair = (COLOUR_NAMES[c], SHAPES[s])
        if pair not in forbidden:
            return pair
    allowed = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in forbidden]
    return allowed[int(rng.integers(len(allowed)))]


def _background(rng: Generator, cfg: WorldConfig) -> np.ndarray:
    """Dark, slightly tinted background with low-frequency texture and clutter (uint8)."""
    n = cfg.image_size
    base = rng.uniform(35.0, 80.0) + rng.uniform(-8.0, 8.0, size=3)
    img = np.empty((n, n, 3), np.float32)
    img[:] = base.astype(np.float32)
    if cfg.texture > 0:
        grid = rng.normal(0.0, 1.0, size=(5, 5)).astype(np.float32)
        tex = cv2.resize(grid, (n, n), interpolation=cv2.INTER_CUBIC)
        img += (cfg.texture * tex)[:, :, None]
    out = np.clip(img, 0, 255).astype(np.uint8)
    s = cfg.scale
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):
        grey = float(np.clip(base.mean() + rng.choice([-1.0, 1.0]) * rng.uniform(30, 70), 0, 255))
        colour = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.uniform(-6, 6, size=3))
        x, y = (float(v) for v in rng.uniform(0, n, size=2))
        if rng.random() < 0.5:
            cv2.circle(out, (int(x), int(y)), int(round(rng.uniform(1.0, 2.0) * s)), colour, -1, cv2.LINE_8)
        else:
            ang, ln = rng.uniform(0, np.pi), rng.uniform(6.0, 16.0) * s
            p2 = (int(x + ln * math.cos(ang)), int(y + ln * math.sin(ang)))
            cv2.line(out, (int(x), int(y)), p2, colour, 1, cv2.LINE_8)
    return out


def render_scene(
    rng: Generator,
    cfg: WorldConfig,
    *,
    compositional: bool = False,
    held_out: Sequence[tuple[str, str]] | None = None,
) -> Scene:
    """Render one scene of ``cfg.min_objects``-``cfg.max_objects`` non-overlapping objects.

    Held-out pairs (default: :func:`held_out_pairs` of ``cfg``) are never drawn, except
    that a ``compositional`` scene gets 1-3 objects of one held-out pair (its other objects
    often share that pair's colour or shape, so naming the target needs both).
    """
    held = [tuple(p) for p in (held_out if held_out is not None else held_out_pairs(cfg))]
    forbidden = set(held)
    n = cfg.image_size
    s = cfg.scale
    pad, gap = 2.0, 3.0 * s
    while True:
        img = _background(rng, cfg)
        n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        pal_shapes = rng.choice(len(SHAPES), size=int(rng.integers(1, 4)), replace=False)
        pal_cols = rng.choice(len(COLOUR_NAMES), size=int(rng.integers(1, 4)), replace=False)
        specs: list[tuple[str, str]] = []
        if compositional:
            c, sh = held[int(rng.integers(len(held)))]
            k = int(rng.choice([1, 1, 2, 2, 3]))
            specs += [(c, sh)] * min(k, n_obj)
            pal_shapes = np.array([SHAPES.index(sh)])
            pal_cols = np.array([COLOUR_NAMES.index(c)])
        while len(specs) < n_obj:
            specs.append(_sample_pair(rng, pal_shapes, pal_cols, forbidden))
        large = rng.random(n_obj) < cfg.p_large
        order = np.argsort(~large, kind="stable")  # place large objects first
        placed: list[tuple[int, str, str, float, np.ndarray]] = []  # (spec idx, colour, shape, extent, pts)
        rects: list[tuple[float, float, float, float]] = []
        for j in order:
            colour, shape = specs[j]
            for is_large in ((True, False) if large[j] else (False,)):
                lo, hi = cfg.large_px if is_large else cfg.small_px
                ext = float(rng.uniform(lo, hi)) * s
                ang = 0.0 if shape == "circle" else math.radians(float(rng.uniform(-1, 1)) * cfg.max_rotation_deg)
                rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
                pts = _UNIT[shape] @ rot.T * ((ext - 1.0) / 2.0)
                lo_xy, hi_xy = pts.min(0), pts.max(0)
                ok = False
                for _ in range(40):
                    cx = rng.uniform(pad - lo_xy[0], n - 1 - pad - hi_xy[0])
                    cy = rng.uniform(pad - lo_xy[1], n - 1 - pad - hi_xy[1])
                    r = (cx + lo_xy[0] - gap, cy + lo_xy[1] - gap, cx + hi_xy[0] + gap, cy + hi_xy[1] + gap)
                    if all(r[0] > q[2] or r[2] < q[0] or r[1] > q[3] or r[3] < q[1] for q in rects):
                        ok = True
                        break
                if ok:
                    rects.append((cx + lo_xy[0], cy + lo_xy[1], cx + hi_xy[0], cy + hi_xy[1]))
                    placed.append((int(j), colour, shape, ext, pts + np.array([cx, cy])))
                    large[j] = is_large
                    break
        if len(placed) < cfg.min_objects or (compositional and not any(p[1:3] in forbidden for p in placed)):
            continue
        placed.sort(key=lambda p: p[0])
        objects: list[SceneObject] = []
        for j, colour, shape, _, pts in placed:
            # Rasterise in a local patch (fast), then place the patch in a full-image mask.
            x0, y0 = (max(0, int(v) - 1) for v in np.floor(pts.min(0)))
            x1, y1 = (min(n, int(v) + 2) for v in np.ceil(pts.max(0)))
            # Anti-aliased coverage; the mask is the pixels at least half covered.
            alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(alpha, [np.round((pts - [x0, y0]) * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
            local = alpha >= 128
            ys, xs = np.nonzero(local)
            jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
            a = (alpha.astype(np.float32) / 255.0)[:, :, None]
            region = img[y0:y1, x0:x1]
            region[:] = np.rint(region * (1.0 - a) + np.array(rgb, np.float32) * a).astype(np.uint8)
            mask = np.zeros((n, n), bool)
            mask[y0:y1, x0:x1] = local
            box = (float(xs.min() + x0), float(ys.min() + y0), float(xs.max() + x0 + 1), float(ys.max() + y0 + 1))
            objects.append(SceneObject(shape, colour, "large" if large[j] else "small", box, int(xs.size), rgb, mask))
        if cfg.noise > 0:
            noisy = img.astype(np.float32) + rng.normal(0.0, cfg.noise, size=img.shape).astype(np.float32)
            img = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return Scene(img, objects)


# ------------------------------------------------------------ parsing and checking


@dataclass(frozen=True)
class NounPhrase:
    """``[size] [colour] shape``; ``None`` for an attribute that is not mentioned."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def __str__(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)

    def matches(self, o: SceneObject) -> bool:
        return o.shape == self.shape and self.colour in (None, o.colour) and self.size in (None, o.size)


@dataclass(frozen=True)
class ParsedExpression:
    """The structure of a template expression; ``relation`` is canonical (see module doc)."""

    type: str
    subject: NounPhrase
    relation: str | None = None
    object: NounPhrase | None = None


_NP = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOUR_NAMES)}) )?({'|'.join(SHAPES)})"
_RX_ATTR = re.compile(rf"^(?:the |a )?{_NP}$")
_RX_SUP = re.compile(rf"^the ({'|'.join(_SUPERLATIVE_WORDS)}) {_NP}$")
_RX_POS = re.compile(rf"^the {_NP} ({'|'.join(_POSITION_PHRASES.values())})$")
_REL_SURFACE = {p: canon for canon, ps in _RELATION_PHRASES.items() for p in ps}
_RX_REL = re.compile(rf"^the {_NP} ({'|'.join(sorted(_REL_SURFACE, key=len, reverse=True))}) the {_NP}$")
_RX_ORD = re.compile(rf"^the (second|third) {_NP} from the (left|right|top|bottom)$")
_POS_CANON = {p: c for c, p in _POSITION_PHRASES.items()}


def _np(size: str | None, colour: str | None, shape: str) -> NounPhrase:
    return NounPhrase(shape=shape, colour=colour or None, size=size or None)


def parse_expression(text: str) -> ParsedExpression | None:
    """Parse a world expression (exactly the :data:`TEMPLATES` grammar); ``None`` otherwise.

    Case, surrounding whitespace and a final full stop are ignored.
    """
    t = " ".join(text.lower().split()).rstrip(".")
    if m := _RX_ATTR.match(t):
        return ParsedExpression("attribute", _np(*m.groups()))
    if m := _RX_SUP.match(t):
        return ParsedExpression("spatial", _np(*m.groups()[1:]), m.group(1))
    if m := _RX_POS.match(t):
        return ParsedExpression("spatial", _np(*m.groups()[:3]), _POS_CANON[m.group(4)])
    if m := _RX_REL.match(t):
        g = m.groups()
        return ParsedExpression("relational", _np(*g[:3]), _REL_SURFACE[g[3]], _np(*g[4:]))
    if m := _RX_ORD.match(t):
        g = m.groups()
        return ParsedExpression("ordinal", _np(*g[1:4]), f"{g[0]} from the {g[4]}")
    return None


def _key(o: SceneObject, direction: str) -> float:
    cx, cy = o.center
    return {"left": cx, "right": -cx, "top": cy, "bottom": -cy}[direction]


def _box_side(o: SceneObject) -> float:
    return math.sqrt((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))


def resolve(parsed: ParsedExpression, objects: Sequence[SceneObject], margin: float, size_ratio: float) -> list[int]:
    """Indices of the objects the expression may refer to (a unique referent gives one).

    Ambiguity is returned as several indices: a superlative whose runner-up is within
    ``margin`` px (or, for sizes, within ``size_ratio`` in both sqrt mask area and sqrt box
    area) returns both; a relation also returns subjects within ``margin`` of the landmark
    along the relation's axis; a relation whose landmark is not unique returns ``[]``.
    """
    subj = [i for i, o in enumerate(objects) if parsed.subject.matches(o)]
    rel = parsed.relation
    if parsed.type == "attribute":
        return subj
    if parsed.type == "spatial":
        if rel in ("biggest", "smallest"):
            sign = -1.0 if rel == "biggest" else 1.0
            ranked = sorted(subj, key=lambda i: sign * objects[i].area)
            if len(ranked) < 2:
                return ranked
            a, b = objects[ranked[0]], objects[ranked[1]]
            big, small = (a, b) if rel == "biggest" else (b, a)
            ok = math.sqrt(big.area) >= size_ratio * math.sqrt(small.area) and _box_side(big) >= size_ratio * _box_side(small)
            return ranked[:1] if ok else sorted(ranked[:2])
        direction = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}[rel]
        ranked = sorted(subj, key=lambda i: _key(objects[i], direction))
        if len(ranked) < 2:
            return ranked
        gap = _key(objects[ranked[1]], direction) - _key(objects[ranked[0]], direction)
        return ranked[:1] if gap >= margin else sorted(ranked[:2])
    if parsed.type == "ordinal":
        k, direction = _ordinal_parts(rel)
        ranked = sorted(subj, key=lambda i: _key(objects[i], direction))
        if len(ranked) < k:
            return []
        t = ranked[k - 1]
        near = [
            ranked[j]
            for j in (k - 2, k)
            if 0 <= j < len(ranked) and abs(_key(objects[ranked[j]], direction) - _key(objects[t], direction)) < margin
        ]
        return sorted([t, *near])
    # relational
    assert parsed.object is not None
    landmarks = [i for i, o in enumerate(objects) if parsed.object.matches(o)]
    if len(landmarks) != 1:
        return []
    y = landmarks[0]
    yx, yy = objects[y].center
    cand = [i for i in subj if i != y]
    if rel in ("left of", "right of", "above", "below"):
        axis, sign = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}[rel]
        ref = (yx, yy)[axis]
        clear = [i for i in cand if sign * (objects[i].center[axis] - ref) >= margin]
        unclear = [i for i in cand if abs(objects[i].center[axis] - ref) < margin]
        return sorted(clear + unclear) if clear else []
    if rel in ("closest to", "farthest from"):
        sign = 1.0 if rel == "closest to" else -1.0

        def dist(i: int) -> float:
            cx, cy = objects[i].center
            return math.hypot(cx - yx, cy - yy)

        ranked = sorted(cand, key=lambda i: sign * dist(i))
        if len(ranked) < 2:
            return ranked
        return ranked[:1] if abs(dist(ranked[1]) - dist(ranked[0])) >= margin else sorted(ranked[:2])
    raise ValueError(f"unknown relation {rel!r}")


def _ordinal_parts(rel: str | None) -> tuple[int, str]:
    """``"second from the left"`` -> ``(2, "left")`` (any of second/third x 4 directions)."""
    word, _, rest = (rel or "").partition(" from the ")
    return {"second": 2, "third": 3}[word], rest


def check_expression(text: str, objects: Sequence[SceneObject], cfg: WorldConfig) -> list[int]:
    """Referents of ``text`` in a scene of ``cfg``'s world (``[]`` if it does not parse)."""
    parsed = parse_expression(text)
    if parsed is None:
        return []
    return resolve(parsed, objects, cfg.margin, cfg.size_ratio)


# --------------------------------------------------------------------- expressions


@dataclass
class Expression:
    """A generated expression and its parsed structure."""

    text: str
    type: str
    target: int
    subject: str
    relation: str | None
    object: str | None
    compositional: bool

    def meta(self, scene_id: int) -> dict[str, Any]:
        return {
            "type": self.type,
            "scene_id": scene_id,
            "target": self.target,
            "subject": self.subject,
            "relation": self.relation,
            "object": self.object,
            "compositional": self.compositional,
        }


class _Candidates:
    """Vectorised enumeration of valid expressions in one scene (the generator's side).

    Works on a noun-phrase x object match matrix with numpy; it is deliberately a separate
    implementation from :func:`resolve`, which re-checks every pick from the text.
    """

    def __init__(self, objects: Sequence[SceneObject], cfg: WorldConfig, held: set[tuple[str, str]], compositional: bool):
        self.objects = objects
        self.margin = cfg.margin
        self.ratio = cfg.size_ratio
        n = len(objects)
        self.n = n
        sh = np.array([SHAPES.index(o.shape) for o in objects])
        co = np.array([COLOUR_NAMES.index(o.colour) for o in objects])
        sz = np.array([SIZES.index(o.size) for o in objects])
        boxes = np.array([o.box for o in objects], dtype=np.float64)
        self.cx = (boxes[:, 0] + boxes[:, 2]) / 2
        self.cy = (boxes[:, 1] + boxes[:, 3]) / 2
        self.side_mask = np.sqrt(np.array([o.area for o in objects], dtype=np.float64))
        self.side_box = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        rows = sorted({(sz[i] if us else -1, co[i] if uc else -1, sh[i]) for i in range(n) for us in (0, 1) for uc in (0, 1)})
        self.nps = np.array(rows, dtype=np.int64)
        ns, nc, nh = self.nps[:, 0:1], self.nps[:, 1:2], self.nps[:, 2:3]
        self.M = (nh == sh) & ((nc < 0) | (nc == co)) & ((ns < 0) | (ns == sz))
        self.cnt = self.M.sum(1)
        self.level = (self.nps[:, 0] >= 0).astype(int) + (self.nps[:, 1] >= 0)
        if compositional:
            self.allowed = np.array([c >= 0 and (COLOUR_NAMES[c], SHAPES[h]) in held for _, c, h in rows], dtype=bool)
        else:
            self.allowed = np.ones(len(rows), dtype=bool)

    def np_text(self, row: int) -> str:
        s, c, h = (int(v) for v in self.nps[row])
        return str(NounPhrase(SHAPES[h], COLOUR_NAMES[c] if c >= 0 else None, SIZES[s] if s >= 0 else None))

    def unique_rows(self, i: int) -> np.ndarray:
        """Noun-phrase rows that name object ``i`` alone."""
        return np.flatnonzero((self.cnt == 1) & self.M[:, i])

    def _ranked(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: object order by ``values`` among matches (non-matches last, as +inf)."""
        V = np.where(self.M[rows], values[None, :], np.inf)
        V = np.concatenate([V, np.full((len(rows), 1), np.inf)], axis=1)
        order = np.argsort(V, axis=1, kind="stable")
        return order, np.take_along_axis(V, order, axis=1)

    def attribute(self) -> dict[str | None, list[tuple]]:
        out: list[tuple] = []
        uniq = (self.cnt == 1) & self.allowed
        for i in range(self.n):
            rows = np.flatnonzero(uniq & self.M[:, i])
            if rows.size:
                lv = self.level[rows]
                out += [(i, int(r), None, None) for r in rows[lv == lv.min()]]
        return {None: out} if out else {}

    def spatial(self) -> dict[str | None, list[tuple]]:
        out: dict[str | None, list[tuple]] = {}
        rows = np.flatnonzero(self.allowed & (self.cnt >= 2))
        if not rows.size:
            return out
        for rel, vals in (("leftmost", self.cx), ("rightmost", -self.cx), ("topmost", self.cy), ("bottommost", -self.cy)):
            order, V = self._ranked(rows, vals)
            ok = V[:, 1] - V[:, 0] >= self.margin
            out[rel] = [(int(order[k, 0]), int(r), rel, None) for k, r in enumerate(rows) if ok[k]]
        size_rows = rows[self.nps[rows, 0] < 0]
        if size_rows.size:
            for rel, sign in (("biggest", -1.0), ("smallest", 1.0)):
                order, _ = self._ranked(size_rows, sign * self.side_mask)
                a, b = order[:, 0], order[:, 1]
                big, small = (a, b) if rel == "biggest" else (b, a)
                ok = (self.side_mask[big] >= self.ratio * self.side_mask[small]) & (
                    self.side_box[big] >= self.ratio * self.side_box[small]
                )
                out[rel] = [(int(a[k]), int(r), rel, None) for k, r in enumerate(size_rows) if ok[k]]
        return {k: v for k, v in out.items() if v}

    def ordinal(self) -> dict[str | None, list[tuple]]:
        out: dict[str | None, list[tuple]] = {}
        vals = {"left": self.cx, "right": -self.cx, "top": self.cy, "bottom": -self.cy}
        for rel, (k, d) in _ORDINALS.items():
            rows = np.flatnonzero(self.allowed & (self.cnt >= k))
            if not rows.size:
                continue
            order, V = self._ranked(rows, vals[d])
            ok = (V[:, k - 1] - V[:, k - 2] >= self.margin) & (V[:, k] - V[:, k - 1] >= self.margin)
            cands = [(int(order[j, k - 1]), int(r), rel, None) for j, r in enumerate(rows) if ok[j]]
            if cands:
                out[rel] = cands
        return out

    def relational(self) -> dict[str | None, list[tuple]]:
        out: dict[str | None, list[tuple]] = {}
        rows = np.flatnonzero(self.allowed & (self.cnt >= 2))
        if not rows.size:
            return out
        idx = np.arange(self.n)
        for y in range(self.n):
            if not self.unique_rows(y).size:
                continue
            Mx = self.M[rows] & (idx != y)[None, :]
            for rel, vals, sign in (
                ("left of", self.cx, -1.0),
                ("right of", self.cx, 1.0),
                ("above", self.cy, -1.0),
                ("below", self.cy, 1.0),
            ):
                diff = vals - vals[y]
                clear = sign * diff >= self.margin
                unclear = np.abs(diff) < self.margin
                ok = ((Mx & clear).sum(1) == 1) & ((Mx & unclear).sum(1) == 0)
                tgt = np.argmax(Mx & clear, axis=1)
                out.setdefault(rel, []).extend((int(tgt[k]), int(r), rel, y) for k, r in enumerate(rows) if ok[k])
            d = np.hypot(self.cx - self.cx[y], self.cy - self.cy[y])
            for rel, sign in (("closest to", 1.0), ("farthest from", -1.0)):
                V = np.where(Mx, sign * d[None, :], np.inf)
                order = np.argsort(V, axis=1, kind="stable")
                Vs = np.take_along_axis(V, order, axis=1)
                ok = (Mx.sum(1) >= 2) & (Vs[:, 1] - Vs[:, 0] >= self.margin)
                out.setdefault(rel, []).extend((int(order[k, 0]), int(r), rel, y) for k, r in enumerate(rows) if ok[k])
        return {k: v for k, v in out.items() if v}


def _render_text(c: _Candidates, typ: str, cand: tuple, rng: Generator) -> tuple[str, str, str | None]:
    """Surface text for a candidate: (text, subject noun phrase, landmark noun phrase)."""
    target, row, rel, y = cand
    x = c.np_text(row)
    if typ == "attribute":
        return TEMPLATES["attribute"][int(rng.integers(3))].format(np=x), x, None
    if typ == "spatial":
        if rel in _POSITION_PHRASES and c.cnt[row] == 2 and rng.random() < 0.5:
            return f"the {x} {_POSITION_PHRASES[rel]}", x, None
        return f"the {rel} {x}", x, None
    if typ == "ordinal":
        k, d = _ORDINALS[rel]
        return f"the {_ORDINAL_WORDS[k]} {x} from the {d}", x, None
    yrows = c.unique_rows(y)
    yt = c.np_text(int(yrows[int(rng.integers(len(yrows)))]))
    phrases = _RELATION_PHRASES[rel]
    return f"the {x} {phrases[int(rng.integers(len(phrases)))]} the {yt}", x, yt


def describe(
    scene: Scene,
    rng: Generator,
    cfg: WorldConfig,
    *,
    n: int | None = None,
    compositional: bool = False,
    held_out: Sequence[tuple[str, str]] | None = None,
    type_counts: dict[str, int] | None = None,
    stats: dict[str, int] | None = None,
) -> list[Expression]:
    """Generate up to ``n`` (default: random in the config's range) unique-referent expressions.

    The type of each expression is the least used so far in ``type_counts`` (updated in
    place; pass one dict per split to balance types across it) among the types this scene
    allows; the relation within a type is drawn uniformly, then a candidate, preferring
    objects not yet targeted. Every pick is re-checked with :func:`check_expression`;
    mismatches are dropped and counted in ``stats["checker_rejections"]``. In a
    ``compositional`` scene only held-out-pair objects are targeted, named by colour and shape.
    """
    held = {tuple(p) for p in (held_out if held_out is not None else held_out_pairs(cfg))}
    counts = type_counts if type_counts is not None else {t: 0 for t in TYPES}
    if n is None:
        n = int(rng.integers(cfg.min_expressions, cfg.max_expressions + 1))
    c = _Candidates(scene.objects, cfg, held, compositional)
    pools: dict[str, dict[str | None, list[tuple]]] = {}
    out: list[Expression] = []
    used_texts: set[str] = set()
    used_targets: set[int] = set()
    for _ in range(n):
        tiebreak = rng.random(len(TYPES))
        for typ in sorted(TYPES, key=lambda t: (counts.get(t, 0), tiebreak[TYPES.index(t)])):
            if typ not in pools:
                pools[typ] = getattr(c, typ)()
            pool = pools[typ]
            picked = None
            while pool and picked is None:
                rels = sorted(pool, key=lambda r: "" if r is None else r)
                rel = rels[int(rng.integers(len(rels)))]
                cands = pool[rel]
                fresh = [k for k, cd in enumerate(cands) if cd[0] not in used_targets]
                k = fresh[int(rng.integers(len(fresh)))] if fresh else int(rng.integers(len(cands)))
                cand = cands.pop(k)
                if not cands:
                    del pool[rel]
                text, subj, obj = _render_text(c, typ, cand, rng)
                if text in used_texts:
                    continue
                parsed = parse_expression(text)
                ok = (
                    parsed is not None
                    and parsed.type == typ
                    and str(parsed.subject) == subj
                    and parsed.relation == cand[2]
                    and (str(parsed.object) if parsed.object else None) == obj
                    and resolve(parsed, scene.objects, cfg.margin, cfg.size_ratio) == [cand[0]]
                )
                if not ok:
                    if stats is not None:
                        stats["checker_rejections"] = stats.get("checker_rejections", 0) + 1
                    continue
                picked = Expression(
                    text, typ, cand[0], subj, cand[2], obj, scene.objects[cand[0]].pair in held
                )
            if picked is not None:
                out.append(picked)
                used_texts.add(picked.text)
                used_targets.add(picked.target)
                counts[typ] = counts.get(typ, 0) + 1
                break
    return out


# ----------------------------------------------------------------------------- io


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a bool ``(H, W)`` mask (column-major, zeros first)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": [int(v) for v in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: a bool ``(H, W)`` mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    vals = np.arange(len(counts)) % 2 == 1
    return np.repeat(vals, counts).reshape((w, h)).T.copy()


def _file_mode() -> int:
    """Mode a plainly created file would get (mkstemp files are 0600 otherwise)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file + rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    seps = (",", ": ") if indent else (",", ":")
    return (json.dumps(obj, sort_keys=True, indent=indent, separators=seps) + "\n").encode("utf-8")


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _scene_rng(cfg: WorldConfig, split: str, i: int) -> Generator:
    return Generator(PCG64(SeedSequence([cfg.seed, _SPLIT_INDEX[split], i])))


def _generate_split(out_dir: Path, split: str, cfg: WorldConfig, held: list[tuple[str, str]], progress: bool) -> dict[str, Any]:
    """Render, describe and write one split; returns its counts for ``world.json``."""
    n = getattr(cfg, f"n_{split}")
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    comp = split == "compositional"
    type_counts = {t: 0 for t in TYPES}
    rel_counts: dict[str, int] = {}
    stats = {"checker_rejections": 0, "resampled_scenes": 0}
    records: list[GroundingRecord] = []
    images, annotations = [], []
    written: set[str] = set()
    mode = _file_mode()
    for i in tqdm(range(n), desc=f"world {split}", disable=not progress, leave=False):
        scene_id = _SPLIT_INDEX[split] * _ID_STRIDE + i
        rng = _scene_rng(cfg, split, i)
        while True:
            scene = render_scene(rng, cfg, compositional=comp, held_out=held)
            exprs = describe(scene, rng, cfg, compositional=comp, held_out=held, type_counts=type_counts, stats=stats)
            if exprs:
                break
            stats["resampled_scenes"] += 1
        name = f"{scene_id:06d}.png"
        written.add(name)
        img_path = img_dir / name
        _atomic_write_bytes(img_path, _png_bytes(scene.image), mode)
        rel_path = f"images/{split}/{name}"
        w, h = scene.size
        images.append({"id": scene_id, "file_name": rel_path, "width": w, "height": h})
        for k, o in enumerate(scene.objects):
            x1, y1, x2, y2 = o.box
            annotations.append(
                {
                    "id": scene_id * 10 + k + 1,
                    "image_id": scene_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": o.area,
                    "category_id": SHAPES.index(o.shape) + 1,
                    "iscrowd": 0,
                    "attributes": {"colour": o.colour, "shape": o.shape, "size": o.size},
                    "segmentation": rle_encode(o.mask) if o.mask is not None else None,
                }
            )
        for e in exprs:
            rel_counts[e.relation or "none"] = rel_counts.get(e.relation or "none", 0) + 1
            records.append(
                GroundingRecord(
                    image=str(img_path),
                    expression=e.text,
                    box=[float(v) for v in scene.objects[e.target].box],
                    image_id=str(scene_id),
                    ref_id=f"{scene_id}_{e.target}",
                    split=split,
                    meta=e.meta(scene_id),
                )
            )
    for stale in img_dir.glob("*.png"):  # scenes left over from a larger earlier world
        if re.fullmatch(r"\d{6}\.png", stale.name) and stale.name not in written:
            stale.unlink()
    write_jsonl(records, out_dir / f"{split}.jsonl", relative_to=out_dir)
    os.chmod(out_dir / f"{split}.jsonl", mode)  # write_jsonl's temp file is created 0600
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)],
        "info": {"description": f"clipground synthetic world, split {split}", "version": VERSION},
    }
    _atomic_write_bytes(out_dir / f"instances_{split}.json", _json_bytes(coco), mode)
    return {
        "scenes": n,
        "objects": len(annotations),
        "expressions": len(records),
        "types": type_counts,
        "relations": dict(sorted(rel_counts.items())),
        **stats,
    }


def generate_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, progress: bool = True) -> Path:
    """Generate the whole world into ``out_dir`` (see module doc for the layout); returns it.

    ``world.json`` is removed first and written last, so an interrupted run is recognised
    as incomplete by :func:`ensure_world` and redone.
    """
    cfg = cfg or WorldConfig()
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    held = held_out_pairs(cfg)
    counts = {split: _generate_split(out, split, cfg, held, progress) for split in SPLITS}
    s = cfg.scale
    world = {
        "version": VERSION,
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "sizes": {"small": [v * s for v in cfg.small_px], "large": [v * s for v in cfg.large_px]},
        },
        "held_out_pairs": [list(p) for p in held],
        "margin_px": cfg.margin,
        "size_ratio": cfg.size_ratio,
        "templates": TEMPLATES,
        "types": list(TYPES),
        "splits": list(SPLITS),
        "scene_id": "split_index * 100000 + i, split_index: train 0, val 1, test 2, compositional 3",
        "mask_format": "COCO uncompressed RLE in instances_{split}.json: column-major counts, zeros first",
        "box_format": "xyxy pixels, [xmin, ymin, xmax + 1, ymax + 1] of the mask",
        "counts": counts,
    }
    _atomic_write_bytes(out / "world.json", _json_bytes(world, indent=2))
    return out


def load_world_config(out_dir: str | os.PathLike) -> WorldConfig | None:
    """The config of a complete world in ``out_dir`` (``None`` if absent, partial or stale)."""
    path = Path(out_dir) / "world.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("version") != VERSION:
            return None
        return WorldConfig.from_json(d["config"])
    except (OSError, ValueError, KeyError, TypeError, WorldConfigError):
        return None


def ensure_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, progress: bool = True) -> Path:
    """Generate the world unless ``out_dir`` already holds a complete one with this config."""
    cfg = cfg or WorldConfig()
    cfg.validate()
    out = Path(out_dir)
    have = load_world_config(out)
    if (
        have is not None
        and have.to_json() == cfg.to_json()
        and all((out / f"{s}.jsonl").is_file() and (out / f"instances_{s}.json").is_file() for s in SPLITS)
    ):
        return out
    return generate_world(out, cfg, progress=progress)


def load_scene_objects(out_dir: str | os.PathLike, split: str, masks: bool = False) -> dict[str, list[SceneObject]]:
    """Scene objects of a split from its COCO file, keyed by image id string (record ``image_id``).

    Object order equals the ``target`` index used in records' meta. Masks are decoded only
    when ``masks`` is true.
    """
    path = Path(out_dir) / f"instances_{split}.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadAnnotationError(f"cannot read {path}: {e}") from None
    out: dict[str, list[SceneObject]] = {str(im["id"]): [] for im in coco["images"]}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        x, y, w, h = a["bbox"]
        at = a["attributes"]
        mask = rle_decode(a["segmentation"]) if masks and a.get("segmentation") else None
        out[str(a["image_id"])].append(
            SceneObject(at["shape"], at["colour"], at["size"], (x, y, x + w, y + h), int(a["area"]), mask=mask)
        )
    return out
