"""A small generated world shared by the world tests (generated once for the package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipground.data.world import WorldConfig, generate_world


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorldConfig]:
    """The first world's kind (one look, the first grammar): 20 scenes per split (seed 0)."""
    cfg = WorldConfig.v1(seed=0, n_train=20, n_val=20, n_test=20, n_compositional=20)
    out = tmp_path_factory.mktemp("world")
    generate_world(out, cfg, progress=False)
    return out, cfg


@pytest.fixture(scope="package")
def rich_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorldConfig]:
    """The default kind (rendering families, the rich grammar): 30 scenes per rendered split."""
    cfg = WorldConfig(seed=0, n_train=30, n_val=30, n_test=30, n_compositional=30, n_new_look=30)
    out = tmp_path_factory.mktemp("rich_world")
    generate_world(out, cfg, progress=False)
    return out, cfg


@pytest.fixture(scope="package")
def world_json(world: tuple[Path, WorldConfig]) -> dict:
    """The world's ``world.json``."""
    return json.loads((world[0] / "world.json").read_text())
