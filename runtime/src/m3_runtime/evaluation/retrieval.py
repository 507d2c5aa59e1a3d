"""Exact (brute-force) retrieval for evaluation, chunked so memory stays bounded.

How each mode ranks the corpus (BGE-M3's own evaluation does the same):

- ``dense``: inner product of the dense vectors, over the whole corpus;
- ``sparse``: FlagEmbedding's lexical matching score (``scoring.lexical_score_matrix``),
  over the whole corpus;
- ``dense+sparse``: ``scoring.sparse_dense`` of the two, over the whole corpus;
- ``colbert``: the **dense top-C** candidates (C = ``candidates``), re-scored by
  ``scoring.colbert_score`` and re-ordered; only those C are ranked;
- ``all``: the union of the **dense top-C and the sparse top-C** (dense top-C alone on a
  model without sparse output), each scored by ``scoring.all_three`` of its exact
  dense, sparse and ColBERT scores;
- ``MODE>rerank``: the top-R of MODE scored by the reranker and re-ordered; the rest of
  MODE's ranking follows unchanged.

The corpus is scored in chunks of passages (all queries against one chunk, the best
``depth`` per query kept), so memory is the corpus' vectors plus one chunk's scores.

ColBERT re-scoring (``pools``) is passage-major: every query's candidates are formed
first, the pairs are inverted (passage -> the queries that need it), and a
``ColbertRows`` source delivers each needed passage's rows exactly once, in chunks of
at most ``COLBERT_BUDGET`` floats, as float32. Each passage is scored against the
stacked rows of the queries that need it: ``best = max_j (Q @ p.T)`` per query row,
then ``sum(best of query q) / len(q)``, exactly ``scoring.colbert_score``. Memory is one
chunk of passage rows plus the queries' rows. Sources: ``kept_rows`` (the corpus
encoding kept them: small corpora), ``encoded_rows`` (re-encoded, each needed passage
once), and ``embedded.parquet_rows`` (``m3 embed-corpus``'s ``colbert`` column, float32
or float16; a 200-token passage is 800 kB in float32, 400 kB in float16).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import scoring
from ..errors import InputError

Say = Callable[[str], None]
CSR = tuple[np.ndarray, np.ndarray, np.ndarray]  # indptr, token ids, weights

SCORE_BUDGET = 1 << 25  # floats per chunk of scores/sparse rows (128 MiB in float32)
COLBERT_BUDGET = 1 << 25  # floats of passage ColBERT rows per chunk (128 MiB in float32)
# A corpus' ColBERT rows are kept from its encoding up to this (float32; about 5,000
# passages of 200 tokens), else re-encoded for the candidates: 20,000 such passages are 16 GB.
KEEP_COLBERT_BYTES = 4 << 30

ColbertRows = Callable[[np.ndarray], Iterator[tuple[np.ndarray, list[np.ndarray]]]]
"""Called with sorted unique corpus indices; yields ``(indices, float32 (tokens, dim) rows
per passage)`` chunks that together cover each index exactly once."""


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """``label: done/total (pct), rate/s`` lines on stderr, at most every ``every`` seconds."""

    def __init__(self, label: str, total: int, say: Say, every: float = 5.0, unit: str = "passages") -> None:
        self.label, self.total, self.say, self.every, self.unit = label, total, say, every, unit
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            rate = self.done / max(now - self.start, 1e-9)
            pct = 100.0 * self.done / max(self.total, 1)
            self.say(f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s")
            self.last = now


@dataclass
class Vectors:
    """Encoded texts: dense rows, lexical weights as CSR, ColBERT rows per text (or None)."""

    dense: np.ndarray  # (n, hidden) float32
    sparse: CSR | None = None
    colbert: list[np.ndarray] | None = None
    lexical: list[dict[str, float]] | None = None  # queries keep the dicts too

    def __len__(self) -> int:
        return len(self.dense)


def csr_rows(csr: CSR, rows: np.ndarray) -> CSR:
    """The CSR arrays of ``rows`` (in that order)."""
    indptr, ids, weights = csr
    starts, stops = indptr[rows], indptr[rows + 1]
    counts = stops - starts
    take = (
        np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        if len(rows)
        else np.zeros(0, np.int64)
    ).astype(np.int64)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), ids[take], weights[take]


def encode(
    model,
    texts: Sequence[str],
    *,
    sparse: bool,
    colbert: bool,
    max_length: int | None,
    say: Say,
    label: str,
    chunk: int = 256,
    colbert_bytes: int | None = None,
) -> Vectors:
    """Encode ``texts`` in chunks (progress on ``say``); lexical weights become CSR arrays.

    ``colbert``: keep every text's ColBERT rows (float32), unless they pass
    ``colbert_bytes`` in all: then none are kept (``Vectors.colbert`` is None, and the
    candidates' rows are re-encoded when they are re-scored)."""
    progress = Progress(label, len(texts), say, unit="texts")
    dense: list[np.ndarray] = []
    lexical: list[dict[str, float]] = []
    vecs: list[np.ndarray] | None = [] if colbert else None
    held = 0
    for start in range(0, len(texts), chunk):
        out = model.embed(
            list(texts[start : start + chunk]),
            max_length=max_length,
            dense=True,
            sparse=sparse,
            colbert=vecs is not None,
        )
        dense.append(out.dense)
        if sparse:
            lexical.extend(out.lexical)
        if vecs is not None:
            vecs.extend(np.asarray(v, np.float32) for v in out.colbert)
            held += sum(v.nbytes for v in out.colbert)
            if colbert_bytes is not None and held > colbert_bytes:
                say(
                    f"{label}: ColBERT rows past {colbert_bytes / 2**30:.1f} GiB after {len(vecs)} texts: "
                    "not kept; each candidate passage's rows are re-encoded when re-scored"
                )
                vecs = None
        progress.update(len(out.dense))
    return Vectors(
        dense=np.concatenate(dense) if dense else np.zeros((0, model.hidden_size), np.float32),
        sparse=scoring.lexical_csr(lexical) if sparse else None,
        colbert=vecs,
        lexical=lexical if sparse else None,
    )


def _merge(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, offset: int, depth: int):
    idx = np.broadcast_to(np.arange(offset, offset + scores.shape[1], dtype=np.int64), scores.shape)
    all_s = np.concatenate([best_s, scores], axis=1)
    all_i = np.concatenate([best_i, idx], axis=1)
    if all_s.shape[1] <= depth:
        return all_s, all_i
    keep = np.argpartition(-all_s, depth - 1, axis=1)[:, :depth]
    return np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)


def _sorted(best_s: np.ndarray, best_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best first; ties by corpus order."""
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else np.zeros(best_s.shape, np.int64)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


@dataclass
class Ranked:
    """Per query: corpus indices best first, and their scores."""

    indices: list[np.ndarray]
    scores: list[np.ndarray]


def first_stage(
    queries: Vectors,
    corpus: Vectors,
    *,
    depth: int,
    modes: Sequence[str],
    weights: Sequence[float],
    say: Say,
) -> dict[str, Ranked]:
    """Top-``depth`` of ``dense``, ``sparse`` and/or ``dense+sparse`` over the whole corpus."""
    n, nq = len(corpus), len(queries)
    depth = min(depth, n)
    need_sparse = any(m in ("sparse", "dense+sparse") for m in modes)
    q_vocab = len({k for q in queries.lexical or [] for k in q}) if need_sparse else 0
    chunk = max(64, min(n, SCORE_BUDGET // max(nq, q_vocab, 1)))
    best = {m: (np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)) for m in modes}
    progress = Progress("scoring", n, say)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        dense = queries.dense @ corpus.dense[start:stop].T
        sparse = None
        if need_sparse:
            assert queries.lexical is not None and corpus.sparse is not None
            sparse = scoring.lexical_score_matrix(queries.lexical, *csr_rows(corpus.sparse, np.arange(start, stop)))
        for mode in modes:
            if mode == "dense":
                s = dense
            elif mode == "sparse":
                s = sparse
            else:
                assert sparse is not None
                s = scoring.sparse_dense(dense, sparse, weights)
            best[mode] = _merge(*best[mode], np.asarray(s, np.float32), start, depth)
        progress.update(stop - start)
    out = {}
    for mode, (s, i) in best.items():
        s, i = _sorted(s, i)
        out[mode] = Ranked(indices=list(i), scores=list(s))
    return out


@dataclass
class Pools:
    """Per query: the candidates that ``colbert`` and ``all`` re-score, with exact scores."""

    indices: list[np.ndarray] = field(default_factory=list)
    dense: list[np.ndarray] = field(default_factory=list)
    sparse: list[np.ndarray] = field(default_factory=list)
    colbert: list[np.ndarray] = field(default_factory=list)
    from_dense: list[np.ndarray] = field(default_factory=list)  # bool: in the dense top-C


@functools.cache
def _float16_table() -> np.ndarray:
    """float32 of every float16 bit pattern (256 kB), as ``astype`` converts them."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def to_float32(rows: np.ndarray) -> np.ndarray:
    """float16 through a table lookup: the same values as ``astype``, 2.5x faster here."""
    if rows.dtype == np.float16:
        return _float16_table()[rows.view(np.uint16)]
    return np.asarray(rows, np.float32)


def split_rows(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """One chunk's rows ``(sum(counts), dim)`` (float16 or float32) as float32 views per passage."""
    rows = to_float32(flat)  # once per chunk
    return np.split(rows, np.cumsum(counts)[:-1]) if len(counts) else []


def kept_rows(vecs: Sequence[np.ndarray], *, chunk: int = 1024) -> ColbertRows:
    """Rows kept in memory from the corpus encoding."""

    def rows(needed: np.ndarray) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        for start in range(0, len(needed), chunk):
            idx = needed[start : start + chunk]
            yield idx, [np.asarray(vecs[int(i)], np.float32) for i in idx]

    return rows


def encoded_rows(model, texts: Sequence[str], *, max_length: int | None) -> ColbertRows:
    """Rows re-encoded from the texts, each needed passage once, in chunks of at most
    ``COLBERT_BUDGET`` floats (by token count; one passage at least)."""
    longest = max_length or model.passage_max_length

    def encoded(chunk: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = model.embed([texts[i] for i in chunk], max_length=max_length, dense=False, colbert=True)
        return np.array(chunk, np.int64), [np.asarray(v, np.float32) for v in out.colbert or []]

    def rows(needed: np.ndarray) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        chunk: list[int] = []
        size = 0
        for start in range(0, len(needed), 1024):
            block = needed[start : start + 1024].tolist()
            lengths = [len(ids) for ids in model.engine.tokenize([texts[i] for i in block], longest)]
            for i, n in zip(block, lengths, strict=True):
                if chunk and (size + n) * model.hidden_size > COLBERT_BUDGET:
                    yield encoded(chunk)
                    chunk, size = [], 0
                chunk.append(i)
                size += n
        if chunk:
            yield encoded(chunk)

    return rows


def pools(
    queries: Vectors,
    corpus: Vectors,
    first: dict[str, Ranked],
    *,
    candidates: int,
    colbert_rows: ColbertRows,
    say: Say,
) -> Pools:
    """Dense top-C + sparse top-C per query with exact dense, sparse and ColBERT scores.

    The candidates of all queries are formed first; ``colbert_rows`` then delivers each
    needed passage once and it is scored against every query that has it as a candidate."""
    out = Pools()
    for q in range(len(queries)):
        d = first["dense"].indices[q][:candidates]
        s = first["sparse"].indices[q][:candidates] if "sparse" in first else d[:0]
        union = np.concatenate([d, s[~np.isin(s, d)]]).astype(np.int64)
        out.indices.append(union)
        out.from_dense.append(np.isin(union, d))
        out.dense.append((corpus.dense[union] @ queries.dense[q]).astype(np.float64))
        if corpus.sparse is not None and queries.lexical is not None:
            s = scoring.lexical_score_matrix([queries.lexical[q]], *csr_rows(corpus.sparse, union))[0]
            out.sparse.append(s.astype(np.float64))
        else:
            out.sparse.append(np.zeros(len(union)))
        out.colbert.append(np.full(len(union), np.nan))
    assert queries.colbert is not None
    q_rows = [np.asarray(v, np.float32) for v in queries.colbert]
    empty = [q for q, v in enumerate(q_rows) if v.ndim != 2 or len(v) == 0]
    if empty:
        raise InputError(f"query {empty[0]}: ColBERT rows must be a non-empty [len, dim] array")
    # the pairs, passage-major: pair k is (query pair_q[k], its candidate slot pair_slot[k])
    sizes = [len(u) for u in out.indices]
    pair_p = np.concatenate(out.indices) if sizes else np.zeros(0, np.int64)
    pair_q = np.repeat(np.arange(len(sizes)), sizes)
    pair_slot = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)
    order = np.lexsort((pair_q, pair_p))
    pair_p, pair_q, pair_slot = pair_p[order], pair_q[order], pair_slot[order]
    needed, first_pair = np.unique(pair_p, return_index=True)
    last_pair = np.append(first_pair[1:], len(pair_p))
    progress = Progress("colbert re-scoring", len(needed), say)
    for idx, rows in colbert_rows(needed):
        where = np.searchsorted(needed, idx)
        for k, p in zip(where.tolist(), rows, strict=True):
            a, b = int(first_pair[k]), int(last_pair[k])
            qs = pair_q[a:b].tolist()
            stacked = q_rows[qs[0]] if len(qs) == 1 else np.concatenate([q_rows[j] for j in qs])
            if p.ndim != 2 or p.shape[1] != stacked.shape[1] or len(p) == 0:
                raise InputError(
                    f"passage {int(needed[k])}: ColBERT rows of shape {p.shape}, queries' are {stacked.shape}"
                )
            best = (stacked @ p.T).max(axis=1)
            row = 0
            for j, slot in zip(qs, pair_slot[a:b].tolist(), strict=True):
                n = len(q_rows[j])
                out.colbert[j][slot] = float(best[row : row + n].sum() / n)  # scoring.colbert_score
                row += n
        progress.update(len(idx))
    missing = [int(u[np.isnan(c)][0]) for u, c in zip(out.indices, out.colbert, strict=True) if np.isnan(c).any()]
    if missing:
        raise RuntimeError(f"the ColBERT source gave no rows for passage {missing[0]}")
    return out


def rank_pool(indices: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((indices, -scores))
    return indices[order], scores[order]


def colbert_ranking(p: Pools) -> Ranked:
    out = Ranked([], [])
    for idx, c, in_dense in zip(p.indices, p.colbert, p.from_dense, strict=True):
        i, s = rank_pool(idx[in_dense], c[in_dense])
        out.indices.append(i)
        out.scores.append(s)
    return out


def weighted_ranking(p: Pools, weights: Sequence[float]) -> Ranked:
    out = Ranked([], [])
    for idx, d, s, c in zip(p.indices, p.dense, p.sparse, p.colbert, strict=True):
        i, sc = rank_pool(idx, scoring.all_three(d, s, c, weights))
        out.indices.append(i)
        out.scores.append(sc)
    return out


def rrf_ranking(p: Pools, k: int = 60) -> Ranked:
    """Reciprocal rank fusion of the pool's dense, sparse and ColBERT orders: sum 1 / (k + rank)."""
    out = Ranked([], [])
    for idx, d, s, c in zip(p.indices, p.dense, p.sparse, p.colbert, strict=True):
        fused = np.zeros(len(idx))
        for scores in (d, s, c):
            ranks = np.empty(len(idx))
            ranks[np.lexsort((idx, -scores))] = np.arange(1, len(idx) + 1)
            fused += 1.0 / (k + ranks)
        i, sc = rank_pool(idx, fused)
        out.indices.append(i)
        out.scores.append(sc)
    return out


def rerank(
    reranker, query_texts: Sequence[str], corpus_texts: Sequence[str], first: Ranked, *, top: int, say: Say
) -> Ranked:
    """The reranker's order over each query's top-``top`` of ``first``; the tail follows as it was."""
    out = Ranked([], [])
    progress = Progress("reranking", len(query_texts), say, unit="queries")
    for q, text in enumerate(query_texts):
        head, tail = first.indices[q][:top], first.indices[q][top:]
        scores = np.asarray(reranker.compute_score([(text, corpus_texts[int(i)]) for i in head]), dtype=np.float64)
        i, s = rank_pool(head, scores)
        out.indices.append(np.concatenate([i, tail]))
        # the tail ranks below every reranked passage, in its first-stage order
        out.scores.append(np.concatenate([s, (s.min() if len(s) else 0.0) - 1 - np.arange(len(tail))]))
        progress.update(1)
    return out
