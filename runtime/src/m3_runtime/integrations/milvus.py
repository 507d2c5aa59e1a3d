"""Milvus and Milvus Lite: a collection for BGE-M3's dense and lexical outputs, and rows for it.

Extra ``m3-runtime[milvus]`` (``pymilvus``, ``milvus-lite``, ``scipy``). Milvus Lite is
``pymilvus.MilvusClient("file.db")``: the engine in a local file, no server.

::

    client = MilvusClient("corpus.db")
    create_collection(client, "docs", dim=model.hidden_size)
    out = model.encode_corpus(texts, return_sparse=True)
    client.insert("docs", rows_from_encode(ids, out, payloads=[{"text": t} for t in texts]))
    q = model.encode_queries(query, return_sparse=True)
    client.search("docs", data=[q["dense_vecs"]], anns_field="dense", limit=10)
    client.search("docs", data=[sparse_vector(q["lexical_weights"])], anns_field="sparse", limit=10)

The collection: primary key ``id`` (INT64 or VARCHAR), ``dense`` FLOAT_VECTOR with a
FLAT index and IP metric (exact search), ``sparse`` SPARSE_FLOAT_VECTOR with
SPARSE_INVERTED_INDEX and IP (the only sparse index Milvus Lite builds), and a dynamic
field for payloads (e.g. the text).

How Milvus's scores relate to FlagEmbedding's (the test checks each against a NumPy brute
force over the same outputs, with the runtime's scoring functions):

- dense, IP: ``q . p``, FlagEmbedding's dense score (the vectors are unit length).
- sparse, IP: ``sum of q[t] * p[t]`` over shared token ids, exactly
  ``compute_lexical_matching_score``. A sparse search returns only rows that share a token
  with the query (score > 0); an empty query returns no rows.
- ``hybrid_search`` with ``WeightedRanker(w_d, w_s)``: per row, the sum over the requests
  that returned it (each keeps its own ``limit`` best) of ``w * f(score)``, where
  ``f(s) = 0.5 + arctan(s) / pi`` with ``norm_score=True`` (the default) and ``f(s) = s``
  with ``norm_score=False``. With ``norm_score=False`` and weights ``w0 / (w0 + w1)``,
  ``w1 / (w0 + w1)``, a row returned by both requests scores FlagEmbedding's
  ``sparse+dense`` for ``weights_for_different_modes=[w0, w1, ...]``; arctan changes the order.
- ColBERT vectors are not stored here; rerank candidates with ``M3Model.colbert_score``,
  or use the Qdrant integration, which stores them as a multivector.

Empty lexical weights. BGE-M3 gives the empty text, and texts of only special tokens,
no lexical weights at all, and Milvus Lite 3.2.2 refuses such a row ("sparse vector must
contain at least one nonzero float32 weight"); a nullable sparse field does not help, as
it refuses ``None`` and a missing value too ("FieldData 'sparse' has neither scalars nor
vectors"). So the row helpers take ``empty_sparse``:

- ``"error"`` (default): a ``ValueError`` naming the row and its id, before anything is
  sent, so no batch is half inserted;
- ``"placeholder"``: store ``{PLACEHOLDER_INDEX: 1.0}``, an index past any vocabulary
  (2**32 - 2, the largest Milvus allows). No BGE-M3 query has that index, so the row's
  sparse score is 0 against every query, as FlagEmbedding's would be, and it is never a
  sparse hit, while its dense vector is searchable like any other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._common import MAX_SPARSE_INDEX, Outputs, from_encode, from_table, lexical_arrays, load_model, missing, select

if TYPE_CHECKING:
    from ..model import M3Model

EmptySparse = Literal["error", "placeholder"]
IdType = Literal["int64", "varchar"]
Output = Literal["dense", "sparse"]
ALL_OUTPUTS: tuple[Output, ...] = ("dense", "sparse")

PLACEHOLDER_INDEX = MAX_SPARSE_INDEX
PLACEHOLDER_WEIGHT = 1.0


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise missing("pymilvus", "milvus") from None
    return pymilvus


def create_schema(
    dim: int,
    *,
    id_type: IdType = "int64",
    max_id_length: int = 512,
    dense: bool = True,
    sparse: bool = True,
    id_field: str = "id",
    dense_field: str = "dense",
    sparse_field: str = "sparse",
    enable_dynamic_field: bool = True,
) -> Any:
    """A ``CollectionSchema``: primary key, FLOAT_VECTOR of ``dim`` and/or SPARSE_FLOAT_VECTOR."""
    pymilvus = _pymilvus()
    if not (dense or sparse):
        raise ValueError("a collection needs the dense or the sparse field (or both)")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be the model's hidden size (an integer >= 2), got {dim!r}")
    types = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=enable_dynamic_field)
    if id_type == "int64":
        schema.add_field(id_field, types.INT64, is_primary=True)
    elif id_type == "varchar":
        schema.add_field(id_field, types.VARCHAR, is_primary=True, max_length=max_id_length)
    else:
        raise ValueError(f"id_type must be 'int64' or 'varchar', got {id_type!r}")
    if dense:
        schema.add_field(dense_field, types.FLOAT_VECTOR, dim=dim)
    if sparse:
        schema.add_field(sparse_field, types.SPARSE_FLOAT_VECTOR)
    return schema


def index_params(
    client: Any,
    *,
    dense: bool = True,
    sparse: bool = True,
    dense_field: str = "dense",
    sparse_field: str = "sparse",
    dense_index_type: str = "FLAT",
    dense_index_params: Mapping[str, Any] | None = None,
) -> Any:
    """IP indexes: ``dense_index_type`` (FLAT: exact) on the dense field, SPARSE_INVERTED_INDEX on the sparse one."""
    params = client.prepare_index_params()
    if dense:
        params.add_index(
            field_name=dense_field,
            index_type=dense_index_type,
            metric_type="IP",
            params=dict(dense_index_params or {}),
        )
    if sparse:
        params.add_index(field_name=sparse_field, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    return params


def create_collection(
    client: Any,
    name: str,
    *,
    dim: int,
    id_type: IdType = "int64",
    max_id_length: int = 512,
    dense: bool = True,
    sparse: bool = True,
    id_field: str = "id",
    dense_field: str = "dense",
    sparse_field: str = "sparse",
    dense_index_type: str = "FLAT",
    dense_index_params: Mapping[str, Any] | None = None,
) -> None:
    """Create (and load) the collection :func:`create_schema` and :func:`index_params` describe."""
    schema = create_schema(
        dim,
        id_type=id_type,
        max_id_length=max_id_length,
        dense=dense,
        sparse=sparse,
        id_field=id_field,
        dense_field=dense_field,
        sparse_field=sparse_field,
    )
    params = index_params(
        client,
        dense=dense,
        sparse=sparse,
        dense_field=dense_field,
        sparse_field=sparse_field,
        dense_index_type=dense_index_type,
        dense_index_params=dense_index_params,
    )
    client.create_collection(name, schema=schema, index_params=params)


def sparse_vector(weights: Mapping[str, float]) -> dict[int, float]:
    """One text's ``lexical_weights`` as a Milvus sparse vector ``{token_id: weight}`` (search data).

    An empty dict stays empty: Milvus accepts it as a query and returns no rows.
    """
    idx, val = lexical_arrays(weights, where="lexical weights")
    return dict(zip(idx.tolist(), val.tolist(), strict=True))


def _rows(
    out: Outputs,
    payloads: Sequence[Mapping[str, Any]] | None,
    *,
    empty_sparse: EmptySparse,
    id_field: str,
    dense_field: str,
    sparse_field: str,
    outputs: Sequence[Output],
) -> list[dict[str, Any]]:
    out = select(out, outputs, allowed=ALL_OUTPUTS, what="vector fields")
    if empty_sparse not in ("error", "placeholder"):
        raise ValueError(f"empty_sparse must be 'error' or 'placeholder', got {empty_sparse!r}")
    n = len(out)
    if payloads is not None and len(payloads) != n:
        raise ValueError(f"{len(payloads)} payloads for {n} rows")
    rows: list[dict[str, Any]] = []
    for i, row_id in enumerate(out.ids):
        row: dict[str, Any] = dict(payloads[i]) if payloads is not None else {}
        clash = {id_field, dense_field, sparse_field} & set(row)
        if clash:
            raise ValueError(f"payloads[{i}] uses the field name(s) {sorted(clash)} of the id or a vector")
        row[id_field] = row_id
        if out.dense is not None:
            row[dense_field] = out.dense[i]
        if out.sparse is not None:
            idx, val = out.sparse[i]
            if idx.size == 0:
                if empty_sparse == "error":
                    raise ValueError(
                        f"row {i} (id {row_id!r}) has no lexical weights (the empty text, or only special tokens), "
                        "and Milvus refuses an empty sparse vector; pass empty_sparse='placeholder' to store a "
                        f"placeholder index ({PLACEHOLDER_INDEX}) that no query matches"
                    )
                row[sparse_field] = {PLACEHOLDER_INDEX: PLACEHOLDER_WEIGHT}
            else:
                row[sparse_field] = dict(zip(idx.tolist(), val.tolist(), strict=True))
        rows.append(row)
    return rows


def rows_from_encode(
    ids: Sequence[int | str],
    output: Mapping[str, Any],
    *,
    payloads: Sequence[Mapping[str, Any]] | None = None,
    empty_sparse: EmptySparse = "error",
    id_field: str = "id",
    dense_field: str = "dense",
    sparse_field: str = "sparse",
    outputs: Sequence[Output] = ALL_OUTPUTS,
) -> list[dict[str, Any]]:
    """Rows for ``client.insert`` from ``M3Model.encode(...)`` output (``return_sparse=True`` for the sparse field).

    ``outputs``: the vector fields the collection holds (default both, as
    :func:`create_collection` makes it); each must be in ``output``, or a ``ValueError``
    names the row's id and the missing output. Pass ``outputs=("dense",)`` for a
    dense-only collection.

    Dense vectors go in as float32 arrays (pymilvus takes them as they are), sparse ones
    as ``{token_id: weight}`` with ascending ids. ``payloads``: extra fields per row (the
    collection's dynamic field stores them).
    """
    return _rows(
        from_encode(ids, output),
        payloads,
        empty_sparse=empty_sparse,
        id_field=id_field,
        dense_field=dense_field,
        sparse_field=sparse_field,
        outputs=outputs,
    )


def rows_from_table(
    table: Any,
    *,
    id_column: str = "id",
    payload_columns: Sequence[str] = (),
    empty_sparse: EmptySparse = "error",
    id_field: str = "id",
    dense_field: str = "dense",
    sparse_field: str = "sparse",
    outputs: Sequence[Output] = ALL_OUTPUTS,
) -> list[dict[str, Any]]:
    """Rows from an ``m3 embed-corpus`` output (a pyarrow Table or RecordBatch read from its Parquet).

    ``outputs``: as :func:`rows_from_encode`.

    Columns ``dense`` and ``sparse_indices``/``sparse_values`` become the vector fields,
    ``payload_columns`` (e.g. ``("tokens",)``) plain fields. Read big files in batches:
    ``for b in pyarrow.parquet.ParquetFile(path).iter_batches(1024): client.insert(name, rows_from_table(b))``.
    """
    payloads = None
    if payload_columns:
        missing_cols = [c for c in payload_columns if c not in table.column_names]
        if missing_cols:
            raise ValueError(f"table has no column(s) {missing_cols} (columns: {', '.join(table.column_names)})")
        values = {c: table.column(c).to_pylist() for c in payload_columns}
        payloads = [{c: values[c][i] for c in payload_columns} for i in range(table.num_rows)]
    return _rows(
        from_table(table, id_column=id_column),
        payloads,
        empty_sparse=empty_sparse,
        id_field=id_field,
        dense_field=dense_field,
        sparse_field=sparse_field,
        outputs=outputs,
    )


class M3EmbeddingFunction:
    """pymilvus' ``BGEM3EmbeddingFunction`` interface (``pymilvus.model.hybrid``) over ``M3Model``.

    ``encode_documents(texts)`` / ``encode_queries(texts)`` / ``__call__(texts)`` return a
    dict with, as asked, ``"dense"`` (a list of float32 ``[dim]`` arrays), ``"sparse"`` (a
    ``scipy.sparse.csr_array`` of float64, shape ``(len(texts), dim["sparse"])``, sorted
    column indices) and ``"colbert_vecs"`` (a list of float32 ``[len_i, dim]`` arrays),
    the types pymilvus' own class returns. ``dim`` is
    ``{"dense": hidden, "colbert_vecs": hidden, "sparse": vocabulary size}``.

    Differences from pymilvus' class: it takes an exported package (or a loaded
    ``M3Model``) instead of a hub name, and ``model_kwargs`` go to ``M3Model`` (pick the
    variant and providers there instead of ``use_fp16``/``device``); ``batch_size=None``
    keeps ``M3Model``'s length-aware batching; ``encode_queries`` goes through
    ``M3Model.encode_queries`` (the package's query instruction and query truncation,
    512 tokens; BGE-M3 has no instruction) where pymilvus calls ``encode`` for both;
    no texts give an empty ``(0, vocab)`` matrix where pymilvus' ``vstack`` raises.

    pymilvus' ``MilvusClient.search`` takes one query's sparse row as ``[out["sparse"][[0]]]``
    (a list of one-row matrices); a bare ``csr_array`` fails inside pymilvus 3.0.2
    ("sparse array length is ambiguous").
    """

    def __init__(
        self,
        model_name: str | os.PathLike[str] | M3Model,
        batch_size: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert_vecs: bool = False,
        **model_kwargs: Any,
    ) -> None:
        self.model = load_model(model_name, model_kwargs)
        self.batch_size = batch_size
        self._encode_config = {
            "return_dense": return_dense,
            "return_sparse": return_sparse,
            "return_colbert_vecs": return_colbert_vecs,
        }

    @property
    def dim(self) -> dict[str, int]:
        hidden = int(self.model.hidden_size)
        return {"dense": hidden, "colbert_vecs": hidden, "sparse": int(self.model.tokenizer.vocab_size)}

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        return self.encode_documents(texts)

    def encode_documents(self, documents: Sequence[str]) -> dict[str, Any]:
        return self._results(
            self.model.encode_corpus(list(documents), batch_size=self.batch_size, **self._encode_config)
        )

    def encode_queries(self, queries: Sequence[str]) -> dict[str, Any]:
        return self._results(
            self.model.encode_queries(list(queries), batch_size=self.batch_size, **self._encode_config)
        )

    def _results(self, output: Mapping[str, Any]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if self._encode_config["return_dense"]:
            results["dense"] = list(output["dense_vecs"])
        if self._encode_config["return_sparse"]:
            results["sparse"] = self._csr(output["lexical_weights"])
        if self._encode_config["return_colbert_vecs"]:
            results["colbert_vecs"] = output["colbert_vecs"]
        return results

    def _csr(self, lexical: Sequence[Mapping[str, float]]) -> Any:
        try:
            from scipy.sparse import csr_array
        except ImportError:
            raise missing("scipy", "milvus") from None
        width = self.dim["sparse"]
        rows = [lexical_arrays(w, where=f"text {i}") for i, w in enumerate(lexical)]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(i) for i, _ in rows])
        indices = np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, np.int64)
        data = np.concatenate([v for _, v in rows]).astype(np.float64) if rows else np.zeros(0, np.float64)
        if indices.size and indices.max() >= width:
            raise ValueError(f"token id {int(indices.max())} is outside the vocabulary of {width}")
        # scipy picks the index dtype (int32 here, as pymilvus' per-row construction gets).
        return csr_array((data, indices, indptr), shape=(len(rows), width))


BGEM3EmbeddingFunction = M3EmbeddingFunction  # the name to change only the import

__all__ = [
    "PLACEHOLDER_INDEX",
    "BGEM3EmbeddingFunction",
    "M3EmbeddingFunction",
    "create_collection",
    "create_schema",
    "index_params",
    "rows_from_encode",
    "rows_from_table",
    "sparse_vector",
]
