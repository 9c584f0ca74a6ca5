"""Tests of ``clipground world generate`` and ``clipground world show`` (clipground.cli.world)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from PIL import Image
from typer.testing import CliRunner

from clipground.errors import ClipgroundError


def test_cli_generate_and_show(tmp_path: Path) -> None:
    from clipground.cli import world as world_cli

    app = typer.Typer()
    world_cli.register(app)
    runner = CliRunner()
    out = tmp_path / "w"
    args = ["world", "generate", "--out", str(out), "--n-train", "3", "--n-val", "3", "--n-test", "2", "--n-compositional", "2", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "val: 3 scenes" in res.output and (out / "world.json").is_file()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already holds" in res.output
    grid = tmp_path / "grid.png"
    res = runner.invoke(app, ["world", "show", str(out), "--split", "val", "--n", "5", "--out", str(grid)])
    assert res.exit_code == 0, res.output
    with Image.open(grid) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    res = runner.invoke(app, ["world", "generate", "--out", str(tmp_path / "x"), "--size", "100"])
    assert isinstance(res.exception, ClipgroundError) and "128" in str(res.exception)
    res = runner.invoke(app, ["world", "show", str(tmp_path / "nothing")])
    assert isinstance(res.exception, ClipgroundError)
    assert not os.path.exists(tmp_path / "x" / "world.json")
