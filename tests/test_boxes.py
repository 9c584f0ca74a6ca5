"""Tests of :mod:`clipground.boxes`: format conversions round-trip, validation refuses bad
boxes with :class:`BadBoxError`, and IoU helpers agree with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from clipground import boxes as B
from clipground.errors import BadBoxError, ClipgroundError


def _random_xyxy(n: int = 50, w: float = 640, h: float = 480, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, generator=g) * (w - 10)
    y1 = torch.rand(n, generator=g) * (h - 10)
    x2 = x1 + 1 + torch.rand(n, generator=g) * (w - x1 - 1)
    y2 = y1 + 1 + torch.rand(n, generator=g) * (h - y1 - 1)
    return torch.stack([x1, y1, x2, y2], 1)


def test_as_boxes_shapes():
    assert B.as_boxes([1, 2, 3, 4]).shape == (1, 4)
    assert B.as_boxes([[1, 2, 3, 4], [0, 0, 1, 1]]).dtype == torch.float32
    assert B.as_boxes(torch.zeros(0, 4)).shape == (0, 4)
    for bad in ([1, 2, 3], [[1, 2, 3, 4, 5]], torch.zeros(2, 2, 4)):
        with pytest.raises(BadBoxError, match=r"\(N, 4\)"):
            B.as_boxes(bad)


def test_xywh_known_values_and_round_trip():
    assert B.from_xywh([10, 20, 30, 40]).tolist() == [[10, 20, 40, 60]]
    assert B.to_xywh([10, 20, 40, 60]).tolist() == [[10, 20, 30, 40]]
    b = _random_xyxy()
    assert torch.allclose(B.from_xywh(B.to_xywh(b)), b, atol=1e-4)


def test_cxcywh_known_values_and_round_trip():
    assert B.to_cxcywh([10, 20, 30, 60]).tolist() == [[20, 40, 20, 40]]
    assert B.from_cxcywh([20, 40, 20, 40]).tolist() == [[10, 20, 30, 60]]
    b = _random_xyxy()
    assert torch.allclose(B.from_cxcywh(B.to_cxcywh(b)), b, atol=1e-4)


def test_normalize_round_trip():
    b = _random_xyxy(w=640, h=480)
    n = B.normalize(b, 640, 480)
    assert (n >= 0).all() and (n <= 1).all()
    assert torch.allclose(B.normalize([320, 240, 640, 480], 640, 480), torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert torch.allclose(B.denormalize(n, 640, 480), b, atol=1e-3)
    # normalized cxcywh (DETR-style) round trip through all three conversions
    assert torch.allclose(B.denormalize(B.from_cxcywh(B.to_cxcywh(n)), 640, 480), b, atol=1e-3)


def test_clip_to_image():
    out = B.clip_to_image([[-5, -5, 50, 700], [10, 10, 20, 20]], 100, 200)
    assert out.tolist() == [[0, 0, 50, 200], [10, 10, 20, 20]]


def test_validate_accepts_and_clips():
    out = B.validate([[-10, 5, 50, 300]], 100, 200)
    assert out.tolist() == [[0, 5, 50, 200]]
    unclipped = B.validate([[-10, 5, 50, 300]], 100, 200, clip=False)
    assert unclipped.tolist() == [[-10, 5, 50, 300]]
    assert B.validate([[1, 2, 3, 4]]).tolist() == [[1, 2, 3, 4]]  # no image size: shape/finite/order only


@pytest.mark.parametrize(
    "box,match",
    [
        ([float("nan"), 0, 10, 10], "NaN"),
        ([0, 0, math.inf, 10], "infinite"),
        ([10, 0, 10, 10], "degenerate"),  # zero width
        ([10, 10, 5, 20], "degenerate"),  # x2 < x1
        ([0, 20, 10, 20], "degenerate"),  # zero height
        ([200, 10, 250, 20], "outside"),  # right of a 100-wide image
        ([-50, 10, -1, 20], "outside"),  # left of it
        ([10, 300, 20, 400], "outside"),  # below a 200-high image
        ([99.5, 10, 150, 20], "smaller"),  # 0.5 px wide once clipped
    ],
)
def test_validate_refuses(box, match):
    with pytest.raises(BadBoxError, match=match) as ei:
        B.validate(box, 100, 200)
    assert isinstance(ei.value, ClipgroundError) and "\n" not in str(ei.value)


def test_iou_giou_paired_iou():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    p = B.paired_iou(a, b)
    assert torch.allclose(p, torch.tensor([1.0, 50 / 150, 0.0]))
    assert torch.allclose(B.iou(a, b).diagonal(), p)
    g = B.giou(a[2:], b[2:])[0, 0]
    # GIoU = IoU - (hull - union) / hull = 0 - (900 - 200) / 900
    assert torch.isclose(g, torch.tensor(-700 / 900))
    assert B.paired_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(BadBoxError, match="equal lengths"):
        B.paired_iou(a, b[:2])


def test_iou_is_invariant_to_format_round_trip():
    a, b = _random_xyxy(seed=1), _random_xyxy(seed=2)
    direct = B.paired_iou(a, b)
    via = B.paired_iou(B.from_xywh(B.to_xywh(a)), B.from_cxcywh(B.to_cxcywh(b)))
    assert torch.allclose(direct, via, atol=1e-5)
