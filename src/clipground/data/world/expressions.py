"""Generating a scene's referring expressions: :func:`describe` and :class:`Expression`.

Each scene gets 1-4 expressions that each pick out exactly one object. The generator
enumerates every valid (target, noun phrase, relation, landmark) candidate of a scene with
numpy (:class:`_Candidates`), balances expression types across a split, renders a
candidate's surface text, and keeps it only if the independent checker of
:mod:`clipground.data.world.grammar` -- working from the text alone -- agrees on its
structure and finds exactly the target. Two separate implementations agreeing is what
makes each expression's answer trustworthy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.random import Generator

from .config import COLOUR_NAMES, SHAPES, SIZES, TYPES, WorldConfig, held_out_pairs
from .grammar import (
    BETWEEN_CLEAR,
    BETWEEN_UNCLEAR,
    GENERIC_NOUNS,
    ORDINAL_WORDS,
    ORDINALS,
    PAIR_FORMS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SIZE_WORDS,
    TEMPLATES,
    NounPhrase,
    forms,
    parse_expression,
    parse_rich,
    referents,
)
from .render import Scene, SceneObject

#: One candidate expression: (target object, noun-phrase row of the subject, canonical
#: relation or ``None``, landmark object or ``None``[, second landmark of "between"]).
Candidate = tuple[int, ...]


@dataclass
class Expression:
    """A generated expression and its parsed structure (noun phrases as text)."""

    text: str
    type: str
    target: int
    subject: str
    relation: str | None
    object: str | None
    compositional: bool
    object2: str | None = None
    form: str | None = None  # the rich grammar's form (``None`` for the v1 grammar)

    def meta(self, scene_id: int) -> dict[str, Any]:
        """The record's ``meta`` dict, as written to ``{split}.jsonl``."""
        out = {
            "type": self.type,
            "scene_id": scene_id,
            "target": self.target,
            "subject": self.subject,
            "relation": self.relation,
            "object": self.object,
            "compositional": self.compositional,
        }
        if self.form is not None:  # the rich grammar's extras (v1 records stay as they were)
            from .grammar import HELD_OUT_FORMS

            out.update({"object2": self.object2, "form": self.form, "held_out_form": self.form in HELD_OUT_FORMS})
        return out


class _Candidates:
    """Vectorised enumeration of valid expressions in one scene (the generator's side).

    Works on a noun-phrase x object match matrix with numpy; it is deliberately a separate
    implementation from :func:`~clipground.data.world.grammar.referents`, which re-checks
    every pick from the text. Rows of ``nps`` are every ``(size, colour, shape)`` index triple
    (``-1`` for an attribute left out) that names at least one object; ``M[row, i]`` says
    whether the row's phrase fits object ``i``. In a ``compositional`` scene only rows naming a
    held-out (colour, shape) pair may be subjects.
    """

    def __init__(
        self, objects: Sequence[SceneObject], cfg: WorldConfig, held: set[tuple[str, str]], compositional: bool,
        side: int | None = None,
    ) -> None:
        self.objects = objects
        self.side = side or cfg.image_size
        self.margin = cfg.margin_at(self.side)
        self.ratio = cfg.size_ratio
        self.rich = cfg.phrasing == "rich"
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
        if self.rich:  # generic nouns: "the red thing", "the big shape" (colour or size needed)
            rows = sorted(set(rows) | {(sz[i] if us else -1, co[i] if uc else -1, -1) for i in range(n)
                                       for us in (0, 1) for uc in (0, 1) if us or uc})
        self.nps = np.array(rows, dtype=np.int64)
        ns, nc, nh = self.nps[:, 0:1], self.nps[:, 1:2], self.nps[:, 2:3]
        self.M = ((nh < 0) | (nh == sh)) & ((nc < 0) | (nc == co)) & ((ns < 0) | (ns == sz))
        self.cnt = self.M.sum(1)
        self.level = (self.nps[:, 0] >= 0).astype(int) + (self.nps[:, 1] >= 0)
        if compositional:
            self.allowed = np.array([c >= 0 and h >= 0 and (COLOUR_NAMES[c], SHAPES[h]) in held for _, c, h in rows],
                                    dtype=bool)
        else:
            self.allowed = np.ones(len(rows), dtype=bool)

    def np_of(self, row: int) -> NounPhrase:
        """The (canonical) noun phrase of ``row``."""
        s, c, h = (int(v) for v in self.nps[row])
        return NounPhrase(SHAPES[h] if h >= 0 else None, COLOUR_NAMES[c] if c >= 0 else None, SIZES[s] if s >= 0 else None)

    def np_text(self, row: int) -> str:
        """The noun phrase of ``row`` as text."""
        return str(self.np_of(row))

    def np_surface(self, row: int, rng: Generator) -> str:
        """The noun phrase of ``row`` as the rich grammar may say it (size synonyms, generic nouns)."""
        p = self.np_of(row)
        size = None
        if p.size is not None:
            words = [w for w, v in SIZE_WORDS.items() if v == p.size]
            size = words[int(rng.integers(len(words)))]
        noun = p.shape or GENERIC_NOUNS[int(rng.integers(len(GENERIC_NOUNS)))]
        return " ".join(w for w in (size, p.colour, noun) if w)

    def unique_rows(self, i: int) -> np.ndarray:
        """Noun-phrase rows that name object ``i`` alone."""
        return np.flatnonzero((self.cnt == 1) & self.M[:, i])

    def _ranked(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: object order by ``values`` among matches (non-matches last, as +inf)."""
        V = np.where(self.M[rows], values[None, :], np.inf)
        V = np.concatenate([V, np.full((len(rows), 1), np.inf)], axis=1)
        order = np.argsort(V, axis=1, kind="stable")
        return order, np.take_along_axis(V, order, axis=1)

    def attribute(self) -> dict[str | None, list[Candidate]]:
        """Unique noun phrases of each object, the fewest attributes only (``{None: [...]}``)."""
        out: list[Candidate] = []
        uniq = (self.cnt == 1) & self.allowed
        for i in range(self.n):
            rows = np.flatnonzero(uniq & self.M[:, i])
            if rows.size:
                lv = self.level[rows]
                out += [(i, int(r), None, None) for r in rows[lv == lv.min()]]
        return {None: out} if out else {}

    def spatial(self) -> dict[str | None, list[Candidate]]:
        """Superlatives with a clear winner, by relation (sizes only for phrases without size)."""
        out: dict[str | None, list[Candidate]] = {}
        rows = np.flatnonzero(self.allowed & (self.cnt >= 2))
        if not rows.size:
            return out
        for rel, vals in (("leftmost", self.cx), ("rightmost", -self.cx), ("topmost", self.cy), ("bottommost", -self.cy)):
            order, V = self._ranked(rows, vals)
            ok = V[:, 1] - V[:, 0] >= self.margin
            out[rel] = [(int(order[k, 0]), int(r), rel, None) for k, r in enumerate(rows) if ok[k]]
        if self.rich:
            h = self.side / 2.0
            order, V = self._ranked(rows, np.abs(self.cx - h) + np.abs(self.cy - h))
            ok = V[:, 1] - V[:, 0] >= self.margin
            out["middle"] = [(int(order[k, 0]), int(r), "middle", None) for k, r in enumerate(rows) if ok[k]]
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

    def ordinal(self) -> dict[str | None, list[Candidate]]:
        """Ordinals whose k-th object is clearly apart from its neighbours, by relation."""
        out: dict[str | None, list[Candidate]] = {}
        vals = {"left": self.cx, "right": -self.cx, "top": self.cy, "bottom": -self.cy}
        for rel, (k, d) in ORDINALS.items():
            rows = np.flatnonzero(self.allowed & (self.cnt >= k))
            if not rows.size:
                continue
            order, V = self._ranked(rows, vals[d])
            ok = (V[:, k - 1] - V[:, k - 2] >= self.margin) & (V[:, k] - V[:, k - 1] >= self.margin)
            cands = [(int(order[j, k - 1]), int(r), rel, None) for j, r in enumerate(rows) if ok[j]]
            if cands:
                out[rel] = cands
        return out

    def relational(self) -> dict[str | None, list[Candidate]]:
        """Relations to a uniquely nameable landmark with exactly one clear subject, by relation."""
        out: dict[str | None, list[Candidate]] = {}
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
        if self.rich:
            out["between"] = self._between(rows)
        return {k: v for k, v in out.items() if v}

    def _between(self, rows: np.ndarray) -> list[Candidate]:
        """"The x between the y and the z": exactly one subject clearly on the segment, none unclear."""
        out: list[Candidate] = []
        idx = np.arange(self.n)
        nameable = [i for i in range(self.n) if self.unique_rows(i).size]
        for y in nameable:
            for z in nameable:
                if z <= y:
                    continue
                dx, dy = self.cx[z] - self.cx[y], self.cy[z] - self.cy[y]
                length2 = dx * dx + dy * dy
                if np.sqrt(length2) < 4 * self.margin:
                    continue
                t = ((self.cx - self.cx[y]) * dx + (self.cy - self.cy[y]) * dy) / length2
                d = np.abs((self.cx - self.cx[y]) * dy - (self.cy - self.cy[y]) * dx) / length2
                clear = (t >= BETWEEN_CLEAR[0]) & (t <= BETWEEN_CLEAR[1]) & (d <= BETWEEN_CLEAR[2])
                unclear = ~clear & (t >= BETWEEN_UNCLEAR[0]) & (t <= BETWEEN_UNCLEAR[1]) & (d <= BETWEEN_UNCLEAR[2])
                Mx = self.M[rows] & (idx != y)[None, :] & (idx != z)[None, :]
                ok = ((Mx & clear).sum(1) == 1) & ((Mx & unclear).sum(1) == 0)
                tgt = np.argmax(Mx & clear, axis=1)
                out.extend((int(tgt[k]), int(r), "between", y, z) for k, r in enumerate(rows) if ok[k])
        return out


def _render_text(c: _Candidates, typ: str, cand: Candidate, rng: Generator) -> tuple[str, str, str | None]:
    """Surface text for a candidate: (text, subject noun phrase, landmark noun phrase)."""
    target, row, rel, y = cand
    x = c.np_text(row)
    if typ == "attribute":
        return TEMPLATES["attribute"][int(rng.integers(3))].format(np=x), x, None
    if typ == "spatial":
        if rel in POSITION_PHRASES and c.cnt[row] == 2 and rng.random() < 0.5:
            return f"the {x} {POSITION_PHRASES[rel]}", x, None
        return f"the {rel} {x}", x, None
    if typ == "ordinal":
        k, d = ORDINALS[rel]
        return f"the {ORDINAL_WORDS[k]} {x} from the {d}", x, None
    yrows = c.unique_rows(y)
    yt = c.np_text(int(yrows[int(rng.integers(len(yrows)))]))
    phrases = RELATION_PHRASES[rel]
    return f"the {x} {phrases[int(rng.integers(len(phrases)))]} the {yt}", x, yt


def _render_rich(c: _Candidates, typ: str, cand: Candidate, rng: Generator, new_look: bool
                 ) -> tuple[str, str, str | None, str | None, str]:
    """Surface text in the rich grammar: (text, subject, landmark, second landmark, form).

    Training splits use the training forms; the ``new-look`` split uses a held-out form where
    the relation has one. Forms for "the left star" kind of phrasing need exactly two matches.
    """
    target, row, rel, y = cand[:4]
    z = cand[4] if len(cand) > 4 else None
    held = forms(typ, rel, held_out=True)
    pool = held if new_look and held else forms(typ, rel, held_out=False)
    pool = [f for f in pool if f not in PAIR_FORMS or c.cnt[row] == 2]
    form = pool[int(rng.integers(len(pool)))]
    x = c.np_surface(row, rng)
    yt = zt = None
    if y is not None:
        yrows = c.unique_rows(y)
        yt = c.np_surface(int(yrows[int(rng.integers(len(yrows)))]), rng)
    if z is not None:
        zrows = c.unique_rows(z)
        zt = c.np_surface(int(zrows[int(rng.integers(len(zrows)))]), rng)
    return fill_form(form, x, yt, zt), x, yt, zt, form


def fill_form(form: str, x: str, y: str | None = None, z: str | None = None) -> str:
    """A rich form with its noun phrases put in ("a" becomes "an" before a vowel)."""
    text = form.format(x=x, y=y, z=z)
    return ("an " + text[2:]) if text.startswith("a ") and text[2:3] in "aeiou" else text


def _accepts(parsed: Any, typ: str, subject: NounPhrase, relation: str | None, c: _Candidates,
             landmarks: Sequence[int | None]) -> bool:
    """Whether the checker's parse of a text has the structure the generator meant: type,
    subject, relation, and each landmark named by one of its own unique noun phrases."""
    if parsed.type != typ or parsed.subject != subject or parsed.relation != relation:
        return False
    for got, want in ((parsed.object, landmarks[0] if landmarks else None),
                      (parsed.object2, landmarks[1] if len(landmarks) > 1 else None)):
        if (got is None) != (want is None):
            return False
        if want is not None and got not in {c.np_of(int(r)) for r in c.unique_rows(want)}:
            return False
    return True


def paraphrase(e: Expression, scene: Scene, cfg: WorldConfig, rng: Generator) -> Expression | None:
    """``e`` said in one of its relation's held-out forms (the same noun phrases and target),
    re-checked from the text; ``None`` when the relation has no held-out form or the check fails."""
    if e.form is None:
        return None
    pool = forms(e.type, e.relation, held_out=True)
    if not pool:
        return None
    form = pool[int(rng.integers(len(pool)))]
    text = fill_form(form, e.subject, e.object, e.object2)
    parsed, want = parse_rich(text), parse_rich(e.text)
    side = scene.size[0]
    if parsed is None or want is None or (parsed.type, parsed.subject, parsed.relation, parsed.object,
                                          parsed.object2) != (want.type, want.subject, want.relation,
                                                              want.object, want.object2):
        return None
    if referents(parsed, scene.objects, cfg.margin_at(side), cfg.size_ratio, scene.size) != [e.target]:
        return None
    return Expression(text, e.type, e.target, e.subject, e.relation, e.object, e.compositional, e.object2, form)


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
    new_look: bool = False,
) -> list[Expression]:
    """Generate up to ``n`` (default: random in the config's range) unique-referent expressions.

    The type of each expression is the least used so far in ``type_counts`` (updated in
    place; pass one dict per split to balance types across it) among the types this scene
    allows; the relation within a type is drawn uniformly, then a candidate, preferring
    objects not yet targeted. Every pick's text is re-parsed (:func:`parse_expression`) and
    re-checked (:func:`referents`); mismatches are dropped and counted in
    ``stats["checker_rejections"]``. In a ``compositional`` scene only held-out-pair objects
    are targeted, named by colour and shape.
    """
    held = {tuple(p) for p in (held_out if held_out is not None else held_out_pairs(cfg))}
    counts = type_counts if type_counts is not None else {t: 0 for t in TYPES}
    if n is None:
        n = int(rng.integers(cfg.min_expressions, cfg.max_expressions + 1))
    side = scene.size[0]
    margin = cfg.margin_at(side)
    c = _Candidates(scene.objects, cfg, held, compositional, side)
    pools: dict[str, dict[str | None, list[Candidate]]] = {}
    out: list[Expression] = []
    used_texts: set[str] = set()
    used_targets: set[int] = set()
    for _ in range(n):
        tiebreak = rng.random(len(TYPES))
        for typ in sorted(TYPES, key=lambda t: (counts.get(t, 0), tiebreak[TYPES.index(t)])):
            if typ not in pools:
                pools[typ] = getattr(c, typ)()
            pool = pools[typ]
            picked: Expression | None = None
            while pool and picked is None:
                rels = sorted(pool, key=lambda r: "" if r is None else r)
                rel = rels[int(rng.integers(len(rels)))]
                cands = pool[rel]
                fresh = [k for k, cd in enumerate(cands) if cd[0] not in used_targets]
                k = fresh[int(rng.integers(len(fresh)))] if fresh else int(rng.integers(len(cands)))
                cand = cands.pop(k)
                if not cands:
                    del pool[rel]
                if c.rich:
                    text, subj, obj, obj2, form = _render_rich(c, typ, cand, rng, new_look)
                    if text in used_texts:
                        continue
                    parsed = parse_rich(text)
                    ok = parsed is not None and _accepts(parsed, typ, c.np_of(cand[1]), cand[2], c, cand[3:])
                    if ok:
                        ok = referents(parsed, scene.objects, margin, cfg.size_ratio, scene.size) == [cand[0]]
                else:
                    text, subj, obj = _render_text(c, typ, cand, rng)
                    obj2 = form = None
                    if text in used_texts:
                        continue
                    parsed = parse_expression(text)
                    ok = (
                        parsed is not None
                        and parsed.type == typ
                        and str(parsed.subject) == subj
                        and parsed.relation == cand[2]
                        and (str(parsed.object) if parsed.object else None) == obj
                        and referents(parsed, scene.objects, margin, cfg.size_ratio) == [cand[0]]
                    )
                if not ok:
                    if stats is not None:
                        stats["checker_rejections"] = stats.get("checker_rejections", 0) + 1
                    continue
                picked = Expression(
                    text, typ, cand[0], subj, cand[2], obj, scene.objects[cand[0]].pair in held, obj2, form
                )
            if picked is not None:
                out.append(picked)
                used_texts.add(picked.text)
                used_targets.add(picked.target)
                counts[typ] = counts.get(typ, 0) + 1
                break
    return out
