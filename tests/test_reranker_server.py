"""/rerank (text-embeddings-inference's shape) and /v1|v2/rerank (Cohere's) on a real loopback server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from m3_runtime import M3Model, M3Reranker
from m3_runtime.testing import start_server

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital of France.",
    "",
    "Bananas are yellow 🍌",
    "Berlin ist die Hauptstadt Deutschlands.",
    "パリ",
]


_start = start_server  # url, server, thread of a live loopback server


@pytest.fixture(scope="module")
def both(package_dir, reranker_dir):
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    reranker = M3Reranker(reranker_dir, variant="fp32")
    url, srv, thread = _start(create_app(model, ServerConfig(max_wait_ms=20, max_texts=50), reranker=reranker))
    yield url, model, reranker
    srv.should_exit = True
    thread.join(timeout=30)


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_tei_rerank(both):
    url, _, reranker = both
    raw = reranker.compute_score([(QUERY, d) for d in DOCS])
    rows = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCS}).json()
    assert [r["index"] for r in rows] == list(np.argsort(-np.array(raw), kind="stable"))
    np.testing.assert_allclose([r["score"] for r in rows], _sigmoid(sorted(raw, reverse=True)), atol=1e-6)
    rows = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True})
    for row in rows.json():
        assert row["text"] == DOCS[row["index"]]
        assert abs(row["score"] - raw[row["index"]]) < 1e-6


def test_cohere_clients(both):
    cohere = pytest.importorskip("cohere")
    url, _, reranker = both
    want = _sigmoid(reranker.compute_score([(QUERY, d) for d in DOCS]))
    v1 = cohere.Client(api_key="unused", base_url=url)
    out = v1.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [r.index for r in out.results] == list(np.argsort(-want, kind="stable")[:3])
    for r in out.results:
        assert abs(r.relevance_score - want[r.index]) < 1e-6 and r.document.text == DOCS[r.index]
    v2 = cohere.ClientV2(api_key="unused", base_url=url)
    out = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS)
    assert sorted(r.index for r in out.results) == list(range(len(DOCS)))
    np.testing.assert_allclose([r.relevance_score for r in out.results], sorted(want, reverse=True), atol=1e-6)


def test_reranks_batch_across_requests_and_share_the_queue(both):
    url, model, reranker = both
    queries = [f"query {i} " + "word " * (i % 9) for i in range(16)]

    def call(q):
        return httpx.post(url + "/rerank", json={"query": q, "texts": DOCS, "raw_scores": True}, timeout=60).json()

    def embed(i):
        return httpx.post(url + "/encode", json={"texts": [queries[i]]}, timeout=60).json()

    with ThreadPoolExecutor(8) as pool:
        reranks = list(pool.map(call, queries))
        embeds = list(pool.map(embed, range(len(queries))))
    for q, rows in zip(queries, reranks, strict=True):
        want = reranker.compute_score([(q, d) for d in DOCS])
        np.testing.assert_allclose([r["score"] for r in sorted(rows, key=lambda r: r["index"])], want, atol=1e-5)
    for q, body in zip(queries, embeds, strict=True):
        np.testing.assert_allclose(body["results"][0]["dense"], model.encode(q)["dense_vecs"], atol=1e-5)
    metrics = httpx.get(url + "/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("m3_")}
    assert value["m3_texts_total"] > value["m3_batches_total"]


@pytest.mark.parametrize(
    "path, payload, status, words",
    [
        ("/rerank", {"texts": ["a"]}, 422, "'query' is required"),
        ("/rerank", {"query": "q", "texts": [1]}, 422, "texts[0]"),
        ("/rerank", {"query": "q", "texts": ["a"] * 51}, 413, "limit 50"),
        ("/rerank", {"query": "q", "texts": ["word " * 600], "truncate": False}, 413, "truncate=true"),
        ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422, "documents[0]"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ],
)
def test_bad_rerank_requests(both, path, payload, status, words):
    url, _, _ = both
    res = httpx.post(url + path, json=payload)
    assert res.status_code == status and words in res.json()["error"]["message"]


def test_reranker_only_server(reranker_dir):
    from m3_runtime.server import create_app

    reranker = M3Reranker(reranker_dir, variant="fp32")
    url, srv, thread = _start(create_app(None, reranker=reranker))
    try:
        assert httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200
        res = httpx.post(url + "/encode", json={"texts": ["x"]})
        assert res.status_code == 404 and "only a reranker" in res.json()["error"]["message"]
        info = httpx.get(url + "/info").json()
        assert info["reranker"]["kind"] == "reranker" and "reranker" in info["model_type"]  # TEI's field too
        # TEI routes POST / by its model's kind: a reranker's is /rerank.
        root = httpx.post(url + "/", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
        want = reranker.compute_score([(QUERY, d) for d in DOCS])
        np.testing.assert_allclose([r["score"] for r in sorted(root, key=lambda r: r["index"])], want, atol=1e-5)
        assert "/" in info["reranker"]["endpoints"]
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_embedder_only_server_refuses_rerank(package_dir):
    from m3_runtime.server import create_app

    url, srv, thread = _start(create_app(M3Model(package_dir, variant="fp32")))
    try:
        res = httpx.post(url + "/rerank", json={"query": "q", "texts": ["a"]})
        assert res.status_code == 404 and "--reranker" in res.json()["error"]["message"]
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
