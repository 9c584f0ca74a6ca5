"""Datasets: one record type, readers for the formats users already have.

``load_records(path, format="auto", images=DIR, split=None, limit=None)`` reads refer
pickles, ReSC/TransVG ``.pth`` split files, MDETR JSON, COCO instances, Visual Genome
regions and clipground JSONL into :class:`GroundingRecord` s (absolute image paths,
``xyxy`` pixel boxes), keeping those whose image exists.

This package imports only the record type eagerly; everything else loads on first use.
"""

from __future__ import annotations

from typing import Any

from .records import GroundingRecord, keep_existing

__all__ = ["GroundingRecord", "keep_existing", "load_records", "LoadResult", "FORMATS", "detect_format",
           "read_jsonl", "write_jsonl"]

_LAZY = {
    "load_records": "loaders",
    "LoadResult": "loaders",
    "FORMATS": "loaders",
    "detect_format": "loaders",
    "read_jsonl": "jsonl",
    "write_jsonl": "jsonl",
}


def __getattr__(name: str) -> Any:
    """Import the loaders only when one is asked for (keeps ``import clipground.data`` cheap)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
