"""The one record type every dataset loader produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class GroundingRecord:
    """One referring expression and the box it refers to.

    Attributes:
        image: path to the image file.
        expression: the referring expression.
        box: target box, canonical ``xyxy`` float pixels of the displayed image.
        image_id: dataset image id (string, to cover every dataset's convention).
        ref_id: id of the referred object / annotation / region.
        split: split name (``train``, ``val``, ``test``, ...).
        meta: free-form extras (category, expression type for the synthetic world, ...).
    """

    image: str
    expression: str
    box: list[float]
    image_id: str = ""
    ref_id: str = ""
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GroundingRecord":
        """Inverse of :meth:`to_json` (a non-string expression becomes ``""``, never ``"None"``)."""
        expression = d["expression"]
        return cls(
            image=str(d["image"]),
            expression=expression if isinstance(expression, str) else "",
            box=[float(v) for v in d["box"]],
            image_id=str(d.get("image_id", "")),
            ref_id=str(d.get("ref_id", "")),
            split=str(d.get("split", "")),
            meta=dict(d.get("meta", {})),
        )


def keep_existing(records: list[GroundingRecord]) -> tuple[list[GroundingRecord], int]:
    """Keep records whose image file exists; return (kept, number dropped)."""
    cache: dict[str, bool] = {}
    kept = []
    for r in records:
        if r.image not in cache:
            cache[r.image] = Path(r.image).is_file()
        if cache[r.image]:
            kept.append(r)
    return kept, len(records) - len(kept)
