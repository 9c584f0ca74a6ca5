"""Spatial-relation parsing and resolution, ReCLIP-style (Subramanian et al., ACL 2022).

CLIP is weak at spatial words, so ReCLIP parses an expression into a subject noun phrase,
optional relations and superlatives, asks CLIP only about the noun phrases, and resolves
the spatial part with rules on box geometry. We do the same with a small keyword
grammar that covers the common English forms:

* superlatives: "the leftmost cup", "the cup on the left", "the left cup", "the cup
  farthest to the left", "the biggest dog", "the green star at the top", "the highest star",
  "the star closest to the top", "the car in the middle"; optionally size adjectives ("the
  large blue square", "the small dog", "the big one") as the biggest / smallest of their noun
  phrase;
* ordinals: "the second cup from the left", "the 2nd cup from the left", "the cup second
  from the left";
* relations: "the cup left of the plate", "the dog closest to the man", "the cup next to the
  plate", "the lamp above the table", "the box under the table", "the bag farthest from the
  door", and the three-place "the cup between the plate and the glass".

Probabilities: each candidate box ``i`` gets ``q_i = exp(T (s_i - max s))`` for its noun
phrase similarity ``s`` (so the best-matching box has ``q = 1``). A superlative or ordinal
asks for the probability that exactly ``n - 1`` matching candidates beat ``i`` on the
geometric key, computed exactly as a Poisson-binomial over the other candidates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.ops import box_iou, nms

# key(boxes, image_size) -> (K,) values; smaller is "better" for the superlative.
_KEYS: dict[str, Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]] = {
    "left": lambda b, s: (b[:, 0] + b[:, 2]) / 2,
    "right": lambda b, s: -(b[:, 0] + b[:, 2]) / 2,
    "top": lambda b, s: (b[:, 1] + b[:, 3]) / 2,
    "bottom": lambda b, s: -(b[:, 1] + b[:, 3]) / 2,
    "biggest": lambda b, s: -(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
    "smallest": lambda b, s: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
    "middle": lambda b, s: ((b[:, 0] + b[:, 2]) / 2 - s[0] / 2).abs() + ((b[:, 1] + b[:, 3]) / 2 - s[1] / 2).abs(),
}

_FAR = r"(?:farthest|furthest)(?: to)?(?: the)?"
_NEAR = r"(?:closest|nearest) to the"
_SUPERLATIVES = [
    (rf"\b(?:left-?most|{_FAR} left|{_NEAR} left)\b", "left"),
    (rf"\b(?:right-?most|{_FAR} right|{_NEAR} right)\b", "right"),
    (rf"\b(?:top-?most|upper-?most|highest|{_NEAR} top)\b", "top"),
    (rf"\b(?:bottom-?most|lower-?most|lowest|{_NEAR} bottom)\b", "bottom"),
    (r"\b(?:biggest|largest)\b", "biggest"),
    (r"\b(?:smallest|tiniest)\b", "smallest"),
    (rf"\b(?:{_NEAR} (?:middle|center|centre)|(?:in|at) the (?:middle|center|centre)|middle|center|centre|central)\b",
     "middle"),
    (r"\b(?:on|at|to) the left\b(?! of)", "left"),
    (r"\b(?:on|at|to) the right\b(?! of)", "right"),
    (r"\b(?:at|on) the top\b(?! of)|\bon top\b(?! of)", "top"),
    (r"\b(?:at|on) the bottom\b(?! of)", "bottom"),
    # "the left star", "the upper one": a position word used as an adjective.
    (r"^(?:the |a )?left\b(?! of)", "left"),
    (r"^(?:the |a )?right\b(?! of)", "right"),
    (r"^(?:the |a )?(?:top|upper)\b(?! of)", "top"),
    (r"^(?:the |a )?(?:bottom|lower)\b(?! of)", "bottom"),
]

# Size adjectives are contrastive in referring expressions ("the big dog" is the bigger of
# the dogs), and a crop shown to CLIP on its own has lost its size: with
# ``parse(..., size_words=True)`` they are read as superlatives over the candidates of the
# remaining noun phrase, after every other superlative.
_SIZE_WORDS = [
    (r"\b(?:large|big|bigger|larger|huge)\b", "biggest"),
    (r"\b(?:small|little|smaller|tiny)\b", "smallest"),
]

#: "closest to the top" is a superlative, not a relation to an object called "top".
_NOT_A_PLACE = r"(?! the (?:top|bottom|left|right|middle|center|centre)\b)"
_RELATIONS = [
    (r"\bbetween\b", "between"),
    (r"\b(?:to the left of|on the left of|left of)\b", "left of"),
    (r"\b(?:to the right of|on the right of|right of)\b", "right of"),
    (r"\b(?:above|over|on top of)\b", "above"),
    (r"\b(?:below|under|beneath|underneath)\b", "below"),
    (rf"\b(?:closest to{_NOT_A_PLACE}|nearest to{_NOT_A_PLACE}|nearest(?! to){_NOT_A_PLACE}|closest(?! to)|"
     rf"next to|near(?!est){_NOT_A_PLACE}|beside)\b", "closest to"),
    (r"\b(?:farthest from|furthest from)\b", "farthest from"),
]

_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "1st": 1, "2nd": 2, "3rd": 3, "4th": 4, "5th": 5}
_ORDINAL_RE = re.compile(r"\b(" + "|".join(_ORDINALS) + r")\b(.*?)\bfrom the (left|right|top|bottom)\b")
_ARTICLES = re.compile(r"^(?:the|a|an|this|that)\s+")


@dataclass
class ParsedExpression:
    """What the resolver needs from an expression.

    ``relation`` is one of the superlative keys (``left``, ``biggest``, ...), a relation
    (``left of``, ``closest to``, ...) or ``None``; ``object`` is the second noun phrase
    of a relation; ``ordinal`` is n for "the n-th X from the ...".
    """

    subject: str
    relation: str | None = None
    object: str | None = None
    ordinal: int = 1
    object2: str | None = None  # the second landmark of "between"

    @property
    def is_spatial(self) -> bool:
        return self.relation is not None


def _clean(np_text: str) -> str:
    t = " ".join(np_text.replace(",", " ").split())
    t = re.sub(r"\b(?:one|that is|which is|who is)$", "", t).strip()
    t = _ARTICLES.sub("", t)
    return t.strip()


def parse(expression: str, size_words: bool = False) -> ParsedExpression:
    """Split an expression into subject, spatial relation/superlative and object.

    ``size_words``: read a size adjective ("the large blue square") as the superlative
    ``biggest`` / ``smallest`` of the rest of the noun phrase (what the zero-shot resolver
    does); by default it stays part of the noun phrase (what trained scorers see).
    """
    text = " ".join(expression.lower().split()).rstrip(".")
    m = _ORDINAL_RE.search(text)
    if m:
        subject = _clean(text[: m.start()] + " " + m.group(2))
        return ParsedExpression(subject or "object", m.group(3), None, _ORDINALS[m.group(1)])
    for pat, rel in _RELATIONS:
        m = re.search(pat, text)
        if m:
            subj, obj = _clean(text[: m.start()]), _clean(text[m.end() :])
            if rel == "between":
                a, sep, b = obj.partition(" and ")
                if subj and a and sep and _clean(b):
                    return ParsedExpression(subj, rel, _clean(a), object2=_clean(b))
                continue
            if subj and obj:
                return ParsedExpression(subj, rel, obj)
    for pat, key in _SUPERLATIVES + (_SIZE_WORDS if size_words else []):
        m = re.search(pat, text)
        if m:
            subject = _clean(text[: m.start()] + " " + text[m.end() :])
            return ParsedExpression(subject or "object", key)
    return ParsedExpression(_clean(text) or text)


def score_expression(phrase: str, boxes: torch.Tensor, size: tuple[float, float],
                     similarity: Callable[[str], torch.Tensor], temperature: float, relations: bool = True,
                     size_words: bool = True) -> tuple[torch.Tensor, bool]:
    """Score every box for one phrase the zero-shot way: ``(scores (K,), resolved)``.

    ``similarity(text)`` gives every box's CLIP similarity to ``text``. A spatial phrase (with
    ``relations``) goes through :func:`resolve` and ``resolved`` is True (scores are
    probabilities in [0, 1]); otherwise the scores are the phrase's similarities. The zero-shot
    scorer and the trained scorers' resolver prior both call this, so they give one answer.
    """
    parsed = parse(phrase, size_words=size_words) if relations else None
    if parsed is not None and parsed.is_spatial:
        return resolve(parsed, boxes, size, similarity, temperature=temperature), True
    return similarity(phrase), False


def is_spatial(expression: str) -> bool:
    """Whether an expression uses a spatial relation, superlative or ordinal."""
    return parse(expression).is_spatial


def _exactly_k_beaten(q: torch.Tensor, beats: torch.Tensor, k: int) -> torch.Tensor:
    """P(exactly ``k`` candidates beat ``i``), candidates independent with probs ``q``.

    ``beats[j, i]`` is 1 when j beats i on the key. Poisson-binomial DP per ``i``.
    """
    n = q.shape[0]
    out = torch.zeros(n)
    for i in range(n):
        p = q * beats[:, i]
        p[i] = 0
        dist = torch.zeros(k + 1)
        dist[0] = 1.0
        for pj in p[p > 0]:
            dist = torch.cat([dist[:1] * (1 - pj), dist[1:] * (1 - pj) + dist[:-1] * pj])
        out[i] = dist[k]
    return out


def _containers(boxes: torch.Tensor, inside: float = 0.9, grow: float = 1.5) -> torch.Tensor:
    """``(K,)`` mask of boxes that enclose another of ``boxes`` (``inside`` of its area within,
    and at least ``grow`` times its area): a group or context box, not one instance."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # inter[a, b]
    encloses = (inter >= inside * area[None, :]) & (area[:, None] >= grow * area[None, :])
    encloses.fill_diagonal_(False)
    return encloses.any(1)


def _dedupe(boxes: torch.Tensor, sims: torch.Tensor, q: torch.Tensor, min_q: float, iou: float,
            drop_containers: bool = True) -> torch.Tensor:
    """Indices of candidate boxes (q >= min_q) after NMS, so one object counts once.

    With ``drop_containers``, a candidate that encloses another candidate is left out (a
    box around several things matches their noun phrase too, and would otherwise always be
    "the biggest"); ReCLIP counts on object proposals, which a proposer such as selective
    search does not guarantee.
    """
    cand = torch.nonzero(q >= min_q).flatten()
    if len(cand) == 0:
        cand = sims.argmax().reshape(1)
    keep = cand[nms(boxes[cand], sims[cand], iou)]
    if drop_containers and len(keep) > 1:
        inner = ~_containers(boxes[keep])
        if inner.any():
            keep = keep[inner]
    return keep


def _spread(scores_kept: torch.Tensor, kept: torch.Tensor, boxes: torch.Tensor, q: torch.Tensor, iou: float) -> torch.Tensor:
    """Give non-kept boxes the score of the kept box they overlap most, scaled by q ratio."""
    out = torch.zeros(len(boxes))
    out[kept] = scores_kept
    others = torch.ones(len(boxes), dtype=torch.bool)
    others[kept] = False
    if others.any():
        ov = box_iou(boxes[others], boxes[kept])
        best_iou, best = ov.max(dim=1)
        parent = kept[best]
        scale = (q[others] / q[parent].clamp(min=1e-12)).clamp(max=1.0)
        out[others] = torch.where(best_iou >= iou, out[parent] * scale * 0.99, q[others] * 1e-3)
    return out


def _between(parsed: ParsedExpression, boxes: torch.Tensor, kept: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
             cx: torch.Tensor, cy: torch.Tensor, similarity: Callable[[str], torch.Tensor], temperature: float,
             dedupe_iou: float) -> torch.Tensor:
    """"The x between the y and the z": the two landmarks are the best boxes of their phrases (not
    the same box), and a subject scores by how close its centre is to the segment joining theirs."""
    wz = torch.softmax(temperature * similarity(parsed.object2 or "object"), dim=0)
    a = int(w.argmax())
    wz = wz.masked_fill(box_iou(boxes[a : a + 1], boxes)[0] >= dedupe_iou, 0.0)
    b = int(wz.argmax())
    ax, ay, bx, by = cx[a], cy[a], cx[b], cy[b]
    length2 = ((bx - ax) ** 2 + (by - ay) ** 2).clamp(min=1e-6)
    k = kept
    t = ((cx[k] - ax) * (bx - ax) + (cy[k] - ay) * (by - ay)) / length2
    d = ((cx[k] - ax) * (by - ay) - (cy[k] - ay) * (bx - ax)).abs() / length2
    closeness = torch.exp(-((d / 0.3) ** 2)) * ((t > 0.0) & (t < 1.0)).float()
    closeness = closeness * (~(box_iou(boxes[k], boxes[[a, b]]) >= dedupe_iou).any(1)).float()
    beats = (closeness[:, None] > closeness[None, :]).float()
    scores = q[k] * closeness * _exactly_k_beaten(q[k] * closeness.clamp(min=1e-6), beats, 0)
    return _spread(scores, kept, boxes, q, dedupe_iou)


def resolve(
    parsed: ParsedExpression,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    similarity: Callable[[str], torch.Tensor],
    temperature: float = 100.0,
    min_q: float = 0.05,
    dedupe_iou: float = 0.5,
) -> torch.Tensor:
    """Score each box for a parsed spatial expression.

    Args:
        parsed: output of :func:`parse` with a non-``None`` relation.
        boxes: ``(K, 4)`` xyxy candidate boxes.
        image_size: ``(width, height)``.
        similarity: noun phrase -> ``(K,)`` CLIP similarity of every box to it.
        temperature: CLIP logit scale turning similarity gaps into probabilities.
        min_q: candidates below this relative probability are ignored as competitors.
        dedupe_iou: NMS threshold that merges boxes on the same object.

    Returns:
        ``(K,)`` scores in [0, 1]; the argmax is the resolved box.
    """
    s = similarity(parsed.subject)
    q = torch.exp(temperature * (s - s.max()))
    kept = _dedupe(boxes, s, q, min_q, dedupe_iou)
    kb = boxes[kept]
    rel = parsed.relation
    if rel in _KEYS:
        key = _KEYS[rel](kb, image_size)
        beats = (key[:, None] < key[None, :]).float()  # beats[j, i]: j is better than i
        scores = q[kept] * _exactly_k_beaten(q[kept], beats, parsed.ordinal - 1)
        return _spread(scores, kept, boxes, q, dedupe_iou)
    # Two-place relations: the object phrase picks a reference box (soft over candidates).
    so = similarity(parsed.object or "object")
    w = torch.softmax(temperature * so, dim=0)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    if rel == "between":
        return _between(parsed, boxes, kept, q, w, cx, cy, similarity, temperature, dedupe_iou)
    same = box_iou(kb, boxes) >= dedupe_iou  # a box cannot relate to itself
    if rel in ("left of", "right of", "above", "below"):
        ckx, cky = cx[kept], cy[kept]
        if rel == "left of":
            ok = ckx[:, None] < cx[None, :]
        elif rel == "right of":
            ok = ckx[:, None] > cx[None, :]
        elif rel == "above":
            ok = cky[:, None] < cy[None, :]
        else:
            ok = cky[:, None] > cy[None, :]
        support = ((ok & ~same).float() * w[None, :]).sum(1)
        # Among subjects satisfying the relation, prefer the nearest to the reference.
        ref = w.argmax()
        dist = torch.hypot(cx[kept] - cx[ref], cy[kept] - cy[ref])
        beats = ((dist[:, None] < dist[None, :]).float() * support[:, None])
        scores = q[kept] * support * _exactly_k_beaten(q[kept] * support, beats, 0)
        return _spread(scores, kept, boxes, q, dedupe_iou)
    # closest to / farthest from: superlative on distance to the reference, averaged over w.
    scores = torch.zeros(len(kept))
    for j in torch.nonzero(w >= 1e-3 * w.max()).flatten():
        d = torch.hypot(cx[kept] - cx[j], cy[kept] - cy[j])
        if rel == "farthest from":
            d = -d
        valid = (~same[:, j]).float()
        qq = q[kept] * valid
        beats = (d[:, None] < d[None, :]).float()
        scores += w[j] * qq * _exactly_k_beaten(qq, beats, 0)
    return _spread(scores, kept, boxes, q, dedupe_iou)
