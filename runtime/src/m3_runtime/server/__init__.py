"""HTTP server: ``m3 serve PACKAGE`` (extra ``m3-runtime[server]``: Starlette, uvicorn,
pydantic, prometheus_client). One job per module:

- ``config``: ``ServerConfig``, the settings (``m3 serve``'s flags).
- ``schemas``: each endpoint's request and response as pydantic models, built with the
  server's and the packages' limits; the parser and ``/openapi.json`` both come from them.
- ``service``: the handlers over the ``Scheduler`` (native, OpenAI and Cohere routes);
  ``tei``: text-embeddings-inference's routes over the same service.
- ``gateway``: ASGI middleware (request ids, API key before the body is read, the
  access log) and reading a body within its limits.
- ``errors``: the one table from error classes to HTTP statuses, and the error bodies.
- ``metrics``: Prometheus metrics through prometheus_client; ``watch``: the package
  files watched for changes; ``openapi``: the document; ``app``: routes and ``serve``.

Endpoints (docs/server.md):

- ``POST /v1/embeddings`` (also ``/embeddings``): OpenAI's embeddings API.
- ``POST /encode``: dense, sparse and ColBERT outputs; ``POST /score``: all five scores.
- ``POST /rerank`` (text-embeddings-inference's shape), ``POST /v1/rerank`` and
  ``/v2/rerank`` (Cohere's): need a reranker package (``--reranker PACKAGE``).
- ``POST /embed``, ``/embed_sparse``, ``/embed_all``, ``/tokenize``, ``/decode`` and
  ``POST /``: text-embeddings-inference's API.
- ``GET /health``, ``/info``, ``/v1/models``, ``/metrics``, ``/openapi.json``.

Errors: 422 malformed JSON, a wrong type or an unknown field (native endpoints), named;
413 too many texts, too long a text or too large a body; 415 a body that is not JSON;
408 a body not received within the request timeout; 429 with ``Retry-After`` when the
queue is full; 503 when shutting down or past the request timeout; 400 for valid JSON
the model refuses; 401 without the API key; 404 for a model the server does not hold;
500 for anything else (a bug: logged, never the exception text). A client that
disconnects before its answer is logged as 499 and its texts still queued never run.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULT_MAX_BODY_BYTES, ServerConfig, bind_warning

# The app's modules import pydantic, prometheus_client and Starlette (the server extra):
# loaded on first use, so that ``m3 --help`` reads ServerConfig's defaults without them.
_LAZY = {"check_port": "app", "create_app": "app", "serve": "app", "Service": "service"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerConfig", "Service", "bind_warning", "check_port", "create_app", "serve"]
