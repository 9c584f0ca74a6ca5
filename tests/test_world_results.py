"""Smoke tests of ``scripts/world_results.py`` on a tiny world with a tiny random CLIP."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "world_results.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("world_results_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


wr = _load_script()

README = "# project\n\nintro\n\n<!-- RESULTS -->\n\n## Python\n\nmore text\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> dict:
    """A tiny world, a saved 'trained' entry (zero-shot on the tiny CLIP), a config and a README."""
    from clipground.data.world import WorldConfig, generate_world
    from clipground.grounder import Grounder

    root = tmp_path_factory.mktemp("world_results")
    world = generate_world(root / "world", WorldConfig.v1(n_train=0, n_val=0, n_test=4, n_compositional=3), progress=False)
    run = root / "runs" / "saved"
    Grounder.load("zero-shot", backbone=str(tiny_clip_dir), proposals="selective-search").save_pretrained(run / "final")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(run / "learning_curve.png")
    config = {
        "splits": ["test", "compositional"],
        "entries": [
            {"name": "zs gt", "method": "zero-shot", "backbone": "clipground/world-clip", "proposals": "gt"},
            {"name": "zs ss", "method": "zero-shot", "backbone": "clipground/world-clip", "proposals": "selective-search"},
            {"name": "zs gt no rel", "method": "zero-shot", "backbone": "clipground/world-clip", "proposals": "gt",
             "options": {"relations": False}},
            {"name": "saved", "dir": str(run / "final"), "proposals": "gt"},
            {"name": "saved ss", "dir": str(run / "final"), "proposals": "selective-search"},
            {"name": "missing", "dir": str(root / "runs" / "nope" / "final"),
             "train_command": "clipground train --method flyp --train runs/world --out runs/nope"},
        ],
    }
    (root / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (root / "README.md").write_text(README)
    out = root / "out"
    base = ["--config", str(root / "config.yaml"), "--world", str(world), "--existing-world", "--out", str(out),
            "--backbone-override", str(tiny_clip_dir), "--limit", "5", "--quiet", "--no-report-plots"]
    return {"root": root, "world": world, "out": out, "base": base, "readme": root / "README.md"}


@pytest.fixture(scope="module")
def first_run(setup: dict) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setattr(wr, "source_hash", lambda: "fixed")  # other edits to the tree must not defeat reuse here
    try:
        rc = wr.main(setup["base"] + ["--update-readme", "--readme", str(setup["readme"])])
        summary = json.loads((setup["out"] / "world_results.json").read_text())
        readme = setup["readme"].read_text()
        rc2 = wr.main(setup["base"] + ["--update-readme", "--readme", str(setup["readme"])])
        summary2 = json.loads((setup["out"] / "world_results.json").read_text())
        readme2 = setup["readme"].read_text()
        rc3 = wr.main(setup["base"] + ["--only", "zs ss", "--force"])
        summary3 = json.loads((setup["out"] / "world_results.json").read_text())
    finally:
        mp.undo()
    return {"rc": (rc, rc2, rc3), "summary": summary, "summary2": summary2, "summary3": summary3,
            "readme": readme, "readme2": readme2}


def _entries(summary: dict) -> dict:
    return {e["name"]: e for e in summary["entries"]}


def test_outputs_and_statuses(setup: dict, first_run: dict) -> None:
    assert first_run["rc"] == (0, 0, 0)
    out = setup["out"]
    for name in ("world_results.json", "world_results.md", "world_results.png", "learning_curve_saved.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "world_results.png").format == "PNG"
    ents = _entries(first_run["summary"])
    assert [e["status"] for e in ents.values()] == ["ok", "ok", "ok", "ok", "ok", "not-trained"]
    assert "clipground train --method flyp" in ents["missing"]["message"]
    for name in ("zs gt", "zs ss", "zs gt no rel", "saved"):
        for split in ("test", "compositional"):
            rep = Path(ents[name]["splits"][split]["report"])
            assert (rep / "metrics.json").is_file() and (rep / "predictions.jsonl").is_file()
    md = (out / "world_results.md").read_text()
    assert "not trained yet: `clipground train --method flyp" in md
    # two entries of one run share one copy of its learning curve, listed once
    assert ents["saved ss"]["learning_curve"] == ents["saved"]["learning_curve"]
    assert not (out / "learning_curve_saved-ss.png").exists()
    assert md.count("learning_curve_saved.png") == 1
    assert "--limit 5" in md


def test_table_matches_predictions(setup: dict, first_run: dict) -> None:
    """Every table number is recomputed from the per-item predictions it summarizes."""
    from clipground.data.jsonl import read_jsonl

    rows = {(r["name"], r["split"]): r for r in first_run["summary"]["table"]}
    assert len(rows) == 10
    md = (setup["out"] / "world_results.md").read_text()
    for (name, split), row in rows.items():
        rep = Path(_entries(first_run["summary"])[name]["splits"][split]["report"])
        items = [json.loads(line) for line in (rep / "predictions.jsonl").read_text().splitlines()]
        n_split = len(read_jsonl(setup["world"] / f"{split}.jsonl"))
        assert row["n"] == len(items) == min(5, n_split)
        assert row["acc"] == pytest.approx(sum(it["iou"] >= 0.5 for it in items) / len(items))
        assert row["miou"] == pytest.approx(sum(it["iou"] for it in items) / len(items), abs=1e-6)
        for t, v in row["types"].items():
            sel = [it for it in items if it["type"] == t]
            assert (v is None) == (not sel)
            if sel:
                assert v == pytest.approx(sum(it["iou"] >= 0.5 for it in sel) / len(sel))
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} | {split} |"))
        assert f"**{100 * row['acc']:.1f}%**" in line
        if name in ("zs gt", "zs gt no rel", "saved"):
            assert row["recall"] == 1.0  # the world's own boxes always contain the target


def test_saved_directory_entry_matches_method_entry(first_run: dict) -> None:
    """A saved zero-shot grounder on the same CLIP and boxes predicts exactly what the method entry does."""
    ents = _entries(first_run["summary"])
    for split in ("test", "compositional"):
        a = Path(ents["zs gt"]["splits"][split]["report"]) / "predictions.jsonl"
        b = Path(ents["saved"]["splits"][split]["report"]) / "predictions.jsonl"
        boxes = [[json.loads(x)["box"] for x in p.read_text().splitlines()] for p in (a, b)]
        assert boxes[0] == boxes[1]


def test_readme_block_inserted_then_replaced(setup: dict, first_run: dict) -> None:
    for text in (first_run["readme"], first_run["readme2"]):
        assert text.count(wr.BEGIN) == 1 and text.count(wr.END) == 1
        assert text.index("<!-- RESULTS -->") < text.index(wr.BEGIN) < text.index(wr.END) < text.index("## Python")
        block = text[text.index(wr.BEGIN):text.index(wr.END)]
        assert "## Results in the synthetic world" in block
        assert "](out/world_results.png)" in block
        assert "python scripts/world_results.py --config" in block and "--update-readme" in block
        assert "| zs gt | test |" in block and "seed 0" in block
    assert first_run["readme"] == first_run["readme2"]


def test_reuse_and_only_force(first_run: dict) -> None:
    second = _entries(first_run["summary2"])
    assert all(all(s["reused"] for s in e["splits"].values()) for e in second.values() if e["status"] == "ok")
    assert first_run["summary2"]["table"] == first_run["summary"]["table"]
    third = _entries(first_run["summary3"])
    assert not any(s["reused"] for s in third["zs ss"]["splits"].values())
    assert all(s["reused"] for s in third["zs gt"]["splits"].values())
    assert first_run["summary3"]["table"] == first_run["summary"]["table"]  # deterministic re-evaluation


def test_main_table_has_one_row_per_main_entry(setup: dict, tmp_path: Path, tiny_clip_dir: Path) -> None:
    bb = "clipground/world-clip"
    cfg = {"splits": ["test", "compositional"],
           "entries": [{"name": "zs gt", "method": "zero-shot", "backbone": bb, "proposals": "gt", "main": True},
                       {"name": "zs gt no rel", "method": "zero-shot", "backbone": bb, "proposals": "gt",
                        "options": {"relations": False}}]}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    (tmp_path / "README.md").write_text(README)
    rc = wr.main(["--config", str(tmp_path / "c.yaml"), "--world", str(setup["world"]), "--existing-world",
                  "--out", str(tmp_path / "o"), "--quiet", "--no-report-plots", "--limit", "3", "--backbone-override",
                  str(tiny_clip_dir), "--update-readme", "--readme", str(tmp_path / "README.md")])
    assert rc == 0
    rows = {(r["name"], r["split"]): r for r in json.loads((tmp_path / "o" / "world_results.json").read_text())["table"]}
    readme = (tmp_path / "README.md").read_text()
    block = readme[readme.index(wr.BEGIN):readme.index(wr.END)]
    main_rows = [ln for ln in block.splitlines() if ln.startswith("| zs")]
    acc = f"{100 * rows[('zs gt', 'test')]['acc']:.1f}%"
    assert main_rows == [f"| zs gt | {acc} | {100 * rows[('zs gt', 'compositional')]['acc']:.1f}% | "
                         f"{format_miou(rows[('zs gt', 'test')]['miou'])} |"]
    assert "[the full table](o/world_results.md)" in block and "zs gt no rel" not in block
    md = (tmp_path / "o" / "world_results.md").read_text()
    assert "| zs gt no rel | test |" in md and "### Every entry" in md
    with pytest.raises(wr.WorldResultsError, match="main"):
        wr.parse_config({"entries": [{"name": "a", "dir": "d", "main": "yes"}]})


def format_miou(v: float) -> str:
    from clipground.evaluation.report import format_value

    return format_value("miou", v)


def test_failing_entry_is_reported_not_fatal(setup: dict, tmp_path: Path, tiny_clip_dir: Path) -> None:
    bb = "clipground/world-clip"
    cfg = {"entries": [{"name": "bad", "method": "no-such-method", "backbone": bb},
                       {"name": "bad option", "method": "zero-shot", "backbone": bb, "options": {"views": ["nope"]}},
                       {"name": "unknown option", "method": "zero-shot", "backbone": bb, "options": {"colour": 1}},
                       {"name": "untrained", "dir": str(tmp_path / "absent")},
                       {"name": "unexported", "method": "zero-shot", "backbone": str(tmp_path / "onnx"), "runtime": "onnx",
                        "train_command": "clipground export onnx --out x"}]}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    rc = wr.main(["--config", str(tmp_path / "c.yaml"), "--world", str(setup["world"]), "--existing-world",
                  "--out", str(tmp_path / "o"), "--quiet", "--backbone-override", str(tiny_clip_dir)])
    assert rc == 1
    ents = _entries(json.loads((tmp_path / "o" / "world_results.json").read_text()))
    assert ents["bad"]["status"] == "error" and "no-such-method" in ents["bad"]["message"]
    assert ents["bad option"]["status"] == "error" and "views" in ents["bad option"]["message"]
    assert ents["unknown option"]["status"] == "error" and "colour" in ents["unknown option"]["message"]
    assert ents["untrained"]["status"] == "not-trained"
    assert ents["unexported"]["status"] == "not-trained" and "not exported yet: clipground export onnx" in ents["unexported"]["message"]
    assert "No entry has results yet" in (tmp_path / "o" / "world_results.md").read_text()


def test_user_errors(setup: dict, tmp_path: Path) -> None:
    assert wr.main(setup["base"][:5] + ["--out", str(tmp_path), "--only", "nobody"]) == 2
    with pytest.raises(wr.WorldResultsError, match="exactly one of"):
        wr.parse_config({"entries": [{"name": "x", "method": "zero-shot", "backbone": "b", "dir": "d"}]})
    with pytest.raises(wr.WorldResultsError, match="unique"):
        wr.parse_config({"entries": [{"name": "a b", "dir": "d"}, {"name": "a-b", "dir": "e"}]})
    with pytest.raises(wr.WorldResultsError, match="runtime"):
        wr.parse_config({"entries": [{"name": "a", "method": "zero-shot", "backbone": "b", "runtime": "tvm"}]})
    with pytest.raises(wr.WorldResultsError, match="runtime"):
        wr.parse_config({"entries": [{"name": "a", "dir": "d", "runtime": "onnx"}]})
    with pytest.raises(wr.WorldResultsError, match="unknown key"):
        wr.parse_config({"entries": [{"name": "a", "dir": "d", "dirr": "e"}]})
    with pytest.raises(wr.WorldResultsError, match="RESULTS"):
        wr.replace_readme_block("# no marker\n", "x")
    with pytest.raises(wr.WorldResultsError, match="unbalanced"):
        wr.replace_readme_block(f"{wr.END}\n{wr.BEGIN}\n", "x")
    assert wr.replace_readme_block(f"a\n{wr.BEGIN}\nold\n{wr.END}\nb", "new") == f"a\n{wr.BEGIN}\nnew\n{wr.END}\nb"


@pytest.mark.parametrize("name,splits", [("world_results.yaml", ["test", "compositional", "new-look", "paraphrase"]),
                                          ("world_results_v1.yaml", ["test", "compositional"])])
def test_shipped_configs_parse(name: str, splits: list[str]) -> None:
    got, entries = wr.load_config(REPO / "configs" / name)
    assert got == splits
    names = [e.name for e in entries]
    assert names[:3] == ["zero-shot (GT boxes)", "zero-shot (selective search)",
                         "zero-shot, no relation resolver (GT boxes)"]
    assert entries[2].options == {"relations": False}
    assert all(e.train_command for e in entries if e.dir is not None)
    mains = [e.method for e in entries if e.main and e.method]
    assert len(set(mains)) == len(mains), "one main row per method"
