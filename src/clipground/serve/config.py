"""What ``clipground serve`` runs with: one typed config, method specs, and the access rule.

:class:`ServeConfig` is a plain dataclass, built by the CLI through the one option parser
(:func:`clipground.options.from_dict`), so a value that does not fit fails before a model
loads. A method spec is ``NAME`` or ``NAME:key=value:key=value`` (the method's own options,
coerced by its config) or a saved grounder directory; the first spec is the default method.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from ..backbone.hub import WORLD_CLIP
from ..errors import ConfigError
from ..images import MAX_PIXELS
from ..options import parse_assignments
from ..phrases import MAX_PHRASE_CHARS

#: Environment variable the API key may come from (instead of ``--api-key`` on a shared machine).
API_KEY_ENV = "CLIPGROUND_API_KEY"
#: Raster formats the service decodes; anything else (SVG, EPS, PDF, ...) is answered 415.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


#: Served when no ``--method`` is given: the zero-shot scorer and a proposal-free heatmap
#: method, both weight-free beside the bundled CLIP, so the page can compare two families.
DEFAULT_METHODS = ("zero-shot", "heatmap-segment:heatmap=clip:segmenter=threshold")


@dataclass(frozen=True)
class MethodSpec:
    """One served method: its id (the spec as typed), registered name or directory, options."""

    id: str
    name: str
    options: dict[str, str]
    directory: bool = False


def parse_method_spec(spec: str) -> MethodSpec:
    """``zero-shot`` / ``zero-shot:views=crop:relations=no`` / a trained-method directory."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("--method: empty method spec")
    if os.path.isdir(spec):
        return MethodSpec(spec, spec, {}, directory=True)
    name, *opts = spec.split(":")
    return MethodSpec(spec, name.strip(), parse_assignments(opts, f"--method {spec!r} option"))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it counts as public


@dataclass
class ServeConfig:
    """Options of the service (the CLI's flags; ``create_app`` reads nothing else).

    Attributes:
        methods: method specs (see module doc); the first is the default.
        backbone: CLIP checkpoint for the registered methods (bundled name, directory, hub id).
        proposals: proposal source for methods that use proposals.
        host, port: where uvicorn binds; the app only reads ``host`` for the access rule.
        workers: inference threads (requests computed at once).
        queue: requests allowed to wait for a worker; more are answered 429.
        timeout_s: a request waiting or computing longer is answered 503.
        cache_mb: budget of the image-state LRU (decoded image + method features).
        max_upload_mb: request bodies over this are answered 413 before they are parsed.
        max_pixels: decoded images over this many pixels are answered 413.
        max_phrases: phrases per request.
        max_phrase_chars: characters per phrase (at most the library's own limit).
        top_k: candidates returned per phrase.
        api_key: required from clients when set; mandatory when ``host`` is not loopback.
        examples: serve the bundled example images on the page.
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    backbone: str = WORLD_CLIP
    proposals: str = "selective-search"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    queue: int = 16
    timeout_s: float = 60.0
    cache_mb: float = 256.0
    max_upload_mb: float = 20.0
    max_pixels: int = 16_000_000
    max_phrases: int = 16
    max_phrase_chars: int = MAX_PHRASE_CHARS
    top_k: int = 5
    api_key: str | None = None
    examples: bool = True

    def validate(self) -> "ServeConfig":
        """Refuse values that cannot work, and a public bind without an API key."""
        if not self.methods:
            raise ConfigError("serve: give at least one --method")
        positive = {"workers": self.workers, "timeout_s": self.timeout_s, "cache_mb": self.cache_mb,
                    "max_upload_mb": self.max_upload_mb, "max_pixels": self.max_pixels,
                    "max_phrases": self.max_phrases, "max_phrase_chars": self.max_phrase_chars, "top_k": self.top_k}
        for k, v in positive.items():
            if v <= 0:
                raise ConfigError(f"serve: {k} must be positive, got {v}")
        if self.queue < 0:
            raise ConfigError(f"serve: queue must be >= 0, got {self.queue}")
        if self.max_pixels > MAX_PIXELS:
            raise ConfigError(f"serve: max_pixels is at most the library's limit {MAX_PIXELS}, got {self.max_pixels}")
        if self.max_phrase_chars > MAX_PHRASE_CHARS:
            raise ConfigError(f"serve: max_phrase_chars is at most the library's limit {MAX_PHRASE_CHARS}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError("serve: the API key must have at least 8 characters")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"refusing to serve on {self.host}, which is not a loopback address, without an API key: "
                f"pass --api-key or set {API_KEY_ENV} (clients then send it as X-API-Key), or bind --host 127.0.0.1")
        for s in self.methods:
            parse_method_spec(s)
        return self
