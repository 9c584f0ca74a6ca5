"""Referring expressions as users type them: validation, and text safe to echo on a terminal.

:func:`check_phrase` is the one gate every phrase passes (the CLI, :class:`~clipground.grounder.Grounder`
and :meth:`~clipground.backbone.clip.ClipBackbone.tokenize`): it refuses what is not a
phrase (empty, over-long, not valid UTF-8, control characters such as terminal colour
codes) with a :class:`~clipground.errors.BadPhraseError` that says what to fix, and
collapses whitespace. :func:`printable` escapes what a terminal would interpret, for
messages that quote user text or file names.
"""

from __future__ import annotations

import re

from .errors import BadPhraseError

#: Longest accepted phrase in characters (CLIP's context is 77 tokens anyway).
MAX_PHRASE_CHARS = 400

#: Lone UTF-16 surrogates: what Python makes of bytes that are not UTF-8 (``surrogateescape``).
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Control characters (Unicode category Cc) except tab, line feed, vertical tab, form feed
#: and carriage return, which are ordinary whitespace in a phrase (collapsed to one space).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
#: What :func:`printable` escapes: every control character, line and paragraph separators,
#: bidirectional embeddings/overrides/isolates (they reorder what follows), surrogates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters, line breaks and undecodable bytes escaped (``\\x1b``, ``\\n``).

    What is left cannot move the cursor, change colours, reorder the line or start a new
    one: safe to print in a one-line message. Ordinary text (any script) is unchanged.
    """
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def check_phrase(phrase: str) -> str:
    """Validate a referring expression; return it with whitespace collapsed.

    Refused (:class:`~clipground.errors.BadPhraseError`): a non-string; text that is not
    valid UTF-8 (lone surrogates, which is what undecodable command-line bytes become);
    control characters other than tabs and line breaks (terminal escape sequences, bell,
    DEL, C1 controls), named as ``U+001B`` with their position; an empty or
    whitespace-only phrase; more than :data:`MAX_PHRASE_CHARS` characters.
    """
    if not isinstance(phrase, str):
        raise BadPhraseError(f"phrase must be a string, got {type(phrase).__name__}")
    bad = _SURROGATE.search(phrase)
    if bad:
        c = bad.group()
        byte = f" (byte 0x{ord(c) - 0xDC00:02x})" if "\udc80" <= c <= "\udcff" else ""
        raise BadPhraseError(
            f"phrase is not valid UTF-8 text: character {bad.start() + 1} is undecodable{byte} in "
            f"'{printable(phrase[:60])}'; check your terminal's or file's encoding"
        )
    bad = _CONTROL.search(phrase)
    if bad:
        raise BadPhraseError(
            f"phrase has control character U+{ord(bad.group()):04X} at position {bad.start() + 1} "
            f"('{printable(phrase[:60])}'): remove it (terminal colour codes and other control "
            f"characters are not text)"
        )
    p = " ".join(phrase.split())
    if not p:
        raise BadPhraseError("phrase is empty: give a referring expression such as 'the red mug on the left'")
    if len(p) > MAX_PHRASE_CHARS:
        raise BadPhraseError(f"phrase is too long: {len(p)} characters, the limit is {MAX_PHRASE_CHARS}")
    return p


__all__ = ["MAX_PHRASE_CHARS", "check_phrase", "printable"]
