"""Reuse a corpus already embedded by ``m3 embed-corpus`` (its Parquet output folder).

The id column must hold the BEIR ``_id`` values (embed the corpus with ``--id-column
_id``, or pass ``--embedded-id-column``); every corpus id must be present. Dense and
sparse columns are read batch by batch into one float32 matrix and CSR arrays in the
corpus' order. A ``colbert`` column (float32 or float16) is not loaded: the candidates'
rows are read from the files when they are re-scored; without it they are re-encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import EvalDataError
from .retrieval import Say, Vectors


def _files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise EvalDataError(f"{folder}: no .parquet files (the OUTPUT folder of m3 embed-corpus)")
    return files


def load_embedded(folder: str | Path, corpus_ids: Sequence[str], *, id_column: str = "_id", say: Say):
    """``(Vectors, colbert_of or None)`` from embed-corpus Parquet files, rows in ``corpus_ids`` order."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError('reading m3 embed-corpus output needs pyarrow: pip install "m3-runtime[ray]"') from None
    position = {cid: i for i, cid in enumerate(corpus_ids)}
    n = len(corpus_ids)
    dense: np.ndarray | None = None
    seen = np.zeros(n, bool)
    lex_rows: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * n
    has_sparse = True
    where: dict[int, tuple[Path, int]] = {}  # corpus index -> (file, row) for the colbert column
    has_colbert = True
    for path in _files(folder):
        schema = pq.read_schema(path)
        names = schema.names
        if id_column not in names:
            raise EvalDataError(f"{path}: no id column {id_column!r} (columns: {', '.join(names)})")
        if "dense" not in names:
            raise EvalDataError(f"{path}: no 'dense' column; embed with --outputs dense,sparse[,colbert]")
        has_sparse &= "sparse_indices" in names
        has_colbert &= "colbert" in names
        cols = [c for c in (id_column, "dense", "sparse_indices", "sparse_values") if c in names]
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=cols, batch_size=4096):
            ids = [str(x) for x in batch.column(id_column).to_pylist()]
            flat = batch.column("dense")
            width = flat.type.list_size
            vecs = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, width)
            if dense is None:
                dense = np.zeros((n, width), np.float32)
            idx = np.array([position.get(i, -1) for i in ids])
            if (idx < 0).any():
                bad = ids[int(np.flatnonzero(idx < 0)[0])]
                raise EvalDataError(
                    f"{path} row {row + int(np.flatnonzero(idx < 0)[0])}: id {bad!r} is not in the corpus"
                )
            dense[idx] = vecs
            seen[idx] = True
            if "sparse_indices" in cols:
                for j, (ti, tw) in enumerate(
                    zip(
                        batch.column("sparse_indices").to_pylist(),
                        batch.column("sparse_values").to_pylist(),
                        strict=True,
                    )
                ):
                    lex_rows[idx[j]] = (np.asarray(ti, np.int64), np.asarray(tw, np.float32))
            for j, i in enumerate(idx):
                where[int(i)] = (path, row + j)
            row += len(ids)
        say(f"read {path} ({row} rows)")
    if not seen.all():
        missing = corpus_ids[int(np.flatnonzero(~seen)[0])]
        raise EvalDataError(f"{folder}: corpus id {missing!r} (and {int((~seen).sum()) - 1} more) not embedded there")
    assert dense is not None
    sparse = None
    if has_sparse:
        counts = np.array([len(t) for t, _ in lex_rows], np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        sparse = (indptr, np.concatenate([t for t, _ in lex_rows]), np.concatenate([w for _, w in lex_rows]))
    colbert_of = None
    if has_colbert:

        def colbert_of(indices: np.ndarray) -> list[np.ndarray]:
            by_file: dict[Path, list[tuple[int, int]]] = {}
            for k, i in enumerate(indices):
                path, row = where[int(i)]
                by_file.setdefault(path, []).append((k, row))
            out: list[np.ndarray] = [np.zeros(0)] * len(indices)
            for path, wanted in by_file.items():
                col = pq.read_table(path, columns=["colbert"]).column("colbert")
                picked = col.take([r for _, r in wanted]).to_pylist()
                for (k, _), rows in zip(wanted, picked, strict=True):
                    out[k] = np.asarray(rows, np.float32)
            return out

    return Vectors(dense=dense, sparse=sparse), colbert_of
