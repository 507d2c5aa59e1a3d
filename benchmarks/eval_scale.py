"""``m3 eval`` at scale: exact retrieval over 100k precomputed passages in bounded
memory, and encoding time per 1,000 passages. Prints figures; measures, never asserts.

Retrieval (no model: synthetic vectors shaped as BGE-M3's):

    python benchmarks/eval_scale.py retrieval [--passages 100000] [--queries 1000]

- dense: unit float32 vectors of 1,024 dims;
- sparse: per passage 120 distinct token ids (per query 8), drawn Zipf-like
  (exponent 1.1) from a 250,002-token vocabulary, weights uniform in (0, 0.3]: about
  what BGE-M3's lexical weights of a 200-token passage hold;
- ColBERT: 200 float16 rows of 1,024 dims per candidate passage, made when a block's
  candidates are re-scored (as rows read from float16 ``m3 embed-corpus`` output are),
  never for the whole corpus.

It runs the same functions as ``m3 eval`` (``retrieval.first_stage`` for dense,
sparse and dense+sparse over the whole corpus, ``retrieval.pools`` for ColBERT and all
over the dense top-100 + sparse top-100, ``metrics.per_query`` on random qrels) and
prints each stage's seconds and the process' peak RSS.

Encoding (a real package, e.g. the full-size random BGE-M3 int8 of
``benchmarks/full_checkpoint.py`` exported with m3-export):

    python benchmarks/eval_scale.py encode PACKAGE [--variant int8] [--passages 200]

encodes that many real English passages (the Python docs' paragraphs, 30-160 words)
with dense, sparse and ColBERT outputs as ``m3 eval`` does and prints seconds per
1,000 passages (encoding 100k passages on a small CPU would take hours).
"""

from __future__ import annotations

import argparse
import resource
import time

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
    from m3_runtime.evaluation.retrieval import Vectors, first_stage, pools

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

    # a bank of float16 matrices stands for the rows read from the files: what is timed is
    # the scoring and the memory of a block's candidates, not random number generation
    bank = [rng.standard_normal((200, hidden), dtype=np.float32).astype(np.float16) for _ in range(64)]

    def colbert_of(indices: np.ndarray) -> list[np.ndarray]:
        return [bank[int(i) % len(bank)].copy() for i in indices]

    t = time.perf_counter()
    p = pools(queries, corpus, first, candidates=100, colbert_of=colbert_of, say=quiet)
    print(
        f"colbert/all re-scoring of dense top-100 + sparse top-100 ({sum(len(i) for i in p.indices)} candidates, "
        f"float16 rows): {time.perf_counter() - t:.1f} s; peak RSS {peak_rss_mb():.0f} MB"
    )
    ids = [f"d{i}" for i in range(n)]
    qids = [f"q{i}" for i in range(nq)]
    qrels = {q: {f"d{int(rng.integers(n))}": 1} for q in qids}
    t = time.perf_counter()
    metrics.per_query(qrels, qids, ids, first["dense"].indices, [10, 100])
    print(f"metrics (pytrec_eval), one mode: {time.perf_counter() - t:.2f} s; peak RSS {peak_rss_mb():.0f} MB")


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
