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
  ``GET /metrics`` (Prometheus text).

Every endpoint's texts go through one ``Scheduler`` (``scheduler.py``). Errors map to
status codes in one place (``error_response``): 422 malformed JSON or wrong field
types (the field is named), 413 too many texts or too long a text, 429 with
``Retry-After`` when the queue is full, 503 when shutting down or past the request
timeout, 400 for valid JSON the model refuses (any ``M3Error``), 500 for anything
else (a bug: logged, never the exception text).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .contract import COLBERT, DENSE, SCORES, SPARSE
from .errors import M3Error, Overloaded
from .heads import sigmoid
from .model import Embeddings, M3Model, gather, pair_scores
from .reranker import M3Reranker
from .scheduler import Histogram, Scheduler

log = logging.getLogger("m3_runtime.server")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class ServerConfig:
    """The server's settings; ``m3 serve``'s option defaults are read from here."""

    max_wait_ms: float = 5.0  # how long the first queued text waits for company
    max_queue: int = 4096  # texts waiting before requests get 429
    max_texts: int = 512  # texts per request (413 above)
    max_chars: int = 200_000  # characters per text (413 above)
    # A request not answered within this many seconds gets 503: what of it is still
    # queued never runs, a running pass's result is discarded. None: no limit.
    request_timeout_s: float | None = 60.0
    workers: int = 1  # forward passes run at once


def error_response(exc: BaseException, config: ServerConfig) -> tuple[int, str, dict[str, str]]:
    """The one map from exceptions to (status, message, headers)."""
    if isinstance(exc, RequestError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, TimeoutError):
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


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)


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


def _texts(value: Any, name: str, *, max_texts: int, max_chars: int) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise RequestError(422, f"field '{name}' must be a string or a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"field '{name}[{i}]' must be a string, got {type(text).__name__}")
        if len(text) > max_chars:
            raise RequestError(413, f"'{name}[{i}]' has {len(text)} characters (limit {max_chars})")
    if len(texts) > max_texts:
        raise RequestError(413, f"'{name}' has {len(texts)} texts (limit {max_texts})")
    return texts


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

    # -- plumbing -------------------------------------------------------------
    async def start(self, *, warm: bool) -> None:
        self.scheduler = Scheduler(
            max_queue=self.config.max_queue, max_wait_ms=self.config.max_wait_ms, workers=self.config.workers
        )
        self.scheduler.start()
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
        return gather(outs, hidden_size=self.model.hidden_size, dense=dense, sparse=sparse, colbert=colbert)

    async def rerank_logits(self, query: str, passages: list[str], *, truncate: bool = True) -> np.ndarray:
        """Raw logits of (query, passage) pairs through the shared scheduler."""
        assert self.scheduler is not None, "the app's lifespan starts the scheduler"
        reranker = self.reranker
        pairs = [(query, p) for p in passages]
        if not truncate:
            limit = reranker.max_length
            whole = reranker.tokenize(pairs, max_length=reranker.engine.max_length, query_max_length=10**9)
            for i, ids in enumerate(whole):
                if len(ids) > limit:
                    raise RequestError(413, f"pair {i} has {len(ids)} tokens (limit {limit}); send truncate=true")
        outs = await self.scheduler.submit(reranker.engine, len(pairs), lambda: reranker.tokenize(pairs), [SCORES])
        return np.array([o.score for o in outs], dtype=np.float32)

    def max_length(self, body: dict, name: str = "max_length", default: int | None = None) -> int:
        value = _field(body, name, int, self.model.passage_max_length if default is None else default)
        if not 2 <= value <= self.model.max_length:
            raise RequestError(422, f"field '{name}' must be in 2..{self.model.max_length}, got {value}")
        return value

    def texts(self, body: dict, name: str) -> list[str]:
        return _texts(
            _field(body, name, (str, list)), name, max_texts=self.config.max_texts, max_chars=self.config.max_chars
        )

    # -- routes ---------------------------------------------------------------
    async def embeddings(self, body: dict) -> dict:
        texts = self.texts(body, "input")
        fmt = _field(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise RequestError(422, f"field 'encoding_format' must be 'float' or 'base64', got {fmt!r}")
        dims = _field(body, "dimensions", int, None)
        if dims is not None and dims != self.model.hidden_size:
            raise RequestError(
                400, f"'dimensions' {dims} is not supported: this model gives {self.model.hidden_size}-d vectors"
            )
        name = _field(body, "model", str, self.model.package.manifest.source.get("id", "m3"))
        out = await self.embed(texts, max_length=self.max_length(body), dense=True, sparse=False, colbert=False)
        assert out.dense is not None
        data = [
            {"object": "embedding", "index": i, "embedding": _b64(v) if fmt == "base64" else v.tolist()}
            for i, v in enumerate(out.dense)
        ]
        tokens = int(out.tokens.sum())
        return {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def encode(self, body: dict) -> dict:
        texts = self.texts(body, "texts")
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
        out = await self.embed(texts, max_length=self.max_length(body), dense=dense, sparse=sparse, colbert=colbert)
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
        if not self.has_heads:
            raise RequestError(400, "/score needs sparse and ColBERT outputs; this package is dense-only")
        pairs = _field(body, "pairs", list)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise RequestError(422, f"field 'pairs[{i}]' must be [query, passage] strings")
        _texts(
            [t for pair in pairs for t in pair],
            "pairs",
            max_texts=2 * self.config.max_texts,
            max_chars=self.config.max_chars,
        )
        from .scoring import check_mode_weights

        weights = _field(body, "weights", list, None)
        weights = [1.0, 1.0, 1.0] if weights is None else weights
        check_mode_weights(weights)
        q_len = self.max_length(body, "max_query_length", self.model.query_max_length)
        p_len = self.max_length(body, "max_passage_length", self.model.passage_max_length)
        every = {"dense": True, "sparse": True, "colbert": True}
        q, p = await asyncio.gather(
            self.embed([a for a, _ in pairs], max_length=q_len, **every),
            self.embed([b for _, b in pairs], max_length=p_len, **every),
        )
        return dict(pair_scores(q, p, weights=weights, chunk=self.model.batch_size))

    async def rerank(self, body: dict) -> list[dict]:
        query = _field(body, "query", str)
        texts = self.texts(body, "texts")
        raw = _field(body, "raw_scores", bool, False)
        return_text = _field(body, "return_text", bool, False)
        truncate = _field(body, "truncate", bool, True)
        logits = await self.rerank_logits(query, texts, truncate=truncate)
        scores = logits.astype(np.float64) if raw else sigmoid(logits)
        rows = [{"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")]
        if return_text:
            for row in rows:
                row["text"] = texts[row["index"]]
        return rows

    async def cohere_rerank(self, body: dict) -> dict:
        query = _field(body, "query", str)
        docs = _field(body, "documents", list)
        texts = []
        for i, doc in enumerate(docs):
            text = doc.get("text") if isinstance(doc, dict) else doc
            if not isinstance(text, str):
                raise RequestError(422, f"field 'documents[{i}]' must be a string or an object with a string 'text'")
            texts.append(text)
        _texts(texts, "documents", max_texts=self.config.max_texts, max_chars=self.config.max_chars)
        top_n = _field(body, "top_n", int, None)
        if top_n is not None and top_n < 1:
            raise RequestError(422, f"field 'top_n' must be >= 1, got {top_n}")
        return_documents = _field(body, "return_documents", bool, False)
        scores = sigmoid(await self.rerank_logits(query, texts))  # relevance in 0..1, as Cohere's
        results: list[dict[str, Any]] = []
        for i in np.argsort(-scores, kind="stable")[:top_n]:
            row: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if return_documents:
                row["document"] = {"text": texts[i]}
            results.append(row)
        name = _field(body, "model", str, self.reranker.package.manifest.source.get("id", "m3-reranker"))
        return {"results": results, "model": name, "meta": {"billed_units": {"search_units": 1}}}

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


def create_app(
    model: M3Model | None,
    config: ServerConfig | None = None,
    *,
    warm: bool = True,
    reranker: M3Reranker | None = None,
):
    from starlette.applications import Starlette
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

    def post(path: str, handler: Callable[[dict], Awaitable[dict | list]]) -> Route:
        async def route(request: Request) -> Response:
            start = time.perf_counter()
            try:
                try:
                    body = json.loads(await request.body())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(422, f"request body is not valid JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise RequestError(422, "request body must be a JSON object")
                response: Response = JSONResponse(await asyncio.wait_for(handler(body), config.request_timeout_s))
            except Exception as exc:
                status, message, headers = error_response(exc, config)
                response = JSONResponse({"error": {"message": message, "code": status}}, status, headers=headers)
            service.metrics.observe(path, response.status_code, time.perf_counter() - start)
            return response

        return Route(path, route, methods=["POST"])

    def get(path: str, handler: Callable[[], Response]) -> Route:
        async def route(_request: Request) -> Response:
            start = time.perf_counter()
            response = handler()
            service.metrics.observe(path, response.status_code, time.perf_counter() - start)
            return response

        return Route(path, route, methods=["GET"])

    routes = [
        post("/v1/embeddings", service.embeddings),
        post("/encode", service.encode),
        post("/score", service.score),
        post("/rerank", service.rerank),
        post("/v1/rerank", service.cohere_rerank),
        post("/v2/rerank", service.cohere_rerank),
        get(
            "/health",
            lambda: JSONResponse({"status": "ok" if service.ready else "loading"}, 200 if service.ready else 503),
        ),
        get("/info", lambda: JSONResponse(service.info())),
        get("/metrics", lambda: PlainTextResponse(service.prometheus(), media_type="text/plain; version=0.0.4")),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


def serve(
    model: M3Model | None, *, host: str, port: int, config: ServerConfig, reranker: M3Reranker | None = None
) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("m3 serve needs the server extra: pip install 'm3-runtime[server]'") from None
    # uvicorn stops accepting on SIGTERM and waits for in-flight requests; the app's
    # lifespan then drains the scheduler's queue before the process exits.
    uvicorn.run(
        create_app(model, config, reranker=reranker),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=60,
    )
