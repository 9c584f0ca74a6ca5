"""Tests of the world's vocabulary and config (clipground.data.world.config)."""

from __future__ import annotations

import pytest

import clipground.data.world as world_pkg
from clipground.data.world import WorldConfig, WorldConfigError, held_out_pairs
from clipground.errors import ClipgroundError


def test_config_validation() -> None:
    with pytest.raises(WorldConfigError):
        WorldConfig(image_size=100).validate()
    with pytest.raises(ClipgroundError):
        WorldConfig(held_out_pairs=(("pink", "circle"),)).validate()
    with pytest.raises(WorldConfigError):
        WorldConfig(min_objects=1).validate()
    cfg = WorldConfig(held_out_pairs=(("red", "star"), ("blue", "circle")))
    cfg.validate()
    assert held_out_pairs(cfg) == [("blue", "circle"), ("red", "star")]
    assert WorldConfig.from_json(cfg.to_json()) == cfg


def test_package_exports_its_public_api() -> None:
    assert all(hasattr(world_pkg, name) for name in world_pkg.__all__)
    assert len(set(world_pkg.__all__)) == len(world_pkg.__all__)
