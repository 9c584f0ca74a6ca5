"""``clipground serve``: the HTTP API and the web page, offline on the bundled world CLIP by default."""

from __future__ import annotations

import os

import typer

from ..errors import ClipgroundError
from ..serve.config import ServeConfig

#: The flags' defaults are the config's own, so the two cannot drift apart.
_D = ServeConfig()


def serve(
    method: list[str] = typer.Option(None, "--method", "-m", help="Method to serve (repeatable; the first is the "
                                     "default): a name, NAME:key=value:key=value, or a trained-method directory. "
                                     f"Default: {' and '.join(_D.methods)}."),
    backbone: str = typer.Option(_D.backbone, "--backbone", "-b", help="CLIP checkpoint (default: the bundled world CLIP, offline)."),
    proposals: str = typer.Option(_D.proposals, "--proposals", "-p", help="Proposal source for proposal-based methods."),
    host: str = typer.Option(_D.host, "--host", help="Address to bind; anything but loopback needs an API key."),
    port: int = typer.Option(_D.port, "--port", help="TCP port."),
    workers: int = typer.Option(_D.workers, "--workers", help="Inference threads encoding images at once."),
    queue: int = typer.Option(_D.queue, "--queue", help="Requests that may wait for a worker; more get 429."),
    timeout: float = typer.Option(_D.timeout_s, "--timeout", help="Seconds before a request is answered 503."),
    cache_mb: float = typer.Option(_D.cache_mb, "--cache-mb", help="Budget of the image-state LRU, in MB."),
    max_upload_mb: float = typer.Option(_D.max_upload_mb, "--max-upload-mb", help="Largest request body, in MB (413 above)."),
    max_pixels: int = typer.Option(_D.max_pixels, "--max-pixels", help="Largest decoded image, in pixels (413 above)."),
    max_phrases: int = typer.Option(_D.max_phrases, "--max-phrases", help="Phrases per request (422 above)."),
    api_key: str | None = typer.Option(None, "--api-key", help="Key clients must send (X-API-Key); default: "
                                       "$CLIPGROUND_API_KEY. Required on a non-loopback address."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve grounding over HTTP (POST /v1/ground, /v1/images) and the web page at /."""
    from ..options import from_dict
    from ..serve.config import API_KEY_ENV
    from .common import quiet_transformers

    try:
        import uvicorn
    except ImportError:
        raise ClipgroundError("clipground serve needs fastapi, uvicorn and python-multipart: "
                              "pip install 'clipground[serve]'") from None
    cfg = from_dict(ServeConfig, {
        "methods": list(method) if method else list(_D.methods), "backbone": backbone,
        "proposals": proposals, "host": host, "port": port, "workers": workers, "queue": queue, "timeout_s": timeout,
        "cache_mb": cache_mb, "max_upload_mb": max_upload_mb, "max_pixels": max_pixels, "max_phrases": max_phrases,
        "api_key": api_key or os.environ.get(API_KEY_ENV) or None,
    }, what="serve option").validate()
    quiet_transformers()
    from ..serve.app import create_app
    from ..serve.memory import tune_allocator

    tune_allocator()

    app = create_app(cfg)
    typer.echo(f"clipground serve: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
               f"(methods: {', '.join(cfg.methods)}; backbone {cfg.backbone})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
