"""Where BGE-M3's outputs go: vector databases and the embedding interfaces frameworks call.

Each submodule needs its own extra and imports it only when used (or, for LangChain,
when the submodule is imported); importing this package imports none of them, and none
imports torch or transformers.

- ``m3_runtime.integrations.milvus`` (``m3-runtime[milvus]``): a Milvus / Milvus Lite
  collection for the dense and lexical outputs, rows from ``encode`` output or
  ``m3 embed-corpus`` Parquet, and ``M3EmbeddingFunction``, pymilvus'
  ``BGEM3EmbeddingFunction`` interface.
- ``m3_runtime.integrations.qdrant`` (``m3-runtime[qdrant]``): named dense, sparse and
  ColBERT multivector vectors, points from either source, and a dense + sparse prefetch
  reranked by ColBERT MAX_SIM.
- ``m3_runtime.integrations.langchain`` (``m3-runtime[langchain]``): ``M3Embeddings``, a
  LangChain ``Embeddings``.

docs/integrations.md has the details: what each database requires, the empty text, and
how each database's scores relate to FlagEmbedding's.
"""
