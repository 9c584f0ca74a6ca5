"""Checkpoint names to files: bundled names, local directories and hub ids, failing fast offline.

Every checkpoint clipground loads (CLIP, BLIP, SAM) is resolved here, so they share one
offline rule: a hub id that is not in the local Hugging Face cache is tried online only when
the hub answers; otherwise the user gets one line naming the id, how to download it where
there is internet, and the option that takes a local directory instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import CheckpointNotFoundError

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: The marker file of a region-aware CLIP directory (:mod:`clipground.backbone.alpha`).
REGION_FILE = "region_clip.json"

#: The offline defaults: small world models clipground's own recipes train, shipped in the package.
WORLD_CLIP = "clipground/world-clip-v2"  # whole-scene world CLIP, the default backbone
WORLD_CLIP_V1 = "clipground/world-clip"  # the first world CLIP (64 px region crops), kept for its results
WORLD_SAM = "clipground/world-sam"
WORLD_BLIP = "clipground/world-blip"
WORLD_REGION_CLIP = "clipground/world-region-clip"  # world CLIP v2 + mask channel + LoRA (region-clip)
#: The hub models the same options default to beside a hub (non-world) CLIP.
HUB_SAM = "facebook/sam-vit-base"
HUB_BLIP = "Salesforce/blip-itm-base-coco"

#: Checkpoints shipped inside the package, addressable by name like hub ids.
BUNDLED: dict[str, Path] = {
    WORLD_CLIP_V1: _ASSETS / "world-clip",
    WORLD_CLIP: _ASSETS / "world-clip-v2",
    WORLD_SAM: _ASSETS / "world-sam",
    WORLD_BLIP: _ASSETS / "world-blip",
    WORLD_REGION_CLIP: _ASSETS / "world-region-clip",
}
#: Trained world grounders (``Grounder.from_pretrained("clipground/world-<method>")``).
BUNDLED_METHODS_DIR = _ASSETS / "methods"


def bundled_method_name(method: str) -> str:
    """The bundled name of a method trained in the world: ``clipground/world-<method>``."""
    return f"clipground/world-{method}"


def bundled_grounder_dir(name: str) -> Path | None:
    """The shipped directory of a bundled trained grounder name, or ``None`` if ``name`` is not one."""
    prefix = "clipground/world-"
    if name in BUNDLED:  # a bundled backbone may also be a grounder (the region-aware CLIP's folder is both)
        d = BUNDLED[name]
        return d if (d / "grounder.json").is_file() else None
    if not name.startswith(prefix):
        return None
    d = BUNDLED_METHODS_DIR / name[len(prefix):]
    return d if (d / "grounder.json").is_file() else None


def companion_checkpoint(kind: str, backbone_name: str) -> str:
    """What an ``auto`` SAM / BLIP option means: the bundled world model beside a bundled world
    CLIP (all offline), the hub model otherwise (the seed's path with real photos)."""
    world = backbone_name in BUNDLED
    if kind == "sam":
        return WORLD_SAM if world else HUB_SAM
    if kind == "blip":
        return WORLD_BLIP if world else HUB_BLIP
    raise ValueError(f"unknown companion model kind {kind!r}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP check of the Hugging Face endpoint, so offline runs fail in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(name: str) -> str:
    return (
        f"cannot load CLIP checkpoint '{name}': it is not in the local Hugging Face cache and the hub is "
        f"unreachable; download it where you have internet (e.g. `huggingface-cli download {name} "
        f"--local-dir DIR`) and pass that directory instead (--backbone DIR), or use the bundled "
        f"offline model --backbone {WORLD_CLIP}"
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Map a bundled name, local directory or hub id to ``(path_or_id, local_files_only)``.

    Raises:
        CheckpointNotFoundError: a local path that does not exist, or a hub id that is
            neither cached nor reachable.
    """
    name = str(name_or_path)
    if name in BUNDLED:
        path = BUNDLED[name]
        if not ((path / "config.json").is_file() or (path / REGION_FILE).is_file()):
            raise CheckpointNotFoundError(f"bundled checkpoint '{name}' is missing from this install ({path})")
        return str(path), True
    p = Path(name).expanduser()
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / REGION_FILE).is_file()):
            raise CheckpointNotFoundError(f"'{p}' is a directory but has no config.json: not a save_pretrained checkpoint "
                                          f"(nor a region-aware CLIP's {REGION_FILE})")
        return str(p), True
    looks_local = name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1
    if looks_local or p.exists():
        raise CheckpointNotFoundError(f"checkpoint directory not found: {name}")
    # A hub id: prefer the local cache, go online only if the hub answers.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return name, True
    except Exception:  # pragma: no cover - cache probing is best effort
        pass
    if not _hub_reachable():
        raise CheckpointNotFoundError(offline_message(name))
    return name, False


def resolve_extra_checkpoint(name: str, what: str, option: str, alternative: str) -> tuple[str, bool]:
    """Resolve a non-CLIP checkpoint (BLIP, SAM) like :func:`resolve_checkpoint`, with its own message.

    Raises:
        CheckpointNotFoundError: one line naming the model, the option to pass a local
            directory with, and the weight-free alternative.
    """
    try:
        return resolve_checkpoint(name)
    except CheckpointNotFoundError as e:
        if str(e) == offline_message(name):
            raise CheckpointNotFoundError(
                f"cannot load {what} '{name}': it is not in the local Hugging Face cache and the hub is unreachable; "
                f"download it where you have internet (`huggingface-cli download {name} --local-dir DIR`) and pass "
                f"{option}=DIR, or use {alternative} (needs no extra weights)"
            ) from None
        raise CheckpointNotFoundError(f"cannot load {what}: {e}") from None


def load_pretrained(cls: Any, name: str, what: str, option: str, alternative: str, **kwargs: Any) -> Any:
    path, local_only = resolve_extra_checkpoint(name, what, option, alternative)
    try:
        return cls.from_pretrained(path, local_files_only=local_only, **kwargs)
    except OSError as e:
        raise CheckpointNotFoundError(f"cannot load {what} '{name}': {str(e).splitlines()[0]}") from None
