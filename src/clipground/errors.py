"""User-facing errors.

Every problem a user can cause (bad image, bad phrase, missing checkpoint, malformed
annotation file) raises a subclass of :class:`ClipgroundError`. The CLI prints its
message on one line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class ClipgroundError(Exception):
    """Base class for errors whose message is meant for the user, not a traceback."""

    exit_code: int = 2


class BadImageError(ClipgroundError):
    """The image is missing, unreadable, truncated, of an unsupported mode, or too large."""


class UnsupportedImageError(BadImageError):
    """The bytes are not an image in a format we read (text, SVG, an unknown format)."""


class ImageTooLargeError(BadImageError):
    """The image has more pixels than the limit (a decompression-bomb header included)."""


class BadPhraseError(ClipgroundError):
    """The referring expression is empty, whitespace-only or too long."""


class BadBoxError(ClipgroundError):
    """A box is degenerate, non-finite, or lies outside the image."""


class BadAnnotationError(ClipgroundError):
    """An annotation file is missing or malformed."""


class CheckpointNotFoundError(ClipgroundError):
    """A model checkpoint (hub id or local directory) cannot be loaded."""


class UnknownNameError(ClipgroundError):
    """A method, proposal source or backbone name is not registered."""


class ConfigError(ClipgroundError):
    """A configuration file or option is malformed (unknown key, bad value, bad type)."""


class UnsafeFileError(ClipgroundError, ValueError):
    """A file we were asked to read is a pickle that would run code (or build objects
    beyond plain data) when loaded; it is refused, never unpickled in full."""
