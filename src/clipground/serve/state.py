"""The service's memory and its workers: a byte-bounded LRU of image states, and two lanes.

:class:`ImageCache` keeps, per uploaded image (keyed by the hash of its bytes), the decoded
image and each method's heavy :class:`~clipground.methods.ImageState`, evicting the least
recently used images once their estimated size passes the budget, so memory stays flat
however many images arrive. A later phrase on a cached image costs only the text side.

:class:`Lane` is a bounded thread pool with admission control: at most ``workers`` jobs
run, at most ``queue`` wait, a further job is refused at once (the caller answers 429),
and a caller that waited longer than its timeout stops waiting (a job still queued is
dropped). The service runs two lanes, so cheap text-side requests do not queue behind
image encodings, and the event loop (``/health``) never computes anything itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..methods import ImageState

T = TypeVar("T")


def nbytes(obj: Any, _depth: int = 0) -> int:
    """Estimated bytes held by tensors, arrays and images inside ``obj`` (containers walked)."""
    if _depth > 6 or obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, Image.Image):
        return obj.width * obj.height * len(obj.getbands())
    if isinstance(obj, dict):
        return sum(nbytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v, _depth + 1) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name), _depth + 1) for f in fields(obj))
    return 0


def state_nbytes(state: ImageState) -> int:
    """Bytes of a state's features and proposals (its image is counted once, with the entry)."""
    return nbytes(state.features) + nbytes(state.proposals)


@dataclass
class CachedImage:
    """One uploaded image: its pixels (displayed orientation) and each method's state."""

    image: Image.Image
    name: str
    states: dict[str, ImageState] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return nbytes(self.image) + sum(self.state_bytes.values())


class ImageCache:
    """Thread-safe LRU of :class:`CachedImage` bounded by estimated bytes.

    The entry used last is never evicted, so one image larger than the budget still works
    for the request that brought it.
    """

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._items: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], threading.Event] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, image_id: str) -> CachedImage | None:
        with self._lock:
            item = self._items.get(image_id)
            if item is not None:
                self._items.move_to_end(image_id)
            return item

    def state(self, image_id: str, method_id: str) -> ImageState | None:
        """The cached state of ``image_id`` for ``method_id`` (counts a hit or a miss)."""
        with self._lock:
            item = self._items.get(image_id)
            st = item.states.get(method_id) if item is not None else None
            if st is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(image_id)
            return st

    def put_image(self, image_id: str, image: Image.Image, name: str) -> CachedImage:
        """Add an image (or touch it if present); returns its entry."""
        with self._lock:
            item = self._items.get(image_id)
            if item is None:
                item = self._items[image_id] = CachedImage(image, name)
            self._items.move_to_end(image_id)
            self._evict()
            return item

    def put_state(self, image_id: str, item: CachedImage, method_id: str, state: ImageState) -> None:
        """Store a computed state; re-adds the image if it was evicted meanwhile."""
        with self._lock:
            item.states[method_id] = state
            item.state_bytes[method_id] = state_nbytes(state)
            self._items[image_id] = item
            self._items.move_to_end(image_id)
            self._evict()

    def _evict(self) -> None:
        total = sum(i.nbytes for i in self._items.values())
        while total > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            total -= old.nbytes
            self.evictions += 1

    def compute_once(self, image_id: str, item: CachedImage, method_id: str,
                     compute: Callable[[Image.Image], ImageState]) -> tuple[ImageState, bool]:
        """The state of ``(image_id, method_id)``: cached, or computed by exactly one caller while
        concurrent callers for the same key wait for it. Returns ``(state, was_cached)``."""
        key = (image_id, method_id)
        while True:
            st = self.state(image_id, method_id)
            if st is not None:
                return st, True
            with self._lock:
                ev = self._pending.get(key)
                mine = ev is None
                if mine:
                    ev = self._pending[key] = threading.Event()
            if not mine:
                ev.wait()
                continue  # computed (or failed, or evicted already): look again
            try:
                st = compute(item.image)
                self.put_state(image_id, item, method_id, st)
                return st, False
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                ev.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            total = sum(i.nbytes for i in self._items.values())
            return {"images": len(self._items), "mb": round(total / 2**20, 2), "limit_mb": round(self.budget / 2**20, 2),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class LaneFull(Exception):
    """Every worker is busy and the queue is full."""


class LaneTimeout(Exception):
    """The job did not finish within the caller's timeout."""


class Lane:
    """A bounded pool of inference threads with a bounded queue (see module doc)."""

    def __init__(self, name: str, workers: int, queue: int):
        self.name = name
        self.workers = workers
        self.queue = queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"clipground-{name}")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.running = 0
        self.refused = 0
        self.timed_out = 0

    def _run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self.running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1

    def _done(self, _fut: Future) -> None:
        with self._lock:
            self.in_flight -= 1

    async def run(self, fn: Callable[[], T], timeout_s: float) -> T:
        """Run ``fn`` on a worker thread; :class:`LaneFull` or :class:`LaneTimeout` when it cannot."""
        with self._lock:
            if self.in_flight >= self.workers + self.queue:
                self.refused += 1
                raise LaneFull(self.name)
            self.in_flight += 1
        try:
            fut = self._pool.submit(self._run, fn)
        except RuntimeError:  # shutting down
            with self._lock:
                self.in_flight -= 1
            raise LaneFull(self.name) from None
        fut.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()  # dropped if still queued; a running job finishes and frees its slot
            with self._lock:
                self.timed_out += 1
            raise LaneTimeout(self.name) from None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"workers": self.workers, "queue": self.queue, "running": self.running,
                    "waiting": max(0, self.in_flight - self.running), "refused": self.refused,
                    "timed_out": self.timed_out}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
