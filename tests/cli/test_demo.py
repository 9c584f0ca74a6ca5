"""``clipground demo --method NAME`` runs offline for every registered method, on the bundled
world models (trained methods from their shipped ``clipground/world-<method>`` checkpoints)."""

from __future__ import annotations

import json

import pytest

from clipground.methods import METHODS
from clipground.testing import run_cli


@pytest.mark.parametrize("method", sorted(METHODS))
def test_demo_runs_offline_for_every_method(method, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--method", method, "--scenes", "1", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["method"] == method and pred["predictions"]
    for p in pred["predictions"]:
        x1, y1, x2, y2 = p["box"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and 0 <= p["iou"] <= 1
    assert list(out.glob("scene_*.png"))
    assert "phrases grounded with IoU >= 0.5" in stdout
