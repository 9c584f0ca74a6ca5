"""``clipground serve``: the HTTP API and the web page over :class:`~clipground.grounder.Grounder`.

:func:`create_app` builds the FastAPI app from a :class:`ServeConfig`; the page and its assets
live in ``static/`` and load nothing from outside the server. Needs the ``serve`` extra
(``pip install clipground[serve]``: fastapi, uvicorn, python-multipart).
"""

from typing import TYPE_CHECKING, Any

from .config import API_KEY_ENV, DEFAULT_METHODS, ServeConfig, is_loopback, parse_method_spec

__all__ = ["API_KEY_ENV", "DEFAULT_METHODS", "ServeConfig", "create_app", "is_loopback", "parse_method_spec"]


if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(config: ServeConfig, methods: dict[str, Any] | None = None) -> "FastAPI":
    """Build the app (see :func:`clipground.serve.app.create_app`); imports FastAPI only when called."""
    from .app import create_app as _create

    return _create(config, methods)
