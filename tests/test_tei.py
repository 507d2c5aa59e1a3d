"""text-embeddings-inference's API on a live loopback server, through the clients written
for TEI (huggingface_hub's InferenceClient, LlamaIndex's TextEmbeddingsInference), each
result compared with direct ``M3Model.encode``; plus /v1/models (the openai client),
/info in TEI's shape, unknown fields, /metrics' HELP lines and the start-up log."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model, M3Reranker
from m3_runtime.testing import free_port, start_server, wait_until_healthy

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

TEXTS = ["What is BGE M3?", "北京是中华人民共和国的首都。", "Быстрая коричневая лиса прыгает через ленивую собаку."]


@pytest.fixture(scope="module")
def live(package_dir, reranker_dir):
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    reranker = M3Reranker(reranker_dir, variant="fp32")
    app = create_app(model, ServerConfig(max_texts=16, max_chars=100_000, max_wait_ms=1), reranker=reranker)
    url, srv, thread = start_server(app)
    yield url, model, reranker
    srv.should_exit = True
    thread.join(timeout=30)


def test_embed_sparse_all_against_direct_encode(live):
    url, model, _ = live
    want = model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    dense = httpx.post(url + "/embed", json={"inputs": TEXTS}).json()
    np.testing.assert_allclose(dense, want["dense_vecs"], atol=1e-6)
    one = httpx.post(url + "/embed", json={"inputs": TEXTS[0], "normalize": True, "truncate": True}).json()
    np.testing.assert_allclose(one, want["dense_vecs"][:1], atol=1e-6)  # a lone string: still a list of one
    sparse = httpx.post(url + "/embed_sparse", json={"inputs": TEXTS}).json()
    for got, weights in zip(sparse, want["lexical_weights"], strict=True):
        assert [v["index"] for v in got] == sorted(int(k) for k in weights)  # TEI's [{index, value}], by index
        np.testing.assert_allclose([v["value"] for v in got], [weights[str(v["index"])] for v in got], atol=1e-6)
    colbert = httpx.post(url + "/embed_all", json={"inputs": TEXTS}).json()
    for got, vecs in zip(colbert, want["colbert_vecs"], strict=True):
        np.testing.assert_allclose(np.array(got), vecs, atol=1e-6)  # one vector per token after <s>


def test_tei_refusals_and_truncation(live):
    url, model, _ = live
    long_text = "word " * 9000
    res = httpx.post(url + "/embed", json={"inputs": ["short", long_text]})  # TEI's default: truncate false
    n = len(model.tokenizer.encode([long_text], 10**9)[0])
    assert n > model.max_length
    assert res.status_code == 413 and res.json() == {
        "error": f"'inputs[1]' has {n} tokens (limit {model.max_length}); send truncate=true",
        "error_type": "Validation",
    }
    cut = httpx.post(url + "/embed", json={"inputs": [long_text], "truncate": True}).json()
    np.testing.assert_allclose(cut, model.encode([long_text], max_length=model.max_length)["dense_vecs"], atol=1e-5)
    res = httpx.post(url + "/embed", json={"inputs": "a", "prompt_name": "query"})
    assert res.status_code == 400 and "'prompt_name' 'query'" in res.json()["error"]
    res = httpx.post(url + "/embed", json={"inputs": "a", "normalize": False})
    assert res.status_code == 400 and "'normalize' false" in res.json()["error"]
    res = httpx.post(url + "/embed", json={"inputs": "a", "truncation_direction": "left"})
    assert (
        res.status_code == 422 and "'truncation_direction'" in res.json()["error"] and '"left"' in res.json()["error"]
    )
    res = httpx.post(url + "/embed", json={"inputs": 3})
    assert res.status_code == 422 and res.json()["error"] == "field 'inputs' must be str or list, got int"


def test_tokenize_and_decode_against_the_tokenizer(live):
    url, model, _ = live
    tokens = httpx.post(url + "/tokenize", json={"inputs": TEXTS}).json()
    ids = model.tokenizer.encode(TEXTS, model.max_length)
    for text, row, want in zip(TEXTS, tokens, ids, strict=True):
        assert [t["id"] for t in row] == want
        assert row[0]["special"] and row[-1]["special"] and row[0]["start"] is None
        inner = row[1:-1]
        assert not any(t["special"] for t in inner)
        starts = [t["start"] for t in inner]
        assert starts == sorted(starts) and inner[-1]["stop"] == len(text)  # offsets cover the text in order
        assert all(t["text"] == text[t["start"] : t["stop"]] for t in inner)
    bare = httpx.post(url + "/tokenize", json={"inputs": TEXTS[0], "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == ids[0][1:-1]
    decoded = httpx.post(url + "/decode", json={"ids": ids}).json()
    assert decoded == TEXTS
    assert httpx.post(url + "/decode", json={"ids": ids[0]}).json() == [TEXTS[0]]
    res = httpx.post(url + "/decode", json={"ids": [10**9]})
    assert res.status_code == 422 and "'ids[0]' must be <=" in res.json()["error"]


def test_root_is_routed_as_tei_routes_it(live):
    url, model, _ = live
    got = httpx.post(url + "/", json={"inputs": TEXTS}).json()  # an embedding model: POST / is /embed
    np.testing.assert_allclose(got, model.encode(TEXTS)["dense_vecs"], atol=1e-6)


def test_huggingface_hub_inference_client(live):
    hub = pytest.importorskip("huggingface_hub")
    url, model, _ = live
    client = hub.InferenceClient(base_url=url)
    got = client.feature_extraction(TEXTS)
    np.testing.assert_allclose(got, model.encode(TEXTS)["dense_vecs"], atol=1e-6)
    got = client.feature_extraction(TEXTS[1], truncate=True, normalize=True)
    np.testing.assert_allclose(got, model.encode(TEXTS[1:2])["dense_vecs"], atol=1e-6)


def test_llamaindex_text_embeddings_inference(live):
    tei = pytest.importorskip("llama_index.embeddings.text_embeddings_inference")
    url, model, _ = live
    embedder = tei.TextEmbeddingsInference(model_name="m3", base_url=url, embed_batch_size=2)
    got = embedder.get_text_embedding_batch(TEXTS)  # two requests of two and one texts
    np.testing.assert_allclose(got, model.encode(TEXTS)["dense_vecs"], atol=1e-6)
    np.testing.assert_allclose(embedder.get_query_embedding(TEXTS[0]), model.encode(TEXTS[0])["dense_vecs"], atol=1e-6)


def test_info_in_tei_shape_beside_ours(live):
    url, model, _ = live
    info = httpx.get(url + "/info").json()
    # TEI's fields (router/src/lib.rs Info) for its clients...
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["max_input_length"] == model.max_length and info["max_client_batch_size"] == 16
    assert info["model_dtype"] == "fp32" and isinstance(info["version"], str)
    # ...and this server's, as before, with which endpoints each package serves.
    assert info["variant"] == "fp32" and info["hidden_size"] == model.hidden_size
    assert "/embed_sparse" in info["endpoints"] and "/" in info["endpoints"]
    assert info["reranker"]["kind"] == "reranker" and "/rerank" in info["reranker"]["endpoints"]


def test_openai_models_list(live):
    openai = pytest.importorskip("openai")
    url, model, reranker = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids == [model.package.manifest.source.get("id"), reranker.package.manifest.source.get("id")]
    body = client.embeddings.create(input=TEXTS[0], model=ids[0])  # an id from the list embeds
    np.testing.assert_allclose(body.data[0].embedding, model.encode(TEXTS[0])["dense_vecs"], atol=1e-6)


def test_unknown_fields_refused_on_native_endpoints_only(live):
    url, _, _ = live
    res = httpx.post(url + "/encode", json={"texts": ["a"], "colbert_formt": "list"})
    assert res.status_code == 422 and "'colbert_formt'" in res.json()["error"]["message"]
    res = httpx.post(url + "/score", json={"pairs": [["q", "p"]], "weight": [1, 1, 1]})
    assert res.status_code == 422 and "'weight'" in res.json()["error"]["message"]
    # OpenAI's, Cohere's and TEI's routes ignore them, as TEI's serde structs do.
    assert httpx.post(url + "/v1/embeddings", json={"input": "a", "extra": 1}).status_code == 200
    assert httpx.post(url + "/v1/rerank", json={"query": "q", "documents": ["a"], "rank_fields": []}).status_code == 200
    assert httpx.post(url + "/embed", json={"inputs": "a", "extra": 1}).status_code == 200


def test_over_long_rerank_pair_reports_its_real_length(live, reranker_dir):
    from tokenizers import Tokenizer

    url, _, reranker = live
    passage = "word " * 9000
    res = httpx.post(url + "/rerank", json={"query": "q", "texts": [passage], "truncate": False})
    tok = Tokenizer.from_file(str(Path(reranker_dir) / "tokenizer.json"))
    # <s> q </s></s> passage </s>: the pair's tokens plus XLM-R's four specials.
    n = len(tok.encode("q", add_special_tokens=False).ids) + len(tok.encode(passage, add_special_tokens=False).ids) + 4
    assert n > 9000
    assert res.status_code == 413
    assert res.json()["error"]["message"] == f"pair 0 has {n} tokens (limit {reranker.max_length}); send truncate=true"


def test_metrics_have_help_lines(live):
    url, _, _ = live
    httpx.post(url + "/embed", json={"inputs": "a"})
    text = httpx.get(url + "/metrics").text
    for name in ("m3_requests_total", "m3_request_seconds", "m3_texts_total", "m3_batch_texts", "m3_queue_texts"):
        assert re.search(rf"^# HELP {name} \S", text, flags=re.M), name
    assert re.search(r'^m3_requests_total\{path="/embed",status="200"\} [1-9]', text, flags=re.M)


def test_startup_log_says_what_serves_what(package_dir, reranker_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    m3 = str(Path(sys.executable).parent / "m3")
    args = [m3, "serve", str(package_dir), "--reranker", str(reranker_dir), "--variant", "fp32", "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", 120)
        time.sleep(0.2)
        lines = [line for line in log.read_text().splitlines() if line.startswith("INFO")]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    embedder = next(line for line in lines if " embedder " in line)
    assert str(package_dir) in embedder and "variant fp32 on CPUExecutionProvider" in embedder
    assert "serves /v1/embeddings /embeddings /encode /score /embed /embed_sparse /embed_all /" in embedder
    reranker = next(line for line in lines if " reranker " in line)
    assert str(reranker_dir) in reranker and "serves /rerank /v1/rerank /v2/rerank" in reranker
    assert len(lines) == len(set(lines)), lines  # no line twice
