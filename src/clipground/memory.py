"""Keep resident memory low: glibc allocator settings and trimming.

``Grounder.set_image`` trims after the proposals and after the encode (selective search and
the image tower leave freed heap behind that would add to the next step's peak). A long-running service that decodes images and runs a model on a few threads makes glibc
keep freed memory: one arena per thread, and large buffers carved from the heap once the
dynamic mmap threshold has grown. :func:`tune_allocator` caps the arenas and pins the mmap
threshold (large buffers then go back to the system when freed); :func:`trim` returns free
heap pages after a heavy request. Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_libc = None
_lock = threading.Lock()


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt  # noqa: B018 - glibc only
            lib.malloc_trim  # noqa: B018
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def tune_allocator(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Cap malloc arenas and fix the mmap threshold; True when applied (glibc)."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(_M_ARENA_MAX, arenas)) and bool(lib.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def trim() -> None:
    """Give free heap memory back to the system (cheap next to an image encoding)."""
    lib = _glibc()
    if lib is not None:
        with _lock:
            lib.malloc_trim(0)
