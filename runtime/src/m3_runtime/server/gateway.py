"""The request's life outside the routes: request id, API key, body limits, metrics and
the access log (ASGI middleware), plus reading and parsing a JSON body.

The ``Gateway`` runs before routing, so a request without the API key gets 401 before
its body is read and never reaches the queue."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .config import ServerConfig
from .errors import ClientGone, RequestError, error_body
from .metrics import Metrics

access_log = logging.getLogger("m3_runtime.access")

# Paths open without the API key: load balancers' probes carry no credentials, and the
# API's description is public documentation.
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
# An X-Request-ID is echoed only if it is 1-128 visible ASCII characters; any other gets
# a fresh id, so a client cannot put control characters or a megabyte into the logs.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")


# -- what one request did, for its access log line --------------------------------------
@dataclass
class Note:
    request_id: str
    texts: int | None = None
    tokens: int | None = None
    inputs: list[str] | None = None
    error: str | None = None

    def add_tokens(self, n: int) -> None:
        self.tokens = (self.tokens or 0) + n


NOTE: ContextVar[Note | None] = ContextVar("m3_request_note", default=None)


def noted(*, texts: int, inputs: list[str]) -> None:
    note = NOTE.get()
    if note is not None:
        note.texts, note.inputs = texts, inputs


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _authorized(header: str | None, key: str) -> str | None:
    """None if ``header`` carries ``key``, else why not."""
    if header is None:
        return "this server needs an API key: send the header 'Authorization: Bearer KEY'"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "the Authorization header must be 'Bearer KEY'"
    # Constant-time, on the header's own bytes (decoded as latin-1 above, so this round-trips).
    if not hmac.compare_digest(token.strip().encode("latin-1"), key.encode("utf-8")):
        return "wrong API key in the Authorization header"
    return None


class Gateway:
    """ASGI middleware around every route: request id, auth, metrics and the access log."""

    def __init__(self, app: Callable, *, config: ServerConfig, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = _header(scope, b"x-request-id")
        request_id = sent if sent is not None and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        note = Note(request_id)
        status = 500
        started = recorded = False
        config = self.config

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            seconds = time.perf_counter() - start
            path = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe(path, status, seconds)
            if config.access_log:
                self.log(scope, note, status, seconds)

        async def send_with_id(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted and logged before the last byte leaves: a client that reads its
                # answer and then scrapes /metrics or the log finds its request there.
                record()
            await send(message)

        token = NOTE.set(note)
        try:
            refused = (
                None
                if config.api_key is None or scope["path"] in OPEN_PATHS
                else _authorized(_header(scope, b"authorization"), config.api_key)
            )
            if refused is not None:
                note.error = refused
                await send_json(send_with_id, 401, error_body(401, refused), {"WWW-Authenticate": 'Bearer realm="m3"'})
            else:
                try:
                    await self.app(scope, receive, send_with_id)
                except asyncio.CancelledError:
                    # uvicorn cancels the requests still running when the drain timeout
                    # passes; without this their clients would read a bare 500.
                    if started:
                        raise
                    note.error = f"server shut down before the answer (drain timeout {config.drain_timeout_s} s)"
                    await send_json(send_with_id, 503, error_body(503, note.error), {"Connection": "close"})
        finally:
            NOTE.reset(token)
            record()  # an answer that never completed (client gone, cancelled) is counted here

    def log(self, scope: dict, note: Note, status: int, seconds: float) -> None:
        client = scope.get("client")
        record: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": note.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": client[0] if client else None,
        }
        if note.texts is not None:
            record["texts"] = note.texts
        if note.tokens is not None:
            record["tokens"] = note.tokens
        if note.error is not None:
            record["error"] = note.error
        if self.config.log_texts and note.inputs is not None:
            record["inputs"] = note.inputs
        access_log.info(json.dumps(record, ensure_ascii=False))


async def send_json(send: Callable, status: int, body: Any, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    try:
        # NaN and Infinity are Python's extension, not JSON; a number too large for a
        # float (1e400) becomes inf and is refused by the field's schema.
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(422, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a >4,300-digit integer, NaN
        raise RequestError(422, f"request body is not valid JSON: {str(exc)[:200]}") from None


async def read_body(receive: Callable, headers: Any, *, limit: int, timeout: float | None) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over ``limit`` bytes:
    from Content-Length before reading anything, else while a chunked body streams in."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(
            413,
            f"request body has {length} bytes (Content-Length), over the limit of {limit} (--max-body-bytes)",
            {"Connection": "close"},
        )

    async def read() -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    413, f"request body is over the limit of {limit} bytes (--max-body-bytes)", {"Connection": "close"}
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise RequestError(
            408, f"request body not received within {timeout:g} s (--request-timeout-s)", {"Connection": "close"}
        ) from None


async def _until_disconnect(receive: Callable) -> None:
    """Returns when the client goes (the body is read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def answer(handler: Callable[[Any], Awaitable[Any]], body: Any, receive: Callable, timeout: float | None) -> Any:
    """``handler(body)``, cancelled if the client goes or ``timeout`` passes: then its texts
    still queued leave the queue unrun (``Scheduler.submit``)."""
    work = asyncio.ensure_future(handler(body))
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        done, _ = await asyncio.wait((work, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if work in done:
        return work.result()
    if gone in done:
        raise ClientGone
    raise TimeoutError
