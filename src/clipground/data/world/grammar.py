"""The world's expression grammar, its parser and the independent checker.

Expressions come from a small fixed grammar (:data:`TEMPLATES`) in four types:
``attribute`` ("the red circle"), ``spatial`` ("the leftmost star", "the square at the
top"), ``relational`` ("the circle left of the blue square") and ``ordinal`` ("the second
star from the left"). :func:`parse_expression` reads a text back into a
:class:`WorldExpression` and :func:`referents` evaluates its meaning over a scene's
objects; :func:`check_expression` does both. The generator
(:mod:`clipground.data.world.expressions`) keeps an expression only if this checker,
working from the *text*, finds exactly the intended object.

Positional comparisons need a clear margin (``margin``, 10 px at 128 px) and size
comparisons a clear ratio (``size_ratio``), so answers are obvious to a person; anything
closer counts as ambiguous.

(:mod:`clipground.relations` has its own ``ParsedExpression`` and ``resolve`` for free
text and soft scores; these names differ so the two are not confused.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .config import COLOUR_NAMES, SHAPES, SIZES, WorldConfig
from .render import SceneObject

# Canonical relation names (meta["relation"]) and the surface forms used for them.
#: Spatial relations said as one word before the noun phrase ("the leftmost star").
SUPERLATIVE_WORDS: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost", "biggest", "smallest")
#: Spatial relations that may also be said after the noun phrase ("the star on the left").
POSITION_PHRASES: dict[str, str] = {"leftmost": "on the left", "rightmost": "on the right", "topmost": "at the top", "bottommost": "at the bottom"}
#: Relational relations and their surface forms ("left of" is also "to the left of").
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
    "closest to": ("closest to",),
    "farthest from": ("farthest from",),
}
#: Ordinal relations: canonical name -> (k, direction counted from).
ORDINALS: dict[str, tuple[int, str]] = {
    "second from the left": (2, "left"),
    "third from the left": (3, "left"),
    "second from the right": (2, "right"),
    "second from the top": (2, "top"),
    "second from the bottom": (2, "bottom"),
}
ORDINAL_WORDS: dict[int, str] = {2: "second", 3: "third"}

#: Every surface template, exactly. ``{np}``/``{x}``/``{y}`` are noun phrases
#: ``[small|large] [colour] shape`` (size before colour, both optional).
TEMPLATES: dict[str, list[str]] = {
    "attribute": ["the {np}", "a {np}", "{np}"],
    "spatial": [f"the {w} {{np}}" for w in SUPERLATIVE_WORDS] + [f"the {{np}} {p}" for p in POSITION_PHRASES.values()],
    "relational": [f"the {{x}} {p} the {{y}}" for ps in RELATION_PHRASES.values() for p in ps],
    "ordinal": [f"the {ORDINAL_WORDS[k]} {{np}} from the {d}" for k, d in ORDINALS.values()],
}


@dataclass(frozen=True)
class NounPhrase:
    """``[size] [colour] shape``; ``None`` for an attribute that is not mentioned."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def __str__(self) -> str:
        """The phrase as written: ``"small red circle"``."""
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)

    def matches(self, o: SceneObject) -> bool:
        """Whether ``o`` fits every attribute the phrase mentions."""
        return o.shape == self.shape and self.colour in (None, o.colour) and self.size in (None, o.size)


@dataclass(frozen=True)
class WorldExpression:
    """The structure of a world expression; ``relation`` is canonical (a key of the phrase tables).

    Named apart from :class:`clipground.relations.ParsedExpression`, which parses free text.
    """

    type: str
    subject: NounPhrase
    relation: str | None = None
    object: NounPhrase | None = None


_NP = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOUR_NAMES)}) )?({'|'.join(SHAPES)})"
_RX_ATTR = re.compile(rf"^(?:the |a )?{_NP}$")
_RX_SUP = re.compile(rf"^the ({'|'.join(SUPERLATIVE_WORDS)}) {_NP}$")
_RX_POS = re.compile(rf"^the {_NP} ({'|'.join(POSITION_PHRASES.values())})$")
_REL_SURFACE = {p: canon for canon, ps in RELATION_PHRASES.items() for p in ps}
_RX_REL = re.compile(rf"^the {_NP} ({'|'.join(sorted(_REL_SURFACE, key=len, reverse=True))}) the {_NP}$")
_RX_ORD = re.compile(rf"^the (second|third) {_NP} from the (left|right|top|bottom)$")
_POS_CANON = {p: c for c, p in POSITION_PHRASES.items()}


def _np(size: str | None, colour: str | None, shape: str) -> NounPhrase:
    """A noun phrase from regex groups (an unmatched group is ``None`` or empty)."""
    return NounPhrase(shape=shape, colour=colour or None, size=size or None)


def parse_expression(text: str) -> WorldExpression | None:
    """Parse a world expression (exactly the :data:`TEMPLATES` grammar); ``None`` otherwise.

    Case, surrounding whitespace and a final full stop are ignored.
    """
    t = " ".join(text.lower().split()).rstrip(".")
    if m := _RX_ATTR.match(t):
        return WorldExpression("attribute", _np(*m.groups()))
    if m := _RX_SUP.match(t):
        return WorldExpression("spatial", _np(*m.groups()[1:]), m.group(1))
    if m := _RX_POS.match(t):
        return WorldExpression("spatial", _np(*m.groups()[:3]), _POS_CANON[m.group(4)])
    if m := _RX_REL.match(t):
        g = m.groups()
        return WorldExpression("relational", _np(*g[:3]), _REL_SURFACE[g[3]], _np(*g[4:]))
    if m := _RX_ORD.match(t):
        g = m.groups()
        return WorldExpression("ordinal", _np(*g[1:4]), f"{g[0]} from the {g[4]}")
    return None


def _key(o: SceneObject, direction: str) -> float:
    """Sort key that puts the object nearest ``direction`` (left/right/top/bottom) first."""
    cx, cy = o.center
    return {"left": cx, "right": -cx, "top": cy, "bottom": -cy}[direction]


def _box_side(o: SceneObject) -> float:
    """Side of the square with the box's area (the second size measure next to mask area)."""
    return math.sqrt((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))


def referents(parsed: WorldExpression, objects: Sequence[SceneObject], margin: float, size_ratio: float) -> list[int]:
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
    return referents(parsed, objects, cfg.margin, cfg.size_ratio)

