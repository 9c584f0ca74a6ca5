"""``clipground eval`` end to end with a tiny random CLIP (and on real RefCOCOg files when present)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipground.cli.main import app
from clipground.data.jsonl import write_jsonl
from clipground.data.records import GroundingRecord


def _dataset(tmp_path):
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "shape"}]}
    recs = []
    for i in range(2):
        Image.new("RGB", (80, 64), (30 + 60 * i, 120, 200)).save(tmp_path / f"im{i}.png")
        coco["images"].append({"id": i, "file_name": f"im{i}.png", "width": 80, "height": 64})
        coco["annotations"].append({"id": i, "image_id": i, "bbox": [4, 4, 30, 30], "category_id": 1})
        coco["annotations"].append({"id": 10 + i, "image_id": i, "bbox": [40, 10, 30, 40], "category_id": 1})
        recs.append(GroundingRecord(str(tmp_path / f"im{i}.png"), "the square on the left", [4, 4, 34, 34], split="val"))
    recs.append(GroundingRecord(str(tmp_path / "gone.png"), "a ghost", [0, 0, 5, 5], split="val"))
    write_jsonl(recs, tmp_path / "data.jsonl")
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    return tmp_path / "data.jsonl", tmp_path / "inst.json"


def test_eval_cli_writes_outputs_and_prints_metrics(tiny_clip_dir, tmp_path):
    data, inst = _dataset(tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["eval", str(data), "--backbone", str(tiny_clip_dir), "--proposals", f"gt:{inst}",
                                 "--out", str(out), "--no-progress", "--option", "views=crop,circle"])
    assert r.exit_code == 0, r.output
    assert "kept 2 items, dropped 1 whose image is missing" in r.output
    assert r.output.index("Acc@0.5") < r.output.index("Acc@0.75") < r.output.index("mean IoU")
    for name in ("P@1 (IoU>=0.5)", "P@5", "P@10", "proposal recall@0.5", "spatial vs non-spatial"):
        assert name in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["kept"] == 2 and m["counts"]["dropped"] == 1
    assert m["protocol"]["method_config"]["views"] == ["crop", "circle"]  # --option reached the method
    assert m["metrics"]["proposal_recall@0.5"] == 1.0
    assert (out / "metrics.md").is_file() and (out / "examples.png").is_file() and (out / "metrics.png").is_file()

    rj = CliRunner().invoke(app, ["eval", str(data), "--backbone", str(tiny_clip_dir), "--proposals", f"gt:{inst}",
                                  "--out", str(out), "--no-progress", "--no-plots", "--json"])
    assert rj.exit_code == 0
    payload = json.loads(rj.stdout[rj.stdout.index("{"):])
    assert payload["metrics"]["count"] == 2


def test_eval_cli_user_errors_are_one_line(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from clipground.cli.main import main

    data = tmp_path / "data.jsonl"
    write_jsonl([GroundingRecord(str(tmp_path / "gone.png"), "a ghost", [0, 0, 5, 5])], data)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    corrupt = tmp_path / "corrupt.jsonl"
    write_jsonl([GroundingRecord(str(tmp_path / "bad.png"), "a thing", [0, 0, 5, 5])], corrupt)
    for args, pattern in [
        ([str(corrupt), "--backbone", str(tiny_clip_dir), "--no-plots", "--out", str(tmp_path / "o")],
         r"error: no expression could be scored: 1 failed \(first: .*bad.png"),
        ([str(data)], r"error: nothing to evaluate: none of the 1 items .* --images"),
        ([str(tmp_path / "absent.pth")], r"error: annotation file not found"),
        ([str(data), "--format", "yolo"], r"error: unknown annotation format 'yolo'"),
    ]:
        monkeypatch.setattr(sys, "argv", ["clipground", "eval", *args])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert re.search(pattern, err[-1]) and not any("Traceback" in line for line in err), err


def test_eval_cli_on_real_refcocog_val(shared_data, tiny_clip_dir, tmp_path):
    """The acceptance command: ReSC split file, 3 real COCO photos, GT boxes from COCO 2017 names."""
    r = CliRunner().invoke(app, [
        "eval", str(shared_data / "refcoco" / "gref_umd_val.pth"),
        "--images", str(shared_data / "coco" / "train2014"),
        "--proposals", f"gt:{shared_data / 'coco128' / 'annotations' / 'instances_train2017.json'}",
        "--backbone", str(tiny_clip_dir), "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert r.exit_code == 0, r.output
    assert "kept 4 items, dropped 4892 whose image is missing" in r.output
    for name in ("Acc@0.5", "Acc@0.75", "mean IoU", "P@1", "P@5", "P@10", "proposal recall@0.5"):
        assert name in r.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["metrics"]["count"] == 4 and m["counts"]["dropped"] == 4892
    # GT proposals found image 309 under its COCO 2017 name: the targets are among them
    assert m["metrics"]["proposal_recall@0.5"] == 1.0 and m["metrics"]["mean_proposals"] > 0


def test_eval_untrained_method_name_is_one_line_error(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """`--method NAME` of a trainable method on a backbone it was not bundled for: a clear error,
    never an evaluation of untrained weights."""
    from clipground.testing import run_cli

    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "x.png")
    ann = tmp_path / "refs.jsonl"
    ann.write_text('{"image": "x.png", "expression": "the red circle", "box": [0, 0, 4, 4]}\n')
    code, out, err = run_cli(["eval", "--images", str(tmp_path), str(ann), "--method", "fusion-regressor", "--backbone", str(tiny_clip_dir),
                              "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert code != 0 and "must be trained" in err and "Traceback" not in err + out
