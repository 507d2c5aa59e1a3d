"""text-embeddings-inference's API over the same service (router/src/http/server.rs and
types.rs of TEI): ``/embed``, ``/embed_sparse``, ``/embed_all``, ``/tokenize``, ``/decode``,
``POST /`` and the TEI fields of ``/info``. ``/rerank`` is ``Service.rerank``.

What differs from TEI: ``truncation_direction`` "left" and ``prompt_name`` are refused
(422 and 400) rather than applied; ``normalize: false`` is refused (400) when the
package's graph normalizes its dense vectors; ``/embed_all`` gives the ColBERT vectors
(one per token after ``<s>``), which is what BGE-M3 has per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import __version__
from ..model import M3Model
from ..reranker import M3Reranker
from .errors import RequestError
from .gateway import noted
from .service import Service


class Tei:
    def __init__(self, service: Service) -> None:
        self.service = service

    def _texts(self, args: Any) -> list[str]:
        if args.prompt_name is not None:
            raise RequestError(
                400, f"'prompt_name' {args.prompt_name!r} is not supported: this server's packages have no prompts"
            )
        texts = [args.inputs] if isinstance(args.inputs, str) else args.inputs
        noted(texts=len(texts), inputs=texts)
        return texts

    async def _run(self, args: Any, *, dense: bool = False, sparse: bool = False, colbert: bool = False) -> Any:
        service = self.service
        texts = self._texts(args)
        if not args.truncate:  # TEI's default: a text over the model's length is refused, not cut
            await service.whole_lengths(texts, "inputs")
        return await service.embed(
            texts, max_length=service.model.max_length, dense=dense, sparse=sparse, colbert=colbert
        )

    async def embed(self, args: Any) -> list[list[float]]:
        model = self.service.model
        if args.dimensions is not None and args.dimensions != model.hidden_size:
            raise RequestError(
                400, f"'dimensions' {args.dimensions} is not supported: this model gives {model.hidden_size}-d vectors"
            )
        normalized = model.package.manifest.normalize
        if not args.normalize and normalized:
            raise RequestError(
                400, "'normalize' false is not served: this package's graph normalizes its dense vectors"
            )
        out = await self._run(args, dense=True)
        dense = out.dense
        if args.normalize and not normalized:
            dense = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
        return dense.tolist()

    async def embed_sparse(self, args: Any) -> list[list[dict[str, Any]]]:
        out = await self._run(args, sparse=True)
        return [
            [{"index": int(k), "value": float(v)} for k, v in sorted(weights.items(), key=lambda kv: int(kv[0]))]
            for weights in out.lexical
        ]

    async def embed_all(self, args: Any) -> list[list[list[float]]]:
        out = await self._run(args, colbert=True)
        return [vecs.tolist() for vecs in out.colbert]

    async def tokenize(self, args: Any) -> list[list[dict[str, Any]]]:
        texts = self._texts(args)
        tokenizer = self.service.model.engine.tokenizer
        return tokenizer.tokens(texts, add_special_tokens=args.add_special_tokens)

    async def decode(self, args: Any) -> list[str]:
        rows = args.ids if args.ids and isinstance(args.ids[0], list) else [args.ids]
        tokenizer = self.service.model.engine.tokenizer
        return tokenizer.decode(rows, skip_special_tokens=args.skip_special_tokens)

    def info(self) -> dict[str, Any]:
        """``/info``: TEI's fields (for its clients) beside this server's own (``packages``).

        TEI describes one model; here the embedder if there is one, else the reranker."""
        service = self.service
        held: M3Model | M3Reranker = service._model if service._model is not None else service.reranker
        man = held.package.manifest
        reranker = isinstance(held, M3Reranker)
        model_type: dict[str, Any] = (
            {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
            if reranker
            else {"embedding": {"pooling": man.pooling}}
        )
        cfg = service.config
        return {
            "model_id": man.source.get("id") or str(held.package.root),
            "model_sha": man.source.get("revision"),
            "model_dtype": held.variant,
            "model_type": model_type,
            "max_concurrent_requests": cfg.max_queue,
            "max_input_length": held.max_length if reranker else man.max_length,
            "max_batch_tokens": held.engine.max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": cfg.max_texts,
            "auto_truncate": False,
            "tokenization_workers": 1,
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }
