"""Per-row outputs from ``M3Model.encode`` results or ``m3 embed-corpus`` tables.

Both sources end up as one :class:`Outputs`: ``dense`` a float32 ``[n, dim]`` array,
``sparse`` a list of ``(indices, values)`` pairs with strictly increasing int64
indices and float32 values, ``colbert`` a list of ``[len_i, dim]`` arrays (float32,
or float16 when the Parquet column is float16). Each database module turns these
into its own objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The Milvus sparse protocol reserves the largest uint32 id; Qdrant takes uint32 indices.
MAX_SPARSE_INDEX = 2**32 - 2

SparseRow = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Outputs:
    ids: list[Any]
    dense: np.ndarray | None
    sparse: list[SparseRow] | None
    colbert: list[np.ndarray] | None

    def __len__(self) -> int:
        return len(self.ids)


def sparse_arrays(indices: Any, values: Any, *, where: str) -> SparseRow:
    """``(indices, values)`` sorted by index; refuses repeated, negative or too large indices."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    val = np.asarray(values, dtype=np.float32).reshape(-1)
    if idx.shape != val.shape:
        raise ValueError(f"{where}: {idx.size} sparse indices but {val.size} values")
    if idx.size == 0:
        return idx, val
    if idx.min() < 0 or idx.max() > MAX_SPARSE_INDEX:
        bad = int(idx[(idx < 0) | (idx > MAX_SPARSE_INDEX)][0])
        raise ValueError(f"{where}: sparse index {bad} is outside 0..{MAX_SPARSE_INDEX}")
    order = np.argsort(idx, kind="stable")
    idx, val = idx[order], val[order]
    repeated = idx[1:] == idx[:-1]
    if repeated.any():
        raise ValueError(f"{where}: sparse index {int(idx[1:][repeated][0])} appears more than once")
    return idx, val


def lexical_arrays(weights: Mapping[str, float], *, where: str) -> SparseRow:
    """One ``{str(token_id): weight}`` dict (``lexical_weights``) as sorted arrays."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{where}: lexical weights must be a dict of token id -> weight, got {type(weights).__name__}")
    try:
        idx = np.fromiter((int(k) for k in weights), dtype=np.int64, count=len(weights))
    except ValueError:
        raise ValueError(f"{where}: lexical weights have a key that is not a token id: {list(weights)[:5]}") from None
    return sparse_arrays(idx, np.fromiter(weights.values(), dtype=np.float32, count=len(weights)), where=where)


def _check_ids(ids: Sequence[Any], n: int, what: str) -> list[Any]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids must be a sequence with one id per text, got {type(ids).__name__}")
    out = [int(x) if isinstance(x, np.integer) else x for x in ids]
    if len(out) != n:
        raise ValueError(f"{len(out)} ids for {n} {what}")
    for i, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise TypeError(f"ids[{i}] is {x!r} ({type(x).__name__}); ids must be int or str")
    return out


def from_encode(ids: Sequence[Any], output: Mapping[str, Any]) -> Outputs:
    """The result of ``M3Model.encode``/``encode_corpus``/``encode_queries`` (many texts or one)."""
    if not isinstance(output, Mapping) or not {"dense_vecs", "lexical_weights", "colbert_vecs"} & set(output):
        raise TypeError(
            "output must be the dict returned by M3Model.encode (dense_vecs, lexical_weights, colbert_vecs)"
        )
    dense, lexical, colbert = (output.get(k) for k in ("dense_vecs", "lexical_weights", "colbert_vecs"))
    single = (dense is not None and np.ndim(dense) == 1) or isinstance(lexical, Mapping)
    if single:  # encode("one text") unwraps its values
        dense = None if dense is None else np.asarray(dense)[None]
        lexical = None if lexical is None else [lexical]
        colbert = None if colbert is None else [colbert]
    n = next((len(x) for x in (dense, lexical, colbert) if x is not None), None)
    if n is None:
        raise ValueError(
            "output holds no dense_vecs, lexical_weights or colbert_vecs: encode returned nothing to store"
        )
    for name, value in (("dense_vecs", dense), ("lexical_weights", lexical), ("colbert_vecs", colbert)):
        if value is not None and len(value) != n:
            raise ValueError(f"output has {n} rows in one field but {len(value)} in {name}")
    checked = _check_ids(ids, n, "texts")
    return Outputs(
        ids=checked,
        dense=None if dense is None else np.asarray(dense, dtype=np.float32),
        sparse=None
        if lexical is None
        else [lexical_arrays(w, where=f"row {i} (id {checked[i]!r})") for i, w in enumerate(lexical)],
        colbert=None if colbert is None else [np.asarray(c) for c in colbert],
    )


def _numpy(array: Any) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _combined(table: Any, name: str) -> Any:
    column = table.column(name)
    return column.combine_chunks() if hasattr(column, "combine_chunks") else column


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def from_table(table: Any, *, id_column: str = "id") -> Outputs:
    """A pyarrow Table or RecordBatch with ``m3 embed-corpus`` columns (as read from its Parquet)."""
    names = getattr(table, "column_names", None)
    if not isinstance(names, list) or not hasattr(table, "num_rows"):
        raise TypeError(f"expected a pyarrow Table or RecordBatch, got {type(table).__name__}")
    if id_column not in names:
        raise ValueError(f"table has no id column {id_column!r} (columns: {', '.join(names)})")
    if not {"dense", "sparse_indices", "colbert"} & set(names):
        raise ValueError(
            f"table has none of the embed-corpus output columns dense, sparse_indices/sparse_values, "
            f"colbert (columns: {', '.join(names)})"
        )
    ids = _check_ids(_combined(table, id_column).to_pylist(), table.num_rows, "rows")
    dense = None
    if "dense" in names:
        col = _combined(table, "dense")
        if col.null_count:
            raise ValueError(f"column 'dense' has {col.null_count} null rows")
        dense = _numpy(col.flatten()).astype(np.float32, copy=False).reshape(len(col), col.type.list_size)
    sparse = None
    if "sparse_indices" in names:
        if "sparse_values" not in names:
            raise ValueError("table has sparse_indices but no sparse_values column")
        idx_col, val_col = _combined(table, "sparse_indices"), _combined(table, "sparse_values")
        lengths = _numpy(idx_col.value_lengths().fill_null(0))
        if not np.array_equal(lengths, _numpy(val_col.value_lengths().fill_null(0))):
            raise ValueError("sparse_indices and sparse_values differ in length on some row")
        pairs = zip(_split(_numpy(idx_col.flatten()), lengths), _split(_numpy(val_col.flatten()), lengths), strict=True)
        sparse = [sparse_arrays(i, v, where=f"row {k} (id {ids[k]!r})") for k, (i, v) in enumerate(pairs)]
    colbert = None
    if "colbert" in names:
        col = _combined(table, "colbert")
        rows = col.flatten()  # one fixed-size list per token
        flat = _numpy(rows.flatten()).reshape(len(rows), rows.type.list_size)
        colbert = _split(flat, _numpy(col.value_lengths().fill_null(0)))
    return Outputs(ids=ids, dense=dense, sparse=sparse, colbert=colbert)


# Where each output comes from, for the message when it is missing.
_ASK = {
    "dense": "return_dense=True (encode) or the dense column (embed-corpus --outputs dense)",
    "sparse": "return_sparse=True (encode) or the sparse_indices/sparse_values columns (--outputs sparse)",
    "colbert": "return_colbert_vecs=True (encode) or the colbert column (--outputs colbert)",
}


def select(out: Outputs, outputs: Sequence[str], *, allowed: tuple[str, ...], what: str) -> Outputs:
    """``out`` with only ``outputs`` (the vectors the collection holds), each of them present.

    A row without a vector its collection expects is stored, and then never found by the
    searches on that vector (a dense-only point in a hybrid collection), so a missing
    output is an error naming the first row's id; the caller asks for fewer outputs
    explicitly (``outputs=("dense",)``) to build such rows."""
    if isinstance(outputs, str) or not isinstance(outputs, Sequence):
        raise TypeError(f"outputs must be a list of {', '.join(allowed)}, got {outputs!r}")
    chosen = list(dict.fromkeys(outputs))
    unknown = [o for o in chosen if o not in allowed]
    if unknown or not chosen:
        raise ValueError(f"outputs must be a non-empty list of {', '.join(allowed)}, got {list(outputs)!r}")
    have = {"dense": out.dense, "sparse": out.sparse, "colbert": out.colbert}
    for name in chosen:
        if have[name] is None and len(out):
            raise ValueError(
                f"row 0 (id {out.ids[0]!r}) has no {name} output, which the collection's {what} expect "
                f"(outputs={tuple(chosen)!r}): without it the row is never found by {name} search. Give it "
                f"with {_ASK[name]}, or pass outputs={tuple(o for o in chosen if have[o] is not None)!r} "
                "to store the rows without it"
            )
    return Outputs(
        ids=out.ids,
        dense=out.dense if "dense" in chosen else None,
        sparse=out.sparse if "sparse" in chosen else None,
        colbert=out.colbert if "colbert" in chosen else None,
    )


def payload_list(payloads: Sequence[Mapping[str, Any]] | None, n: int) -> list[dict[str, Any]]:
    if payloads is None:
        return [{} for _ in range(n)]
    if len(payloads) != n:
        raise ValueError(f"{len(payloads)} payloads for {n} rows")
    out = []
    for i, p in enumerate(payloads):
        if not isinstance(p, Mapping):
            raise TypeError(f"payloads[{i}] must be a dict, got {type(p).__name__}")
        out.append(dict(p))
    return out


def load_model(model: Any, model_kwargs: Mapping[str, Any]) -> Any:
    """An ``M3Model`` as given, or loaded from a package directory with ``model_kwargs``."""
    from ..model import M3Model

    if isinstance(model, M3Model):
        if model_kwargs:
            raise TypeError(f"model options {sorted(model_kwargs)} apply only when a package directory is given")
        return model
    if isinstance(model, (str, os.PathLike)):
        return M3Model(os.fspath(model), **model_kwargs)
    raise TypeError(f"expected an M3Model or a package directory, got {type(model).__name__}")


def missing(module: str, extra: str) -> ImportError:
    return ImportError(f"this integration needs {module}: pip install 'm3-runtime[{extra}]'")
