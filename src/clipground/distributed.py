"""The Ray Data engine: the per-shard work of ``predict``, ``eval`` and ``cache build`` on many machines.

A run is cut into shards of whole images. The single-process run and the Ray run call the
same shard function (:func:`clipground.evaluation.evaluate.score_groups`,
:func:`clipground.cli.predict.predict_lines`, :meth:`clipground.cache.FeatureCache.image_shard`)
and one merge (the evaluator's result builder, the JSONL concatenation, the cache's index),
so their files are identical; Ray only decides *where* a shard runs.

:func:`map_shards` puts the shards in a ``ray.data`` dataset and maps them with a callable
class on an actor pool (``map_batches(..., compute=ActorPoolStrategy(size=N))``): each actor
loads its model once (``load()``: one backbone per actor) and turns a shard into bytes (JSON
or safetensors, never a pickle of ours). Only the driver writes files: a finished shard is
saved at once through the atomic writer (:class:`ShardStore`, or the cache's own shard files),
so a killed run resumes at the shards it lacks, and workers need no shared output folder.

Ray is imported here only, and only when ``--engine ray`` asks for it (it is heavy and
optional: ``pip install 'clipground[ray]'``). Without an address a local cluster is started
and stopped again; with ``--ray-address`` an existing cluster is joined (and left running).
A Ray session already open in the process (e.g. a test's) is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ClipgroundError, ConfigError
from .io import atomic_write

#: What runs the shards: this process, or actors of a Ray cluster.
ENGINES = ("local", "ray")
RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install 'clipground[ray]'"


@dataclass
class RayEngine:
    """Where and how wide a Ray run is.

    Attributes:
        address: an existing cluster (``ray://host:10001``, ``host:6379`` or ``auto``);
            ``None`` starts a local one on this machine for the run.
        workers: actors, each holding one model (0: one per ``gpus`` GPUs of the cluster,
            or one per 4 CPUs, at least 1).
        gpus: GPUs per actor (0: CPU actors; their CPUs are split evenly between them).
        num_cpus: CPUs of a local cluster (``None``: all of this machine's).
    """

    address: str | None = None
    workers: int = 0
    gpus: float = 0.0
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 0 or self.gpus < 0:
            raise ConfigError("--ray-workers and --ray-gpus must be >= 0")


def engine_from_options(engine: str, address: str | None = None, workers: int = 0,
                        gpus: float = 0.0) -> RayEngine | None:
    """The CLI's ``--engine/--ray-address/--ray-workers/--ray-gpus`` as a :class:`RayEngine` (``None``: local)."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        if address or workers or gpus:
            raise ConfigError("--ray-address, --ray-workers and --ray-gpus need --engine ray")
        return None
    require_ray()
    return RayEngine(address=address, workers=workers, gpus=gpus)


def require_ray() -> Any:
    """The ``ray`` module (with ``ray.data``), or a :class:`ClipgroundError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ClipgroundError(RAY_MISSING) from None
    return ray


def run_fingerprint(**parts: Any) -> str:
    """sha256 of what a run's shards depend on (its inputs, model and options): resumed shards must match."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def shard_bounds(n: int, shard_size: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``[(start, end)]`` slices of ``n`` items, ``shard_size`` each, rounded up to a multiple of ``multiple``.

    Shards that start at multiples of the image batch encode exactly the batches the
    single-process run encodes, so their numbers are the same to the bit.
    """
    size = max(int(shard_size), 1)
    m = max(int(multiple), 1)
    size = -(-size // m) * m
    return [(a, min(a + size, n)) for a in range(0, n, size)]


# --------------------------------------------------------------------------- resumable shards


class ShardStore:
    """Finished shards of one run, one file each, in a folder next to the run's output.

    ``run.json`` holds the run's fingerprint: shards left by a run of other inputs or
    options are removed, never merged. Each shard is written atomically as it arrives, so a
    killed run keeps them; :meth:`remove` clears the folder once the merged files are written.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.stale = 0
        meta = self.root / "run.json"
        if self.root.is_dir():
            try:
                same = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                self.stale = len(list(self.root.glob("shard-*")))
                shutil.rmtree(self.root, ignore_errors=True)
        if not meta.is_file():
            atomic_write(meta, json.dumps({"fingerprint": fingerprint}) + "\n")

    def path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.bin"

    def done(self) -> set[int]:
        """Indices of the shards already written."""
        return {int(p.stem.split("-")[1]) for p in self.root.glob("shard-*.bin")}

    def write(self, i: int, data: bytes) -> None:
        atomic_write(self.path(i), data)

    def read(self, i: int) -> bytes:
        return self.path(i).read_bytes()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class MemoryStore:
    """A :class:`ShardStore` that keeps shards in memory (output to stdout: nothing to resume)."""

    stale = 0

    def __init__(self) -> None:
        self._data: dict[int, bytes] = {}

    def done(self) -> set[int]:
        return set(self._data)

    def write(self, i: int, data: bytes) -> None:
        self._data[i] = data

    def read(self, i: int) -> bytes:
        return self._data[i]

    def remove(self) -> None:
        self._data.clear()


# --------------------------------------------------------------------------- Ray


@contextmanager
def ray_session(engine: RayEngine) -> Iterator[Any]:
    """``ray`` connected to the engine's cluster; a cluster started here is shut down on exit."""
    ray = require_ray()
    started = False
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
                              "configure_logging": True}
        try:
            if engine.address:
                ray.init(address=engine.address, **kw)
            else:
                ray.init(num_cpus=engine.num_cpus or os.cpu_count() or 1, **kw)
        except Exception as e:  # a wrong address, a cluster that does not answer
            raise ClipgroundError(f"cannot start or join the Ray cluster"
                                  f"{' at ' + engine.address if engine.address else ''}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield ray
    finally:
        if started:
            ray.shutdown()


def _pool(ray: Any, engine: RayEngine, shards: int) -> tuple[int, float, float]:
    """``(actors, CPUs each, GPUs each)`` for ``shards`` shards on the connected cluster."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    if engine.gpus > 0:
        if gpus < engine.gpus:
            raise ClipgroundError(f"--ray-gpus {engine.gpus:g} per worker, but the Ray cluster has {gpus:g} GPUs")
        n = engine.workers or int(gpus // engine.gpus)
    else:
        n = engine.workers or max(1, int(cpus // 4))
    n = max(1, min(n, shards))
    per_cpu = max(1.0, float(int(cpus // n))) if engine.gpus == 0 else 1.0
    if engine.gpus == 0 and n > cpus:
        per_cpu = cpus / n
    return n, per_cpu, float(engine.gpus)


class _ShardWorker:
    """One Ray actor: loads its model once, then turns shard indices into result bytes."""

    def __init__(self, job: list[Any]):
        import ray

        load, self.work, self.shards = ray.get(job[0])
        self.state = load()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids = [int(i) for i in batch["shard"]]
        out = [self.work(self.state, self.shards[i]) for i in ids]
        return {"shard": np.array(ids, dtype=np.int64), "result": np.array(out, dtype=object)}


def map_shards(engine: RayEngine, load: Callable[[], Any], work: Callable[[Any, Any], bytes],
               shards: Sequence[Any], todo: Sequence[int], on_result: Callable[[int, bytes], None]) -> int:
    """Run ``work(load(), shards[i])`` for each ``i`` in ``todo`` on Ray actors; call
    ``on_result(i, bytes)`` in this process as each shard finishes (in any order).

    ``load`` and ``work`` are shipped to the actors (they must pickle); ``load`` runs once per
    actor. Returns the number of actors used. A worker's failure is raised here as a
    :class:`ClipgroundError` naming the shard's error.
    """
    todo = list(todo)
    if not todo:
        return 0
    with ray_session(engine) as ray:
        n, cpus, gpus = _pool(ray, engine, len(todo))
        ref = ray.put((load, work, list(shards)))
        items = ray.data.from_items([{"shard": i} for i in todo])
        kw = dict(fn_constructor_args=([ref],), batch_size=1, batch_format="numpy",
                  compute=ray.data.ActorPoolStrategy(size=n), num_cpus=cpus, num_gpus=gpus or None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            try:  # not restarted: a lost actor fails the run, which then resumes at its shards
                ds = items.map_batches(_ShardWorker, max_restarts=0, **kw)
            except TypeError:  # a Ray that takes no remote arguments here any more
                ds = items.map_batches(_ShardWorker, **kw)
        try:
            for row in ds.iter_rows():
                on_result(int(row["shard"]), bytes(row["result"]))
        except ClipgroundError:
            raise
        except Exception as e:  # a RayTaskError wraps the worker's exception
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, ClipgroundError):
                raise type(cause)(str(cause)) from None
            lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
            raise ClipgroundError(f"a Ray worker failed: {lines[-1] if lines else type(cause).__name__}") from None
    return n


def run_shards(engine: RayEngine, store: "ShardStore | MemoryStore", load: Callable[[], Any],
               work: Callable[[Any, Any], bytes], shards: Sequence[Any],
               tick: Callable[[int], None] | None = None) -> tuple[list[bytes], int]:
    """Every shard's bytes, in order: those in ``store`` as they are, the others computed on Ray
    (each saved in ``store`` as it arrives, ``tick(i)`` after it). Returns them and the actor count."""
    done = store.done()
    todo = [i for i in range(len(shards)) if i not in done]
    if tick is not None:
        for i in sorted(done):
            tick(i)

    def got(i: int, data: bytes) -> None:
        store.write(i, data)
        if tick is not None:
            tick(i)

    n = map_shards(engine, load, work, shards, todo, got)
    return [store.read(i) for i in range(len(shards))], n


def same(obj: Any) -> Any:
    """``functools.partial(same, x)`` is a picklable ``load`` that ships ``x`` itself to the actors."""
    return obj


__all__ = ["ENGINES", "MemoryStore", "RAY_MISSING", "RayEngine", "ShardStore", "engine_from_options", "map_shards",
           "ray_session", "require_ray", "run_fingerprint", "run_shards", "same", "shard_bounds"]
