"""The one table from errors to HTTP statuses, and the error body every endpoint answers with."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..errors import M3Error, Overloaded, ShuttingDown

log = logging.getLogger("m3_runtime.server")

# Requests a client closed before its answer (nginx's code; never sent, only logged and counted).
CLIENT_CLOSED = 499


class RequestError(Exception):
    """A refusal the server decides itself (a field, a header, a limit), with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientGone(Exception):
    """The client closed the connection before its answer."""


_RETRY = {"Retry-After": "1"}
# The runtime's error classes and their statuses, most specific first: the first class
# an exception is an instance of decides. Anything not listed is a bug: 500, logged.
STATUS: tuple[tuple[type[BaseException], int, dict[str, str]], ...] = (
    (ShuttingDown, 503, _RETRY),  # the scheduler is closing (SIGTERM): try another replica
    (Overloaded, 429, _RETRY),  # the queue is full (--max-queue)
    (M3Error, 400, {}),  # valid JSON the model refuses: bad weights, an output the package lacks
)


def error_response(exc: BaseException, *, request_timeout_s: float | None) -> tuple[int, str, dict[str, str]]:
    """The one map from exceptions to (status, message, headers)."""
    if isinstance(exc, RequestError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ClientGone):
        return CLIENT_CLOSED, "client closed the connection before the answer", {}
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return (
            503,
            f"request not answered within {request_timeout_s or 0:g} s (--request-timeout-s); "
            "the server is overloaded, try again",
            dict(_RETRY),
        )
    for cls, status, headers in STATUS:
        if isinstance(exc, cls):
            return status, str(exc), dict(headers)
    log.exception("internal error", exc_info=exc)
    return 500, "internal server error", {}


def error_body(status: int, message: str) -> dict[str, Any]:
    """``{"error": {"message", "code"}}``: the native, OpenAI and Cohere routes' error shape."""
    return {"error": {"message": message, "code": status}}


# text-embeddings-inference's error_type per status (router/src/http/server.rs maps them back).
_TEI_TYPES = {413: "Validation", 422: "Validation", 400: "Empty", 429: "Overloaded", 503: "Unhealthy"}


def tei_error_body(status: int, message: str) -> dict[str, Any]:
    """``{"error", "error_type"}``: text-embeddings-inference's error shape, on its routes."""
    return {"error": message, "error_type": _TEI_TYPES.get(status, "Backend")}
