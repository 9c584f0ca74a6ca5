"""Drawing a scene: :class:`Look`, :class:`SceneObject`, :class:`Scene` and :func:`render_scene`.

A scene is 2-8 coloured shapes on a textured background with a little clutter (specks and
short lines), so a method must find objects rather than any bright pixel. Each object has
a slight per-object colour jitter and a small rotation; sizes are ``small`` (14-20 px) and
``large`` (30-40 px) at 128 px, scaled with the scene's side. Object boxes never overlap, so
every object's box and mask are unambiguous.

How a scene is drawn is its :class:`Look`: a background (``dark``, ``light``, ``textured``,
``gradient``), a shape style (``flat``, ``shaded``: lit from the top left; ``outlined``: a
contrasting rim), a side and a rotation range. The classic look (dark, flat, the config's
image size) is the first world's; with ``looks="many"`` every scene draws its family, side
and rotation, and the ``new-look`` split draws from families the other splits never show.
Every family keeps colours saturated and shapes whole, so a person names them at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.random import Generator
from PIL import Image

from .config import COLOUR_NAMES, COLOURS, SHAPES, WorldConfig, held_out_pairs, training_looks


@dataclass(frozen=True)
class Look:
    """How one scene is drawn: background, shape style, side (px) and max rotation (degrees)."""

    background: str = "dark"
    style: str = "flat"
    side: int = 128
    max_rotation: float = 10.0

    @property
    def family(self) -> str:
        """``background-style``, e.g. ``dark-flat`` (stored in each record's meta)."""
        return f"{self.background}-{self.style}"


def classic_look(cfg: WorldConfig) -> Look:
    """The first world's look: dark and flat at the config's image size."""
    return Look("dark", "flat", cfg.image_size, cfg.max_rotation_deg)


def draw_look(rng: Generator, cfg: WorldConfig, new_look: bool = False) -> Look:
    """A scene's look: the classic one, or (``looks="many"``) a family, side and rotation drawn
    from ``rng`` (from the held-out families for the ``new-look`` split)."""
    if cfg.looks == "classic":
        return classic_look(cfg)  # draws nothing: the first world's scenes stay byte-identical
    families = [tuple(x) for x in cfg.held_out_looks] if new_look else training_looks(cfg)
    background, style = families[int(rng.integers(len(families)))]
    side = int(rng.integers(cfg.image_sizes[0], cfg.image_sizes[1] + 1))
    return Look(background, style, side, float(rng.uniform(*cfg.rotations)))


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
        """``(colour, shape)``: what the held-out pairs are made of."""
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
        """The image as a PIL RGB image."""
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


#: Each shape's unit outline, computed once.
_UNIT: dict[str, np.ndarray] = {s: _unit_polygon(s) for s in SHAPES}


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


def _base_image(rng: Generator, cfg: WorldConfig, look: Look) -> tuple[np.ndarray, float]:
    """The background of ``look`` before clutter, float32 ``(n, n, 3)``, and its mean grey level."""
    n = look.side
    if look.background == "dark":
        base = rng.uniform(35.0, 80.0) + rng.uniform(-8.0, 8.0, size=3)
    elif look.background == "light":
        base = rng.uniform(150.0, 200.0) + rng.uniform(-8.0, 8.0, size=3)
    elif look.background == "textured":
        base = rng.uniform(60.0, 110.0) + rng.uniform(-8.0, 8.0, size=3)
    else:  # gradient
        base = rng.uniform(40.0, 90.0) + rng.uniform(-8.0, 8.0, size=3)
    img = np.empty((n, n, 3), np.float32)
    img[:] = base.astype(np.float32)
    if look.background == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        rise = rng.uniform(50.0, 90.0)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1)
        img += (rise * (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5) + 0.5))[:, :, None]
    if look.background == "textured":
        ang, period = rng.uniform(0, np.pi), rng.uniform(6.0, 14.0) * n / 128.0
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        img += (12.0 * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period))[:, :, None]
    amp = cfg.texture * (3.0 if look.background == "textured" else 1.0)
    if cfg.texture > 0:
        grid = rng.normal(0.0, 1.0, size=(5, 5)).astype(np.float32)
        tex = cv2.resize(grid, (n, n), interpolation=cv2.INTER_CUBIC)
        img += (amp * tex)[:, :, None]
    return img, float(base.mean())


def _background(rng: Generator, cfg: WorldConfig, look: Look) -> np.ndarray:
    """Tinted background with low-frequency texture and clutter (uint8)."""
    n = look.side
    img, mean = _base_image(rng, cfg, look)
    out = np.clip(img, 0, 255).astype(np.uint8)
    s = n / 128.0
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):
        grey = float(np.clip(mean + rng.choice([-1.0, 1.0]) * rng.uniform(30, 70), 0, 255))
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
    look: Look | None = None,
) -> Scene:
    """Render one scene of ``cfg.min_objects``-``cfg.max_objects`` non-overlapping objects.

    Held-out pairs (default: :func:`held_out_pairs` of ``cfg``) are never drawn, except
    that a ``compositional`` scene gets 1-3 objects of one held-out pair (its other objects
    often share that pair's colour or shape, so naming the target needs both). ``look``
    defaults to the classic one.
    """
    held = [tuple(p) for p in (held_out if held_out is not None else held_out_pairs(cfg))]
    forbidden = set(held)
    look = look or classic_look(cfg)
    n = look.side
    s = n / 128.0
    pad, gap = 2.0, 3.0 * s
    while True:
        img = _background(rng, cfg, look)
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
                ang = 0.0 if shape == "circle" else math.radians(float(rng.uniform(-1, 1)) * look.max_rotation)
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
            if look.style == "outlined":  # room for the rim
                x0, y0, x1, y1 = max(0, x0 - 2), max(0, y0 - 2), min(n, x1 + 2), min(n, y1 + 2)
            # Anti-aliased coverage; the mask is the pixels at least half covered.
            poly = [np.round((pts - [x0, y0]) * 16).astype(np.int32)]
            alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(alpha, poly, 255, cv2.LINE_AA, 4)
            jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
            fill = np.broadcast_to(np.array(rgb, np.float32), alpha.shape + (3,))
            if look.style == "shaded":  # lit from the top left: the same hue, lighter and darker
                yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
                ramp = ((xx - xx.mean()) + (yy - yy.mean())) / max(float(xx.max() + yy.max()), 1.0)
                fill = np.clip(fill * (1.0 - 0.6 * ramp)[:, :, None], 0, 255)
            a = (alpha.astype(np.float32) / 255.0)[:, :, None]
            region = img[y0:y1, x0:x1]
            region[:] = np.rint(region * (1.0 - a) + fill * a).astype(np.uint8)
            if look.style == "outlined":
                rim = np.zeros_like(alpha)
                cv2.polylines(rim, poly, True, 255, 1 if s < 1.4 else 2, cv2.LINE_AA, 4)
                ink = 20.0 if look.background in ("light", "gradient") else 235.0
                r = (0.85 * rim.astype(np.float32) / 255.0)[:, :, None]
                region[:] = np.rint(region * (1.0 - r) + ink * r).astype(np.uint8)
                alpha = np.maximum(alpha, rim)
            local = alpha >= 128
            ys, xs = np.nonzero(local)
            mask = np.zeros((n, n), bool)
            mask[y0:y1, x0:x1] = local
            box = (float(xs.min() + x0), float(ys.min() + y0), float(xs.max() + x0 + 1), float(ys.max() + y0 + 1))
            objects.append(SceneObject(shape, colour, "large" if large[j] else "small", box, int(xs.size), rgb, mask))
        if cfg.noise > 0:
            noisy = img.astype(np.float32) + rng.normal(0.0, cfg.noise, size=img.shape).astype(np.float32)
            img = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return Scene(img, objects)

