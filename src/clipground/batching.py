"""Many images through one grounder: decoding and proposals in data-loader workers, CLIP in batches.

:func:`iter_image_states` runs image decoding and the proposal source in
``torch.utils.data.DataLoader`` worker processes (``num_workers``), so they overlap the CLIP
forward in the main process, and encodes ``image_batch`` images' views together
(:meth:`~clipground.grounder.Grounder.image_states`). Each state equals the one
``set_image`` computes for that image alone, so batched and sequential runs give the same answers.

:func:`expand_inputs` turns what ``clipground predict`` takes (an image, a folder, a glob or a
JSONL manifest of ``{"image": ..., "phrases": [...]}``) into a list of :class:`ImageJob`.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import BadImageError, ClipgroundError
from .images import load_image

#: File endings a folder or glob input is filtered by.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageJob:
    """One image to ground ``phrases`` in (``None``: the phrases given for every image)."""

    image: str
    phrases: list[str] | None = None


@dataclass
class Prepared:
    """What a worker hands back: the decoded image and its proposals, or the error it met."""

    index: int
    key: str
    image: Any = None
    proposals: Any = None
    error: str | None = None


@dataclass
class BatchedState:
    """One image's heavy state (or the error that stopped it), in input order."""

    index: int
    key: str
    state: Any = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def expand_inputs(source: str | os.PathLike) -> list[ImageJob]:
    """Images named by ``source``: a JSONL manifest, a folder (sorted), a glob pattern, or one image.

    Raises:
        BadImageError: nothing matched, or a manifest line is not ``{"image": str, "phrases": [str]}``.
    """
    s = str(source)
    p = Path(s).expanduser()
    if p.suffix == ".jsonl" and p.is_file():
        jobs = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadImageError(f"{p}:{n}: not JSON ({e.msg})") from None
            phrases = d.get("phrases") if isinstance(d, dict) else None
            if isinstance(d, dict) and isinstance(d.get("phrase"), str) and phrases is None:
                phrases = [d["phrase"]]
            if (not isinstance(d, dict) or not isinstance(d.get("image"), str) or not isinstance(phrases, list)
                    or not all(isinstance(x, str) for x in phrases)):
                raise BadImageError(f'{p}:{n}: a manifest line is {{"image": "path", "phrases": ["...", ...]}}')
            im = Path(d["image"]).expanduser()
            jobs.append(ImageJob(str(im if im.is_absolute() else p.parent / im), list(phrases)))
        if not jobs:
            raise BadImageError(f"manifest {p} lists no images")
        return jobs
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadImageError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [ImageJob(f) for f in files]
    if any(c in s for c in "*?["):
        files = sorted(f for f in globlib.glob(os.path.expanduser(s), recursive=True)
                       if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadImageError(f"image not found: {s} (no such file, and no image matches it as a glob pattern)")
        return [ImageJob(f) for f in files]
    return [ImageJob(s)]


def is_batch_input(source: str | os.PathLike) -> bool:
    """Whether ``source`` names several images (folder, glob, manifest) rather than one file."""
    s = str(source)
    p = Path(s).expanduser()
    return p.is_dir() or (p.suffix == ".jsonl" and p.is_file()) or (not p.exists() and any(c in s for c in "*?["))


class _PrepareDataset(Dataset):
    """Decode image ``i`` and run the proposal source on it (in a worker process)."""

    def __init__(self, keys: Sequence[str], proposals: Any):
        self.keys = list(keys)
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Prepared:
        key = self.keys[i]
        try:
            img = load_image(key)
            props = self.proposals(img, key) if self.proposals is not None else None
        except ClipgroundError as e:
            return Prepared(i, key, error=str(e))
        return Prepared(i, key, img, props)


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    """One thread per worker: the main process's CLIP forward keeps the cores."""
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - opencv is a dependency
        pass


def prepared_images(keys: Sequence[str], proposals: Any, num_workers: int = 0) -> Iterator[Prepared]:
    """Decoded images and their proposals, in order; ``num_workers > 0`` prepares them in workers."""
    ds = _PrepareDataset(keys, proposals)
    if num_workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    # Spawned, not forked: a fork copies OpenCV's and OpenMP's thread pools without their
    # threads, and the first selective search in the child then waits forever.
    import multiprocessing

    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=int(num_workers), collate_fn=_identity,
                        worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False,
                        multiprocessing_context=multiprocessing.get_context("spawn"))
    yield from loader


def iter_image_states(grounder: Any, keys: Sequence[str], num_workers: int = 0,
                      image_batch: int = 8) -> Iterator[BatchedState]:
    """Heavy states of the images ``keys`` (paths), in order, ``image_batch`` images encoded together."""
    import time

    uses_props = bool(getattr(grounder.method, "uses_proposals", False))
    source = grounder.proposals if uses_props else None
    pending: list[Prepared] = []

    def flush() -> Iterator[BatchedState]:
        good = [p for p in pending if p.error is None]
        t0 = time.perf_counter()
        try:
            states = grounder.image_states([p.image for p in good], [p.key for p in good],
                                           [p.proposals for p in good] if uses_props else None) if good else []
        except ClipgroundError:  # one image the method refuses: encode them one by one to isolate it
            states = []
            for p in good:
                try:
                    states += grounder.image_states([p.image], [p.key], [p.proposals] if uses_props else None)
                except ClipgroundError as e:
                    p.error = str(e)
                    states.append(None)
        dt = (time.perf_counter() - t0) / max(len(good), 1)
        by_index = {p.index: s for p, s in zip(good, states)}
        for p in pending:
            st = by_index.get(p.index)
            yield BatchedState(p.index, p.key, st, p.error if st is None else None, dt)
        pending.clear()

    for prep in prepared_images(keys, source, num_workers):
        pending.append(prep)
        if len(pending) >= max(int(image_batch), 1):
            yield from flush()
    if pending:
        yield from flush()
