"""Files in and out: the one atomic writer, and safe readers for files a user hands us.

Writing: every file clipground writes (cache shards, checkpoints, world files, reports,
saved grounders) goes through :func:`atomic_path` / :func:`atomic_write` (a temp file in
the same folder, fsync, rename) or :func:`atomic_dir` (a temp folder renamed into place),
so a run killed at any moment leaves the old file or the new one, never half of one. The
result gets the permissions of a normally created file (``mkstemp`` would leave 0600).

Reading: pickles run code when they are unpickled, so a file we did not write is never
given to :mod:`pickle` or to ``torch.load`` without ``weights_only``.
:func:`load_torch_data` uses torch's restricted ``weights_only`` unpickler (tensors,
numeric numpy arrays, containers, numbers, strings); :func:`load_pickle_data` a restricted
unpickler that builds only plain containers, numbers and strings (what refer's
``refs(*).p`` holds). Both refuse anything else with
:class:`~clipground.errors.UnsafeFileError`, which names the file.
"""

from __future__ import annotations

import io as _stdio
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UnsafeFileError

TMP_PREFIX = ".tmp-"


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
    before the rename (see :func:`replace_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX + path.name + "."))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` (a sibling of ``path``) in place of ``path`` in one rename.

    Every file in ``tmp`` gets normal permissions and is synced first. An existing ``path``
    is moved aside under a :data:`TMP_PREFIX` name, then removed, so at every moment
    ``path`` is the old folder or the complete new one. For writers that must name their
    temp folder themselves (several processes of a training run write into one), else use
    :func:`atomic_dir`.
    """
    tmp, path = Path(tmp), Path(path)
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
    return path


# --------------------------------------------------------------------------- safe reading

#: The only globals a plain-data pickle may name (Python 2 and 3 spellings).
_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "complex"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),  # how protocol 2 spells a bytes object
}


class _Forbidden(Exception):
    """Raised inside the unpickler when a pickle names a global outside the allowed plain types."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, sets, strings, bytes and numbers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name}")


def _refusal(path: str | os.PathLike, what: str, reason: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path} is not a plain-data {what} (it asks to {reason}); refusing to load it")


def load_pickle_data(path: str | os.PathLike, what: str = "file") -> Any:
    """Unpickle a plain-data file (Python 2 or 3) without running any code from it.

    Python 2 byte strings are read as latin-1 and repaired to UTF-8 text. Raises
    :class:`UnsafeFileError` (naming the file, ``what`` it should have been and the global
    it asked for) when the pickle names anything but plain types, and
    :class:`pickle.UnpicklingError` / ``EOFError`` / ``ValueError`` for a corrupt file.
    """
    raw = Path(path).read_bytes()
    try:
        try:
            return _PlainUnpickler(_stdio.BytesIO(raw)).load()
        except UnicodeDecodeError:
            return _repair_latin1(_PlainUnpickler(_stdio.BytesIO(raw), encoding="latin-1").load())
    except _Forbidden as e:
        raise _refusal(path, what, f"run code: {e}") from None


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


#: What torch's ``weights_only`` unpickler says when a file asks for more than plain data
#: (other ``UnpicklingError`` s mean a corrupt file).
_TORCH_REFUSALS = re.compile(r"GLOBAL (\S+)|Can only create new object|Trying to call reduce|Can only build")


def _numpy_globals() -> list[Any]:
    """What rebuilds numeric numpy arrays and scalars, under numpy 1's and 2's module names.

    These only allocate an array or scalar from a dtype, a shape and raw bytes; anything
    an array could hold beyond numbers must itself pass the restricted unpickler.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype]
    out += list({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGUS"})  # numbers and text: no object arrays
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    return out


#: First object of a legacy-format (``_use_new_zipfile_serialization=False``) torch file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NotPlain(Exception):
    """The fast path cannot read this file as plain data; torch's loader must decide."""


class _NoTensorsUnpickler(_PlainUnpickler):
    def persistent_load(self, pid: Any) -> Any:
        raise _NotPlain("the file holds tensors")


def _load_legacy_plain(path: Path) -> Any:
    """A legacy-format torch file without tensors, read by the C unpickler restricted to plain types.

    That is how the published ReSC/TransVG split files are stored; torch's own restricted
    unpickler is pure Python and about 8x slower on them. Raises :class:`_NotPlain` for
    anything else (zip files, tensors, numpy arrays, refused or corrupt files).
    """
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise _NotPlain("a zip file")
        f.seek(0)

        def load() -> Any:
            return _NoTensorsUnpickler(f, encoding="utf-8").load()

        try:
            if load() != _TORCH_LEGACY_MAGIC or load() != 1001 or not isinstance(load(), dict):
                raise _NotPlain("not a legacy torch file")
            data = load()
            if load() != [] or f.read(1):  # storage keys: none without tensors
                raise _NotPlain("the file holds tensors")
        except _NotPlain:
            raise
        except Exception as e:  # _Forbidden, corrupt data, ...: torch says what is wrong
            raise _NotPlain(str(e)) from None
    return data


def load_torch_data(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` with the restricted ``weights_only`` unpickler (zip and legacy formats).

    Tensors, numpy arrays and scalars, lists, dicts, tuples, strings and numbers load; a
    file that would need code raises :class:`UnsafeFileError` (naming the file, ``what`` it
    should have been and the global it asked for). Corrupt files raise torch's own errors
    (``RuntimeError``, ``pickle.UnpicklingError``, ``EOFError``, ...).
    """
    import torch

    try:
        return _load_legacy_plain(Path(path))
    except _NotPlain:
        pass  # tensors, numpy, a zip file, a refusal or a corrupt file: torch's loader decides
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _TORCH_REFUSALS.search(text)
        if "Weights only load failed" not in text or not m:
            raise
        if m.group(1):
            reason = f"run code: {m.group(1)}"
        else:
            reason = "build objects beyond plain data: " + text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise _refusal(path, what, reason) from None


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
    "replace_dir",
    "save_figure",
    "save_image",
    "save_safetensors",
    "write_json",
]
