"""Tests of mirror views: words, boxes and images flip together; views vote on one box."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipground.errors import ClipgroundError
from clipground.mirror import check_kinds, flip_box, flip_expression, flip_image, vote_boxes


def test_flip_words_boxes_and_images_agree() -> None:
    assert flip_expression("the leftmost red box left of the top circle", "h") == \
        "the rightmost red box right of the top circle"
    assert flip_expression("the square above the bottommost star", "hv") == "the square below the topmost star"
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.putpixel((3, 5), (255, 0, 0))
    for kind in ("h", "v", "hv"):
        x1, y1, _, _ = flip_box([3, 5, 4, 6], kind, 40, 30)
        assert flip_image(img, kind).getpixel((int(x1), int(y1))) == (255, 0, 0)
        assert flip_box(flip_box([3, 5, 9, 8], kind, 40, 30), kind, 40, 30) == [3, 5, 9, 8]
    with pytest.raises(ClipgroundError, match="flip kind"):
        check_kinds(["h", "diagonal"])


def test_vote_outvotes_a_minority_instead_of_averaging_it_in() -> None:
    right = torch.tensor([10.0, 10.0, 30.0, 30.0])
    boxes = torch.stack([right, right + 1, right - 1, torch.tensor([60.0, 60.0, 90.0, 90.0])])
    box, score = vote_boxes(boxes, torch.tensor([0.8, 0.7, 0.6, 0.9]))
    assert torch.allclose(box, (0.8 * right + 0.7 * (right + 1) + 0.6 * (right - 1)) / 2.1)
    assert abs(float(score) - 2.1 / 4) < 1e-6
    # A lone confident view loses to three that agree; a single view is returned as it is.
    one, s1 = vote_boxes(boxes[3:], torch.tensor([0.9]))
    assert torch.equal(one, boxes[3]) and abs(float(s1) - 0.9) < 1e-6
    with pytest.raises(ClipgroundError):
        vote_boxes(boxes, torch.tensor([0.5]))
