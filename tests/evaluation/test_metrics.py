"""Metrics on hand-made boxes whose IoUs are known exactly."""

from __future__ import annotations

import pytest
import torch

from clipground.evaluation import metrics as M
from clipground.boxes import paired_iou
from clipground.errors import BadBoxError


def test_paired_iou_known_values():
    target = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]]
    pred = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 2, 2]]
    ious = paired_iou(pred, target)
    assert ious.tolist() == pytest.approx([1.0, 50 / 150, 0.0, 4 / 16])
    assert paired_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(BadBoxError):
        paired_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 2, 2]])


def test_paired_iou_matches_torchvision_on_many_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2500, 2, generator=g) * 100
    a = torch.cat([xy, xy + 1 + torch.rand(2500, 2, generator=g) * 50], 1)
    b = a + torch.randn(2500, 4, generator=g) * 5
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1)
    from torchvision.ops import box_iou

    expected = torch.stack([box_iou(a[i:i + 1], b[i:i + 1])[0, 0] for i in range(0, 2500, 97)])
    assert torch.allclose(paired_iou(a, b)[::97], expected)


def test_accuracy_thresholds_are_inclusive_and_mean_iou():
    ious = torch.tensor([0.5, 0.74, 0.75, 0.2])
    assert M.accuracy(ious, 0.5) == pytest.approx(0.75)
    assert M.accuracy(ious, 0.75) == pytest.approx(0.25)
    assert M.mean_iou(ious) == pytest.approx(0.5475)
    assert M.accuracy(torch.zeros(0)) == 0.0 and M.mean_iou(torch.zeros(0)) == 0.0


def test_precision_at_k_over_ranked_candidates():
    target = [0, 0, 10, 10]
    good, bad = [0, 0, 10, 9], [50, 50, 60, 60]
    ranked = [
        M.candidate_ious([good, bad], target),  # hit at rank 1
        M.candidate_ious([bad, bad, good], target),  # hit at rank 3
        M.candidate_ious([bad] * 7 + [good], target),  # hit at rank 8
        M.candidate_ious([bad] * 12, target),  # never
        torch.zeros(0),  # no candidates at all
    ]
    assert M.topk_hits(ranked, 1).tolist() == [True, False, False, False, False]
    assert M.precision_at_k(ranked, 1) == pytest.approx(1 / 5)
    assert M.precision_at_k(ranked, 5) == pytest.approx(2 / 5)
    assert M.precision_at_k(ranked, 10) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        M.topk_hits(ranked, 0)


def test_proposal_recall_and_best_iou():
    target = [0, 0, 10, 10]
    assert M.best_iou([[0, 0, 5, 10], [0, 0, 10, 10]], target) == pytest.approx(1.0)
    assert M.best_iou(torch.zeros(0, 4), target) == 0.0
    assert M.proposal_recall(torch.tensor([0.9, 0.49, 0.5, 0.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("expr,bin_", [("dog", "1-2"), ("brown dog", "1-2"), ("the brown dog", "3-4"),
                                        ("the dog on the left", "5-8"), ("a b c d e f g h", "5-8"),
                                        ("the man in the red shirt holding a cup", "9+")])
def test_length_bins(expr, bin_):
    assert M.length_bin(expr) == bin_


def test_grouped_counts_and_order():
    ious = torch.tensor([1.0, 0.0, 0.6, 0.8])
    out = M.grouped(["9+", "1-2", "1-2", "5-8"], ious, torch.tensor([1.0, 0.2, 0.7, 0.9]), order=M.LENGTH_BINS)
    assert list(out) == ["1-2", "5-8", "9+"]  # display order, empty "3-4" skipped
    assert out["1-2"]["count"] == 2 and out["1-2"]["acc@0.5"] == pytest.approx(0.5)
    assert out["1-2"]["miou"] == pytest.approx(0.3)
    assert out["1-2"]["proposal_recall@0.5"] == pytest.approx(0.5)
    assert out["5-8"]["acc@0.75"] == pytest.approx(1.0)
