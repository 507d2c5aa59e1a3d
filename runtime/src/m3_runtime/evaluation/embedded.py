"""Reuse a corpus already embedded by ``m3 embed-corpus`` (its Parquet output folder).

The id column must hold the BEIR ``_id`` values (embed the corpus with ``--id-column
_id``, or pass ``--embedded-id-column``); every corpus id must be present. Dense and
sparse columns are read batch by batch into one float32 matrix and CSR arrays in the
corpus' order. A ``colbert`` column (float32 or float16) is not loaded:
``parquet_rows`` reads the candidates' rows when they are re-scored (without the
column they are re-encoded). It reads each file once: only the ``colbert`` column, only
the row groups that hold needed rows, one row group at a time (embed-corpus writes row
groups of at most ``corpus.COLBERT_ROW_GROUP_BYTES`` of it; a file written before that
is one row group, read whole). The needed rows go ``BATCH_ROWS`` at a time through
Arrow's ``flatten().to_numpy()``, with no Python lists, and become float32 together.
Memory: one row group of the column (compressed and decoded) and ``BATCH_ROWS`` needed
rows in float32 (100 MB for 200-token passages).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import EvalDataError
from .retrieval import ColbertRows, Say, Vectors, split_rows

BATCH_ROWS = 128  # rows per record batch read from the colbert column


def _files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise EvalDataError(f"{folder}: no .parquet files (the OUTPUT folder of m3 embed-corpus)")
    return files


def load_embedded(folder: str | Path, corpus_ids: Sequence[str], *, id_column: str = "_id", say: Say):
    """``(Vectors, ColbertRows or None)`` from embed-corpus Parquet files, rows in ``corpus_ids`` order."""
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
    files = _files(folder)
    file_of = np.full(n, -1, np.int32)  # corpus index -> (file, row) for the colbert column
    row_of = np.zeros(n, np.int64)
    has_colbert = True
    for number, path in enumerate(files):
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
            file_of[idx] = number
            row_of[idx] = row + np.arange(len(idx))
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
    colbert = parquet_rows(files, file_of, row_of, width=dense.shape[1]) if has_colbert else None
    return Vectors(dense=dense, sparse=sparse), colbert


def parquet_rows(files: Sequence[Path], file_of: np.ndarray, row_of: np.ndarray, *, width: int) -> ColbertRows:
    """The ``colbert`` column of ``files``: corpus index ``i`` is row ``row_of[i]`` of ``files[file_of[i]]``.

    Several indices may share a row (each gets its copy). Needed rows are read file by
    file, row group by row group (only groups holding one), ``BATCH_ROWS`` at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def rows(needed: np.ndarray):
        order = np.lexsort((row_of[needed], file_of[needed]))  # file by file, row by row
        needed = needed[order]
        for number in np.unique(file_of[needed]).tolist():
            idx = needed[file_of[needed] == number]
            wanted = row_of[idx]
            reader = pq.ParquetFile(files[number])
            sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            group_of = np.searchsorted(bounds, wanted, side="right") - 1
            for g in np.unique(group_of).tolist():
                # one row group's colbert column chunk at a time (iter_batches reads ahead)
                column = reader.read_row_group(g, columns=["colbert"], use_threads=False).column(0)
                in_group = np.flatnonzero(group_of == g)
                for a in range(0, len(in_group), BATCH_ROWS):
                    take = in_group[a : a + BATCH_ROWS]
                    picked = column.take(pa.array(wanted[take] - bounds[g])).combine_chunks()
                    counts = pc.list_value_length(picked).to_numpy(zero_copy_only=False)
                    vectors = picked.flatten()  # fixed-size lists of the ColBERT dim
                    dim = vectors.type.list_size if pa.types.is_fixed_size_list(vectors.type) else width
                    flat = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                    yield idx[take], split_rows(flat, counts)
                del column

    return rows
