"""Atomic, resumable training checkpoints.

Layout under ``<output_dir>/checkpoints/``::

    step-00000300/
        model.safetensors      trainable parameters + persistent buffers only
        optimizer.pt           optimizer state (and the AMP grad scaler, if any)
        scheduler.pt           LR scheduler state
        rng-<rank>.pt          python / numpy / torch (CPU + CUDA) RNG states of each process
        trainer_state.json     step, epoch, batches consumed in the epoch (written last)
    latest                     name of the newest complete checkpoint (one line)

Every ``.pt`` file holds plain data only (tensors, lists, dicts, numbers, strings: the RNG
states are stored in that form, see :func:`rng_state`) and is read back with torch's
restricted ``weights_only`` unpickler (:func:`clipground.io.load_torch_data`): resuming
from a folder someone else handed you cannot run code from it.

A checkpoint is first written to ``.tmp-step-…`` (by every process: each writes its RNG
file) and put in place with :func:`clipground.io.replace_dir` once complete; ``latest`` is
replaced atomically (:func:`clipground.io.atomic_write`) after that. A run killed at any
moment therefore leaves either the previous checkpoint or the new one, never a half-written
one that resume would pick up: temp directories are ignored (and removed) and a directory
without ``trainer_state.json`` is never chosen.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import TMP_PREFIX, atomic_write, json_text, load_torch_data, replace_dir

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimiser step ``step``."""
    return f"step-{step:08d}"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` plus persistent buffers: what training changes."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    param_names = {n for n, _ in model.named_parameters()}
    for n, t in model.state_dict().items():
        if n not in param_names and n not in state and isinstance(t, torch.Tensor):
            state[n] = t.detach()
    # safetensors refuses shared / non-contiguous storage: store independent copies.
    return {n: t.contiguous().clone().cpu() for n, t in state.items()}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights written by :func:`trainable_state_dict`; every saved key must match."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"checkpoint has weights the model lacks: {unknown[:5]}")
    expected = set(trainable_state_dict_keys(model))
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks trainable weights: {missing[:5]}")
    model.load_state_dict(state, strict=False)


def trainable_state_dict_keys(model: torch.nn.Module) -> list[str]:
    """Names :func:`trainable_state_dict` would save (without copying tensors)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    param_names = {n for n, _ in model.named_parameters()}
    names += [n for n in model.state_dict() if n not in param_names]
    return names


def rng_state() -> dict[str, Any]:
    """All RNG states of this process, as plain data ``torch.load(weights_only=True)`` reads.

    Python's state becomes a list of ints, numpy's MT19937 state a dict with its key as an
    int64 tensor, torch's (CPU and CUDA) are byte tensors already. :func:`set_rng_state`
    restores exactly the same streams.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state` (or the tuples older checkpoints hold)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]) if isinstance(py, dict) else py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = {"bit_generator": npy["bit_generator"],
               "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
               "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]}
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir`` (None if there is none).

    Trusts the ``latest`` pointer when it names a complete checkpoint; otherwise scans
    ``step-*`` folders. Temp folders and folders without ``trainer_state.json`` are ignored.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    ptr = root / LATEST
    if ptr.is_file():
        name = ptr.read_text(encoding="utf-8").strip()
        cand = root / name
        if name and not name.startswith(TMP_PREFIX) and (cand / STATE_FILE).is_file():
            return cand
    best: tuple[int, Path] | None = None
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith("step-") or not (d / STATE_FILE).is_file():
            continue
        try:
            step = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


def remove_stale_temp(output_dir: str | os.PathLike) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep only the ``keep_last`` newest complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    root = Path(output_dir) / CHECKPOINT_DIR
    done = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))
    for d in done[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def write_checkpoint_files(tmp_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                           scaler: Any | None) -> None:
    """Main-process part of a checkpoint: weights, optimizer, scheduler (into ``tmp_dir``)."""
    save_file(trainable_state_dict(model), str(tmp_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    opt = {"optimizer": optimizer.state_dict()}
    if scaler is not None:
        opt["scaler"] = scaler.state_dict()
    torch.save(opt, tmp_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp_dir / "scheduler.pt")


def write_rng_file(tmp_dir: Path, rank: int) -> None:
    """Per-process RNG states (each process writes its own)."""
    torch.save(rng_state(), tmp_dir / f"rng-{rank}.pt")


def commit_checkpoint(tmp_dir: Path, final_dir: Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json`` last, put temp -> final in one rename, then update ``latest``."""
    (tmp_dir / STATE_FILE).write_text(json_text(state, indent=1), encoding="utf-8")
    replace_dir(tmp_dir, final_dir)  # re-saving the same step (e.g. after a resume) replaces it
    atomic_write(final_dir.parent / LATEST, final_dir.name + "\n")


def read_checkpoint(ckpt: Path, rank: int) -> dict[str, Any]:
    """Load everything from a checkpoint folder (weights on CPU); no file may run code."""
    out: dict[str, Any] = {
        "state": json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")),
        "model": load_file(str(ckpt / WEIGHTS_FILE)),
        "optimizer": load_torch_data(ckpt / "optimizer.pt", what="checkpoint file"),
        "scheduler": load_torch_data(ckpt / "scheduler.pt", what="checkpoint file"),
    }
    rng_file = ckpt / f"rng-{rank}.pt"
    out["rng"] = load_torch_data(rng_file, what="checkpoint file") if rng_file.is_file() else None
    return out
