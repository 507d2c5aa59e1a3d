"""HTTP server: routes only. Parse a request, submit it to the scheduler, serialize the answer.

``m3 serve PACKAGE`` (extra ``m3-runtime[server]``: Starlette + uvicorn). Endpoints:

- ``POST /v1/embeddings``: OpenAI-compatible dense vectors (``input`` str or list,
  ``model``, ``encoding_format`` float|base64; ``dimensions`` only if it equals the
  model's), with token usage.
- ``POST /encode``: ``texts`` plus ``dense``/``sparse``/``colbert`` and ``max_length``;
  sparse as ``{token_id: weight}`` or ``{indices, values}`` (``sparse_format``), ColBERT
  as nested lists or base64 float32/float16 (``colbert_format``).
- ``POST /score``: ``pairs`` of [query, passage], all five scores; ``weights``,
  ``max_query_length``, ``max_passage_length`` as in ``compute_score``.
- ``POST /rerank`` (text-embeddings-inference's shape): ``query``, ``texts``,
  ``raw_scores`` (default false: sigmoid), ``return_text``, ``truncate`` -> an array of
  ``{index, score, text?}``, best first. ``POST /v1/rerank`` (Cohere's shape, also what
  Jina and infinity accept): ``query``, ``documents`` (str or ``{text}``), ``top_n``,
  ``return_documents`` -> ``{results: [{index, relevance_score, document?}]}``
  (also at ``/v2/rerank``, where Cohere's v2 client posts).
  Both need a reranker package (``m3 serve [EMBEDDER] --reranker PACKAGE``).
- ``GET /health`` (200 once loaded and warmed, else 503), ``GET /info``,
  ``GET /metrics`` (Prometheus text), ``GET /openapi.json`` (OpenAPI 3.1).

Each POST endpoint's fields are declared once, as JSON Schema (``Service.endpoints``):
the parser (``check``) validates bodies against those declarations and
``/openapi.json`` publishes them, so the two cannot drift apart.

Every endpoint's texts go through one ``Scheduler`` (``scheduler.py``). Errors map to
status codes in one place (``error_response``): 422 malformed JSON or wrong field
types (the field is named), 413 too many texts, too long a text or too large a body,
415 a body that is not JSON, 408 a body not received within the request timeout,
429 with ``Retry-After`` when the queue is full, 503 when shutting down or past the
request timeout, 400 for valid JSON the model refuses (any ``M3Error``), 401 without
the API key (``--api-key``), 404 for a model the server does not hold, 500 for
anything else (a bug: logged, never the exception text). A client that disconnects
before its answer is logged as 499 and its texts still queued never run.

Every response carries ``X-Request-ID`` (the client's, if it sent a usable one);
each request is one JSON line on the ``m3_runtime.access`` logger, without texts
unless ``log_texts``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .contract import COLBERT, DENSE, SCORES, SPARSE
from .errors import M3Error, Overloaded
from .heads import sigmoid
from .model import Embeddings, M3Model, gather, pair_scores
from .reranker import M3Reranker
from .scheduler import Histogram, Scheduler

log = logging.getLogger("m3_runtime.server")
access_log = logging.getLogger("m3_runtime.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Requests a client closed before its answer (nginx's code; never sent, only logged and counted).
CLIENT_CLOSED = 499
# Paths open without the API key: load balancers' probes carry no credentials, and the
# API's description is public documentation.
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
# An X-Request-ID is echoed only if it is 1-128 visible ASCII characters; any other gets
# a fresh id, so a client cannot put control characters or a megabyte into the logs.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# Default --max-body-bytes. The largest useful request is --max-texts (512) texts each
# filling the model's 8,192 tokens: at ~4 bytes of JSON per token that is 16 MiB.
# Bigger bodies carry text the model would truncate away; max_texts * max_chars
# (102 M characters, up to 400 MB of UTF-8) would let one request pin that much memory.
DEFAULT_MAX_BODY_BYTES = 16 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientGone(Exception):
    """The client closed the connection before its answer."""


@dataclass
class ServerConfig:
    """The server's settings; ``m3 serve``'s option defaults are read from here."""

    max_wait_ms: float = 5.0  # how long the first queued text waits for company
    max_queue: int = 4096  # texts waiting before requests get 429
    max_texts: int = 512  # texts per request (413 above)
    max_chars: int = 200_000  # characters per text (413 above)
    # A request not answered within this many seconds gets 503: what of it is still
    # queued never runs, a running pass's result is discarded. A body not received
    # within it gets 408. None: no limit.
    request_timeout_s: float | None = 60.0
    workers: int = 2  # N: short passes at once, and N - 1 passages on a second session (scheduler.py)
    # Passes of a text over the engine's budget run on threads this much nicer (Linux).
    long_pass_nice: int = 10
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request bodies over this get 413 (see DEFAULT_MAX_BODY_BYTES)
    # Bearer token every request but OPEN_PATHS must carry (None: no auth). Not in repr.
    api_key: str | None = field(default=None, repr=False)
    log_texts: bool = False  # put request texts into the access log (off: counts only)
    access_log: bool = True  # one JSON line per request on the m3_runtime.access logger
    # On SIGTERM: seconds to wait for in-flight and queued requests before closing anyway.
    drain_timeout_s: int = 60


def error_response(exc: BaseException, config: ServerConfig) -> tuple[int, str, dict[str, str]]:
    """The one map from exceptions to (status, message, headers)."""
    if isinstance(exc, RequestError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ClientGone):
        return CLIENT_CLOSED, "client closed the connection before the answer", {}
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return (
            503,
            f"request not answered within {config.request_timeout_s:g} s (--request-timeout-s); "
            "the server is overloaded, try again",
            {"Retry-After": "1"},
        )
    if isinstance(exc, Overloaded):
        status = 503 if "shutting down" in str(exc) else 429
        return status, str(exc), {"Retry-After": "1"}
    if isinstance(exc, M3Error):
        return 400, str(exc), {}
    log.exception("internal error", exc_info=exc)
    return 500, "internal server error", {}


def bind_warning(host: str, *, api_key: bool) -> str | None:
    """What ``m3 serve`` says when ``host`` is reachable from other machines (None: loopback only)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    auth = (
        "requests need the API key"
        if api_key
        else "with no --api-key (or M3_API_KEY): anyone who can reach this port can use the model"
    )
    return (
        f"listening on {host}, not on loopback (127.0.0.1): the server is reachable from other machines, {auth}; "
        "traffic is plain HTTP, so put a TLS proxy in front of it for untrusted networks"
    )


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)


class PackageWatch:
    """Notices a served package's files changing on disk after the load.

    ONNX Runtime memory-maps a graph's external weights (``model.<variant>.onnx.data``)
    and reads them through the page cache on every forward pass: a file overwritten in
    place changes what the running session computes (measured: the tiny package's fp32
    data file overwritten with 0x7f bytes made the next 902-token pass fail in a Gather
    node with an index from the file). So the session does NOT hold the weights in
    memory, and the server checks the files' size, modification time and inode (a
    ``stat``: 1.4 us each here, 6 files a package) before and after each request: from
    the first change on it answers 503 and /health says so, and a restart verifies the
    SHA-256 again (a corrupted package then fails to load with PackageError). An
    in-place write that also restores the modification time goes unnoticed until then."""

    def __init__(self, engines: list[Any]) -> None:
        self.paths = []
        for engine in engines:
            package = engine.package
            entries = package.manifest.tokenizer_files + package.variant(engine.variant).files
            self.paths += [package.path(e) for e in entries]
        self.stamps = {path: self._stamp(path) for path in self.paths}
        self.changed: str | None = None

    @staticmethod
    def _stamp(path: Any) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def check(self) -> None:
        """RequestError(503) once any served file differs from what was loaded."""
        changed = self.poll()
        if changed is not None:
            raise RequestError(503, changed)

    def poll(self) -> str | None:
        """Why the package can no longer be trusted (None: its files are as loaded)."""
        if self.changed is None:
            for path in self.paths:
                if self._stamp(path) != self.stamps[path]:
                    self.changed = (
                        f"package file {path} changed on disk while the server runs (its weights are memory-mapped, "
                        "so answers could come from the changed file): restart the server, which verifies it again"
                    )
                    log.error(self.changed)
                    break
        return self.changed


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


_NOTE: ContextVar[Note | None] = ContextVar("m3_request_note", default=None)


def _noted(*, texts: int, inputs: list[str]) -> None:
    note = _NOTE.get()
    if note is not None:
        note.texts, note.inputs = texts, inputs


# -- request validation: a small subset of JSON Schema, so that the schema IS the parser --
# maxLength and maxItems are size limits (413); every other keyword is a shape (422).
_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "minimum",
        "maximum",
        "maxLength",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "properties",
        "required",
        "anyOf",
        "description",
        "default",
        "title",
    }
)
_TYPE_NAMES = {
    "string": "str",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "array": "list",
    "object": "object",
    "null": "null",
}
# A lone surrogate (only reachable through a JSON \ud800 escape) cannot be encoded as UTF-8:
# the tokenizer and the response serializer would fail on it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _is(value: Any, kind: str) -> bool:
    got = _json_type(value)
    if got == kind:
        return True
    if kind == "number":
        return got == "integer"
    # JSON Schema: 2.0 is an integer.
    return kind == "integer" and got == "number" and math.isfinite(value) and float(value).is_integer()


def _show(value: Any) -> str:
    """A short, safe rendering of a refused value (no deep structures, no megabytes)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return _TYPE_NAMES[_json_type(value)]


def check(value: Any, schema: dict[str, Any], path: str) -> Any:
    """``value`` validated against ``schema`` (a subset of JSON Schema 2020-12) -> the value
    (integral floats of integer fields made ints). RequestError names ``path`` on a refusal."""
    if "anyOf" in schema:
        options = schema["anyOf"]
        fitting = [s for s in options if "type" not in s or _is(value, s["type"])]
        if not fitting:
            wanted = " or ".join(_TYPE_NAMES[s["type"]] for s in options)
            raise RequestError(422, f"field '{path}' must be {wanted}, got {_TYPE_NAMES[_json_type(value)]}")
        first: RequestError | None = None
        for option in fitting:
            try:
                value = check(value, option, path)
                break
            except RequestError as exc:
                first = first or exc
        else:
            assert first is not None
            raise first
    kind = schema.get("type")
    if kind is not None:
        if not _is(value, kind):
            # The type's name only, never the value: a misplaced text must not reach the access log.
            raise RequestError(422, f"field '{path}' must be {_TYPE_NAMES[kind]}, got {_TYPE_NAMES[_json_type(value)]}")
        if kind == "integer":
            value = int(value)
        if kind == "number" and not math.isfinite(value):
            raise RequestError(422, f"field '{path}' must be a finite number")
    if "const" in schema and not (value == schema["const"] and _json_type(value) == _json_type(schema["const"])):
        raise RequestError(422, f"field '{path}' must be {_show(schema['const'])}, got {_show(value)}")
    if "enum" in schema and not any(value == c and _json_type(value) == _json_type(c) for c in schema["enum"]):
        choices = " or ".join(_show(c) for c in schema["enum"])
        raise RequestError(422, f"field '{path}' must be {choices}, got {_show(value)}")
    low, high = schema.get("minimum"), schema.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"in {low}..{high}"
            if low is not None and high is not None
            else f">= {low}"
            if high is None
            else f"<= {high}"
        )
        raise RequestError(422, f"field '{path}' must be {bounds}, got {_show(value)}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise RequestError(413, f"'{path}' has {len(value)} characters (limit {schema['maxLength']})")
        bad = _SURROGATE.search(value)
        if bad is not None:
            raise RequestError(
                422,
                f"field '{path}' is not valid Unicode: "
                f"lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}",
            )
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise RequestError(413, f"'{path}' has {len(value)} items (limit {schema['maxItems']})")
        if len(value) < schema.get("minItems", 0):
            raise RequestError(422, f"field '{path}' must have at least {schema['minItems']} items, got {len(value)}")
        prefix = schema.get("prefixItems", [])
        rest = schema.get("items", True)
        if rest is False and len(value) > len(prefix):
            raise RequestError(422, f"field '{path}' must have at most {len(prefix)} items, got {len(value)}")
        checked = []
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else rest
            checked.append(check(item, sub, f"{path}[{i}]") if isinstance(sub, dict) else item)
        value = checked
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                raise RequestError(422, f"field '{path}.{name}' is required")
        props = schema.get("properties", {})
        value = {k: check(v, props[k], f"{path}.{k}") if k in props else v for k, v in value.items()}
    return value


def enforced(schema: dict[str, Any], path: str) -> None:
    """ValueError if ``schema`` uses a keyword ``check`` does not enforce: a declaration the
    parser would ignore must not reach the published document."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"schema of {path!r} uses keywords the parser does not enforce: {sorted(unknown)}")
    children = [schema["items"]] if isinstance(schema.get("items"), dict) else []
    children += [*schema.get("prefixItems", ()), *schema.get("anyOf", ()), *schema.get("properties", {}).values()]
    for child in children:
        enforced(child, path)


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Field:
    """One request field: its JSON Schema, what it means, and its default (absent: required)."""

    name: str
    schema: dict[str, Any]
    doc: str
    default: Any = _REQUIRED

    def openapi(self) -> dict[str, Any]:
        out = {**self.schema, "description": self.doc}
        if self.default is not _REQUIRED and self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class Rule:
    """A condition on the whole body (JSON Schema) and the message when it fails."""

    schema: dict[str, Any]
    message: str


@dataclass(frozen=True)
class Endpoint:
    """A POST route's request fields and its answer's shape (``response``: JSON Schema)."""

    summary: str
    fields: tuple[Field, ...]
    response: dict[str, Any]
    rules: tuple[Rule, ...] = ()

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        """Every declared field's value (defaults filled in); unknown fields are ignored."""
        out = {}
        for f in self.fields:
            if f.name in body:
                out[f.name] = check(body[f.name], f.schema, f.name)
            elif f.default is _REQUIRED:
                raise RequestError(422, f"field '{f.name}' is required")
            else:
                out[f.name] = f.default
        for rule in self.rules:
            try:
                check(body, rule.schema, "body")
            except RequestError:
                raise RequestError(422, rule.message) from None
        return out

    def request_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: f.openapi() for f in self.fields},
            "required": [f.name for f in self.fields if f.default is _REQUIRED],
        }
        if self.rules:
            schema["allOf"] = [{**r.schema, "description": r.message} for r in self.rules]
        return schema


def _string(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_chars}


def _texts_schema(max_texts: int, max_chars: int, *, single: bool = True) -> dict[str, Any]:
    many = {"type": "array", "items": _string(max_chars), "maxItems": max_texts}
    return {"anyOf": [_string(max_chars), many]} if single else many


NUMBERS = {"type": "array", "items": {"type": "number"}}
# A /score weight. Bounded so that the weighted scores stay finite: with |w| <= 1e6 the
# smallest non-zero |w0 + w1| is ~1e-10, so a combined score stays below ~1e17 (fuzzing
# found [1.6e16, 1.8e308, 5e16] giving inf, which JSON cannot carry).
WEIGHT = {"type": "number", "minimum": -1e6, "maximum": 1e6}
INT = {"type": "integer"}
STRING = {"type": "string"}
BOOL = {"type": "boolean"}


def _obj(props: dict[str, Any], required: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props if required is None else required)}


ERROR_SCHEMA = _obj(
    {
        "error": _obj(
            {
                "message": {**STRING, "description": "what was refused; names the field, header or limit"},
                "code": {**INT, "description": "the HTTP status again"},
            }
        )
    }
)


_PACKAGE_SCHEMA = _obj(
    {
        "model": {"type": ["string", "null"]},
        "kind": STRING,
        "variant": STRING,
        "providers": {"type": "array", "items": STRING},
        "hidden_size": INT,
        "max_length": INT,
        "outputs": {"type": "array", "items": STRING},
        "query_instruction": {"type": ["string", "null"]},
    }
)
# /info: the embedder's fields at the top level (absent on a reranker-only server), the
# reranker's under "reranker".
INFO_SCHEMA = {
    "type": "object",
    "properties": {**_PACKAGE_SCHEMA["properties"], "reranker": _PACKAGE_SCHEMA},
}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


class Service:
    """The state behind the routes: the models, their scheduler, readiness and metrics."""

    def __init__(self, model: M3Model | None, config: ServerConfig, reranker: M3Reranker | None = None) -> None:
        if model is None and reranker is None:
            raise ValueError("a server needs an embedding model, a reranker or both")
        self._model = model
        self._reranker = reranker
        self.config = config
        self.metrics = Metrics()
        self.ready = False
        self.scheduler: Scheduler | None = None
        self.has_heads = model is not None and model.engine.kind.has(SPARSE)
        self.endpoints = self._endpoints()
        for path, endpoint in self.endpoints.items():
            for f in endpoint.fields:
                enforced(f.schema, f"{path} {f.name}")
            for rule in endpoint.rules:
                enforced(rule.schema, f"{path} rule")
        self.watch = PackageWatch([m.engine for m in (model, reranker) if m is not None])

    @property
    def model(self) -> M3Model:
        if self._model is None:
            raise RequestError(404, "this server holds only a reranker: start it with an embedding package too")
        return self._model

    @property
    def reranker(self) -> M3Reranker:
        if self._reranker is None:
            raise RequestError(404, "this server has no reranker: start it with --reranker PACKAGE")
        return self._reranker

    # -- the API: one declaration per endpoint, read by the parser and /openapi.json ----
    def _endpoints(self) -> dict[str, Endpoint]:
        cfg = self.config
        texts = _texts_schema(cfg.max_texts, cfg.max_chars)
        out: dict[str, Endpoint] = {}
        if self._model is not None:
            m = self._model
            lengths = {"type": "integer", "minimum": 2, "maximum": m.max_length}
            max_length = Field("max_length", lengths, "tokens each text is truncated to", m.passage_max_length)
            vector = {**NUMBERS, "minItems": m.hidden_size, "maxItems": m.hidden_size}
            out["/v1/embeddings"] = Endpoint(
                "Dense vectors, OpenAI's embeddings API",
                (
                    Field("input", texts, "a text or a list of texts"),
                    Field("model", STRING, "echoed in the answer", m.package.manifest.source.get("id", "m3")),
                    Field("encoding_format", {"enum": ["float", "base64"]}, "base64: little-endian float32", "float"),
                    Field(
                        "dimensions",
                        INT,
                        f"only the model's own size, {m.hidden_size}, is served (any other integer: 400)",
                        None,
                    ),
                    max_length,
                ),
                _obj(
                    {
                        "object": {"const": "list"},
                        "data": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "object": {"const": "embedding"},
                                    "index": INT,
                                    "embedding": {"anyOf": [vector, STRING]},
                                }
                            ),
                        },
                        "model": STRING,
                        "usage": _obj({"prompt_tokens": INT, "total_tokens": INT}),
                    }
                ),
            )
            colbert_b64 = _obj(
                {
                    "shape": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
                    "dtype": {"enum": ["float32", "float16"]},
                    "data": STRING,
                }
            )
            out["/encode"] = Endpoint(
                "Dense, sparse (lexical) and ColBERT outputs, as M3Model.encode",
                (
                    Field("texts", texts, "a text or a list of texts"),
                    Field("dense", BOOL, "the dense vector", True),
                    Field("sparse", BOOL, "lexical weights (400 on a dense-only package)", False),
                    Field(
                        "colbert", BOOL, "ColBERT vectors, one per token after <s> (400 on a dense-only package)", False
                    ),
                    Field(
                        "sparse_format",
                        {"enum": ["dict", "indices"]},
                        "{token_id: weight} or {indices, values}",
                        "dict",
                    ),
                    Field(
                        "colbert_format",
                        {"enum": ["list", "base64-float32", "base64-float16"]},
                        "nested lists or {shape, dtype, data} with little-endian base64 data",
                        "list",
                    ),
                    max_length,
                ),
                _obj(
                    {
                        "results": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "dense": vector,
                                    "sparse": {
                                        "anyOf": [
                                            {
                                                "type": "object",
                                                "additionalProperties": {"type": "number"},
                                                "propertyNames": {"pattern": "^[0-9]+$"},
                                            },
                                            _obj({"indices": {"type": "array", "items": INT}, "values": NUMBERS}),
                                        ]
                                    },
                                    "colbert": {"anyOf": [{"type": "array", "items": vector}, colbert_b64]},
                                },
                                required=(),
                            ),
                        },
                        "usage": _obj({"tokens": INT}),
                    }
                ),
                rules=(
                    Rule(
                        {
                            "anyOf": [
                                {"properties": {"dense": {"const": True}}},
                                {"properties": {"sparse": {"const": True}}, "required": ["sparse"]},
                                {"properties": {"colbert": {"const": True}}, "required": ["colbert"]},
                            ]
                        },
                        "ask for at least one of 'dense', 'sparse', 'colbert'",
                    ),
                ),
            )
            pair = {"type": "array", "prefixItems": [_string(cfg.max_chars)] * 2, "items": False, "minItems": 2}
            out["/score"] = Endpoint(
                "All five compute_score scores of [query, passage] pairs (400 on a dense-only package)",
                (
                    Field(
                        "pairs", {"type": "array", "items": pair, "maxItems": cfg.max_texts}, "[query, passage] pairs"
                    ),
                    Field(
                        "weights",
                        {"type": "array", "prefixItems": [WEIGHT] * 3, "items": False, "minItems": 3},
                        "[dense, sparse, colbert] weights; 400 if dense+sparse or all three sum to zero",
                        [1.0, 1.0, 1.0],
                    ),
                    Field("max_query_length", lengths, "tokens each query is truncated to", m.query_max_length),
                    Field("max_passage_length", lengths, "tokens each passage is truncated to", m.passage_max_length),
                ),
                _obj(
                    {name: NUMBERS for name in ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")}
                ),
            )
        if self._reranker is not None:
            query = Field("query", _string(cfg.max_chars), "the query every text is scored against")
            out["/rerank"] = Endpoint(
                "Cross-encoder scores, text-embeddings-inference's rerank API; best first",
                (
                    query,
                    Field("texts", texts, "the passages"),
                    Field("raw_scores", BOOL, "the logit instead of its sigmoid", False),
                    Field("return_text", BOOL, "include each passage's text", False),
                    Field(
                        "truncate",
                        BOOL,
                        f"cut pairs to {self._reranker.max_length} tokens; false: 413 for a longer pair",
                        True,
                    ),
                ),
                {
                    "type": "array",
                    "items": _obj({"index": INT, "score": {"type": "number"}, "text": STRING}, ("index", "score")),
                },
            )
            document = _obj({"text": _string(cfg.max_chars)})
            result = _obj(
                {
                    "index": INT,
                    "relevance_score": {"type": "number", "minimum": 0, "maximum": 1},
                    "document": _obj({"text": STRING}),
                },
                ("index", "relevance_score"),
            )
            out["/v1/rerank"] = Endpoint(
                "Cross-encoder relevance (sigmoid of the logit), Cohere's rerank API (v1 and v2); best first",
                (
                    query,
                    Field(
                        "documents",
                        {
                            "type": "array",
                            "items": {"anyOf": [_string(cfg.max_chars), document]},
                            "maxItems": cfg.max_texts,
                        },
                        "passages: strings or {text} objects",
                    ),
                    Field("top_n", {"type": "integer", "minimum": 1}, "keep the best n (absent: all)", None),
                    Field("return_documents", BOOL, "include each document's text", False),
                    Field(
                        "model",
                        STRING,
                        "echoed in the answer",
                        self._reranker.package.manifest.source.get("id", "m3-reranker"),
                    ),
                ),
                _obj(
                    {
                        "id": STRING,
                        "results": {"type": "array", "items": result},
                        "model": STRING,
                        "meta": _obj({"billed_units": _obj({"search_units": INT})}),
                    }
                ),
            )
        return out

    def endpoint(self, path: str) -> Endpoint:
        try:
            return self.endpoints[path]
        except KeyError:
            raise RequestError(
                404,
                "this server has no reranker: start it with --reranker PACKAGE"
                if "rerank" in path
                else "this server holds only a reranker: start it with an embedding package too",
            ) from None

    # -- plumbing -------------------------------------------------------------
    async def start(self, *, warm: bool) -> None:
        self.scheduler = Scheduler(
            max_queue=self.config.max_queue,
            max_wait_ms=self.config.max_wait_ms,
            workers=self.config.workers,
            long_nice=self.config.long_pass_nice,
        )
        self.scheduler.start()
        for held in (self._model, self._reranker):
            if held is not None:
                await self.scheduler.prepare(held.engine)
        if warm and self._model is not None:
            await self.embed(["warm-up"], max_length=16, dense=True, sparse=self.has_heads, colbert=self.has_heads)
        if warm and self._reranker is not None:
            await self.rerank_logits("warm-up", ["warm-up"])
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.scheduler is not None:
            await self.scheduler.close()  # in-flight and queued requests finish first (SIGTERM drains)

    async def embed(self, texts: list[str], *, max_length: int, dense: bool, sparse: bool, colbert: bool) -> Embeddings:
        assert self.scheduler is not None, "the app's lifespan starts the scheduler"
        names = [n for n, on in ((DENSE, dense), (SPARSE, sparse), (COLBERT, colbert)) if on]
        if not names:
            raise RequestError(422, "ask for at least one of 'dense', 'sparse', 'colbert'")
        engine = self.model.engine
        engine.check_outputs(names, "ask for dense only")
        outs = await self.scheduler.encode(engine, texts, max_length=max_length, outputs=names)
        note = _NOTE.get()
        if note is not None:
            note.add_tokens(sum(o.tokens for o in outs))
        return gather(outs, hidden_size=self.model.hidden_size, dense=dense, sparse=sparse, colbert=colbert)

    async def rerank_logits(self, query: str, passages: list[str], *, truncate: bool = True) -> np.ndarray:
        """Raw logits of (query, passage) pairs through the shared scheduler."""
        assert self.scheduler is not None, "the app's lifespan starts the scheduler"
        reranker = self.reranker
        pairs = [(query, p) for p in passages]
        if not truncate:
            limit = reranker.max_length
            whole = await asyncio.to_thread(  # off the event loop: up to max_texts whole, untruncated texts
                reranker.tokenize, pairs, max_length=reranker.engine.max_length, query_max_length=10**9
            )
            for i, ids in enumerate(whole):
                if len(ids) > limit:
                    raise RequestError(413, f"pair {i} has {len(ids)} tokens (limit {limit}); send truncate=true")
        note = _NOTE.get()  # read here: the tokenizer's thread does not see this context

        def tokenize() -> list[list[int]]:
            ids = reranker.tokenize(pairs)
            if note is not None:
                note.add_tokens(sum(len(x) for x in ids))
            return ids

        outs = await self.scheduler.submit(reranker.engine, len(pairs), tokenize, [SCORES])
        return np.array([o.score for o in outs], dtype=np.float32)

    # -- routes ---------------------------------------------------------------
    async def embeddings(self, body: dict) -> dict:
        args = self.endpoint("/v1/embeddings").parse(body)
        texts = [args["input"]] if isinstance(args["input"], str) else args["input"]
        _noted(texts=len(texts), inputs=texts)
        dims = args["dimensions"]
        if dims is not None and dims != self.model.hidden_size:
            raise RequestError(
                400, f"'dimensions' {dims} is not supported: this model gives {self.model.hidden_size}-d vectors"
            )
        out = await self.embed(texts, max_length=args["max_length"], dense=True, sparse=False, colbert=False)
        assert out.dense is not None
        base64_ = args["encoding_format"] == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _b64(v) if base64_ else v.tolist()}
            for i, v in enumerate(out.dense)
        ]
        tokens = int(out.tokens.sum())
        return {
            "object": "list",
            "data": data,
            "model": args["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def encode(self, body: dict) -> dict:
        args = self.endpoint("/encode").parse(body)
        texts = [args["texts"]] if isinstance(args["texts"], str) else args["texts"]
        _noted(texts=len(texts), inputs=texts)
        out = await self.embed(
            texts, max_length=args["max_length"], dense=args["dense"], sparse=args["sparse"], colbert=args["colbert"]
        )
        sparse_format, colbert_format = args["sparse_format"], args["colbert_format"]
        rows: list[dict[str, Any]] = []
        for i in range(len(texts)):
            row: dict[str, Any] = {}
            if out.dense is not None:
                row["dense"] = out.dense[i].tolist()
            if out.lexical is not None:
                weights = out.lexical[i]
                row["sparse"] = (
                    weights
                    if sparse_format == "dict"
                    else {"indices": [int(k) for k in weights], "values": list(weights.values())}
                )
            if out.colbert is not None:
                vecs = out.colbert[i]
                if colbert_format == "list":
                    row["colbert"] = vecs.tolist()
                else:
                    dtype = np.float16 if colbert_format.endswith("16") else np.float32
                    row["colbert"] = {
                        "shape": list(vecs.shape),
                        "dtype": np.dtype(dtype).name,
                        "data": _b64(vecs.astype(dtype)),
                    }
            rows.append(row)
        return {"results": rows, "usage": {"tokens": int(out.tokens.sum())}}

    async def score(self, body: dict) -> dict:
        args = self.endpoint("/score").parse(body)
        if not self.has_heads:
            raise RequestError(400, "/score needs sparse and ColBERT outputs; this package is dense-only")
        pairs = args["pairs"]
        _noted(texts=2 * len(pairs), inputs=[t for pair in pairs for t in pair])
        from .scoring import check_mode_weights

        weights = args["weights"]
        try:
            check_mode_weights(weights)
        except M3Error as exc:
            raise RequestError(400, f"field 'weights': {exc}") from None
        every = {"dense": True, "sparse": True, "colbert": True}
        q, p = await asyncio.gather(
            self.embed([a for a, _ in pairs], max_length=args["max_query_length"], **every),
            self.embed([b for _, b in pairs], max_length=args["max_passage_length"], **every),
        )
        scores = dict(pair_scores(q, p, weights=weights, chunk=self.model.batch_size))
        if not all(math.isfinite(x) for values in scores.values() for x in values):
            raise RequestError(422, f"field 'weights' {weights} gives scores that are not finite numbers")
        return scores

    async def rerank(self, body: dict) -> list[dict]:
        args = self.endpoint("/rerank").parse(body)
        query = args["query"]
        texts = [args["texts"]] if isinstance(args["texts"], str) else args["texts"]
        _noted(texts=len(texts), inputs=[query, *texts])
        logits = await self.rerank_logits(query, texts, truncate=args["truncate"])
        scores = logits.astype(np.float64) if args["raw_scores"] else sigmoid(logits)
        rows: list[dict[str, Any]] = [
            {"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")
        ]
        if args["return_text"]:
            for row in rows:
                row["text"] = texts[row["index"]]
        return rows

    async def cohere_rerank(self, body: dict) -> dict:
        args = self.endpoint("/v1/rerank").parse(body)
        query = args["query"]
        texts = [doc if isinstance(doc, str) else doc["text"] for doc in args["documents"]]
        _noted(texts=len(texts), inputs=[query, *texts])
        top_n = args["top_n"]
        scores = sigmoid(await self.rerank_logits(query, texts))  # relevance in 0..1, as Cohere's
        results: list[dict[str, Any]] = []
        for i in np.argsort(-scores, kind="stable")[:top_n]:
            row: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if args["return_documents"]:
                row["document"] = {"text": texts[i]}
            results.append(row)
        note = _NOTE.get()
        return {
            "id": note.request_id if note is not None else uuid.uuid4().hex,
            "results": results,
            "model": args["model"],
            "meta": {"billed_units": {"search_units": 1}},
        }

    def info(self) -> dict:
        def describe(m: M3Model | M3Reranker) -> dict:
            man = m.package.manifest
            return {
                "model": man.source.get("id"),
                "kind": man.model_kind,
                "variant": m.variant,
                "providers": m.providers,
                "hidden_size": man.hidden_size,
                "max_length": man.max_length,
                "outputs": list(man.output_names),
                "query_instruction": man.query_instruction,
            }

        out = describe(self._model) if self._model is not None else {}
        if self._reranker is not None:
            out["reranker"] = describe(self._reranker)
        return out

    def prometheus(self) -> str:
        lines = ["# TYPE m3_requests_total counter"]
        lines += [
            f'm3_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.metrics.requests.items())
        ]
        lines.append("# TYPE m3_request_seconds histogram")
        for path, hist in sorted(self.metrics.latency.items()):
            lines += hist.lines("m3_request_seconds", f'path="{path}"')
        if self.scheduler is not None:
            stats = self.scheduler.stats
            lines += [
                "# TYPE m3_texts_total counter",
                f"m3_texts_total {stats.texts}",
                "# TYPE m3_tokens_total counter",
                f"m3_tokens_total {stats.tokens}",
                "# TYPE m3_batches_total counter",
                f"m3_batches_total {stats.batches}",
                "# TYPE m3_batch_texts histogram",
                *stats.batch_texts.lines("m3_batch_texts"),
                "# TYPE m3_queue_texts gauge",
                f"m3_queue_texts {self.scheduler.queued_texts}",
            ]
        return "\n".join(lines) + "\n"

    # -- OpenAPI ----------------------------------------------------------------
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of this server (its models, limits and auth)."""
        from . import __version__

        cfg = self.config
        auth = cfg.api_key is not None
        request_id = {
            "X-Request-ID": {
                "description": "the client's X-Request-ID if it was 1-128 visible ASCII characters, else a new id",
                "required": True,
                "schema": STRING,
            }
        }
        retry = {"Retry-After": {"description": "seconds to wait", "required": True, "schema": STRING}}

        def error(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
            return {
                "description": description,
                "headers": {**request_id, **(headers or {})},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }

        def ok(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
            return {"description": "OK", "headers": request_id, "content": {media: {"schema": schema}}}

        denied = {"401": error("no Authorization: Bearer header, or a wrong API key")} if auth else {}
        secured: dict[str, Any] = {"security": [{"bearer": []}]} if auth else {}
        request_id_param = {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "echoed in the response and the access log",
            "schema": STRING,
        }
        paths: dict[str, Any] = {}
        posts = [
            ("/v1/embeddings", "/v1/embeddings"),
            ("/encode", "/encode"),
            ("/score", "/score"),
            ("/rerank", "/rerank"),
            ("/v1/rerank", "/v1/rerank"),
            ("/v2/rerank", "/v1/rerank"),
        ]
        for path, name in posts:
            endpoint = self.endpoints.get(name)
            responses: dict[str, Any] = {}
            if endpoint is not None:
                responses["200"] = ok(endpoint.response)
                responses.update(
                    {
                        "400": error("valid JSON the model refuses"),
                        **denied,
                        "408": error(f"body not received within {cfg.request_timeout_s} s (--request-timeout-s)"),
                        "413": error(
                            f"over a limit: {cfg.max_texts} texts, {cfg.max_chars} characters a text, "
                            f"{cfg.max_body_bytes} bytes a body, "
                            "or a pair over the reranker's length with truncate=false"
                        ),
                        "415": error("a Content-Type other than application/json"),
                        "422": error("not JSON, not an object, or a field of the wrong type or value (named)"),
                        "429": error("the queue is full", headers=retry),
                        "503": error(
                            "shutting down, not answered within the request timeout (both with Retry-After), "
                            "or a package file changed on disk since the load"
                        ),
                    }
                )
                body = {"required": True, "content": {"application/json": {"schema": endpoint.request_schema()}}}
                summary = endpoint.summary
            else:
                responses.update({**denied, "404": error("this server does not hold the model this endpoint needs")})
                body = {"required": False, "content": {"application/json": {"schema": {}}}}
                summary = "not served here (404): the server was started without the model this endpoint needs"
            paths[path] = {
                "post": {
                    "operationId": path.strip("/").replace("/", "_"),
                    "summary": summary,
                    "parameters": [request_id_param],
                    "requestBody": body,
                    "responses": responses,
                    **secured,
                }
            }
        gets = {
            "/health": (
                "200 once loaded and warmed up; open without the API key",
                _obj({"status": {"enum": ["ok", "loading"]}}),
                {
                    "503": {
                        **ok(
                            _obj(
                                {"status": {"enum": ["loading", "package-changed"]}, "message": STRING},
                                required=("status",),
                            )
                        ),
                        "description": "loading, shutting down, or a package file changed on disk since the load",
                    }
                },
                False,
            ),
            "/info": ("the packages served", INFO_SCHEMA, {}, True),
            "/metrics": ("Prometheus text exposition", STRING, {}, True),
            "/openapi.json": ("this document; open without the API key", {"type": "object"}, {}, False),
        }
        for path, (summary, schema, extra, protected) in gets.items():
            media = "text/plain" if path == "/metrics" else "application/json"
            paths[path] = {
                "get": {
                    "operationId": path.strip("/").replace(".", "_"),
                    "summary": summary,
                    "parameters": [request_id_param],
                    "responses": {"200": ok(schema, media), **extra, **(denied if protected else {})},
                    **(secured if protected else {}),
                }
            }
        components: dict[str, Any] = {"schemas": {"Error": ERROR_SCHEMA}}
        if auth:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        return {
            "openapi": "3.1.0",
            "info": {
                "title": "m3-runtime",
                "version": __version__,
                "description": "BGE-M3 embeddings and reranking without PyTorch. Every error body is "
                '{"error": {"message", "code"}}; every response carries X-Request-ID.',
            },
            "paths": paths,
            "components": components,
        }


# -- the request's life outside the routes: id, auth, timing, access log -------------------
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
    """ASGI middleware around every route: request id, auth, metrics and the access log.

    It runs before routing, so a request without the API key gets 401 before its body
    is read and never reaches the queue."""

    def __init__(self, app: Callable, *, service: Service, routes: frozenset[str]) -> None:
        self.app = app
        self.service = service
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
        config = self.service.config

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            seconds = time.perf_counter() - start
            path = scope["path"] if scope["path"] in self.routes else "other"
            self.service.metrics.observe(path, status, seconds)
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

        token = _NOTE.set(note)
        try:
            refused = (
                None
                if config.api_key is None or scope["path"] in OPEN_PATHS
                else _authorized(_header(scope, b"authorization"), config.api_key)
            )
            if refused is not None:
                note.error = refused
                await _send_json(
                    send_with_id, 401, _error_body(401, refused), {"WWW-Authenticate": 'Bearer realm="m3"'}
                )
            else:
                try:
                    await self.app(scope, receive, send_with_id)
                except asyncio.CancelledError:
                    # uvicorn cancels the requests still running when the drain timeout
                    # passes; without this their clients would read a bare 500.
                    if started:
                        raise
                    note.error = f"server shut down before the answer (drain timeout {config.drain_timeout_s} s)"
                    await _send_json(send_with_id, 503, _error_body(503, note.error), {"Connection": "close"})
        finally:
            _NOTE.reset(token)
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
        if self.service.config.log_texts and note.inputs is not None:
            record["inputs"] = note.inputs
        access_log.info(json.dumps(record, ensure_ascii=False))


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "code": status}}


async def _send_json(send: Callable, status: int, body: Any, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(data: bytes) -> Any:
    try:
        # NaN and Infinity are Python's extension, not JSON; a number too large for a
        # float (1e400) becomes inf and is refused by the field's schema.
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(422, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a >4,300-digit integer, NaN
        raise RequestError(422, f"request body is not valid JSON: {str(exc)[:200]}") from None


async def _read_body(receive: Callable, headers: Any, *, limit: int, timeout: float | None) -> bytes:
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


async def _answer(
    handler: Callable[[dict], Awaitable[Any]], body: dict, receive: Callable, timeout: float | None
) -> Any:
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
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    config = config or ServerConfig()
    service = Service(model, config, reranker)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start(warm=warm)
        yield
        await service.stop()

    def failure(exc: BaseException) -> Response:
        status, message, headers = error_response(exc, config)
        note = _NOTE.get()
        if note is not None:
            note.error = message
        return JSONResponse(_error_body(status, message), status, headers=headers)

    def post(path: str, handler: Callable[[dict], Awaitable[dict | list]]) -> Route:
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
                raw = await _read_body(
                    request.receive, request.headers, limit=config.max_body_bytes, timeout=config.request_timeout_s
                )
                body = _parse_json(raw)
                if not isinstance(body, dict):
                    raise RequestError(422, f"request body must be a JSON object, got {_show(body)}")
                service.watch.check()
                answer = await _answer(handler, body, request.receive, config.request_timeout_s)
                service.watch.check()  # a file changed while this request ran: its numbers may be wrong
                return JSONResponse(answer)
            except Exception as exc:
                # A pass that failed on weights changed under it: say so, not 400 or 500.
                changed = service.watch.poll()
                return failure(exc if changed is None else RequestError(503, changed))

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

    spec: dict[str, Any] = {}

    def openapi() -> Response:
        if not spec:
            spec.update(service.openapi())
        return JSONResponse(spec)

    routes = [
        post("/v1/embeddings", service.embeddings),
        post("/encode", service.encode),
        post("/score", service.score),
        post("/rerank", service.rerank),
        post("/v1/rerank", service.cohere_rerank),
        post("/v2/rerank", service.cohere_rerank),
        get("/health", health),
        get("/info", lambda: JSONResponse(service.info())),
        get("/metrics", lambda: PlainTextResponse(service.prometheus(), media_type="text/plain; version=0.0.4")),
        get("/openapi.json", openapi),
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
        middleware=[Middleware(Gateway, service=service, routes=frozenset(r.path for r in routes))],
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
    # uvicorn stops accepting on SIGTERM and waits up to drain_timeout_s for in-flight
    # requests; the app's lifespan then drains the scheduler's queue before the process exits.
    uvicorn.run(
        create_app(model, config, reranker=reranker),
        host=host,
        port=port,
        log_level="info",
        access_log=False,  # Gateway writes one JSON line per request instead
        timeout_graceful_shutdown=config.drain_timeout_s,
    )
