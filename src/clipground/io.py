"""Files in and out: the one atomic writer, and safe readers for files a user hands us.

Writing: every file clipground writes (cache shards, checkpoints, world files, reports,
saved grounders) goes through :func:`atomic_path` / :func:`atomic_write` (a temp file in
the same folder, fsync, rename) or :func:`atomic_dir` (a temp folder renamed into place),
so a run killed at any moment leaves the old file or the new one, never half of one. The
result gets the permissions of a normally created file (``mkstemp`` would leave 0600).

Reading: pickles run code when they are unpickled, so a file we did not write is never
given to :mod:`pickle` or ``torch.load(weights_only=False)``. :func:`load_torch_data` uses
torch's restricted ``weights_only`` unpickler (tensors, containers, numbers, strings);
:func:`load_pickle_data` a restricted unpickler that builds only plain containers,
numbers and strings (what refer's ``refs(*).p`` holds).
"""

from __future__ import annotations

import io as _stdio
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


class UnsafeFileError(ValueError):
    """A pickle asked to build an object outside the allowed plain types."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a normally created file under the current umask."""
    return 0o666 & ~_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; once the block finishes, the file there replaces ``path``.

    Whatever writes to the yielded path (``save_file``, ``fig.savefig``, ``open``) gets
    atomicity for free. On an exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` atomically."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def json_text(obj: Any, indent: int | None = 2, sort_keys: bool = True) -> str:
    """The JSON text clipground writes (``default=str`` for paths and the like, trailing newline)."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> Path:
    """:func:`atomic_write` of :func:`json_text`."""
    return atomic_write(path, json_text(obj, indent, sort_keys))


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as a safetensors file atomically (copies made contiguous, on the CPU)."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata or {"format": "pt"})
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` atomically (the format comes from ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


def save_image(image: Any, path: str | os.PathLike, format: str | None = None) -> Path:
    """Save a PIL image atomically (format from the suffix unless given)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=format or (path.suffix.lstrip(".").upper() or "PNG").replace("JPG", "JPEG"))
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; once the block finishes it replaces ``path`` whole.

    Used for saved models (``save_pretrained``) and training checkpoints: readers see the
    old folder or the complete new one. Files inside get normal permissions and are synced
    before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX + path.name + "."))
    try:
        yield tmp
        mode = file_mode()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- safe reading

#: The only globals a plain-data pickle may name (Python 2 and 3 spellings).
_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "complex"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),  # how protocol 2 spells a bytes object
}


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, sets, strings, bytes and numbers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(f"the pickle asks to build {module}.{name}, which a plain-data file never needs")


def load_pickle_data(path: str | os.PathLike) -> Any:
    """Unpickle a plain-data file (Python 2 or 3) without running any code from it.

    Python 2 byte strings are read as latin-1 and repaired to UTF-8 text. Raises
    :class:`UnsafeFileError` when the pickle names anything but plain types, and
    :class:`pickle.UnpicklingError` / ``EOFError`` / ``ValueError`` for a corrupt file.
    """
    raw = Path(path).read_bytes()
    try:
        return _PlainUnpickler(_stdio.BytesIO(raw)).load()
    except UnicodeDecodeError:
        return _repair_latin1(_PlainUnpickler(_stdio.BytesIO(raw), encoding="latin-1").load())


def _repair_latin1(x: Any) -> Any:
    """Undo latin-1 decoding of Python 2 UTF-8 byte strings, recursively."""
    if isinstance(x, str):
        try:
            return x.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return x
    if isinstance(x, list):
        return [_repair_latin1(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_repair_latin1(v) for v in x)
    if isinstance(x, dict):
        return {_repair_latin1(k): _repair_latin1(v) for k, v in x.items()}
    return x


def load_torch_data(path: str | os.PathLike) -> Any:
    """``torch.load`` with the restricted ``weights_only`` unpickler (zip and legacy formats).

    Tensors, lists, dicts, tuples, strings and numbers load; anything that would need code
    from the file raises ``pickle.UnpicklingError``.
    """
    import torch

    return torch.load(Path(path), map_location="cpu", weights_only=True)


__all__ = [
    "TMP_PREFIX",
    "UnsafeFileError",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "file_mode",
    "json_text",
    "load_pickle_data",
    "load_torch_data",
    "save_figure",
    "save_image",
    "save_safetensors",
    "write_json",
]
