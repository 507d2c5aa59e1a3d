"""The handlers over the scheduler: the models, their scheduler, readiness, and one method
per endpoint taking the endpoint's parsed request (``schemas``) and returning its answer."""

from __future__ import annotations

import asyncio
import base64
import math
import uuid
from typing import Any

import numpy as np

from ..contract import COLBERT, DENSE, SCORES, SPARSE
from ..errors import M3Error
from ..heads import sigmoid
from ..model import Embeddings, M3Model, gather, pair_scores
from ..reranker import M3Reranker
from ..scheduler import Scheduler
from . import schemas
from .config import ServerConfig
from .errors import RequestError
from .gateway import NOTE, noted
from .metrics import Metrics
from .watch import PackageWatch

# Token counts up to this are "whole" when a client asks not to truncate (truncate=false).
_WHOLE = 1 << 30


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def finite(out: Embeddings) -> Embeddings:
    """``out`` unchanged, or a 500 naming the first text whose outputs hold NaN or infinity.

    The answers are written by orjson, which writes NaN as ``null`` where the standard
    library refused: this check keeps a broken model from answering ``null`` as a number."""
    for name, rows in (
        ("dense", out.dense),
        ("colbert", out.colbert),
        ("sparse", None if out.lexical is None else [np.fromiter(w.values(), np.float32) for w in out.lexical]),
    ):
        for i, row in enumerate(rows if rows is not None else ()):
            if not np.isfinite(row).all():
                raise RequestError(500, f"the model's {name} output for text {i} holds NaN or infinity")
    return out


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
        limits: dict[str, Any] = {}
        if model is not None:
            limits.update(
                hidden_size=model.hidden_size,
                max_length=model.max_length,
                passage_max_length=model.passage_max_length,
                query_max_length=model.query_max_length,
                model_id=model.package.manifest.source.get("id", "m3"),
                vocab_size=model.package.manifest.vocab_size,
            )
        if reranker is not None:
            limits.update(
                reranker_id=reranker.package.manifest.source.get("id", "m3-reranker"),
                reranker_max_length=reranker.max_length,
            )
        self.endpoints = schemas.build(
            schemas.Limits(
                max_texts=config.max_texts,
                max_chars=config.max_chars,
                embedder=model is not None,
                reranker=reranker is not None,
                **limits,
            )
        )
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

    def endpoint(self, path: str) -> schemas.Endpoint:
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
            on_batch=self.metrics.on_batch,
        )
        scheduler = self.scheduler
        self.metrics.watch_queue(lambda: scheduler.queued_texts)
        scheduler.start()
        for held in (self._model, self._reranker):
            if held is not None:
                await scheduler.prepare(held.engine)
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
        note = NOTE.get()
        if note is not None:
            note.add_tokens(sum(o.tokens for o in outs))
        return finite(gather(outs, hidden_size=self.model.hidden_size, dense=dense, sparse=sparse, colbert=colbert))

    async def whole_lengths(self, texts: list[str], field: str) -> None:
        """413 naming the first text longer than the model takes (for truncate=false)."""
        model = self.model
        ids = await asyncio.to_thread(model.engine.tokenizer.encode, texts, _WHOLE)  # off the event loop
        for i, row in enumerate(ids):
            if len(row) > model.max_length:
                raise RequestError(
                    413, f"'{field}[{i}]' has {len(row)} tokens (limit {model.max_length}); send truncate=true"
                )

    async def rerank_logits(self, query: str, passages: list[str], *, truncate: bool = True) -> np.ndarray:
        """Raw logits of (query, passage) pairs through the shared scheduler."""
        assert self.scheduler is not None, "the app's lifespan starts the scheduler"
        reranker = self.reranker
        pairs = [(query, p) for p in passages]
        if not truncate:
            limit = reranker.max_length
            # Whole, untruncated pairs (the reranker's tokenize stops at the engine's length),
            # off the event loop: up to max_texts of them.
            whole = await asyncio.to_thread(
                reranker.tokenizer.encode_pairs,
                reranker._detailed(pairs),
                max_length=_WHOLE,
                query_max_length=_WHOLE,
            )
            for i, ids in enumerate(whole):
                if len(ids) > limit:
                    raise RequestError(413, f"pair {i} has {len(ids)} tokens (limit {limit}); send truncate=true")
        note = NOTE.get()  # read here: the tokenizer's thread does not see this context

        def tokenize() -> list[list[int]]:
            ids = reranker.tokenize(pairs)
            if note is not None:
                note.add_tokens(sum(len(x) for x in ids))
            return ids

        outs = await self.scheduler.submit(reranker.engine, len(pairs), tokenize, [SCORES])
        logits = np.array([o.score for o in outs], dtype=np.float32)
        if not np.isfinite(logits).all():
            raise RequestError(
                500, f"the reranker's logit for pair {int(np.flatnonzero(~np.isfinite(logits))[0])} is NaN or infinite"
            )
        return logits

    # -- native and OpenAI routes -------------------------------------------------
    async def embeddings(self, args: Any) -> dict:
        texts = _texts(args.input)
        noted(texts=len(texts), inputs=texts)
        dims = args.dimensions
        if dims is not None and dims != self.model.hidden_size:
            raise RequestError(
                400, f"'dimensions' {dims} is not supported: this model gives {self.model.hidden_size}-d vectors"
            )
        out = await self.embed(texts, max_length=args.max_length, dense=True, sparse=False, colbert=False)
        assert out.dense is not None
        base64_ = args.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": b64(v) if base64_ else v.tolist()}
            for i, v in enumerate(out.dense)
        ]
        tokens = int(out.tokens.sum())
        return {
            "object": "list",
            "data": data,
            "model": args.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def encode(self, args: Any) -> dict:
        texts = _texts(args.texts)
        noted(texts=len(texts), inputs=texts)
        out = await self.embed(
            texts, max_length=args.max_length, dense=args.dense, sparse=args.sparse, colbert=args.colbert
        )
        rows: list[dict[str, Any]] = []
        for i in range(len(texts)):
            row: dict[str, Any] = {}
            if out.dense is not None:
                row["dense"] = out.dense[i].tolist()
            if out.lexical is not None:
                weights = out.lexical[i]
                row["sparse"] = (
                    weights
                    if args.sparse_format == "dict"
                    else {"indices": [int(k) for k in weights], "values": list(weights.values())}
                )
            if out.colbert is not None:
                vecs = out.colbert[i]
                if args.colbert_format == "list":
                    row["colbert"] = vecs.tolist()
                else:
                    dtype = np.float16 if args.colbert_format.endswith("16") else np.float32
                    row["colbert"] = {
                        "shape": list(vecs.shape),
                        "dtype": np.dtype(dtype).name,
                        "data": b64(vecs.astype(dtype)),
                    }
            rows.append(row)
        return {"results": rows, "usage": {"tokens": int(out.tokens.sum())}}

    async def score(self, args: Any) -> dict:
        if not self.has_heads:
            raise RequestError(400, "/score needs sparse and ColBERT outputs; this package is dense-only")
        pairs = [tuple(p) for p in args.pairs]
        noted(texts=2 * len(pairs), inputs=[t for pair in pairs for t in pair])
        from ..scoring import check_mode_weights

        weights = list(args.weights)
        try:
            check_mode_weights(weights)
        except M3Error as exc:
            raise RequestError(400, f"field 'weights': {exc}") from None
        every = {"dense": True, "sparse": True, "colbert": True}
        q, p = await asyncio.gather(
            self.embed([a for a, _ in pairs], max_length=args.max_query_length, **every),
            self.embed([b for _, b in pairs], max_length=args.max_passage_length, **every),
        )
        scores = dict(pair_scores(q, p, weights=weights, chunk=self.model.batch_size))
        if not all(math.isfinite(x) for values in scores.values() for x in values):
            raise RequestError(422, f"field 'weights' {weights} gives scores that are not finite numbers")
        return scores

    async def rerank(self, args: Any) -> list[dict]:
        texts = _texts(args.texts)
        noted(texts=len(texts), inputs=[args.query, *texts])
        logits = await self.rerank_logits(args.query, texts, truncate=args.truncate)
        scores = logits.astype(np.float64) if args.raw_scores else sigmoid(logits)
        rows: list[dict[str, Any]] = [
            {"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")
        ]
        if args.return_text:
            for row in rows:
                row["text"] = texts[row["index"]]
        return rows

    async def cohere_rerank(self, args: Any) -> dict:
        texts = [doc if isinstance(doc, str) else doc.text for doc in args.documents]
        noted(texts=len(texts), inputs=[args.query, *texts])
        scores = sigmoid(await self.rerank_logits(args.query, texts))  # relevance in 0..1, as Cohere's
        results: list[dict[str, Any]] = []
        for i in np.argsort(-scores, kind="stable")[: args.top_n]:
            row: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if args.return_documents:
                row["document"] = {"text": texts[i]}
            results.append(row)
        note = NOTE.get()
        return {
            "id": note.request_id if note is not None else uuid.uuid4().hex,
            "results": results,
            "model": args.model,
            "meta": {"billed_units": {"search_units": 1}},
        }

    def models(self) -> dict:
        """OpenAI's model list: the packages served, by the id their answers echo."""
        held: list[tuple[M3Model | M3Reranker, str]] = [(m, "m3") for m in (self._model,) if m is not None]
        held += [(r, "m3-reranker") for r in (self._reranker,) if r is not None]
        return {
            "object": "list",
            "data": [
                {"id": m.package.manifest.source.get("id", default), "object": "model", "created": 0, "owned_by": "m3"}
                for m, default in held
            ],
        }
