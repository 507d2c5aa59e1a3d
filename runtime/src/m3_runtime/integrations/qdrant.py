"""Qdrant: named vectors for BGE-M3's dense, lexical and ColBERT outputs, points, and a hybrid query.

Extra ``m3-runtime[qdrant]`` (``qdrant-client``; its local mode, ``QdrantClient(path=...)``,
needs no server).

::

    client = QdrantClient(path="qdrant-data")
    create_collection(client, "docs", dim=model.hidden_size)
    out = model.encode_corpus(texts, return_sparse=True, return_colbert_vecs=True)
    client.upsert("docs", points_from_encode(ids, out, payloads=[{"text": t} for t in texts]))
    q = model.encode_queries(query, return_sparse=True, return_colbert_vecs=True)
    hits = query_hybrid(client, "docs", q, limit=10)

The collection has three named vectors: ``dense`` (DOT or COSINE), ``sparse`` (a sparse
vector with no IDF modifier: BGE-M3's weights are learnt and used as they are) and
``colbert``, a multivector with the ``MAX_SIM`` comparator (DOT), its HNSW graph off
(``m=0``), as Qdrant advises for a vector used only to rerank, and optionally stored as
float16.

How Qdrant's scores relate to FlagEmbedding's (the test checks each against a NumPy brute
force over the same outputs, with the runtime's scoring functions):

- dense, DOT: ``q . p``, FlagEmbedding's dense score. COSINE gives the same numbers up to
  float32 rounding, since BGE-M3's dense vectors are unit length (Qdrant normalises them
  again on upload).
- sparse: ``sum of q[t] * p[t]`` over shared indices, exactly
  ``compute_lexical_matching_score``. Only points sharing an index with the query are
  returned; an empty query returns none.
- ``colbert``, MAX_SIM: ``sum_i max_j q_i . p_j``, summed over the query's token vectors,
  where FlagEmbedding's ``colbert_score`` averages: divide Qdrant's score by
  ``len(q["colbert_vecs"])`` to get FlagEmbedding's number (the order is the same).
- :func:`query_hybrid` takes the ``prefetch_limit`` best points by dense score and by
  sparse score, and orders their union by the ColBERT MAX_SIM score.

What Qdrant requires, handled here: point ids are unsigned 64-bit integers or UUIDs
(:func:`point_id` keeps those, maps any other string to a UUID5, and the original id goes
in the payload under ``id_key``); sparse indices are unique (sorted here); a multivector
has at least one vector (BGE-M3 always gives one: the empty text has its ``</s>`` row);
vectors are lists of floats. An empty sparse vector (the empty text, or only special
tokens) is accepted as it is: it scores 0 against every query and is never a sparse hit.
float16 ColBERT: Qdrant's local mode ignores the ``datatype``, so the vectors are rounded
to float16 here before they are sent, and a local collection scores what a server one
stores. The query's vectors stay float32.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ._common import Outputs, from_encode, from_table, lexical_arrays, missing, select

Distance = Literal["dot", "cosine"]
ColbertDtype = Literal["float32", "float16"]
Output = Literal["dense", "sparse", "colbert"]
ALL_OUTPUTS: tuple[Output, ...] = ("dense", "sparse", "colbert")

# Fixed, so a string id maps to the same UUID in every process and every run.
ID_NAMESPACE = uuid.UUID("6f1c1c56-3c57-4bd2-a2ad-9f3f2f1b3b6e")


def _models() -> Any:
    try:
        from qdrant_client import models
    except ImportError:
        raise missing("qdrant-client", "qdrant") from None
    return models


def create_collection(
    client: Any,
    name: str,
    *,
    dim: int,
    dense: bool = True,
    sparse: bool = True,
    colbert: bool = True,
    dense_distance: Distance = "dot",
    colbert_dtype: ColbertDtype = "float32",
    dense_name: str = "dense",
    sparse_name: str = "sparse",
    colbert_name: str = "colbert",
) -> None:
    """Create the collection: named ``dense``/``colbert`` vectors of ``dim`` and a ``sparse`` vector."""
    models = _models()
    if not (dense or sparse or colbert):
        raise ValueError("a collection needs at least one of dense, sparse, colbert")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be the model's hidden size (a positive integer), got {dim!r}")
    distances = {"dot": models.Distance.DOT, "cosine": models.Distance.COSINE}
    if dense_distance not in distances:
        raise ValueError(f"dense_distance must be 'dot' or 'cosine', got {dense_distance!r}")
    dtypes = {"float32": models.Datatype.FLOAT32, "float16": models.Datatype.FLOAT16}
    if colbert_dtype not in dtypes:
        raise ValueError(f"colbert_dtype must be 'float32' or 'float16', got {colbert_dtype!r}")
    vectors: dict[str, Any] = {}
    if dense:
        vectors[dense_name] = models.VectorParams(size=dim, distance=distances[dense_distance])
    if colbert:
        vectors[colbert_name] = models.VectorParams(
            size=dim,
            distance=models.Distance.DOT,
            multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
            datatype=dtypes[colbert_dtype],
            hnsw_config=models.HnswConfigDiff(m=0),  # reranking only: no graph to build
        )
    client.create_collection(
        name,
        vectors_config=vectors,
        sparse_vectors_config={sparse_name: models.SparseVectorParams()} if sparse else None,
    )


def point_id(value: int | str) -> int | str:
    """A Qdrant point id: an int in 0..2**64-1 or a UUID as is, any other string as its UUID5."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 2**64:
            raise ValueError(f"Qdrant point ids are unsigned 64-bit integers or UUIDs; {value} is out of range")
        return value
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return str(uuid.uuid5(ID_NAMESPACE, value))
    raise TypeError(f"ids must be int or str, got {value!r} ({type(value).__name__})")


def sparse_vector(weights: Mapping[str, float]) -> Any:
    """One text's ``lexical_weights`` as a ``models.SparseVector`` (sorted unique indices)."""
    idx, val = lexical_arrays(weights, where="lexical weights")
    return _models().SparseVector(indices=idx.tolist(), values=val.tolist())


def _colbert_list(vecs: np.ndarray, dtype: ColbertDtype, where: str) -> list[list[float]]:
    if vecs.ndim != 2 or len(vecs) == 0:
        raise ValueError(f"{where}: a ColBERT multivector must be a non-empty [len, dim] array, got shape {vecs.shape}")
    rounded = vecs.astype(np.float16) if dtype == "float16" else vecs
    return rounded.astype(np.float32).tolist()


def _points(
    out: Outputs,
    payloads: Sequence[Mapping[str, Any]] | None,
    *,
    colbert_dtype: ColbertDtype,
    id_key: str | None,
    dense_name: str,
    sparse_name: str,
    colbert_name: str,
    outputs: Sequence[Output],
) -> list[Any]:
    models = _models()
    out = select(out, outputs, allowed=ALL_OUTPUTS, what="named vectors")
    if colbert_dtype not in ("float32", "float16"):
        raise ValueError(f"colbert_dtype must be 'float32' or 'float16', got {colbert_dtype!r}")
    n = len(out)
    if payloads is not None and len(payloads) != n:
        raise ValueError(f"{len(payloads)} payloads for {n} rows")
    points = []
    for i, row_id in enumerate(out.ids):
        where = f"row {i} (id {row_id!r})"
        vector: dict[str, Any] = {}
        if out.dense is not None:
            vector[dense_name] = out.dense[i].tolist()
        if out.sparse is not None:
            idx, val = out.sparse[i]
            vector[sparse_name] = models.SparseVector(indices=idx.tolist(), values=val.tolist())
        if out.colbert is not None:
            vector[colbert_name] = _colbert_list(np.asarray(out.colbert[i]), colbert_dtype, where)
        payload = dict(payloads[i]) if payloads is not None else {}
        if id_key is not None:
            if id_key in payload:
                raise ValueError(f"payloads[{i}] already has the key {id_key!r} that holds the original id")
            payload[id_key] = row_id
        points.append(models.PointStruct(id=point_id(row_id), vector=vector, payload=payload or None))
    return points


def points_from_encode(
    ids: Sequence[int | str],
    output: Mapping[str, Any],
    *,
    payloads: Sequence[Mapping[str, Any]] | None = None,
    colbert_dtype: ColbertDtype = "float32",
    id_key: str | None = "id",
    dense_name: str = "dense",
    sparse_name: str = "sparse",
    colbert_name: str = "colbert",
    outputs: Sequence[Output] = ALL_OUTPUTS,
) -> list[Any]:
    """``models.PointStruct`` s for ``client.upsert`` from ``M3Model.encode(...)`` output.

    ``outputs``: the named vectors the collection holds (default all three, as
    :func:`create_collection` makes it); each must be in ``output``, or a ``ValueError``
    names the row's id and the missing output (a point without its sparse or ColBERT
    vector is stored, and never found by the hybrid search). Pass fewer, e.g.
    ``outputs=("dense",)``, to build points with only those. ``colbert_dtype="float16"``
    for a collection created with it. ``id_key``: the payload key of the original id
    (``None``: none).
    """
    return _points(
        from_encode(ids, output),
        payloads,
        colbert_dtype=colbert_dtype,
        id_key=id_key,
        dense_name=dense_name,
        sparse_name=sparse_name,
        colbert_name=colbert_name,
        outputs=outputs,
    )


def points_from_table(
    table: Any,
    *,
    id_column: str = "id",
    payload_columns: Sequence[str] = (),
    colbert_dtype: ColbertDtype = "float32",
    id_key: str | None = "id",
    dense_name: str = "dense",
    sparse_name: str = "sparse",
    colbert_name: str = "colbert",
    outputs: Sequence[Output] = ALL_OUTPUTS,
) -> list[Any]:
    """Points from an ``m3 embed-corpus`` output (a pyarrow Table or RecordBatch read from its Parquet).

    ``dense``, ``sparse_indices``/``sparse_values`` and ``colbert`` (float32 or float16)
    become the named vectors, ``payload_columns`` payload keys. ``outputs``: as
    :func:`points_from_encode` (a missing column is an error unless left out there).
    """
    payloads = None
    if payload_columns:
        missing_cols = [c for c in payload_columns if c not in table.column_names]
        if missing_cols:
            raise ValueError(f"table has no column(s) {missing_cols} (columns: {', '.join(table.column_names)})")
        values = {c: table.column(c).to_pylist() for c in payload_columns}
        payloads = [{c: values[c][i] for c in payload_columns} for i in range(table.num_rows)]
    return _points(
        from_table(table, id_column=id_column),
        payloads,
        colbert_dtype=colbert_dtype,
        id_key=id_key,
        dense_name=dense_name,
        sparse_name=sparse_name,
        colbert_name=colbert_name,
        outputs=outputs,
    )


def query_hybrid(
    client: Any,
    collection_name: str,
    query: Mapping[str, Any],
    *,
    limit: int = 10,
    prefetch_limit: int = 100,
    dense_name: str = "dense",
    sparse_name: str = "sparse",
    colbert_name: str = "colbert",
    with_payload: bool = True,
) -> list[Any]:
    """Dense and sparse candidates (``prefetch_limit`` each), reranked by ColBERT MAX_SIM; ``limit`` points.

    ``query``: ``M3Model.encode_queries(text, return_sparse=True, return_colbert_vecs=True)``
    for one text (dense or sparse may be left out; ColBERT is needed). The scores are
    Qdrant's MAX_SIM sums: divide by ``len(query["colbert_vecs"])`` for FlagEmbedding's
    ``colbert_score``.
    """
    models = _models()
    out = from_encode([0], query)
    if len(out) != 1:
        raise ValueError(f"query must be the encode output of one text, got {len(out)} rows")
    if out.colbert is None:
        raise ValueError("query has no colbert_vecs: encode it with return_colbert_vecs=True")
    for name, value in (("limit", limit), ("prefetch_limit", prefetch_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    prefetch = []
    if out.dense is not None:
        prefetch.append(models.Prefetch(query=out.dense[0].tolist(), using=dense_name, limit=prefetch_limit))
    if out.sparse is not None:
        idx, val = out.sparse[0]
        prefetch.append(
            models.Prefetch(
                query=models.SparseVector(indices=idx.tolist(), values=val.tolist()),
                using=sparse_name,
                limit=prefetch_limit,
            )
        )
    if not prefetch:
        raise ValueError("query has neither dense_vecs nor lexical_weights to prefetch candidates with")
    response = client.query_points(
        collection_name,
        prefetch=prefetch,
        query=_colbert_list(np.asarray(out.colbert[0]), "float32", "query"),
        using=colbert_name,
        limit=limit,
        with_payload=with_payload,
    )
    return list(response.points)


__all__ = [
    "ID_NAMESPACE",
    "create_collection",
    "point_id",
    "points_from_encode",
    "points_from_table",
    "query_hybrid",
    "sparse_vector",
]
