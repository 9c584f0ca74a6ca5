"""The HTTP API and the web page: :func:`create_app` builds a FastAPI app from a :class:`ServeConfig`.

Endpoints (JSON in and out; errors are ``{"error": {"status", "code", "message"}}``):

* ``POST /v1/ground``: an image (multipart field ``image``, or JSON ``{"image": base64}``) and
  phrases (``phrases`` repeated, or a JSON list) -> each phrase's box, score and candidates
  (:meth:`Prediction.to_dict`) and the transformers zero-shot-object-detection list (``hf``);
* ``POST /v1/images`` -> ``image_id`` (sha256 of the bytes) with the method's heavy state
  kept in the LRU; ``POST /v1/images/{id}/ground`` then costs only the text side;
* ``GET /health``, ``GET /v1/methods``, ``GET /v1/examples``; ``GET /docs`` is a local page
  over ``/openapi.json`` (FastAPI's default docs page loads scripts from a CDN, so it is off);
* ``GET /`` the web page; every asset under ``/static`` is local.

Bad input is answered with a 4xx and the library's own message (the image loader's words for
bad bytes, the phrase check's for bad phrases), never a 500. Inference runs on worker threads
(:mod:`clipground.serve.state`), so the event loop only parses, routes and answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (BadImageError, BadPhraseError, ClipgroundError, ConfigError, ImageTooLargeError,
                      UnknownNameError, UnsupportedImageError)
from ..grounder import Grounder, Prediction
from ..images import load_image_bytes
from ..methods import ImageState
from ..phrases import check_phrase, printable
from .config import API_KEY_ENV, UPLOAD_FORMATS, MethodSpec, ServeConfig, parse_method_spec
from .memory import trim
from .state import ImageCache, Lane, LaneFull, LaneTimeout

log = logging.getLogger("clipground.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
EXAMPLES_DIR = STATIC_DIR / "examples"
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
#: Filenames are echoed in messages: keep them short and printable.
_MAX_NAME = 120
#: Workers of the text lane: the text side is serialized anyway (see ``Service.text_lock``).
TEXT_WORKERS = 1


class ServiceError(Exception):
    """A request the service answers with ``status`` and a one-line JSON message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": printable(message)}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, code, message), status_code=status, headers=headers)


def from_library_error(e: ClipgroundError) -> ServiceError:
    """The HTTP status of a typed library error (user input, so always a 4xx)."""
    if isinstance(e, UnsupportedImageError):
        return ServiceError(415, "unsupported_image", str(e))
    if isinstance(e, ImageTooLargeError):
        return ServiceError(413, "image_too_large", str(e))
    if isinstance(e, BadImageError):
        return ServiceError(422, "bad_image", str(e))
    if isinstance(e, BadPhraseError):
        return ServiceError(422, "bad_phrase", str(e))
    if isinstance(e, (ConfigError, UnknownNameError)):
        return ServiceError(422, "bad_option", str(e))
    return ServiceError(422, "bad_request", str(e))


@dataclass
class Served:
    """One served method: its spec and a grounder (used only as a factory of per-call grounders)."""

    spec: MethodSpec
    grounder: Grounder

    def describe(self, default: bool) -> dict[str, Any]:
        m = self.grounder.method
        doc = (type(m).__doc__ or "").strip().splitlines()
        return {"id": self.spec.id, "method": m.name, "options": self.spec.options, "default": default,
                "uses_proposals": m.uses_proposals, "backbone": m.backbone.name,
                "proposals": self.grounder.proposals.name if self.grounder.proposals is not None else None,
                "description": doc[0] if doc else ""}

    def fresh(self) -> Grounder:
        """A grounder of its own for one call (shares the model; its image state is private)."""
        return Grounder(self.grounder.method, self.grounder.proposals)


def load_methods(config: ServeConfig) -> dict[str, Served]:
    """Load every served method, the CLIP backbone once for all registered ones."""
    from ..backbone import ClipBackbone
    from ..grounder import trained_source

    out: dict[str, Served] = {}
    backbone = None
    for s in config.methods:
        spec = parse_method_spec(s)
        source = spec.name if spec.directory else trained_source(spec.name, config.backbone)
        if source is not None:
            g = Grounder.from_pretrained(source, proposals=None if config.proposals == "selective-search"
                                         else config.proposals, options=spec.options)
        else:
            if backbone is None:
                backbone = ClipBackbone.from_pretrained(config.backbone)
            g = Grounder.load(spec.name, backbone=backbone, proposals=config.proposals, **spec.options)
        g.method.eval()
        out[spec.id] = Served(spec, g)
    return out


class Service:
    """Everything one app holds: config, served methods, the image LRU, the two lanes."""

    def __init__(self, config: ServeConfig, methods: dict[str, Served]):
        self.config = config
        self.methods = methods
        self.default_method = next(iter(methods))
        self.cache = ImageCache(int(config.cache_mb * 2**20))
        self.image_lane = Lane("image", config.workers, config.queue)
        self.text_lane = Lane("text", TEXT_WORKERS, max(4 * config.queue, 8))
        #: The text side (tokenizer, the backbone's text memo, ranking) runs one call at a time:
        #: fast tokenizers and the memo are not safe to share across threads, and it costs ms.
        self.text_lock = threading.Lock()
        self.started = time.time()
        self.requests = 0

    # ------------------------------------------------------------------ input checks
    def method(self, method_id: Any) -> Served:
        if method_id in (None, ""):
            return self.methods[self.default_method]
        if not isinstance(method_id, str) or method_id not in self.methods:
            raise ServiceError(422, "unknown_method", f"unknown method {printable(str(method_id))[:80]!r}; this "
                               f"server runs {sorted(self.methods)} (GET /v1/methods)")
        return self.methods[method_id]

    def phrases(self, raw: Any) -> list[str]:
        """Validated phrases: a list of strings within the count and length limits."""
        c = self.config
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise ServiceError(422, "bad_phrase", "give one or more phrases: 'phrases' (a list of strings, or the "
                               "form field repeated) or 'phrase'")
        if len(raw) > c.max_phrases:
            raise ServiceError(422, "too_many_phrases", f"{len(raw)} phrases in one request, the limit is {c.max_phrases}")
        out = []
        for p in raw:
            try:
                q = check_phrase(p)
            except BadPhraseError as e:
                raise ServiceError(422, "bad_phrase", str(e)) from None
            if len(q) > c.max_phrase_chars:
                raise ServiceError(422, "bad_phrase", f"phrase is too long: {len(q)} characters, the limit is "
                                   f"{c.max_phrase_chars}")
            out.append(q)
        return out

    def top_k(self, raw: Any) -> int:
        if raw in (None, ""):
            return self.config.top_k
        try:
            k = int(raw)
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
        except (TypeError, ValueError):
            raise ServiceError(422, "bad_option", f"top_k must be an integer, got {printable(str(raw))[:40]!r}") from None
        if not 1 <= k <= 100:
            raise ServiceError(422, "bad_option", f"top_k must be between 1 and 100, got {k}")
        return k

    # ------------------------------------------------------------------ work (worker threads)
    def _encode(self, served: Served) -> Callable[[Any], ImageState]:
        def run(image: Any) -> ImageState:
            g = served.fresh()
            g.set_image(image)
            return g.get_image_state()
        return run

    def _predict(self, served: Served, state: ImageState, phrases: list[str]) -> list[Prediction]:
        g = served.fresh().set_image_state(state)
        with self.text_lock:
            return g.predict_batch(phrases)

    def add_image(self, data: bytes, name: str, image_id: str) -> Any:
        """Decode ``data`` into the cache (or touch it there); the entry."""
        item = self.cache.get(image_id)
        if item is not None:
            return item
        img = load_image_bytes(data, name, max_pixels=self.config.max_pixels, formats=UPLOAD_FORMATS)
        return self.cache.put_image(image_id, img, name)

    def ground_job(self, served: Served, image_id: str, item: Any, phrases: list[str] | None, top_k: int,
                   data: bytes | None = None, name: str = "") -> dict[str, Any]:
        """Decode (if ``data``), encode (if not cached) and rank: the body of every grounding answer."""
        t0 = time.perf_counter()
        try:
            if item is None:
                item = self.add_image(data or b"", name, image_id)
            state, cached = self.cache.compute_once(image_id, item, served.spec.id, self._encode(served))
            if not cached:
                trim()
            t1 = time.perf_counter()
            preds = self._predict(served, state, phrases) if phrases else []
        except ClipgroundError as e:
            raise from_library_error(e) from None
        t2 = time.perf_counter()
        out: dict[str, Any] = {
            "image_id": image_id,
            "image_size": list(item.image.size),
            "method": served.spec.id,
            "backbone": served.grounder.method.backbone.name,
            "cached": cached,
            "timing_ms": {"image": round((t1 - t0) * 1e3, 2), "text": round((t2 - t1) * 1e3, 2),
                          "total": round((t2 - t0) * 1e3, 2)},
        }
        if phrases is not None:
            out["predictions"] = [p.to_dict(top_k=top_k) for p in preds]
            out["hf"] = sorted((d for p in preds for d in p.to_hf(top_k=1)), key=lambda d: -d["score"])
        return out

    async def submit(self, served: Served, image_id: str, item: Any, phrases: list[str] | None, top_k: int,
                     data: bytes | None = None, name: str = "") -> dict[str, Any]:
        """Run a grounding job on the right lane: the text lane when the state is cached."""
        cached = item is not None and served.spec.id in item.states
        if item is None and data is not None:
            hit = self.cache.get(image_id)
            if hit is not None:
                item, cached = hit, served.spec.id in hit.states
        lane = self.text_lane if cached else self.image_lane
        try:
            return await lane.run(lambda: self.ground_job(served, image_id, item, phrases, top_k, data, name),
                                  self.config.timeout_s)
        except LaneFull:
            raise ServiceError(429, "busy", f"the server is busy ({lane.name} lane: {lane.workers} running, "
                               f"{lane.queue} waiting); retry shortly", {"Retry-After": "1"}) from None
        except LaneTimeout:
            raise ServiceError(503, "timeout", f"the request did not finish within {self.config.timeout_s:g} s; "
                               f"retry later or with a smaller image") from None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1), "default_method": self.default_method,
                "methods": list(self.methods), "cache": self.cache.stats(),
                "lanes": {"image": self.image_lane.stats(), "text": self.text_lane.stats()},
                "auth": bool(self.config.api_key)}


# ---------------------------------------------------------------------- request parsing
def _clean_name(name: Any, default: str) -> str:
    n = Path(str(name or "")).name.strip() or default
    return printable(n)[:_MAX_NAME]


def _b64(raw: Any) -> bytes:
    if not isinstance(raw, str):
        raise ServiceError(422, "bad_request", "'image' must be a base64 string (optionally a data: URL)")
    s = raw.strip()
    if s.startswith("data:"):
        s = s.partition(",")[2]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(422, "bad_request", "'image' is not valid base64") from None


async def read_body(request: Request, service: Service, need_image: bool) -> dict[str, Any]:
    """The request as ``{"data", "name", "phrases", "method", "top_k"}`` from multipart or JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    out: dict[str, Any] = {"data": None, "name": "upload"}
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise ServiceError(422, "bad_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ServiceError(422, "bad_request", "the JSON body must be an object")
        if need_image:
            if "image" not in body:
                raise ServiceError(422, "bad_request", "missing 'image' (base64 of the image file's bytes)")
            out["data"] = _b64(body["image"])
            out["name"] = _clean_name(body.get("filename"), "upload")
        out["phrases"] = body.get("phrases", body.get("phrase"))
        out["method"] = body.get("method")
        out["top_k"] = body.get("top_k")
        return out
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=2, max_fields=service.config.max_phrases + 16)
        except Exception as e:  # malformed multipart: starlette raises its own kinds
            raise ServiceError(422, "bad_request", f"malformed form body: {str(e)[:200]}") from None
        try:
            if need_image:
                f = form.get("image")
                if f is None or isinstance(f, str):
                    raise ServiceError(422, "bad_request", "missing file field 'image' (multipart upload)")
                out["data"] = await f.read()
                out["name"] = _clean_name(f.filename, "upload")
            phrases = [v for v in form.getlist("phrases") + form.getlist("phrase")]
            if any(not isinstance(v, str) for v in phrases):
                raise ServiceError(422, "bad_phrase", "phrases must be text fields, not files")
            out["phrases"] = phrases if phrases else None
            out["method"] = form.get("method") if isinstance(form.get("method"), str) else None
            out["top_k"] = form.get("top_k") if isinstance(form.get("top_k"), str) else None
        finally:
            await form.close()
        return out
    if not need_image and ctype == "":
        return {"phrases": None, "method": None, "top_k": None}
    raise ServiceError(415, "unsupported_media_type",
                       f"send multipart/form-data or application/json, not {printable(ctype)[:60] or 'no content type'}")


# ---------------------------------------------------------------------- middleware
class GuardMiddleware:
    """API key check and a hard cap on request bodies, before any route parses anything.

    Bodies are read here with a per-chunk timeout (a client that stalls gets 408) and
    refused at ``limit`` bytes with 413, then replayed to the app.
    """

    def __init__(self, app: Any, service: Service, chunk_timeout_s: float = 30.0):
        self.app, self.service, self.chunk_timeout_s = app, service, chunk_timeout_s
        self.limit = int(service.config.max_upload_mb * 2**20)
        self.key = service.config.api_key

    async def _send_error(self, send: Any, status: int, code: str, message: str, extra: list | None = None) -> None:
        body = json.dumps(_error_body(status, code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: dict[str, Any]) -> bool:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not given and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given, self.key.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.key and path.startswith("/v1/") and not self._authorized(scope):
            return await self._send_error(send, 401, "unauthorized", "missing or wrong API key: send it as "
                                          "'X-API-Key: KEY' (or 'Authorization: Bearer KEY')",
                                          [(b"www-authenticate", b"Bearer")])
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await self._send_error(send, 400, "bad_request", "invalid Content-Length header")
        too_big = (f"the request body is over the upload limit of {self.service.config.max_upload_mb:g} MB; "
                   f"send a smaller image")
        if declared > self.limit:
            return await self._send_error(send, 413, "upload_too_large", too_big)
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), self.chunk_timeout_s)
            except asyncio.TimeoutError:
                return await self._send_error(send, 408, "timeout", f"the request body stalled for "
                                              f"{self.chunk_timeout_s:g} s")
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._send_error(send, 413, "upload_too_large", too_big)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------- the app
def _examples() -> list[dict[str, Any]]:
    """The bundled examples (read once per app, not per request)."""
    index = EXAMPLES_DIR / "examples.json"
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    return [dict(e, url=f"/static/examples/{e['file']}") for e in items if (EXAMPLES_DIR / e["file"]).is_file()]


def create_app(config: ServeConfig, methods: dict[str, Served] | None = None) -> FastAPI:
    """The service as a FastAPI app (``uvicorn.run(create_app(cfg))``); loads the methods unless given."""
    config.validate()
    from .. import __version__

    service = Service(config, methods if methods is not None else load_methods(config))
    example_list = _examples() if config.examples else []

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.image_lane.shutdown()
        service.text_lane.shutdown()

    app = FastAPI(title="clipground", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Visual grounding: an image and phrases in, boxes and scores out.")
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(_r: Request, e: ServiceError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(ClipgroundError)
    async def _library_error(_r: Request, e: ClipgroundError) -> JSONResponse:
        se = from_library_error(e)
        return error_response(se.status, se.code, se.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:  # a bug, never user input
        log.exception("internal error")
        return error_response(500, "internal_error", "internal error (a bug: please report it)")

    image_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"},
            "phrases": {"type": "array", "items": {"type": "string"}},
            "method": {"type": "string"}, "top_k": {"type": "integer"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "description": "base64 of the file's bytes (a data: URL is accepted)"},
            "filename": {"type": "string"},
            "phrases": {"type": "array", "items": {"type": "string"}}, "phrase": {"type": "string"},
            "method": {"type": "string"}, "top_k": {"type": "integer"}}}}}}}
    text_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"phrases": {"type": "array", "items": {"type": "string"}},
                                         "phrase": {"type": "string"}, "method": {"type": "string"},
                                         "top_k": {"type": "integer"}}}}}}}

    @app.get("/health", summary="Liveness, queue and cache state (answered on the event loop)")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/methods", summary="The methods this server runs (the first is the default)")
    async def methods_() -> dict[str, Any]:
        from ..methods import METHODS

        return {"default": service.default_method,
                "methods": [s.describe(i == service.default_method) for i, s in service.methods.items()],
                "registered": sorted(METHODS)}

    @app.get("/v1/examples", summary="Bundled example images with suggested phrases")
    async def examples() -> dict[str, Any]:
        return {"examples": example_list}

    @app.post("/v1/ground", summary="Ground phrases in an uploaded image", openapi_extra=image_body)
    async def ground(request: Request) -> dict[str, Any]:
        body = await read_body(request, service, need_image=True)
        served = service.method(body["method"])
        phrases = service.phrases(body["phrases"])
        top_k = service.top_k(body["top_k"])
        data = body["data"]
        image_id = hashlib.sha256(data).hexdigest()
        return await service.submit(served, image_id, None, phrases, top_k, data, body["name"])

    @app.post("/v1/images", summary="Upload an image; its heavy state is cached under the returned id",
              openapi_extra=image_body)
    async def add_image(request: Request) -> dict[str, Any]:
        body = await read_body(request, service, need_image=True)
        served = service.method(body["method"])
        data = body["data"]
        image_id = hashlib.sha256(data).hexdigest()
        return await service.submit(served, image_id, None, None, 1, data, body["name"])

    @app.post("/v1/images/{image_id}/ground", summary="Ground phrases in a cached image (text side only)",
              openapi_extra=text_body)
    async def ground_cached(image_id: str, request: Request) -> dict[str, Any]:
        body = await read_body(request, service, need_image=False)
        served = service.method(body["method"])
        phrases = service.phrases(body["phrases"])
        top_k = service.top_k(body["top_k"])
        item = service.cache.get(image_id) if _IMAGE_ID.match(image_id) else None
        if item is None:
            raise ServiceError(404, "unknown_image", "unknown image id (never uploaded here, or evicted from the "
                               "cache): POST the image to /v1/images again")
        return await service.submit(served, image_id, item, phrases, top_k)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(GuardMiddleware, service=service)
    return app


__all__ = ["API_KEY_ENV", "Service", "ServiceError", "create_app", "load_methods"]
