"""HTTP server: all three BGE-M3 outputs of one forward pass, with dynamic batching.

``m3 serve PACKAGE`` (extra ``m3-runtime[server]``: Starlette + uvicorn). Endpoints:

- ``POST /v1/embeddings``: OpenAI-compatible dense vectors (``input`` str or list,
  ``model``, ``encoding_format`` float|base64; ``dimensions`` only if it equals the
  model's), with token usage.
- ``POST /encode``: ``texts`` plus ``dense``/``sparse``/``colbert`` and ``max_length``;
  sparse as ``{token_id: weight}`` or ``{indices, values}`` (``sparse_format``), ColBERT
  as nested lists or base64 float32/float16 (``colbert_format``).
- ``POST /score``: ``pairs`` of [query, passage], all five scores; ``weights``,
  ``max_query_length``, ``max_passage_length`` as in ``compute_score``.
- ``GET /health`` (200 once loaded and warmed, else 503), ``GET /info``,
  ``GET /metrics`` (Prometheus text).

Errors map to status codes in one place (``_error``): 422 malformed JSON or wrong
field types (the field is named), 413 too many texts or too long a text, 429 with
``Retry-After`` when the queue is full, 400 for valid JSON the model refuses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batcher import Batcher, Options, QueueFull
from .model import M3Model

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class ServerConfig:
    max_batch_tokens: int = 2048
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_texts: int = 512
    max_chars: int = 200_000
    # A request not answered within this many seconds gets 503: if it is still queued it
    # never runs, if it is running its slice is discarded. None: no limit.
    request_timeout_s: float | None = 60.0


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, list[int]] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        buckets = self.latency.setdefault(path, [0] * (len(LATENCY_BUCKETS) + 1))
        buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
        self.latency_sum[path] = self.latency_sum.get(path, 0.0) + seconds


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise RequestError(422, f"field '{name}' is required")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int in Python
        wanted = " or ".join(k.__name__ for k in kinds)
        raise RequestError(422, f"field '{name}' must be {wanted}, got {type(value).__name__}")
    return value


def _texts(value: Any, name: str, config: ServerConfig) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise RequestError(422, f"field '{name}' must be a string or a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"field '{name}[{i}]' must be a string, got {type(text).__name__}")
        if len(text) > config.max_chars:
            raise RequestError(413, f"'{name}[{i}]' has {len(text)} characters (limit {config.max_chars})")
    if len(texts) > config.max_texts:
        raise RequestError(413, f"'{name}' has {len(texts)} texts (limit {config.max_texts})")
    return texts


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def create_app(model: M3Model, config: ServerConfig | None = None, *, warm: bool = True):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    config = config or ServerConfig()
    state: dict[str, Any] = {"ready": False}
    metrics = Metrics()
    has_heads = "sparse_weights" in model.outputs

    @asynccontextmanager
    async def lifespan(_app):
        batcher = Batcher(
            model, max_batch_tokens=config.max_batch_tokens, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue
        )
        batcher.start()
        state["batcher"] = batcher
        if warm:
            await batcher.encode(["warm-up"], Options(max_length=16, dense=True, sparse=has_heads, colbert=has_heads))
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.close()  # in-flight and queued requests finish first (SIGTERM drains)

    def endpoint(path: str, handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if request.method == "POST":
                    try:
                        body = json.loads(await request.body())
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise RequestError(422, f"request body is not valid JSON: {exc}") from None
                    if not isinstance(body, dict):
                        raise RequestError(422, "request body must be a JSON object")
                    response = await asyncio.wait_for(handler(body), config.request_timeout_s)
                else:
                    response = await handler()
            except TimeoutError:
                response = JSONResponse(
                    {
                        "error": {
                            "message": f"request not answered within {config.request_timeout_s:g} s "
                            "(--request-timeout-s); the server is overloaded, try again",
                            "code": 503,
                        }
                    },
                    503,
                    headers={"Retry-After": "1"},
                )
            except RequestError as exc:
                response = JSONResponse(
                    {"error": {"message": exc.message, "code": exc.status}}, exc.status, headers=exc.headers
                )
            except QueueFull as exc:
                response = JSONResponse(
                    {"error": {"message": str(exc), "code": 429}}, 429, headers={"Retry-After": "1"}
                )
            except (ValueError, TypeError) as exc:
                response = JSONResponse({"error": {"message": str(exc), "code": 400}}, 400)
            metrics.observe(path, response.status_code, time.perf_counter() - start)
            return response

        return wrapped

    def options(body: dict, *, dense: bool, sparse: bool, colbert: bool) -> Options:
        max_length = _field(body, "max_length", int, model.passage_max_length)
        if not 2 <= max_length <= model.max_length:
            raise RequestError(422, f"field 'max_length' must be in 2..{model.max_length}, got {max_length}")
        return Options(max_length=max_length, dense=dense, sparse=sparse, colbert=colbert)

    async def embeddings(body: dict) -> Response:
        texts = _texts(_field(body, "input", (str, list)), "input", config)
        fmt = _field(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise RequestError(422, f"field 'encoding_format' must be 'float' or 'base64', got {fmt!r}")
        dims = _field(body, "dimensions", int, None)
        if dims is not None and dims != model.hidden_size:
            raise RequestError(
                400, f"'dimensions' {dims} is not supported: this model gives {model.hidden_size}-d vectors"
            )
        opts = options(body, dense=True, sparse=False, colbert=False)
        result, tokens = await state["batcher"].encode(texts, opts)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _b64(v.astype(np.float32)) if fmt == "base64" else v.tolist(),
            }
            for i, v in enumerate(result["dense_vecs"])
        ]
        name = _field(body, "model", str, model.package.manifest.source.get("id", "m3"))
        return JSONResponse(
            {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    async def encode(body: dict) -> Response:
        texts = _texts(_field(body, "texts", (str, list)), "texts", config)
        dense = _field(body, "dense", bool, True)
        sparse = _field(body, "sparse", bool, False)
        colbert = _field(body, "colbert", bool, False)
        sparse_format = _field(body, "sparse_format", str, "dict")
        colbert_format = _field(body, "colbert_format", str, "list")
        if sparse_format not in ("dict", "indices"):
            raise RequestError(422, f"field 'sparse_format' must be 'dict' or 'indices', got {sparse_format!r}")
        if colbert_format not in ("list", "base64-float32", "base64-float16"):
            raise RequestError(
                422, f"field 'colbert_format' must be list, base64-float32 or base64-float16, got {colbert_format!r}"
            )
        opts = options(body, dense=dense, sparse=sparse, colbert=colbert)
        result, tokens = await state["batcher"].encode(texts, opts)
        rows: list[dict[str, Any]] = []
        for i in range(len(texts)):
            row: dict[str, Any] = {}
            if dense:
                row["dense"] = result["dense_vecs"][i].tolist()
            if sparse:
                weights = result["lexical_weights"][i]
                row["sparse"] = (
                    weights
                    if sparse_format == "dict"
                    else {"indices": [int(k) for k in weights], "values": list(weights.values())}
                )
            if colbert:
                vecs = result["colbert_vecs"][i]
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
        return JSONResponse({"results": rows, "usage": {"tokens": tokens}})

    async def score(body: dict) -> Response:
        if not has_heads:
            raise RequestError(400, "/score needs sparse and ColBERT outputs; this package is dense-only")
        pairs = _field(body, "pairs", list)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise RequestError(422, f"field 'pairs[{i}]' must be [query, passage] strings")
        _texts(
            [t for pair in pairs for t in pair],
            "pairs",
            ServerConfig(max_texts=2 * config.max_texts, max_chars=config.max_chars),
        )
        weights = _field(body, "weights", list, None)
        q_len = _field(body, "max_query_length", int, None)
        p_len = _field(body, "max_passage_length", int, None)
        scores = await state["batcher"].run_exclusive(
            lambda: model.compute_score(
                [tuple(p) for p in pairs],
                max_query_length=q_len,
                max_passage_length=p_len,
                weights_for_different_modes=weights,
            )
        )
        return JSONResponse(scores)

    async def health() -> Response:
        return JSONResponse({"status": "ok" if state["ready"] else "loading"}, 200 if state["ready"] else 503)

    async def info() -> Response:
        m = model.package.manifest
        return JSONResponse(
            {
                "model": m.source.get("id"),
                "kind": m.model_kind,
                "variant": model.variant,
                "providers": model.providers,
                "hidden_size": m.hidden_size,
                "max_length": m.max_length,
                "outputs": list(model.outputs),
                "query_instruction": m.query_instruction,
            }
        )

    async def prometheus() -> Response:
        b = state.get("batcher")
        lines = ["# TYPE m3_requests_total counter"]
        lines += [f'm3_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(metrics.requests.items())]
        lines.append("# TYPE m3_request_seconds histogram")
        for path, counts in sorted(metrics.latency.items()):
            total = 0
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                total += count
                lines.append(f'm3_request_seconds_bucket{{path="{path}",le="{bound}"}} {total}')
            lines.append(f'm3_request_seconds_sum{{path="{path}"}} {metrics.latency_sum[path]:.6f}')
            lines.append(f'm3_request_seconds_count{{path="{path}"}} {total}')
        if b is not None:
            sizes = b.stats.batch_sizes
            lines += [
                "# TYPE m3_texts_total counter",
                f"m3_texts_total {b.stats.texts}",
                "# TYPE m3_tokens_total counter",
                f"m3_tokens_total {b.stats.tokens}",
                "# TYPE m3_batches_total counter",
                f"m3_batches_total {b.stats.batches}",
                "# TYPE m3_batch_texts_mean gauge",
                f"m3_batch_texts_mean {np.mean(sizes) if sizes else 0:.3f}",
                "# TYPE m3_queue_texts gauge",
                f"m3_queue_texts {b.queued_texts}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v1/embeddings", endpoint("/v1/embeddings", embeddings), methods=["POST"]),
        Route("/encode", endpoint("/encode", encode), methods=["POST"]),
        Route("/score", endpoint("/score", score), methods=["POST"]),
        Route("/health", endpoint("/health", health), methods=["GET"]),
        Route("/info", endpoint("/info", info), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", prometheus), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and load tests on loopback)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll ``url/health`` until it answers 200; TimeoutError after ``timeout_s``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f} s")


def serve(model: M3Model, *, host: str, port: int, config: ServerConfig) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("m3 serve needs the server extra: pip install 'm3-runtime[server]'") from None
    # uvicorn stops accepting on SIGTERM and waits for in-flight requests; the app's
    # lifespan then drains the batcher's queue before the process exits.
    uvicorn.run(create_app(model, config), host=host, port=port, log_level="info", timeout_graceful_shutdown=60)
