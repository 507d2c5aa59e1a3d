"""``m3 eval`` at scale: exact retrieval over 100k precomputed passages in bounded
memory, and encoding time per 1,000 passages. Prints figures; measures, never asserts.

Retrieval (no model: synthetic vectors shaped as BGE-M3's):

    python benchmarks/eval_scale.py retrieval [--passages 100000] [--queries 1000]
        [--colbert-store DIR [--store-passages N] [--store-file-rows 2000]]

- dense: unit float32 vectors of 1,024 dims;
- sparse: per passage 120 distinct token ids (per query 8), drawn Zipf-like
  (exponent 1.1) from a 250,002-token vocabulary, weights uniform in (0, 0.3]: about
  what BGE-M3's lexical weights of a 200-token passage hold;
- ColBERT: 12 float32 rows per query; per passage 200 float16 rows of 1,024 dims,
  delivered chunk by chunk as ``embedded.parquet_rows`` delivers rows read from float16
  ``m3 embed-corpus`` output (one float16 array per chunk, copied from a bank of 256
  random passages, then ``split_rows``: float32 once per chunk), never for the whole
  corpus;
- ``--colbert-store DIR``: the rows come from a real float16 Parquet store in
  embed-corpus' layout (files of ``--store-file-rows`` rows written with
  ``corpus.parquet_options``: row groups of at most 64 MiB of ColBERT rows; columns
  ``_id``, ``tokens``, ``dense``, ``sparse_indices``, ``sparse_values``, ``colbert``),
  written once into DIR (``--store-passages`` passages, default all; 410 kB each, so
  100k passages take 41 GB) and read by ``embedded.parquet_rows``, so reading and
  decoding are timed too. With fewer store passages than ``--passages``, passage ``i``
  is store row ``i % N``: each store row is read once and serves several passages.

It runs the same functions as ``m3 eval`` (``retrieval.first_stage`` for dense,
sparse and dense+sparse over the whole corpus, ``retrieval.pools`` for ColBERT and all
over the dense top-100 + sparse top-100, ``metrics.per_query`` on random qrels) and
prints each stage's seconds, the seconds spent obtaining rows, and the process' peak RSS.

Encoding (a real package, e.g. the full-size random BGE-M3 int8 of
``benchmarks/full_checkpoint.py`` exported with m3-export):

    python benchmarks/eval_scale.py encode PACKAGE [--variant int8] [--passages 200]

encodes that many real English passages (the Python docs' paragraphs, 30-160 words)
with dense, sparse and ColBERT outputs as ``m3 eval`` does and prints seconds per
1,000 passages (encoding 100k passages on a small CPU would take hours).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def synthetic_lexical(rng: np.random.Generator, n: int, per: int, vocab: int = 250_002):
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-1.1
    p /= p.sum()
    rows = []
    for _ in range(n):
        ids = np.unique(rng.choice(vocab, size=per * 2, p=p))[:per]
        rows.append((ids.astype(np.int64), rng.uniform(1e-3, 0.3, len(ids)).astype(np.float32)))
    return rows


def retrieval(args: argparse.Namespace) -> None:
    from m3_runtime.evaluation import metrics
    from m3_runtime.evaluation.retrieval import Vectors, colbert_ranking, first_stage, pools, weighted_ranking

    rng = np.random.default_rng(0)
    n, nq, hidden = args.passages, args.queries, 1024
    t0 = time.perf_counter()
    dense = rng.standard_normal((n, hidden), dtype=np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lex = synthetic_lexical(rng, n, 120)
    indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in lex])]).astype(np.int64)
    corpus = Vectors(
        dense=dense, sparse=(indptr, np.concatenate([i for i, _ in lex]), np.concatenate([w for _, w in lex]))
    )
    del lex
    q_dense = rng.standard_normal((nq, hidden), dtype=np.float32)
    q_dense /= np.linalg.norm(q_dense, axis=1, keepdims=True)
    q_lex = [{str(int(i)): float(w) for i, w in zip(ids, ws, strict=True)} for ids, ws in synthetic_lexical(rng, nq, 8)]
    q_colbert = [rng.standard_normal((12, hidden), dtype=np.float32) for _ in range(nq)]
    queries = Vectors(dense=q_dense, lexical=q_lex, colbert=q_colbert)
    print(f"built {n} passages, {nq} queries in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_mb():.0f} MB")

    quiet = lambda _m: None  # noqa: E731
    t = time.perf_counter()
    first = first_stage(
        queries, corpus, depth=100, modes=["dense", "sparse", "dense+sparse"], weights=(0.4, 0.2, 0.4), say=quiet
    )
    print(
        f"dense + sparse + dense+sparse over the corpus: {time.perf_counter() - t:.1f} s; peak RSS {peak_rss_mb():.0f} MB"
    )

    if args.colbert_store:
        rows, how = store_rows(args, corpus, bank(rng, hidden))
    else:
        rows, how = synthetic_rows(bank(rng, hidden)), "synthetic float16 rows"
    timed = Timed(rows)
    t = time.perf_counter()
    p = pools(queries, corpus, first, candidates=100, colbert_rows=timed, say=print if args.verbose else quiet)
    pooled = time.perf_counter() - t
    t = time.perf_counter()
    colbert_ranking(p)
    weighted_ranking(p, (0.4, 0.2, 0.4))
    ranking = time.perf_counter() - t
    pairs = sum(len(i) for i in p.indices)
    print(
        f"colbert/all re-scoring of dense top-100 + sparse top-100 ({pairs} pairs, {timed.passages} distinct "
        f"passages, {how}): {pooled:.1f} s, of which obtaining rows {timed.seconds:.1f} s; ranking colbert and all "
        f"{ranking:.1f} s; peak RSS {peak_rss_mb():.0f} MB"
    )
    ids = [f"d{i}" for i in range(n)]
    qids = [f"q{i}" for i in range(nq)]
    qrels = {q: {f"d{int(rng.integers(n))}": 1} for q in qids}
    t = time.perf_counter()
    metrics.per_query(qrels, qids, ids, first["dense"].indices, [10, 100])
    print(f"metrics (pytrec_eval), one mode: {time.perf_counter() - t:.2f} s; peak RSS {peak_rss_mb():.0f} MB")


PASSAGE_TOKENS = 200


def bank(rng: np.random.Generator, hidden: int, size: int = 256) -> np.ndarray:
    """``(size, PASSAGE_TOKENS, hidden)`` float16 random rows that passages copy (cheaper than drawing 20G values)."""
    return rng.standard_normal((size, PASSAGE_TOKENS, hidden), dtype=np.float32).astype(np.float16)


def synthetic_rows(rows_bank: np.ndarray):
    """A ``ColbertRows`` that delivers each chunk as one fresh float16 array, as the Parquet reader does."""
    from m3_runtime.evaluation import retrieval

    per = max(1, retrieval.COLBERT_BUDGET // (PASSAGE_TOKENS * rows_bank.shape[2]))

    def rows(needed: np.ndarray):
        for start in range(0, len(needed), per):
            idx = needed[start : start + per]
            flat = rows_bank[idx % len(rows_bank)].reshape(-1, rows_bank.shape[2])
            yield idx, retrieval.split_rows(flat, np.full(len(idx), PASSAGE_TOKENS))

    return rows


class Timed:
    """A ``ColbertRows`` wrapper that adds up the seconds spent inside the source."""

    def __init__(self, rows) -> None:
        self.rows, self.seconds, self.passages = rows, 0.0, 0

    def __call__(self, needed: np.ndarray):
        self.passages = len(needed)
        it = iter(self.rows(needed))
        while True:
            t = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                self.seconds += time.perf_counter() - t
                return
            self.seconds += time.perf_counter() - t
            yield chunk


def write_store(folder: Path, corpus, rows_bank: np.ndarray, passages: int, file_rows: int) -> None:
    """``passages`` rows in embed-corpus' layout: a file per ``file_rows`` rows, written as it writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from m3_runtime.corpus import parquet_options

    hidden = rows_bank.shape[2]
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for number, start in enumerate(range(0, passages, file_rows)):
        idx = np.arange(start, min(passages, start + file_rows))
        flat = rows_bank[idx % len(rows_bank)].reshape(-1)
        rows = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), hidden)
        offsets = np.arange(0, PASSAGE_TOKENS * (len(idx) + 1), PASSAGE_TOKENS, dtype=np.int32)
        indptr, ids, weights = corpus.sparse
        sparse_offsets = pa.array((indptr[start : idx[-1] + 2] - indptr[start]).astype(np.int32))
        span = slice(indptr[start], indptr[idx[-1] + 1])
        table = pa.table(
            {
                "_id": [f"d{i}" for i in idx],
                "tokens": pa.array(np.full(len(idx), PASSAGE_TOKENS + 2, np.int32)),
                "dense": pa.FixedSizeListArray.from_arrays(pa.array(corpus.dense[idx].reshape(-1)), hidden),
                "sparse_indices": pa.ListArray.from_arrays(sparse_offsets, pa.array(ids[span].astype(np.int32))),
                "sparse_values": pa.ListArray.from_arrays(sparse_offsets, pa.array(weights[span])),
                "colbert": pa.ListArray.from_arrays(pa.array(offsets), rows),
            }
        )
        partial = folder / f".part-{number:05d}.parquet.partial"
        pq.write_table(table, partial, **parquet_options(table))  # as embed-corpus writes a file
        partial.rename(folder / f"part-{number:05d}.parquet")
        del table, rows, flat
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
    (folder / "STORE.json").write_text(json.dumps({"passages": passages, "file_rows": file_rows}))
    print(
        f"wrote {passages} passages in {folder} ({size / 1e9:.1f} GB) in {seconds:.1f} s = {size / 1e6 / seconds:.0f} MB/s"
    )


def store_rows(args: argparse.Namespace, corpus, rows_bank: np.ndarray):
    """``embedded.parquet_rows`` over the store in ``args.colbert_store`` (written first if absent)."""
    from m3_runtime.evaluation.embedded import parquet_rows

    folder = Path(args.colbert_store)
    passages = args.store_passages or args.passages
    marker = folder / "STORE.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != {"passages": passages, "file_rows": args.store_file_rows}:
            raise SystemExit(
                f"{folder} holds a store of {found}; asked for {passages} passages, {args.store_file_rows} rows per file"
            )
        print(f"reusing the store in {folder}")
    else:
        if passages > args.passages:
            raise SystemExit(f"--store-passages {passages} is more than --passages {args.passages}")
        write_store(folder, corpus, rows_bank, passages, args.store_file_rows)
    files = sorted(folder.glob("*.parquet"))
    store_row = np.arange(args.passages) % passages
    file_of = (store_row // args.store_file_rows).astype(np.int32)
    row_of = (store_row % args.store_file_rows).astype(np.int64)
    return parquet_rows(
        files, file_of, row_of, width=rows_bank.shape[2]
    ), f"float16 Parquet store of {passages} passages"


def encode(args: argparse.Namespace) -> None:
    from m3_exporter.texts import english_paragraphs
    from m3_runtime import M3Model
    from m3_runtime.evaluation.retrieval import encode as encode_texts

    texts = (english_paragraphs(480, max_words=160) * (args.passages // 480 + 1))[: args.passages]
    model = M3Model(args.package, variant=args.variant)
    model.embed(texts[:4], sparse=True, colbert=True)  # warm-up
    t = time.perf_counter()
    out = encode_texts(model, texts, sparse=True, colbert=True, max_length=None, say=print, label="encoding")
    seconds = time.perf_counter() - t
    tokens = int(sum(len(c) + 1 for c in out.colbert or []))
    print(
        f"{model.variant}: {len(texts)} passages ({tokens / len(texts):.0f} tokens each on average) in {seconds:.1f} s "
        f"= {1000 * seconds / len(texts):.0f} s per 1,000 passages; peak RSS {peak_rss_mb():.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("retrieval")
    r.add_argument("--passages", type=int, default=100_000)
    r.add_argument("--queries", type=int, default=1_000)
    r.add_argument("--colbert-store", help="a folder for (or holding) a float16 Parquet store of ColBERT rows")
    r.add_argument("--store-passages", type=int, help="passages in the store (default: --passages)")
    r.add_argument("--store-file-rows", type=int, default=2_000, help="rows per store file")
    r.add_argument("--verbose", action="store_true", help="progress lines of the re-scoring")
    r.set_defaults(func=retrieval)
    e = sub.add_parser("encode")
    e.add_argument("package")
    e.add_argument("--variant", default="int8")
    e.add_argument("--passages", type=int, default=200)
    e.set_defaults(func=encode)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
