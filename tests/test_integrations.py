"""m3_runtime.integrations against real embedded databases and the libraries' own classes.

Milvus Lite (``pymilvus.MilvusClient("file.db")``) and Qdrant's local mode
(``QdrantClient(path=...)``) hold the tiny package's outputs for a corpus of 279 texts
from models/source/multilingual.txt; for 30 queries, each database's top 10 (ids and
scores) must equal a NumPy brute force over the same outputs, scored with the runtime's
own functions: the dense inner product, ``M3Model.compute_lexical_matching_score`` and
``scoring.colbert_score`` (FlagEmbedding's formulas). How each database's formula relates
to FlagEmbedding's is said where it is checked.

"Ties aside": ``check_top`` requires the database's scores to be the k best scores of
the brute force, in order, and each returned id to have in the brute force the score the
database gave it; two ids whose scores tie may come in either order.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model, scoring

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "models" / "source" / "multilingual.txt"
TOL = {"rtol": 1e-5, "atol": 2e-6}  # float32 sums in another order
K = 10
PREFETCH = 20


def _corpus() -> tuple[list[str], list[str]]:
    """280 distinct passages (with the empty text and texts of no lexical weight) and 30 queries."""
    lines = [x.strip() for x in SOURCE.read_text(encoding="utf-8").splitlines() if x.strip()]
    n = len(lines)
    passages = [*lines]
    passages += [f"{lines[i]} {lines[(7 * i + 3) % n]}" for i in range(n)]
    passages += [x[: max(1, len(x) // 2)] for x in lines]
    passages += ["", " ", "<s>"]  # no lexical weights: the empty text, and only special tokens
    passages = list(dict.fromkeys(passages))
    queries = []
    for i in range(0, 90, 3):
        words = lines[i].split()
        queries.append(" ".join(words[1:5]) if len(words) >= 5 else lines[i][2:14])
    return passages, list(dict.fromkeys(queries))


TEXTS, QUERIES = _corpus()
IDS = [1000 + 7 * i for i in range(len(TEXTS))]  # not 0..n-1, so a lost mapping shows
POS = {x: i for i, x in enumerate(IDS)}
EMPTY = [i for i, t in enumerate(TEXTS) if t in ("", " ", "<s>")]


def test_corpus_is_large_enough():
    assert len(TEXTS) >= 200 and len(QUERIES) == 30


@pytest.fixture(scope="module")
def model(package_dir) -> M3Model:
    return M3Model(package_dir, variant="fp32")


@pytest.fixture(scope="module")
def docs(model) -> dict:
    return model.encode_corpus(TEXTS, return_sparse=True, return_colbert_vecs=True)


@pytest.fixture(scope="module")
def qs(model) -> dict:
    return model.encode_queries(QUERIES, return_sparse=True, return_colbert_vecs=True)


def _oracle(q: dict, dense: np.ndarray, lexical: list, colbert: list) -> dict[str, np.ndarray]:
    """Scores of every query against every passage, with the runtime's scoring functions."""
    return {
        "dense": (q["dense_vecs"] @ dense.T).astype(np.float64),
        "sparse": np.asarray(M3Model.compute_lexical_matching_score(q["lexical_weights"], lexical), np.float64),
        # FlagEmbedding's colbert_score: the mean over query tokens of the best passage match
        "colbert": np.array([[scoring.colbert_score(a, b) for b in colbert] for a in q["colbert_vecs"]]),
    }


@pytest.fixture(scope="module")
def oracle(qs, docs) -> dict[str, np.ndarray]:
    return _oracle(qs, docs["dense_vecs"], docs["lexical_weights"], docs["colbert_vecs"])


def check_top(hits: list[tuple[int, float]], row: np.ndarray, *, pool: np.ndarray | None = None, k: int = K) -> bool:
    """``hits`` (ids, scores) are the k best of ``row`` over ``pool`` (positions), ties aside.

    Returns whether the order is also exactly the brute force's (it differs only at ties).
    """
    pool = np.arange(len(row)) if pool is None else np.asarray(pool)
    best = pool[np.argsort(-row[pool], kind="stable")][:k]
    got = [POS[h[0]] for h in hits]
    scores = np.array([h[1] for h in hits], dtype=np.float64)
    assert len(set(got)) == len(got) == len(best), (got, best)
    assert set(got) <= set(pool.tolist())
    np.testing.assert_allclose(scores, row[best], **TOL)  # the k best scores, in order
    np.testing.assert_allclose(row[got], scores, **TOL)  # and each id carries its own score
    return got == best.tolist()


def positive(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(row > 0)


# -- Milvus Lite ---------------------------------------------------------------


@pytest.fixture(scope="module")
def milvus(tmp_path_factory, docs):
    pymilvus = pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from m3_runtime.integrations import milvus as mv

    client = pymilvus.MilvusClient(str(tmp_path_factory.mktemp("milvus") / "m3.db"))
    mv.create_collection(client, "docs", dim=docs["dense_vecs"].shape[1])
    rows = mv.rows_from_encode(IDS, docs, payloads=[{"text": t} for t in TEXTS], empty_sparse="placeholder")
    assert client.insert("docs", rows)["insert_count"] == len(TEXTS)
    yield client
    client.close()


def _milvus_hits(result) -> list[list[tuple[int, float]]]:
    return [[(h["id"], h["distance"]) for h in hits] for hits in result]


def test_milvus_dense_and_sparse_search_equal_brute_force(milvus, qs, oracle):
    """Milvus IP on the dense field is FlagEmbedding's dense score (q . p); IP on the sparse
    field is exactly compute_lexical_matching_score, over the rows sharing a token."""
    from m3_runtime.integrations.milvus import sparse_vector

    dense = _milvus_hits(milvus.search("docs", data=list(qs["dense_vecs"]), anns_field="dense", limit=K))
    sparse_data = [sparse_vector(w) for w in qs["lexical_weights"]]
    sparse = _milvus_hits(milvus.search("docs", data=sparse_data, anns_field="sparse", limit=K))
    exact = 0
    for i in range(len(QUERIES)):
        exact += check_top(dense[i], oracle["dense"][i])
        row = oracle["sparse"][i]
        exact += check_top(sparse[i], row, pool=positive(row), k=min(K, len(positive(row))))
    assert exact >= 2 * len(QUERIES) - 2  # orders differ only where scores tie


@pytest.mark.parametrize("norm_score", [True, False])
def test_milvus_hybrid_search_weighted_ranker(milvus, qs, oracle, norm_score):
    """WeightedRanker(w_d, w_s): each request keeps its own `limit` best rows; a row scores
    sum over the requests that returned it of w * f(score), f(s) = 0.5 + arctan(s) / pi with
    norm_score=True (Milvus' IP normalisation), f(s) = s with norm_score=False."""
    from m3_runtime.integrations.milvus import sparse_vector
    from pymilvus import AnnSearchRequest, WeightedRanker

    w_dense, w_sparse = 0.7, 0.3
    requests = [
        AnnSearchRequest(data=list(qs["dense_vecs"]), anns_field="dense", param={"metric_type": "IP"}, limit=PREFETCH),
        AnnSearchRequest(
            data=[sparse_vector(w) for w in qs["lexical_weights"]],
            anns_field="sparse",
            param={"metric_type": "IP"},
            limit=PREFETCH,
        ),
    ]
    result = milvus.hybrid_search(
        "docs", requests, ranker=WeightedRanker(w_dense, w_sparse, norm_score=norm_score), limit=K
    )
    f = (lambda s: 0.5 + np.arctan(s) / math.pi) if norm_score else (lambda s: s)
    found_by_both = 0
    for i, hits in enumerate(_milvus_hits(result)):
        d_row, s_row = oracle["dense"][i], oracle["sparse"][i]
        d_top = np.argsort(-d_row, kind="stable")[:PREFETCH]
        s_pos = positive(s_row)
        s_top = s_pos[np.argsort(-s_row[s_pos], kind="stable")][:PREFETCH]
        fused = np.zeros(len(TEXTS))
        fused[d_top] += w_dense * f(d_row[d_top])
        fused[s_top] += w_sparse * f(s_row[s_top])
        pool = np.union1d(d_top, s_top)
        check_top(hits, fused, pool=pool, k=min(K, len(pool)))
        if not norm_score:  # weights summing to 1: FlagEmbedding's sparse+dense, for rows both requests found
            both = [(POS[h[0]], h[1]) for h in hits if POS[h[0]] in set(d_top) & set(s_top)]
            for j, score in both:
                flag = scoring.combine_scores(d_row[[j]], s_row[[j]], np.zeros(1), [w_dense, w_sparse, 0.0])
                assert flag["sparse+dense"][0] == pytest.approx(score, rel=1e-5, abs=2e-6)
            found_by_both += len(both)
    assert norm_score or found_by_both >= 10


def test_milvus_empty_sparse_vector(milvus, model, docs, qs):
    """Milvus Lite refuses an empty sparse vector; the helpers raise first, or store a placeholder."""
    from m3_runtime.integrations import milvus as mv
    from pymilvus import MilvusException

    assert all(docs["lexical_weights"][i] == {} for i in EMPTY)
    with pytest.raises(ValueError, match=rf"row {EMPTY[0]} \(id {IDS[EMPTY[0]]}\) has no lexical weights"):
        mv.rows_from_encode(IDS, docs)
    row = mv.rows_from_encode([1], model.encode([""], return_sparse=True), empty_sparse="placeholder")[0]
    assert row["sparse"] == {mv.PLACEHOLDER_INDEX: 1.0}
    bare = {"id": 1, "dense": docs["dense_vecs"][EMPTY[0]], "sparse": {}}
    with pytest.raises(MilvusException, match="sparse vector must contain at least one nonzero float32 weight"):
        milvus.insert("docs", [bare])  # what the helper spares users: the database's own refusal
    # The placeholder rows are stored: found by their dense vectors, never a sparse hit.
    for i in EMPTY:
        (hit, *_), *_ = milvus.search("docs", data=[docs["dense_vecs"][i]], anns_field="dense", limit=3)
        assert hit["distance"] == pytest.approx(1.0, abs=1e-5)
        assert TEXTS[POS[hit["id"]]] in ("", " ", "<s>")
    sparse = milvus.search("docs", data=[mv.sparse_vector(w) for w in qs["lexical_weights"]], anns_field="sparse")
    assert not {h["id"] for hits in sparse for h in hits} & {IDS[i] for i in EMPTY}
    # An empty query (the empty text's weights) is accepted and matches nothing.
    assert milvus.search("docs", data=[mv.sparse_vector({})], anns_field="sparse", limit=K)[0] == []


# -- embed-corpus Parquet --------------------------------------------------------


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, package_dir):
    """The corpus through `m3 embed-corpus`'s job on a local Ray (float16 ColBERT), read back."""
    pytest.importorskip("ray")
    pq = pytest.importorskip("pyarrow.parquet")
    import ray
    from m3_runtime.corpus import CorpusJob, embed_corpus, init_ray

    root = tmp_path_factory.mktemp("corpus")
    with (root / "in.jsonl").open("w", encoding="utf-8") as fh:
        for i, t in zip(IDS, TEXTS, strict=True):
            fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    init_ray("local", 1)
    try:
        job = CorpusJob(
            package=str(package_dir), outputs=("dense", "sparse", "colbert"), colbert_dtype="float16", batch_rows=64
        )
        summary = embed_corpus(job, root / "in.jsonl", root / "out", say=lambda _m: None)
    finally:
        ray.shutdown()
    assert summary.rows == len(TEXTS)
    return pq.read_table(root / "out" / "in.parquet")


@pytest.fixture(scope="module")
def parquet_arrays(parquet) -> dict:
    """The Parquet's own values, as plain NumPy (the oracle's side, not the helpers')."""
    assert parquet["id"].to_pylist() == IDS
    lexical = [
        {str(k): float(v) for k, v in zip(idx, val, strict=True)}
        for idx, val in zip(parquet["sparse_indices"].to_pylist(), parquet["sparse_values"].to_pylist(), strict=True)
    ]
    colbert = [np.array(c, dtype=np.float32) for c in parquet["colbert"].to_pylist()]
    return {"dense": np.array(parquet["dense"].to_pylist(), dtype=np.float32), "lexical": lexical, "colbert": colbert}


def test_milvus_rows_from_embed_corpus_parquet(milvus, parquet, parquet_arrays, qs):
    """The oracle is the Parquet's own values (embed-corpus loads the CPU default, int8;
    tests/test_corpus.py checks those against encode)."""
    from m3_runtime.integrations import milvus as mv

    mv.create_collection(milvus, "parquet", dim=parquet_arrays["dense"].shape[1])
    batches = parquet.to_batches(max_chunksize=100)  # as one would insert a big file
    assert len(batches) > 1
    for batch in batches:
        milvus.insert("parquet", mv.rows_from_table(batch, payload_columns=("tokens",), empty_sparse="placeholder"))
    oracle = _oracle(qs, parquet_arrays["dense"], parquet_arrays["lexical"], parquet_arrays["colbert"])
    dense = milvus.search("parquet", data=list(qs["dense_vecs"]), anns_field="dense", limit=K, output_fields=["tokens"])
    sparse_data = [mv.sparse_vector(w) for w in qs["lexical_weights"]]
    sparse = milvus.search("parquet", data=sparse_data, anns_field="sparse", limit=K)
    tokens = parquet["tokens"].to_pylist()
    for i in range(len(QUERIES)):
        check_top(_milvus_hits([dense[i]])[0], oracle["dense"][i])
        assert [h["entity"]["tokens"] for h in dense[i]] == [tokens[POS[h["id"]]] for h in dense[i]]
        row = oracle["sparse"][i]
        check_top(_milvus_hits([sparse[i]])[0], row, pool=positive(row), k=min(K, len(positive(row))))


# -- pymilvus' BGEM3EmbeddingFunction interface ------------------------------------


@pytest.mark.exporter  # transformers, pymilvus-model
def test_embedding_function_returns_what_pymilvus_class_returns(model, package_dir):
    """The reference is pymilvus' own BGEM3EmbeddingFunction, its conversion code run as shipped
    on M3Model (a drop-in for BGEM3FlagModel.encode); only FlagEmbedding's loading is skipped."""
    pytest.importorskip("scipy")
    hybrid = pytest.importorskip("pymilvus.model.hybrid")
    from m3_runtime.integrations.milvus import BGEM3EmbeddingFunction, M3EmbeddingFunction
    from scipy.sparse import csr_array

    class Reference(hybrid.BGEM3EmbeddingFunction):
        def __init__(self, flag_model) -> None:  # the shipped __init__ loads FlagEmbedding from the hub
            self.model = flag_model
            self._encode_config = {
                "batch_size": 16,
                "return_dense": True,
                "return_sparse": True,
                "return_colbert_vecs": True,
            }

        @property
        def dim(self) -> dict:  # the shipped one reads BGEM3FlagModel's torch modules
            return expected_dim

    config = json.loads((ROOT / "models" / "tiny-m3" / "config.json").read_text())
    from transformers import AutoTokenizer  # len(tokenizer), as pymilvus' dim["sparse"] takes it

    expected_dim = {
        "dense": config["hidden_size"],
        "colbert_vecs": config["hidden_size"],  # BGE-M3's colbert_linear maps hidden -> hidden
        "sparse": len(AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-m3")),
    }
    ours = M3EmbeddingFunction(package_dir, batch_size=16, variant="fp32", return_colbert_vecs=True)
    assert BGEM3EmbeddingFunction is M3EmbeddingFunction
    assert ours.dim == expected_dim
    ref = Reference(model)
    texts = TEXTS[:40]
    for got, want in (
        (ours.encode_documents(texts), ref.encode_documents(texts)),
        (ours(texts), ref(texts)),
        (ours.encode_queries(QUERIES), ref.encode_queries(QUERIES)),
    ):
        assert list(got) == list(want) == ["dense", "sparse", "colbert_vecs"]
        assert type(got["dense"]) is list and len(got["dense"]) == len(want["dense"])
        for a, b in zip(got["dense"], want["dense"], strict=True):
            assert type(a) is type(b) is np.ndarray and a.dtype == b.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-6)
        s, r = got["sparse"], want["sparse"]
        assert type(s) is type(r) is csr_array
        assert (s.shape, s.dtype, s.indices.dtype, s.indptr.dtype) == (
            r.shape,
            r.dtype,
            r.indices.dtype,
            r.indptr.dtype,
        )
        assert s.has_sorted_indices and r.has_sorted_indices
        np.testing.assert_array_equal(s.indptr, r.indptr)
        np.testing.assert_array_equal(s.indices, r.indices)
        np.testing.assert_allclose(s.data, r.data, atol=1e-6)
        assert type(got["colbert_vecs"]) is type(want["colbert_vecs"]) is list
        for a, b in zip(got["colbert_vecs"], want["colbert_vecs"], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-6)
    empty = ours.encode_documents([])
    assert empty["dense"] == [] and empty["sparse"].shape == (0, expected_dim["sparse"])


def test_embedding_function_output_goes_into_milvus_as_pymilvus_documents(milvus, model, oracle):
    """The pymilvus tutorial's pattern: one-row CSR slices as rows and as search data."""
    from m3_runtime.integrations.milvus import M3EmbeddingFunction, create_collection

    fn = M3EmbeddingFunction(model)
    keep = [i for i in range(len(TEXTS)) if i not in EMPTY]  # Milvus refuses the empty rows (see above)
    out = fn.encode_documents([TEXTS[i] for i in keep])
    create_collection(milvus, "fn", dim=fn.dim["dense"])
    milvus.insert(
        "fn", [{"id": IDS[i], "dense": out["dense"][k], "sparse": out["sparse"][[k]]} for k, i in enumerate(keep)]
    )
    q = fn.encode_queries(QUERIES)
    for i in range(len(QUERIES)):
        (hits,) = milvus.search("fn", data=[q["sparse"][[i]]], anns_field="sparse", limit=K)
        row = oracle["sparse"][i]
        pool = np.intersect1d(positive(row), keep)
        check_top(_milvus_hits([hits])[0], row, pool=pool, k=min(K, len(pool)))
        (hits,) = milvus.search("fn", data=[q["dense"][i]], anns_field="dense", limit=K)
        check_top(_milvus_hits([hits])[0], oracle["dense"][i], pool=np.array(keep))


# -- Qdrant local mode -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qdrant(tmp_path_factory, docs):
    qdrant_client = pytest.importorskip("qdrant_client")
    from m3_runtime.integrations import qdrant as qd

    client = qdrant_client.QdrantClient(path=str(tmp_path_factory.mktemp("qdrant")))
    dim = docs["dense_vecs"].shape[1]
    payloads = [{"text": t} for t in TEXTS]
    qd.create_collection(client, "dot", dim=dim, dense_distance="dot")
    client.upsert("dot", qd.points_from_encode(IDS, docs, payloads=payloads))
    qd.create_collection(client, "cos16", dim=dim, dense_distance="cosine", colbert_dtype="float16")
    client.upsert("cos16", qd.points_from_encode(IDS, docs, payloads=payloads, colbert_dtype="float16"))
    yield client
    client.close()


def _qdrant_hits(points) -> list[tuple[int, float]]:
    return [(p.id, p.score) for p in points]


def _colbert16(qs, colbert) -> np.ndarray:
    rounded = [c.astype(np.float16).astype(np.float32) for c in colbert]
    return np.array([[scoring.colbert_score(a, b) for b in rounded] for a in qs["colbert_vecs"]])


@pytest.mark.parametrize("collection", ["dot", "cos16"])
def test_qdrant_dense_sparse_colbert_equal_brute_force(qdrant, qs, docs, oracle, collection):
    """DOT (and COSINE, on unit vectors) is q . p; the sparse score is compute_lexical_matching_score;
    MAX_SIM sums the best match over query tokens where FlagEmbedding's colbert_score averages,
    so Qdrant's score is colbert_score * len(q). float16: the stored vectors rounded to float16."""
    from m3_runtime.integrations.qdrant import sparse_vector

    q_len = np.array([len(c) for c in qs["colbert_vecs"]])
    colbert = oracle["colbert"] if collection == "dot" else _colbert16(qs, docs["colbert_vecs"])
    maxsim = colbert * q_len[:, None]
    for i in range(len(QUERIES)):
        dense = qdrant.query_points(collection, query=qs["dense_vecs"][i].tolist(), using="dense", limit=K).points
        check_top(_qdrant_hits(dense), oracle["dense"][i])
        w = qs["lexical_weights"][i]
        sparse = qdrant.query_points(collection, query=sparse_vector(w), using="sparse", limit=K).points
        row = oracle["sparse"][i]
        check_top(_qdrant_hits(sparse), row, pool=positive(row), k=min(K, len(positive(row))))
        full = qdrant.query_points(collection, query=qs["colbert_vecs"][i].tolist(), using="colbert", limit=K).points
        check_top(_qdrant_hits(full), maxsim[i])
        # divided by the query's token count, Qdrant's number is FlagEmbedding's colbert_score
        np.testing.assert_allclose([p.score / q_len[i] for p in full], colbert[i][[POS[p.id] for p in full]], **TOL)


def _prefetch_pool(i: int, oracle: dict) -> np.ndarray:
    """The PREFETCH best passages by dense score, with the PREFETCH best by sparse score (> 0)."""
    d_row, s_row = oracle["dense"][i], oracle["sparse"][i]
    d_top = np.argsort(-d_row, kind="stable")[:PREFETCH]
    s_pos = positive(s_row)
    return np.union1d(d_top, s_pos[np.argsort(-s_row[s_pos], kind="stable")][:PREFETCH])


@pytest.mark.parametrize("collection", ["dot", "cos16"])
def test_qdrant_hybrid_query_prefetch_then_colbert_rerank(qdrant, qs, docs, oracle, collection):
    """query_hybrid: the union of the PREFETCH best by dense and by sparse score, ordered by MAX_SIM."""
    from m3_runtime.integrations.qdrant import query_hybrid

    q_len = np.array([len(c) for c in qs["colbert_vecs"]])
    colbert = oracle["colbert"] if collection == "dot" else _colbert16(qs, docs["colbert_vecs"])
    for i in range(len(QUERIES)):
        query = {k: v[i] for k, v in qs.items()}
        hits = query_hybrid(qdrant, collection, query, limit=K, prefetch_limit=PREFETCH)
        check_top(_qdrant_hits(hits), colbert[i] * q_len[i], pool=_prefetch_pool(i, oracle))
        assert hits[0].payload["text"] == TEXTS[POS[hits[0].id]] and hits[0].payload["id"] == hits[0].id


def test_qdrant_empty_sparse_vector(qdrant, model, docs, oracle):
    """Qdrant accepts an empty sparse vector; it never matches, and an empty query finds nothing."""
    from m3_runtime.integrations.qdrant import query_hybrid, sparse_vector

    stored = qdrant.retrieve("dot", ids=[IDS[i] for i in EMPTY], with_vectors=True)
    assert len(stored) == len(EMPTY)
    assert all(p.vector["sparse"].indices == [] for p in stored)
    assert qdrant.query_points("dot", query=sparse_vector({}), using="sparse", limit=K).points == []
    # The empty text as the query: no lexical weights, so only the dense prefetch brings candidates.
    q = model.encode_queries("", return_sparse=True, return_colbert_vecs=True)
    assert q["lexical_weights"] == {}
    hits = query_hybrid(qdrant, "dot", q, limit=K, prefetch_limit=PREFETCH)
    dense = docs["dense_vecs"] @ q["dense_vecs"]
    pool = np.argsort(-dense, kind="stable")[:PREFETCH]
    maxsim = np.array([scoring.colbert_score(q["colbert_vecs"], p) for p in docs["colbert_vecs"]])
    check_top(_qdrant_hits(hits), maxsim * len(q["colbert_vecs"]), pool=pool)
    assert POS[hits[0].id] in EMPTY  # the empty text is its own best match


def test_qdrant_points_from_embed_corpus_parquet(qdrant, parquet, parquet_arrays, qs):
    """Parquet rows (float16 ColBERT, as embed-corpus wrote them) into a float16 collection."""
    from m3_runtime.integrations import qdrant as qd

    assert str(parquet.schema.field("colbert").type.value_type.value_type) == "halffloat"
    qd.create_collection(qdrant, "parquet", dim=parquet_arrays["dense"].shape[1], colbert_dtype="float16")
    for batch in parquet.to_batches(max_chunksize=100):
        qdrant.upsert("parquet", qd.points_from_table(batch, payload_columns=("tokens",), colbert_dtype="float16"))
    oracle = _oracle(qs, parquet_arrays["dense"], parquet_arrays["lexical"], parquet_arrays["colbert"])
    q_len = np.array([len(c) for c in qs["colbert_vecs"]])
    tokens = parquet["tokens"].to_pylist()
    for i in range(len(QUERIES)):
        hits = qd.query_hybrid(qdrant, "parquet", {k: v[i] for k, v in qs.items()}, prefetch_limit=PREFETCH)
        check_top(_qdrant_hits(hits), oracle["colbert"][i] * q_len[i], pool=_prefetch_pool(i, oracle))
        assert [h.payload["tokens"] for h in hits] == [tokens[POS[h.id]] for h in hits]


def test_qdrant_point_ids(qdrant, model):
    """Qdrant takes unsigned ints and UUIDs; other strings become a fixed UUID5, the original in the payload."""
    pa = pytest.importorskip("pyarrow")
    from m3_runtime.integrations import qdrant as qd

    u = str(uuid.uuid4())
    ids = ["doc-a", u, 5]
    assert qd.point_id("doc-a") == str(uuid.uuid5(qd.ID_NAMESPACE, "doc-a")) and qd.point_id(u) == u
    with pytest.raises(ValueError, match="-1 is out of range"):
        qd.point_id(-1)
    out = model.encode(["alpha", "beta", "gamma"], return_sparse=True, return_colbert_vecs=True)
    qd.create_collection(qdrant, "ids", dim=model.hidden_size)
    qdrant.upsert("ids", qd.points_from_encode(ids, out))
    got = {p.payload["id"]: p.id for p in qdrant.retrieve("ids", ids=[qd.point_id(x) for x in ids])}
    assert got == {x: qd.point_id(x) for x in ids}
    with pytest.raises(ValueError, match=r"sparse index 7 appears more than once"):
        qd.points_from_table(pa.table({"id": [1], "sparse_indices": [[7, 3, 7]], "sparse_values": [[1.0, 1.0, 1.0]]}))


def test_qdrant_refuses_points_without_an_output_the_collection_expects(qdrant, model, parquet):
    """A dense-only point in a hybrid collection is stored and never found by the hybrid
    query; building it is an error unless the caller asks for fewer outputs."""
    from m3_runtime.integrations import qdrant as qd

    dense_only = model.encode_corpus(["only dense here"])
    with pytest.raises(ValueError, match=r"row 0 \(id 9\) has no sparse output.* pass outputs=\('dense',\)"):
        qd.points_from_encode([9], dense_only)
    with_sparse = model.encode_corpus(["only dense here"], return_sparse=True)
    with pytest.raises(ValueError, match=r"row 0 \(id 'a'\) has no colbert output.*return_colbert_vecs=True"):
        qd.points_from_encode(["a"], with_sparse)
    no_colbert = parquet.select(["id", "dense", "sparse_indices", "sparse_values"])
    first_id = no_colbert.column("id")[0].as_py()
    with pytest.raises(ValueError, match=rf"row 0 \(id {first_id!r}\) has no colbert output.*colbert column"):
        qd.points_from_table(no_colbert)
    with pytest.raises(ValueError, match="outputs must be a non-empty list of dense, sparse, colbert"):
        qd.points_from_encode([9], dense_only, outputs=("dense", "bm25"))  # type: ignore[arg-type]

    # Asked for explicitly: built with what is there, and only the named vectors asked for.
    qd.create_collection(qdrant, "partial", dim=model.hidden_size)
    full = model.encode_corpus(["another text entirely"], return_sparse=True, return_colbert_vecs=True)
    point = qd.points_from_encode([10], full, outputs=("dense", "sparse"))[0]
    assert set(point.vector) == {"dense", "sparse"}
    qdrant.upsert("partial", qd.points_from_encode([9], dense_only, outputs=("dense",)))
    qdrant.upsert("partial", qd.points_from_encode([10], full))
    q = model.encode_queries("only dense here", return_sparse=True, return_colbert_vecs=True)
    assert [p.id for p in qd.query_hybrid(qdrant, "partial", q, limit=10)] == [10]  # why the default refuses
    assert {p.id for p in qdrant.query_points("partial", query=q["dense_vecs"].tolist(), using="dense").points} == {
        9,
        10,
    }


def test_milvus_refuses_rows_without_an_output_the_collection_expects(milvus, model):
    from m3_runtime.integrations import milvus as mv

    dense_only = model.encode_corpus(["only dense here", "and here"])
    with pytest.raises(ValueError, match=r"row 0 \(id 'x'\) has no sparse output.*outputs=\('dense',\)"):
        mv.rows_from_encode(["x", "y"], dense_only)
    rows = mv.rows_from_encode([5, 6], dense_only, outputs=("dense",))
    assert [sorted(r) for r in rows] == [["dense", "id"], ["dense", "id"]]
    mv.create_collection(milvus, "dense_only", dim=model.hidden_size, sparse=False)
    milvus.insert("dense_only", rows)
    hits = milvus.search("dense_only", data=[dense_only["dense_vecs"][1]], anns_field="dense", limit=1)
    assert hits[0][0]["id"] == 6


# -- LangChain -----------------------------------------------------------------------


def test_langchain_embeddings(model, package_dir, tmp_path):
    embeddings_mod = pytest.importorskip("langchain_core.embeddings")
    from m3_runtime.integrations.langchain import M3Embeddings

    emb = M3Embeddings(model)
    assert isinstance(emb, embeddings_mod.Embeddings)
    docs = emb.embed_documents(TEXTS[:20])
    assert type(docs) is list and all(type(v) is list and type(v[0]) is float for v in docs)
    np.testing.assert_allclose(docs, model.encode(TEXTS[:20])["dense_vecs"], atol=1e-6)
    np.testing.assert_allclose(emb.embed_query(QUERIES[0]), model.encode([QUERIES[0]])["dense_vecs"][0], atol=1e-6)
    # the async methods are langchain-core's own, over the sync ones
    assert asyncio.run(emb.aembed_query(QUERIES[0])) == emb.embed_query(QUERIES[0])
    assert asyncio.run(emb.aembed_documents(TEXTS[:3])) == emb.embed_documents(TEXTS[:3])
    with pytest.raises(TypeError, match="takes a list of texts"):
        emb.embed_documents("one text")

    # a package with a query instruction: embed_query prepends it, embed_documents does not
    pkg = tmp_path / "with-instruction"
    shutil.copytree(package_dir, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["query_instruction"] = "query: "
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    inst = M3Embeddings(pkg, variant="fp32")
    plain = M3Model(pkg, variant="fp32")
    np.testing.assert_allclose(inst.embed_query("lambda"), plain.encode(["query: lambda"])["dense_vecs"][0], atol=1e-6)
    assert not np.allclose(inst.embed_query("lambda"), plain.encode(["lambda"])["dense_vecs"][0], atol=1e-3)
    np.testing.assert_allclose(inst.embed_documents(["lambda"]), plain.encode(["lambda"])["dense_vecs"], atol=1e-6)


def test_langchain_in_memory_vector_store(model, oracle):
    """langchain-core's InMemoryVectorStore (cosine) over M3Embeddings orders as the dense brute force."""
    vectorstores = pytest.importorskip("langchain_core.vectorstores")
    from m3_runtime.integrations.langchain import M3Embeddings

    store = vectorstores.InMemoryVectorStore(M3Embeddings(model))
    store.add_texts(TEXTS, ids=[str(x) for x in IDS])
    for i in range(0, len(QUERIES), 5):
        found = store.similarity_search_with_score(QUERIES[i], k=K)
        check_top([(int(d.id), s) for d, s in found], oracle["dense"][i])


# -- packaging -----------------------------------------------------------------------


def test_integrations_import_no_torch_and_name_their_extra(package_dir):
    code = (
        "import sys; import m3_runtime.integrations.milvus as mv, m3_runtime.integrations.qdrant as qd; "
        "import m3_runtime.integrations.langchain as lc; from m3_runtime import M3Model; "
        f"m = M3Model({str(package_dir)!r}); out = m.encode(['a b'], return_sparse=True, return_colbert_vecs=True); "
        "mv.rows_from_encode([1], out); qd.points_from_encode([1], out); mv.M3EmbeddingFunction(m)(['x']); "
        "lc.M3Embeddings(m).embed_query('x'); "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    hint = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['pymilvus'] = None; from m3_runtime.integrations import milvus; "
            "milvus.create_schema(64)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install 'm3-runtime[milvus]'" in hint.stderr


# -- docs/integrations.md ------------------------------------------------------------


def test_docs_examples_run(package_dir, parquet, tmp_path, monkeypatch):
    """The Python blocks of docs/integrations.md, run in order in one namespace, on the tiny package."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("qdrant_client")
    pytest.importorskip("langchain_core")
    pq = pytest.importorskip("pyarrow.parquet")
    text = (ROOT / "docs" / "integrations.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embeddings").mkdir()
    pq.write_table(parquet, tmp_path / "embeddings" / "part-0.parquet")
    ns: dict = {}
    for k, block in enumerate(blocks):
        exec(compile(block.replace("path/to/bge-m3-package", str(package_dir)), f"integrations.md[{k}]", "exec"), ns)
        if k == 0:
            assert ns["hybrid_hits"][0] and ns["dense_hits"][0] and ns["sparse_hits"][0]
        if k == 2:
            assert ns["client"].query("pymilvus_style", filter="id >= 0", output_fields=["id"])
            ns["client"].close()  # the Milvus client; the next block makes a Qdrant one
    assert ns["hits"] and ns["store"].similarity_search("BGE", k=1)
    ns["client"].close()
