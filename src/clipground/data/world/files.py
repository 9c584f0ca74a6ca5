"""The world on disk: writing it (:func:`generate_world`, :func:`ensure_world`) and reading it back.

Layout written by :func:`generate_world`::

    OUT/images/{split}/{scene_id:06d}.png
    OUT/{split}.jsonl             GroundingRecords (image path relative to OUT)
    OUT/instances_{split}.json    COCO instances; masks as uncompressed COCO RLE
    OUT/world.json                config, vocabulary, held-out pairs, counts (written last)

Masks are stored in the COCO json as ``segmentation = {"size": [h, w], "counts": [...]}``
(uncompressed RLE, column-major, starting with a run of zeros), which pycocotools reads;
:func:`rle_decode` decodes it without pycocotools. Scene ids are unique across splits:
``split_index * 100000 + i`` (train 0, val 1, test 2, compositional 3).

Everything is seeded: each scene draws from its own ``PCG64(SeedSequence([seed, split,
i]))``, so a split's scenes do not depend on other splits' sizes and the same config
gives byte-identical files. Every file is written with :func:`clipground.io.atomic_write`,
so a killed run leaves whole files only, and ``world.json`` (written last) marks a
complete world.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.random import PCG64, Generator, SeedSequence
from PIL import Image
from tqdm import tqdm

from ...errors import BadAnnotationError
from ...io import atomic_write, write_json
from ..jsonl import write_jsonl
from ..records import GroundingRecord
from .config import (
    COLOURS,
    ID_STRIDE,
    RENDERED_SPLITS,
    SHAPES,
    SPLIT_INDEX,
    SPLITS,
    TYPES,
    VERSION,
    WorldConfig,
    WorldConfigError,
    held_out_pairs,
    training_looks,
)
from .expressions import describe, paraphrase
from .grammar import FORMS, HELD_OUT_FORMS, TEMPLATES
from .render import SceneObject, draw_look, render_scene


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a bool ``(H, W)`` mask (column-major, zeros first)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": [int(v) for v in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: a bool ``(H, W)`` mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    vals = np.arange(len(counts)) % 2 == 1
    return np.repeat(vals, counts).reshape((w, h)).T.copy()


def _compact_json(obj: Any) -> str:
    """One-line JSON with sorted keys and no spaces (the COCO files are large)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG of an RGB array; fast compression, no optimisation (the same bytes every run)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _scene_rng(cfg: WorldConfig, split: str, i: int) -> Generator:
    """Scene ``i`` of ``split``'s own generator (independent of other scenes and splits)."""
    return Generator(PCG64(SeedSequence([cfg.seed, SPLIT_INDEX[split], i])))


def _record(e: Any, scene: Any, img_path: Path, scene_id: int, split: str, look: str | None) -> GroundingRecord:
    """The record of one expression (``look``: the rendering family, with ``looks="many"``)."""
    meta = e.meta(scene_id)
    if look is not None:
        meta["look"] = look
    return GroundingRecord(image=str(img_path), expression=e.text, box=[float(v) for v in scene.objects[e.target].box],
                           image_id=str(scene_id), ref_id=f"{scene_id}_{e.target}", split=split, meta=meta)


def _write_split_files(out_dir: Path, split: str, records: list[GroundingRecord], images: list[dict[str, Any]],
                       annotations: list[dict[str, Any]]) -> None:
    write_jsonl(records, out_dir / f"{split}.jsonl", relative_to=out_dir)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)],
        "info": {"description": f"clipground synthetic world, split {split}", "version": VERSION},
    }
    atomic_write(out_dir / f"instances_{split}.json", _compact_json(coco))


def _generate_split(
    out_dir: Path, split: str, cfg: WorldConfig, held: list[tuple[str, str]], progress: bool
) -> dict[str, Any]:
    """Render, describe and write one split; returns its counts for ``world.json``.

    With the rich grammar, ``test`` also writes ``paraphrase``: its expressions re-said in
    held-out forms over the same scenes (and the same COCO file).
    """
    n = getattr(cfg, f"n_{split.replace('-', '_')}")
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    comp = split == "compositional"
    new_look = split == "new-look"
    type_counts = {t: 0 for t in TYPES}
    rel_counts: dict[str, int] = {}
    stats = {"checker_rejections": 0, "resampled_scenes": 0}
    records: list[GroundingRecord] = []
    twins: list[GroundingRecord] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    written: set[str] = set()
    for i in tqdm(range(n), desc=f"world {split}", disable=not progress, leave=False):
        scene_id = SPLIT_INDEX[split] * ID_STRIDE + i
        rng = _scene_rng(cfg, split, i)
        while True:
            look = draw_look(rng, cfg, new_look)
            scene = render_scene(rng, cfg, compositional=comp, held_out=held, look=look)
            exprs = describe(scene, rng, cfg, compositional=comp, held_out=held, type_counts=type_counts,
                             stats=stats, new_look=new_look)
            if exprs:
                break
            stats["resampled_scenes"] += 1
        name = f"{scene_id:06d}.png"
        written.add(name)
        img_path = img_dir / name
        atomic_write(img_path, _png_bytes(scene.image))
        rel_path = f"images/{split}/{name}"
        w, h = scene.size
        images.append({"id": scene_id, "file_name": rel_path, "width": w, "height": h})
        for k, o in enumerate(scene.objects):
            x1, y1, x2, y2 = o.box
            annotations.append(
                {
                    "id": scene_id * 10 + k + 1,
                    "image_id": scene_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": o.area,
                    "category_id": SHAPES.index(o.shape) + 1,
                    "iscrowd": 0,
                    "attributes": {"colour": o.colour, "shape": o.shape, "size": o.size},
                    "segmentation": rle_encode(o.mask) if o.mask is not None else None,
                }
            )
        family = look.family if cfg.looks == "many" else None
        for k, e in enumerate(exprs):
            rel_counts[e.relation or "none"] = rel_counts.get(e.relation or "none", 0) + 1
            records.append(_record(e, scene, img_path, scene_id, split, family))
            if split == "test" and cfg.phrasing == "rich":
                twin = paraphrase(e, scene, cfg, Generator(PCG64(SeedSequence([cfg.seed, SPLIT_INDEX["paraphrase"], i, k]))))
                if twin is not None:
                    rec = _record(twin, scene, img_path, scene_id, "paraphrase", family)
                    rec.meta["template"] = e.text  # the same target said in a training form (in test.jsonl)
                    twins.append(rec)
    for stale in img_dir.glob("*.png"):  # scenes left over from a larger earlier world
        if re.fullmatch(r"\d{6}\.png", stale.name) and stale.name not in written:
            stale.unlink()
    _write_split_files(out_dir, split, records, images, annotations)
    out = {
        "scenes": n,
        "objects": len(annotations),
        "expressions": len(records),
        "types": type_counts,
        "relations": dict(sorted(rel_counts.items())),
        **stats,
    }
    if split == "test":
        _write_split_files(out_dir, "paraphrase", twins, images, annotations)
        out["paraphrase_expressions"] = len(twins)
    return out


def generate_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, progress: bool = True) -> Path:
    """Generate the whole world into ``out_dir`` (layout in this module's docstring); returns it.

    ``world.json`` is removed first and written last, so an interrupted run is recognised
    as incomplete by :func:`ensure_world` and redone.
    """
    cfg = cfg or WorldConfig()
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    held = held_out_pairs(cfg)
    counts = {split: _generate_split(out, split, cfg, held, progress) for split in RENDERED_SPLITS}
    s = cfg.scale
    world = {
        "version": VERSION,
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "sizes": {"small": [v * s for v in cfg.small_px], "large": [v * s for v in cfg.large_px]},
        },
        "held_out_pairs": [list(p) for p in held],
        "margin_px": cfg.margin,
        "size_ratio": cfg.size_ratio,
        "templates": TEMPLATES if cfg.phrasing == "v1" else {t: {str(r): list(f) for r, f in rels.items()}
                                                             for t, rels in FORMS.items()},
        "held_out_forms": sorted(HELD_OUT_FORMS) if cfg.phrasing == "rich" else [],
        "looks": {"training": [list(x) for x in training_looks(cfg)], "held_out": [list(x) for x in cfg.held_out_looks]}
        if cfg.looks == "many" else "classic",
        "types": list(TYPES),
        "splits": list(SPLITS),
        "scene_id": "split_index * 100000 + i, split_index: train 0, val 1, test 2, compositional 3, new-look 4 "
                    "(paraphrase reuses the test scenes)",
        "mask_format": "COCO uncompressed RLE in instances_{split}.json: column-major counts, zeros first",
        "box_format": "xyxy pixels, [xmin, ymin, xmax + 1, ymax + 1] of the mask",
        "counts": counts,
    }
    write_json(out / "world.json", world)
    return out


def load_world_config(out_dir: str | os.PathLike) -> WorldConfig | None:
    """The config of a complete world in ``out_dir`` (``None`` if absent, partial or stale)."""
    path = Path(out_dir) / "world.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("version") != VERSION:
            return None
        return WorldConfig.from_json(d["config"])
    except (OSError, ValueError, KeyError, TypeError, WorldConfigError):
        return None


def ensure_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, progress: bool = True) -> Path:
    """Generate the world unless ``out_dir`` already holds a complete one with this config."""
    cfg = cfg or WorldConfig()
    cfg.validate()
    out = Path(out_dir)
    have = load_world_config(out)
    if (
        have is not None
        and have.to_json() == cfg.to_json()
        and all((out / f"{s}.jsonl").is_file() and (out / f"instances_{s}.json").is_file() for s in SPLITS)
    ):
        return out
    return generate_world(out, cfg, progress=progress)


def load_scene_objects(out_dir: str | os.PathLike, split: str, masks: bool = False) -> dict[str, list[SceneObject]]:
    """Scene objects of a split from its COCO file, keyed by image id string (record ``image_id``).

    Object order equals the ``target`` index used in records' meta. Masks are decoded only
    when ``masks`` is true.
    """
    path = Path(out_dir) / f"instances_{split}.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadAnnotationError(f"cannot read {path}: {e}") from None
    out: dict[str, list[SceneObject]] = {str(im["id"]): [] for im in coco["images"]}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        x, y, w, h = a["bbox"]
        at = a["attributes"]
        mask = rle_decode(a["segmentation"]) if masks and a.get("segmentation") else None
        out[str(a["image_id"])].append(
            SceneObject(at["shape"], at["colour"], at["size"], (x, y, x + w, y + h), int(a["area"]), mask=mask)
        )
    return out
