"""The Starlette app: each POST route parses its endpoint's model and calls the service;
the GET routes; the Gateway around them; ``serve`` runs it under uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson

from ..model import M3Model
from ..reranker import M3Reranker
from . import openapi
from .config import ServerConfig, bind_warning
from .errors import RequestError, error_body, error_response, tei_error_body
from .gateway import NOTE, Gateway, access_log, answer, parse_json, read_body
from .metrics import CONTENT_TYPE
from .schemas import parse
from .service import Service
from .tei import Tei

log = logging.getLogger("m3_runtime.server")

# /info's schema: TEI's fields (tei.Tei.info), the embedder's (describe) and "reranker".
_NULLABLE_STRING = {"type": ["string", "null"]}
_PACKAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "endpoints": {"type": "array", "items": {"type": "string"}},
        "model": _NULLABLE_STRING,
        "kind": {"type": "string"},
        "variant": {"type": "string"},
        "providers": {"type": "array", "items": {"type": "string"}},
        "hidden_size": {"type": "integer"},
        "max_length": {"type": "integer"},
        "outputs": {"type": "array", "items": {"type": "string"}},
        "query_instruction": _NULLABLE_STRING,
        "check": {"type": ["object", "null"]},  # m3 serve --check's report (check.CheckReport.to_dict)
    },
}
INFO_SCHEMA = {
    "type": "object",
    "properties": {
        "model_id": {"type": "string"},
        "model_sha": _NULLABLE_STRING,
        "model_dtype": {"type": "string"},
        "model_type": {"type": "object"},
        "max_concurrent_requests": {"type": "integer"},
        "max_input_length": {"type": "integer"},
        "max_batch_tokens": {"type": "integer"},
        "max_batch_requests": {"type": ["integer", "null"]},
        "max_client_batch_size": {"type": "integer"},
        "auto_truncate": {"type": "boolean"},
        "tokenization_workers": {"type": "integer"},
        "version": {"type": "string"},
        "sha": _NULLABLE_STRING,
        "docker_label": _NULLABLE_STRING,
        **_PACKAGE_SCHEMA["properties"],  # type: ignore[dict-item]
        "reranker": _PACKAGE_SCHEMA,
    },
    "required": ["model_id", "model_type", "max_input_length", "max_client_batch_size", "version"],
}


def dumps(content: Any) -> bytes:
    """The bytes of every endpoint's answer, by orjson: 8-17x faster than the standard
    library on these answers (``benchmarks/json_encoding.py``, docs/server.md), the same
    numbers. orjson writes NaN as ``null``; no answer holds one (``service.finite`` and the
    reranker refuse non-finite model outputs with a 500, /score refuses weights that give
    non-finite scores)."""
    return orjson.dumps(content)


def describe(m: M3Model | M3Reranker, endpoints: list[str]) -> dict[str, Any]:
    """One package as /info and the start-up log show it."""
    man = m.package.manifest
    return {
        "endpoints": endpoints,
        "model": man.source.get("id"),
        "kind": man.model_kind,
        "variant": m.variant,
        "providers": m.providers,
        "hidden_size": man.hidden_size,
        "max_length": man.max_length,
        "outputs": list(man.output_names),
        "query_instruction": man.query_instruction,
        "check": None if m.last_check is None else m.last_check.to_dict(),
    }


def served(service: Service) -> dict[str, tuple[M3Model | M3Reranker, list[str]]]:
    """Which package serves which POST paths: {"embedder": ..., "reranker": ...}."""
    out: dict[str, tuple[M3Model | M3Reranker, list[str]]] = {}
    root = root_endpoint(service)
    for role, held, names in (
        ("embedder", service._model, ("/v1/embeddings", "/encode", "/score", "/embed", "/embed_sparse", "/embed_all")),
        ("reranker", service._reranker, ("/rerank", "/v1/rerank")),
    ):
        if held is not None:
            paths = [p for p, n in openapi.POSTS.items() if n in names and n in service.endpoints]
            if root in names:
                paths.append("/")
            out[role] = (held, paths)
    return out


def root_endpoint(service: Service) -> str:
    """What ``POST /`` answers as, as text-embeddings-inference routes it by its model's kind:
    an embedder's /embed, a reranker's /rerank (here: /embed when an embedder is served)."""
    return "/embed" if service._model is not None else "/rerank"


def create_app(
    model: M3Model | None,
    config: ServerConfig | None = None,
    *,
    warm: bool = True,
    reranker: M3Reranker | None = None,
):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    config = config or ServerConfig()
    service = Service(model, config, reranker)
    tei = Tei(service)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start(warm=warm)
        yield
        await service.stop()

    def failure(exc: BaseException, *, tei_shape: bool = False) -> Response:
        status, message, headers = error_response(exc, request_timeout_s=config.request_timeout_s)
        note = NOTE.get()
        if note is not None:
            note.error = message
        body = tei_error_body(status, message) if tei_shape else error_body(status, message)
        return JSONResponse(body, status, headers=headers)

    handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "/v1/embeddings": service.embeddings,
        "/encode": service.encode,
        "/score": service.score,
        "/rerank": service.rerank,
        "/v1/rerank": service.cohere_rerank,
        "/embed": tei.embed,
        "/embed_sparse": tei.embed_sparse,
        "/embed_all": tei.embed_all,
        "/tokenize": tei.tokenize,
        "/decode": tei.decode,
    }

    def post(path: str, name: str) -> Route:
        handler = handlers[name]
        tei_shape = name in service.endpoints and service.endpoints[name].tei

        async def route(request: Request) -> Response:
            try:
                # Only JSON (or no Content-Type). Form and text/plain bodies are what a browser
                # may POST cross-site without a CORS preflight; refusing them keeps a web page
                # from driving a loopback server with no API key.
                ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype and ctype != "application/json" and not ctype.endswith("+json"):
                    raise RequestError(
                        415,
                        f"Content-Type must be application/json, got {request.headers['content-type'][:80]!r} "
                        "(curl: --json or -H 'Content-Type: application/json')",
                    )
                endpoint = service.endpoint(name)
                raw = await read_body(
                    request.receive, request.headers, limit=config.max_body_bytes, timeout=config.request_timeout_s
                )
                body = parse_json(raw)
                if not isinstance(body, dict):
                    kind = "list" if isinstance(body, list) else "null" if body is None else type(body).__name__
                    raise RequestError(422, f"request body must be a JSON object, got {kind}")
                args = parse(endpoint.request, body)
                service.watch.check()
                result = await answer(handler, args, request.receive, config.request_timeout_s)
                service.watch.check()  # a file changed while this request ran: its numbers may be wrong
                return Response(dumps(result), media_type="application/json")
            except Exception as exc:
                # A pass that failed on weights changed under it: say so, not 400 or 500.
                changed = service.watch.poll()
                return failure(exc if changed is None else RequestError(503, changed), tei_shape=tei_shape)

        return Route(path, route, methods=["POST"])

    def get(path: str, handler: Callable[[], Response]) -> Route:
        async def route(_request: Request) -> Response:
            return handler()

        return Route(path, route, methods=["GET"])

    def health() -> Response:
        try:
            service.watch.check()
        except RequestError as exc:
            return JSONResponse({"status": "package-changed", "message": exc.message}, 503)
        return JSONResponse({"status": "ok" if service.ready else "loading"}, 200 if service.ready else 503)

    def info() -> Response:
        # TEI's fields and this server's own share no name: both sit at the top level, the
        # embedder's fields there too (as before TEI's were added), the reranker's under "reranker".
        out = tei.info()
        for role, (held, paths) in served(service).items():
            if role == "embedder":
                out.update(describe(held, paths))
            else:
                out["reranker"] = describe(held, paths)
        return JSONResponse(out)

    spec: dict[str, Any] = {}

    def document() -> Response:
        if not spec:
            from .. import __version__

            spec.update(
                openapi.document(
                    service.endpoints,
                    config,
                    root=root_endpoint(service),
                    info_schema=INFO_SCHEMA,
                    version=__version__,
                )
            )
        return JSONResponse(spec)

    routes = [post(path, name) for path, name in openapi.POSTS.items()]
    routes.append(post("/", root_endpoint(service)))
    routes += [
        get("/health", health),
        get("/info", info),
        get("/v1/models", lambda: JSONResponse(service.models())),
        get("/metrics", lambda: Response(service.metrics.exposition(), media_type=CONTENT_TYPE)),
        get("/openapi.json", document),
    ]

    async def http_error(_request: Request, exc: Exception) -> Response:  # 404, 405 in the API's error shape
        assert isinstance(exc, HTTPException)
        message = {404: "no such endpoint: see /openapi.json", 405: "method not allowed"}.get(
            exc.status_code, exc.detail
        )
        return failure(RequestError(exc.status_code, message, dict(exc.headers or {})))

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                Gateway,
                config=config,
                metrics=service.metrics,
                routes=frozenset(r.path for r in routes),
            )
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.service = service
    return app


def _configure_logging() -> None:
    """Warnings of the runtime on standard error as uvicorn prints its own; access lines bare (JSON)."""
    runtime = logging.getLogger("m3_runtime")
    if not runtime.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        runtime.addHandler(handler)
        runtime.setLevel(logging.INFO)
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


def check_port(host: str, port: int) -> None:
    """OSError naming --host/--port if nothing could listen there (checked before the models load)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise OSError(
                f"--port {port} (M3_PORT) on --host {host} (M3_HOST) {why}: stop what holds it or pick another port"
            ) from None


def serve(
    model: M3Model | None, *, host: str, port: int, config: ServerConfig, reranker: M3Reranker | None = None
) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("m3 serve needs the server extra: pip install 'm3-runtime[server]'") from None
    _configure_logging()
    warning = bind_warning(host, api_key=config.api_key is not None)
    if warning is not None:
        log.warning(warning)
    app = create_app(model, config, reranker=reranker)
    for role, (held, paths) in served(app.state.service).items():
        log.info(
            "%s %s (%s, variant %s on %s) serves %s",
            role,
            held.package.root,
            held.package.manifest.source.get("id") or held.package.manifest.model_kind,
            held.variant,
            ", ".join(held.providers),
            " ".join(paths),
        )
    # uvicorn stops accepting on SIGTERM and waits up to drain_timeout_s for in-flight
    # requests; the app's lifespan then drains the scheduler's queue before the process exits.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,  # Gateway writes one JSON line per request instead
        timeout_graceful_shutdown=config.drain_timeout_s,
    )
