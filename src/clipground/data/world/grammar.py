"""The world's expression grammar, its parser and the independent checker.

Expressions come in four types: ``attribute`` ("the red circle"), ``spatial`` ("the
leftmost star", "the square at the top", "the hexagon in the middle"), ``relational``
("the circle left of the blue square", "the star between the circle and the square") and
``ordinal`` ("the second star from the left"). Two grammars exist:

* ``v1`` (:data:`TEMPLATES`): the first world's few templates;
* ``rich`` (:data:`FORMS`): paraphrases of every relation and attribute ("the left star",
  "the highest star", "the star under the square", "the big red thing", "the 2nd star from
  the left", ...). Noun phrases may use the size words ``little``/``big`` and a generic noun
  (``thing``, ``shape``, ``object``) when colour or size alone names the object. Some forms
  are held out (:data:`HELD_OUT_FORMS`): only the ``new-look`` and ``paraphrase`` splits say
  them, and every word they use also appears in a training form, so they test phrasing, not
  vocabulary.

:func:`parse_expression` reads a text back into a :class:`WorldExpression` and
:func:`referents` evaluates its meaning over a scene's objects; :func:`check_expression`
does both. The generator (:mod:`clipground.data.world.expressions`) keeps an expression only
if this checker, working from the *text*, finds exactly the intended object.

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
from functools import lru_cache

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


# --------------------------------------------------------------------------- the rich grammar

#: Size words of the rich grammar and the size each means.
SIZE_WORDS: dict[str, str] = {"small": "small", "little": "small", "large": "large", "big": "large"}
#: Nouns that name any shape (the phrase then needs a colour or a size).
GENERIC_NOUNS: tuple[str, ...] = ("thing", "shape", "object")

#: Every surface form of the rich grammar, by type and canonical relation. ``{x}`` is the
#: subject noun phrase, ``{y}`` (and ``{z}``) the landmark(s); "a" becomes "an" before a vowel.
FORMS: dict[str, dict[str | None, tuple[str, ...]]] = {
    "attribute": {None: ("the {x}", "a {x}", "{x}")},
    "spatial": {
        "leftmost": ("the leftmost {x}", "the {x} on the left", "the left {x}", "the {x} furthest left",
                     "the {x} farthest to the left"),
        "rightmost": ("the rightmost {x}", "the {x} on the right", "the right {x}", "the {x} furthest right",
                      "the {x} farthest to the right"),
        "topmost": ("the topmost {x}", "the {x} at the top", "the top {x}", "the upper {x}", "the highest {x}",
                    "the uppermost {x}", "the {x} closest to the top"),
        "bottommost": ("the bottommost {x}", "the {x} at the bottom", "the bottom {x}", "the lower {x}",
                       "the lowest {x}", "the {x} closest to the bottom"),
        "biggest": ("the biggest {x}", "the largest {x}"),
        "smallest": ("the smallest {x}", "the tiniest {x}"),
        "middle": ("the {x} in the middle", "the {x} in the center", "the {x} in the centre", "the central {x}",
                   "the {x} closest to the middle"),
    },
    "relational": {
        "left of": ("the {x} left of the {y}", "the {x} to the left of the {y}", "the {x} on the left of the {y}"),
        "right of": ("the {x} right of the {y}", "the {x} to the right of the {y}", "the {x} on the right of the {y}"),
        "above": ("the {x} above the {y}", "the {x} over the {y}"),
        "below": ("the {x} below the {y}", "the {x} under the {y}", "the {x} beneath the {y}",
                  "the {x} underneath the {y}"),
        "closest to": ("the {x} closest to the {y}", "the {x} nearest to the {y}", "the {x} nearest the {y}",
                       "the {x} next to the {y}", "the {x} near the {y}"),
        "farthest from": ("the {x} farthest from the {y}", "the {x} furthest from the {y}"),
        "between": ("the {x} between the {y} and the {z}",),
    },
    "ordinal": {
        rel: (f"the {ORDINAL_WORDS[k]} {{x}} from the {d}", f"the {k}{'nd' if k == 2 else 'rd'} {{x}} from the {d}",
              f"the {{x}} {ORDINAL_WORDS[k]} from the {d}")
        for rel, (k, d) in ORDINALS.items()
    },
}
#: Forms only the ``new-look`` and ``paraphrase`` splits use (new constructions of training words).
HELD_OUT_FORMS: frozenset[str] = frozenset({
    "{x}",
    "the {x} farthest to the left", "the {x} farthest to the right", "the {x} closest to the top",
    "the {x} closest to the bottom", "the {x} closest to the middle",
    "the {x} on the left of the {y}", "the {x} on the right of the {y}",
    *(f"the {{x}} {ORDINAL_WORDS[k]} from the {d}" for k, d in ORDINALS.values()),
})
#: Forms that only fit when exactly two objects match the subject ("the left star" of two).
PAIR_FORMS: frozenset[str] = frozenset({
    "the {x} on the left", "the {x} on the right", "the {x} at the top", "the {x} at the bottom",
    "the left {x}", "the right {x}", "the top {x}", "the bottom {x}", "the upper {x}", "the lower {x}",
})


def forms(typ: str, relation: str | None, held_out: bool | None = None) -> list[str]:
    """The rich forms of a relation: all (``held_out=None``), the training ones or the held-out ones."""
    out = list(FORMS[typ][relation])
    if held_out is None:
        return out
    return [f for f in out if (f in HELD_OUT_FORMS) == held_out]


@dataclass(frozen=True)
class NounPhrase:
    """``[size] [colour] shape``; ``None`` for an attribute that is not mentioned.

    A ``shape`` of ``None`` is a generic noun ("the red thing"): any shape, so colour or size
    must name the object.
    """

    shape: str | None
    colour: str | None = None
    size: str | None = None

    def __str__(self) -> str:
        """The phrase in canonical words: ``"small red circle"`` (``"red thing"`` for a generic noun)."""
        return " ".join(w for w in (self.size, self.colour, self.shape or "thing") if w)

    def matches(self, o: SceneObject) -> bool:
        """Whether ``o`` fits every attribute the phrase mentions."""
        return (self.shape in (None, o.shape) and self.colour in (None, o.colour)
                and self.size in (None, o.size))


@dataclass(frozen=True)
class WorldExpression:
    """The structure of a world expression; ``relation`` is canonical (a key of the phrase tables).

    Named apart from :class:`clipground.relations.ParsedExpression`, which parses free text.
    """

    type: str
    subject: NounPhrase
    relation: str | None = None
    object: NounPhrase | None = None
    object2: NounPhrase | None = None  # the second landmark of "between"


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


_RICH_NP = (rf"(?:({'|'.join(SIZE_WORDS)}) )?(?:({'|'.join(COLOUR_NAMES)}) )?"
            rf"({'|'.join(SHAPES + GENERIC_NOUNS)})")


def _rich_np(size: str | None, colour: str | None, noun: str) -> NounPhrase | None:
    """A rich noun phrase from regex groups; a generic noun with neither colour nor size names nothing."""
    shape = None if noun in GENERIC_NOUNS else noun
    if shape is None and not size and not colour:
        return None
    return NounPhrase(shape=shape, colour=colour or None, size=SIZE_WORDS[size] if size else None)


@lru_cache(maxsize=1)
def _rich_patterns() -> list[tuple[re.Pattern[str], str, str | None, tuple[str, ...]]]:
    """One anchored regex per rich form: (pattern, type, relation, slot order)."""
    out = []
    for typ, rels in FORMS.items():
        for rel, fs in rels.items():
            for f in fs:
                slots = tuple(re.findall(r"\{([xyz])\}", f))
                rx = re.escape(f).replace(r"\{x\}", "{x}").replace(r"\{y\}", "{y}").replace(r"\{z\}", "{z}")
                rx = rx.replace(r"a\ {x}", r"an?\ {x}") if f.startswith("a {x}") else rx
                rx = rx.replace("{x}", _RICH_NP).replace("{y}", _RICH_NP).replace("{z}", _RICH_NP)
                out.append((re.compile(f"^{rx}$"), typ, rel, slots))
    return out


def parse_rich(text: str) -> WorldExpression | None:
    """Parse an expression of the rich grammar (:data:`FORMS`); ``None`` if no form fits."""
    t = " ".join(text.lower().split()).rstrip(".")
    for rx, typ, rel, slots in _rich_patterns():
        m = rx.match(t)
        if not m:
            continue
        g = m.groups()
        nps = [_rich_np(*g[3 * i : 3 * i + 3]) for i in range(len(slots))]
        if any(p is None for p in nps):
            continue
        return WorldExpression(typ, nps[0], rel, nps[1] if len(nps) > 1 else None, nps[2] if len(nps) > 2 else None)
    return None


def parse_expression(text: str, phrasing: str = "v1") -> WorldExpression | None:
    """Parse a world expression of the ``phrasing``'s grammar (:data:`TEMPLATES` for ``v1``,
    :data:`FORMS` for ``rich``); ``None`` otherwise.

    Case, surrounding whitespace and a final full stop are ignored.
    """
    if phrasing == "rich":
        return parse_rich(text)
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


#: "Between": a subject is clearly between two landmarks when its centre projects onto the
#: segment joining theirs within these fractions of its length and lies this close to it
#: (as a fraction of the length); it is unclear within the looser bounds.
BETWEEN_CLEAR = (0.15, 0.85, 0.3)
BETWEEN_UNCLEAR = (-0.1, 1.1, 0.6)


def between_position(c: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """``(t, d)``: where ``c`` projects on the segment ``a -> b`` (0 at ``a``, 1 at ``b``) and its
    distance from the segment's line, as a fraction of the segment's length."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    if length2 <= 0:
        return math.inf, math.inf
    t = ((c[0] - a[0]) * dx + (c[1] - a[1]) * dy) / length2
    d = abs((c[0] - a[0]) * dy - (c[1] - a[1]) * dx) / length2
    return t, d


def _middle_key(o: SceneObject, image_size: tuple[int, int]) -> float:
    """City-block distance of the object's centre from the image centre."""
    cx, cy = o.center
    return abs(cx - image_size[0] / 2.0) + abs(cy - image_size[1] / 2.0)


def referents(parsed: WorldExpression, objects: Sequence[SceneObject], margin: float, size_ratio: float,
              image_size: tuple[int, int] | None = None) -> list[int]:
    """Indices of the objects the expression may refer to (a unique referent gives one).

    Ambiguity is returned as several indices: a superlative whose runner-up is within
    ``margin`` px (or, for sizes, within ``size_ratio`` in both sqrt mask area and sqrt box
    area) returns both; a relation also returns subjects within ``margin`` of the landmark
    along the relation's axis; a relation whose landmark is not unique returns ``[]``.
    ``image_size`` (``(width, height)``) is needed for "in the middle".
    """
    subj = [i for i, o in enumerate(objects) if parsed.subject.matches(o)]
    rel = parsed.relation
    if parsed.type == "attribute":
        return subj
    if parsed.type == "spatial" and rel == "middle":
        if image_size is None:
            raise ValueError("'in the middle' needs the image size")
        ranked = sorted(subj, key=lambda i: _middle_key(objects[i], image_size))
        if len(ranked) < 2:
            return ranked
        gap = _middle_key(objects[ranked[1]], image_size) - _middle_key(objects[ranked[0]], image_size)
        return ranked[:1] if gap >= margin else sorted(ranked[:2])
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
    if rel == "between":
        assert parsed.object2 is not None
        others = [i for i, o in enumerate(objects) if parsed.object2.matches(o)]
        if len(others) != 1 or others[0] == y:
            return []
        z = others[0]
        a, b = objects[y].center, objects[z].center
        if math.hypot(b[0] - a[0], b[1] - a[1]) < 4 * margin:
            return []
        clear, unclear = [], []
        for i in subj:
            if i in (y, z):
                continue
            t, d = between_position(objects[i].center, a, b)
            if BETWEEN_CLEAR[0] <= t <= BETWEEN_CLEAR[1] and d <= BETWEEN_CLEAR[2]:
                clear.append(i)
            elif BETWEEN_UNCLEAR[0] <= t <= BETWEEN_UNCLEAR[1] and d <= BETWEEN_UNCLEAR[2]:
                unclear.append(i)
        return sorted(clear + unclear) if clear else []
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


def check_expression(text: str, objects: Sequence[SceneObject], cfg: WorldConfig, side: int | None = None) -> list[int]:
    """Referents of ``text`` in a scene of ``cfg``'s world of side ``side`` (default: the config's
    image size); ``[]`` if it does not parse."""
    parsed = parse_expression(text, cfg.phrasing)
    if parsed is None:
        return []
    side = side or cfg.image_size
    return referents(parsed, objects, cfg.margin_at(side), cfg.size_ratio, (side, side))

