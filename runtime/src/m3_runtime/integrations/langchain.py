"""LangChain: an ``Embeddings`` (``langchain_core.embeddings``) over ``M3Model``'s dense vectors.

Extra ``m3-runtime[langchain]`` (``langchain-core``)::

    from m3_runtime.integrations.langchain import M3Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(M3Embeddings("bge-m3-package"))
    store.add_texts(texts)
    store.similarity_search("what is BGE M3?", k=4)

``embed_documents`` is ``encode_corpus(texts)["dense_vecs"]`` and ``embed_query`` is
``encode_queries(text)["dense_vecs"]``, which prepends the package's query instruction
(bge-*-en-v1.5 have one, BGE-M3 none) and truncates at the query length (512 tokens).
The vectors are unit length, so a store's cosine, dot product and FlagEmbedding's dense
score order the same. The async methods are langchain-core's (the sync ones in an
executor thread; ONNX Runtime sessions take concurrent calls).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._common import load_model, missing

try:
    from langchain_core.embeddings import Embeddings
except ImportError:
    raise missing("langchain-core", "langchain") from None

if TYPE_CHECKING:
    from ..model import M3Model


class M3Embeddings(Embeddings):
    """``Embeddings`` over ``M3Model``: an exported package directory, or a loaded model.

    ``batch_size``: most texts per forward pass (``None``: the model's own, batched by
    length); ``model_kwargs`` go to ``M3Model`` when a directory is given (``variant``,
    ``providers``, ...).
    """

    def __init__(
        self, model: str | os.PathLike[str] | M3Model, *, batch_size: int | None = None, **model_kwargs: Any
    ) -> None:
        self.model = load_model(model, model_kwargs)
        self.batch_size = batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("embed_documents takes a list of texts; use embed_query for one text")
        out = self.model.encode_corpus(list(texts), batch_size=self.batch_size)
        return out["dense_vecs"].tolist()

    def embed_query(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes one text (str), got {type(text).__name__}")
        out = self.model.encode_queries([text], batch_size=self.batch_size)
        return out["dense_vecs"][0].tolist()


__all__ = ["M3Embeddings"]
