"""The ReCLIP-style spatial parser and resolver."""

import torch

from clipground.relations import _containers, is_spatial, parse, resolve


def test_parse_forms():
    p = parse("the leftmost triangle")
    assert (p.subject, p.relation) == ("triangle", "left")
    p = parse("the green star at the top")
    assert (p.subject, p.relation) == ("green star", "top")
    p = parse("the circle to the left of the blue square")
    assert (p.subject, p.relation, p.object) == ("circle", "left of", "blue square")
    p = parse("the square closest to the red star")
    assert (p.subject, p.relation, p.object) == ("square", "closest to", "red star")
    p = parse("the second circle from the left")
    assert (p.subject, p.relation, p.ordinal) == ("circle", "left", 2)
    p = parse("the large blue square")
    assert p.relation is None and p.subject == "large blue square"
    p = parse("the large blue square", size_words=True)  # size is contrastive: the biggest blue square
    assert (p.subject, p.relation) == ("blue square", "biggest")
    p = parse("a small dog", size_words=True)
    assert (p.subject, p.relation) == ("dog", "smallest")
    p = parse("the small red circle at the top", size_words=True)  # an explicit superlative wins
    assert (p.subject, p.relation) == ("small red circle", "top")
    p = parse("the large circle left of the blue square", size_words=True)
    assert (p.subject, p.relation, p.object) == ("large circle", "left of", "blue square")
    assert parse("the red mug").relation is None
    assert is_spatial("the biggest dog") and not is_spatial("a red mug")


def _sim_factory(boxes, labels):
    """A fake CLIP: similarity 1 for boxes whose label matches the phrase, else 0."""
    def sim(text):
        return torch.tensor([1.0 if text in lab else 0.0 for lab in labels])
    return sim


def test_resolve_superlative_ordinal_and_relations():
    # three circles in a row and one square; x centres 10, 50, 90, 130
    boxes = torch.tensor([[0, 0, 20, 20], [40, 0, 60, 20], [80, 0, 100, 20], [120, 40, 140, 60]], dtype=torch.float32)
    labels = ["red circle", "blue circle", "red circle", "blue square"]
    sim = _sim_factory(boxes, labels)
    size = (200, 100)
    assert resolve(parse("the leftmost circle"), boxes, size, sim).argmax() == 0
    assert resolve(parse("the rightmost circle"), boxes, size, sim).argmax() == 2
    assert resolve(parse("the second circle from the left"), boxes, size, sim).argmax() == 1
    assert resolve(parse("the second circle from the right"), boxes, size, sim).argmax() == 1
    assert resolve(parse("the circle closest to the square"), boxes, size, sim).argmax() == 2
    assert resolve(parse("the circle farthest from the square"), boxes, size, sim).argmax() == 0
    assert resolve(parse("the square below the blue circle"), boxes, size, sim).argmax() == 3
    # relation flips the answer: the red circle left of the blue circle is box 0, right of it is box 2
    assert resolve(parse("the red circle left of the blue circle"), boxes, size, sim).argmax() == 0
    assert resolve(parse("the red circle right of the blue circle"), boxes, size, sim).argmax() == 2


def test_size_adjectives_ignore_boxes_around_several_objects():
    # a large and a small star, and a proposal around both (and the whole image): both
    # enclosing boxes "contain a star" to CLIP, but neither is one star.
    boxes = torch.tensor([[10, 10, 50, 50], [70, 20, 85, 35], [5, 5, 90, 55], [0, 0, 100, 60]], dtype=torch.float32)
    labels = ["star", "star", "star", "star"]
    sim = _sim_factory(boxes, labels)
    assert _containers(boxes).tolist() == [False, False, True, True]
    assert resolve(parse("the large star", size_words=True), boxes, (100, 60), sim).argmax() == 0
    assert resolve(parse("the small star", size_words=True), boxes, (100, 60), sim).argmax() == 1
    assert resolve(parse("the biggest star"), boxes, (100, 60), sim).argmax() == 0
    # without the container rule the box around everything would be "the biggest"
    import clipground.relations as R

    q = torch.ones(4)
    assert {2, 3} & set(R._dedupe(boxes, q, q, 0.05, 0.5, drop_containers=False).tolist())
    assert sorted(R._dedupe(boxes, q, q, 0.05, 0.5).tolist()) == [0, 1]
