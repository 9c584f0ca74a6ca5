"""evaluate(): per-image batching, failure accounting, exact metrics, reports and comparisons."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from clipground.data.records import GroundingRecord
from clipground.errors import BadImageError, BadPhraseError
from clipground.evaluation import (
    EvalResult,
    comparison_markdown,
    evaluate,
    load_result,
    metrics_markdown,
    plot_comparison,
    write_report,
)
from clipground.grounder import Prediction

PROPS = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]


class FakeGrounder:
    """Scripted grounder: fixed proposals, a fixed ranking per phrase, some failures."""

    def __init__(self, rankings):
        self.rankings = rankings
        self.method = SimpleNamespace(name="fake", uses_proposals=True, config=SimpleNamespace(to_dict=lambda: {"k": 1}))
        self.backbone = SimpleNamespace(name="no-backbone")
        self.proposals = SimpleNamespace(config=lambda: {"name": "fake-props"})
        self.state = None
        self.set_image_calls: list[str] = []
        self.batch_calls: list[list[str]] = []

    def set_image(self, image):
        self.set_image_calls.append(str(image))
        if "broken" in str(image):
            raise BadImageError(f"cannot read image {image}")
        self.state = SimpleNamespace(proposals=SimpleNamespace(boxes=torch.tensor(PROPS, dtype=torch.float32)))

    def predict_batch(self, phrases):
        self.batch_calls.append(list(phrases))
        if "refuse" in phrases:
            raise BadPhraseError("phrase refused")
        out = []
        for p in phrases:
            boxes = torch.tensor(self.rankings[p], dtype=torch.float32)
            scores = torch.linspace(1, 0, len(boxes))
            out.append(Prediction(p, boxes[0].tolist(), float(scores[0]), boxes, scores, (100, 100)))
        return out


def _records():
    R = GroundingRecord
    return [
        R("a.png", "the dog", [0, 0, 10, 10], split="val", meta={"type": "attribute"}),
        R("a.png", "the cat on the left", [20, 20, 30, 30], split="val", meta={"type": "spatial"}),
        R("b.png", "x", [100, 100, 110, 110], split="test", meta={"type": "attribute"}),
        R("a.png", "a thing that is there", [40, 40, 50, 50], split="test", meta={"type": "attribute"}),
        R("b.png", "refuse", [0, 0, 10, 10], split="test", meta={"type": "spatial"}),
        R("broken.png", "y", [0, 0, 10, 10], split="val"),
    ]


RANKINGS = {
    "the dog": [PROPS[0], PROPS[1]],  # IoU 1 at rank 1
    "the cat on the left": [PROPS[0], PROPS[2], PROPS[1]],  # wrong at rank 1, hit at rank 3
    "a thing that is there": [[40, 40, 50, 45], PROPS[0]],  # IoU exactly 0.5
    "x": PROPS,  # target not covered by any proposal
}


def test_groups_by_image_counts_failures_and_scores_exactly():
    g = FakeGrounder(RANKINGS)
    res = evaluate(g, _records(), progress=False, examples=3)
    assert g.set_image_calls == ["a.png", "b.png", "broken.png"]  # once per image, first-appearance order
    assert g.batch_calls[0] == ["the dog", "the cat on the left", "a thing that is there"]  # one batch per image
    m = res.metrics
    # The refused phrase is a miss (IoU 0); the expression on the broken image is not scored.
    assert m["count"] == 3 + 1 + 1
    assert m["acc@0.5"] == pytest.approx(2 / 5)
    assert m["acc@0.75"] == pytest.approx(1 / 5)
    assert m["miou"] == pytest.approx((1 + 0 + 0.5 + 0 + 0) / 5)
    assert (m["p@1"], m["p@5"], m["p@10"]) == pytest.approx((2 / 5, 3 / 5, 3 / 5))
    assert m["proposal_recall@0.5"] == pytest.approx(4 / 5)
    assert m["mean_proposals"] == pytest.approx(3.0)
    assert m["refused_rate"] == pytest.approx(1 / 5)
    assert list(m)[0] == "acc@0.5"
    c = res.counts
    assert (c["records"], c["scored"], c["refused"], c["failed_items"], c["failed_images"], c["images"]) == \
        (6, 5, 1, 1, 1, 2)
    assert {f.get("expression") for f in res.failures} == {None, "refuse"}
    refused = [it for it in res.items if it.refused]
    assert len(refused) == 1 and refused[0].box == [] and refused[0].iou == 0.0 and not refused[0].correct
    bd = res.breakdown
    assert bd["spatial"]["spatial"]["count"] == 1 and bd["spatial"]["spatial"]["acc@0.5"] == 0.0
    assert bd["type"]["attribute"]["count"] == 3 and bd["type"]["attribute"]["acc@0.5"] == pytest.approx(2 / 3)
    assert set(bd["split"]) == {"val", "test"} and bd["split"]["val"]["acc@0.5"] == pytest.approx(0.5)
    assert bd["split_type"]["test/attribute"]["count"] == 2
    assert sum(b["count"] for b in bd["length"].values()) == 5
    assert res.protocol["refused_phrases"] == "scored as misses"
    assert res.protocol["hit_criterion"].startswith("IoU") and "GIoU" in res.protocol["hit_criterion"]
    assert len(res.examples) == 3 and any(res.items[i].correct for i in res.examples) \
        and any(not res.items[i].correct for i in res.examples)


def test_batch_by_image_false_sets_image_per_record():
    g = FakeGrounder(RANKINGS)
    recs = [r for r in _records() if r.expression in RANKINGS]
    evaluate(g, recs, batch_by_image=False, progress=False)
    assert len(g.set_image_calls) == len(recs)


def test_report_files_roundtrip_and_comparison(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (120, 120), (200, 200, 200)).save(tmp_path / name)
    recs = _records()
    for r in recs:
        r.image = str(tmp_path / r.image)
    res = evaluate(FakeGrounder(RANKINGS), recs, progress=False, examples=4)
    files = write_report(res, tmp_path / "out")
    for name in ("metrics.json", "metrics.md", "predictions.jsonl", "metrics.png", "examples.png"):
        assert files[name].is_file() and files[name].stat().st_size > 0, name
    assert files["metrics.png"].read_bytes()[:4] == b"\x89PNG"
    md = files["metrics.md"].read_text()
    table = md[md.index("| metric"):]
    assert table.splitlines()[2].startswith("| Acc@0.5 |")  # Acc@0.5 is the first row
    assert "IoU, not GIoU" in md and "broken.png" in md
    lines = files["predictions.jsonl"].read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["correct"] is True
    assert "1 phrases the model refused, scored as misses" in md

    back = load_result(tmp_path / "out")
    assert back.metrics == res.metrics and back.breakdown == res.breakdown and back.items == []
    assert metrics_markdown(back) == metrics_markdown(res)

    other = EvalResult.from_json({**res.to_json(), "label": "other"})
    other.breakdown = {k: v for k, v in other.breakdown.items() if k not in ("split", "split_type")}
    other.counts["splits"] = ["val"]
    table = comparison_markdown([res, other])
    rows = table.splitlines()
    assert rows[0].startswith("| method | split | n | Acc@0.5 all | Acc@0.5 attribute | Acc@0.5 spatial")
    assert any(r.startswith("| fake | test | 3 | 33.3% | 50.0% | 0.0% |") for r in rows)
    assert any(r.startswith("| other | val | 5 | 40.0% |") for r in rows)
    png = plot_comparison([res, other], tmp_path / "cmp.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_real_grounder_with_ground_truth_proposals(tiny_clip_dir, tmp_path):
    """A real Grounder: GT proposals bound recall at 1, and Acc@0.5 agrees with P@1."""
    from clipground.data.jsonl import write_jsonl
    from clipground.data.loaders import load_records
    from clipground.grounder import Grounder

    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "shape"}]}
    recs = []
    for i in range(3):
        img = Image.new("RGB", (96, 80), (40 * i, 100, 160))
        img.save(tmp_path / f"im{i}.png")
        coco["images"].append({"id": i, "file_name": f"im{i}.png", "width": 96, "height": 80})
        for j, box in enumerate([[5, 5, 30, 30], [50, 20, 40, 50]]):
            coco["annotations"].append({"id": 10 * i + j, "image_id": i, "bbox": box, "category_id": 1})
            x, y, w, h = box
            recs.append(GroundingRecord(str(tmp_path / f"im{i}.png"), ["the left square", "a big shape"][j],
                                        [x, y, x + w, y + h], split="val"))
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    write_jsonl(recs, tmp_path / "data.jsonl")
    loaded = load_records(tmp_path / "data.jsonl")
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals=f"gt:{tmp_path / 'inst.json'}")
    res = evaluate(g, loaded, progress=False)
    m = res.metrics
    assert m["count"] == 6 and res.counts["images"] == 3
    assert m["proposal_recall@0.5"] == pytest.approx(1.0) and m["mean_proposals"] == pytest.approx(2.0)
    assert m["p@5"] == pytest.approx(1.0)  # both GT boxes are among the ranked candidates
    assert m["acc@0.5"] == pytest.approx(m["p@1"])
    assert all(it.iou in (0.0, 1.0) or it.iou == pytest.approx(1.0) for it in res.items)
    assert res.protocol["dataset"]["kept"] == 6 and res.protocol["proposals"]["name"] == "gt"
