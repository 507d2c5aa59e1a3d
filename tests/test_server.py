"""The HTTP server, started for real on a loopback port, checked against direct encode."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.testing import free_port, wait_until_healthy

httpx = pytest.importorskip("httpx")  # installed with the test tools
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(package_dir):
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    port = free_port()
    config = ServerConfig(max_texts=100, max_chars=5000, max_queue=64, max_wait_ms=20)
    srv = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 60)
    yield url, model
    srv.should_exit = True
    thread.join(timeout=30)


TEXTS = ["What is BGE M3?", "北京是中华人民共和国的首都。", "", "Быстрая коричневая лиса прыгает через ленивую собаку."]


def test_health_info_metrics(server):
    url, model = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    info = httpx.get(url + "/info").json()
    assert info["variant"] == "fp32" and info["hidden_size"] == model.hidden_size
    httpx.post(url + "/encode", json={"texts": ["metrics"]})
    text = httpx.get(url + "/metrics").text
    assert 'm3_requests_total{path="/encode",status="200"}' in text and "m3_tokens_total" in text


def test_openai_embeddings(server):
    url, model = server
    want = model.encode(TEXTS)["dense_vecs"]
    body = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, "model": "m3"}).json()
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(
        len(x) for x in model.tokenizer.encode(TEXTS, model.passage_max_length)
    )
    b64 = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vec, want[0], atol=1e-6)
    res = httpx.post(url + "/v1/embeddings", json={"input": "x", "dimensions": 8})
    assert res.status_code == 400 and "dimensions" in res.json()["error"]["message"]


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    url, model = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    out = client.embeddings.create(input=TEXTS, model="m3")
    got = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(got, model.encode(TEXTS)["dense_vecs"], atol=1e-6)  # the client asks for base64


def test_encode_all_outputs_and_formats(server):
    url, model = server
    want = model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    rows = httpx.post(url + "/encode", json={"texts": TEXTS, "sparse": True, "colbert": True}).json()["results"]
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row["dense"], want["dense_vecs"][i], atol=1e-6)
        assert row["sparse"].keys() == want["lexical_weights"][i].keys()
        np.testing.assert_allclose(
            np.array(row["colbert"]).reshape(-1, model.hidden_size), want["colbert_vecs"][i], atol=1e-6
        )
    packed = httpx.post(
        url + "/encode",
        json={
            "texts": TEXTS[:1],
            "dense": False,
            "sparse": True,
            "colbert": True,
            "sparse_format": "indices",
            "colbert_format": "base64-float16",
        },
    ).json()["results"][0]
    assert packed["sparse"]["indices"] == [int(k) for k in want["lexical_weights"][0]]
    c = packed["colbert"]
    vecs = np.frombuffer(base64.b64decode(c["data"]), dtype=np.float16).reshape(c["shape"])
    np.testing.assert_allclose(vecs, want["colbert_vecs"][0], atol=1e-3)


def test_score(server):
    url, model = server
    pairs = [["What is BGE M3?", "BGE M3 is an embedding model"], ["fox", "Der schnelle braune Fuchs"]]
    got = httpx.post(url + "/score", json={"pairs": pairs, "weights": [0.4, 0.2, 0.4]}).json()
    want = model.compute_score([tuple(p) for p in pairs], weights_for_different_modes=[0.4, 0.2, 0.4])
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, atol=1e-6)


@pytest.mark.parametrize(
    "path, payload, status, words",
    [
        ("/encode", b"{not json", 422, "not valid JSON"),
        ("/encode", {"texts": [1, 2]}, 422, "texts[0]"),
        ("/encode", {"texts": ["a"], "sparse": "yes"}, 422, "'sparse' must be bool"),
        ("/encode", {"texts": ["a"], "max_length": 99999}, 422, "max_length"),
        ("/encode", {"texts": ["a"] * 101}, 413, "limit 100"),
        ("/encode", {"texts": ["a" * 5001]}, 413, "5001 characters"),
        ("/v1/embeddings", {"model": "m3"}, 422, "'input' is required"),
        ("/score", {"pairs": [["only one"]]}, 422, "pairs[0]"),
    ],
)
def test_bad_requests(server, path, payload, status, words):
    url, _ = server
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    res = httpx.post(url + path, **kwargs)
    assert res.status_code == status
    assert words in res.json()["error"]["message"]


def test_full_queue_answers_429(server):
    url, _ = server
    res = httpx.post(url + "/encode", json={"texts": ["q"] * 65})  # more than the queue holds
    assert res.status_code == 429 and res.headers["Retry-After"] == "1"


def test_concurrent_requests_get_their_own_results(server):
    url, model = server
    requests = [[f"request {i} text {j} " + "word " * (i * 7 % 40) for j in range(1 + i % 4)] for i in range(24)]

    def call(texts):
        return httpx.post(url + "/encode", json={"texts": texts, "sparse": True}, timeout=120).json()["results"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, requests))
    for texts, rows in zip(requests, answers, strict=True):
        want = model.encode(texts, return_sparse=True)
        assert len(rows) == len(texts)
        for row, vec, weights in zip(rows, want["dense_vecs"], want["lexical_weights"], strict=True):
            np.testing.assert_allclose(row["dense"], vec, atol=1e-5)
            assert row["sparse"].keys() == weights.keys()
    metrics = httpx.get(url + "/metrics").text
    batches = int(float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("m3_batches_total"))))
    texts = int(float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("m3_texts_total"))))
    assert texts > batches  # requests were merged into shared model calls


def test_sigterm_drains_in_flight_requests(package_dir):
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "m3"), "serve", str(package_dir), "--variant", "fp32", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 120)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, url + "/encode", json={"texts": ["long " * 4000], "colbert": True}, timeout=120
            )
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            res = pending.result()
        assert res.status_code == 200 and len(res.json()["results"][0]["colbert"]) > 1000
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit is -SIGTERM, not a crash code.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stderr.read()  # the lifespan drained the batcher
    finally:
        if proc.poll() is None:
            proc.kill()


def test_runtime_server_stays_torch_free(package_dir):
    code = (
        "import sys; from m3_runtime.server import create_app; from m3_runtime import M3Model; "
        f"create_app(M3Model({str(package_dir)!r})); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')]; sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_server_json_is_standard(server):
    url, _ = server
    raw = httpx.post(url + "/encode", json={"texts": ["x"], "sparse": True}).text
    json.loads(raw)  # no NaN/Infinity tokens


def test_request_timeout_answers_503_and_queued_work_never_runs(package_dir):
    """A request still unanswered after ``request_timeout_s`` gets 503; one that timed out
    while queued never reaches the model; the next request gets its own right numbers."""
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    seen: list[list[str]] = []
    encode = model.encode
    run = model.engine.run
    decode = model.tokenizer._tok.decode_batch

    def slow_run(batch, outputs, **kw):  # the scheduler's forward passes go through Engine.run
        texts = decode(batch.input_ids.tolist(), skip_special_tokens=True)
        seen.append(texts)
        if "slow" in texts:
            time.sleep(1.5)
        return run(batch, outputs, **kw)

    model.engine.run = slow_run  # type: ignore[method-assign]
    port = free_port()
    config = ServerConfig(max_wait_ms=1, request_timeout_s=0.5, workers=1)  # one worker: the second request queues
    srv = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 60)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/encode", json={"texts": ["slow"]}, timeout=10)
            time.sleep(0.2)  # "slow" is on the model thread now
            queued = pool.submit(httpx.post, url + "/encode", json={"texts": ["queued behind"]}, timeout=10)
            for res in (running.result(), queued.result()):
                assert res.status_code == 503 and res.headers["Retry-After"] == "1"
                assert "within 0.5 s" in res.json()["error"]["message"]
        time.sleep(1.5)  # the slow call finishes; its result is discarded
        fine = httpx.post(url + "/encode", json={"texts": TEXTS}, timeout=10)
        assert fine.status_code == 200
        got = np.array([row["dense"] for row in fine.json()["results"]])
        np.testing.assert_allclose(got, encode(TEXTS)["dense_vecs"], atol=1e-6)
        assert ["queued behind"] not in seen and ["slow"] in seen
        metrics = httpx.get(url + "/metrics").text
        assert 'm3_requests_total{path="/encode",status="503"} 2.0' in metrics
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def _poison_token(package: Path, token_id: int) -> None:
    """Make the fp32 graph's embedding row of ``token_id`` NaN, in place, and re-hash the
    changed file in the manifest (as an export would): a model that gives NaN for any text
    holding that token, and finite outputs for every other text."""
    import hashlib

    import onnx

    graph = onnx.load(str(package / "model.fp32.onnx"), load_external_data=False)
    table = next(t for t in graph.graph.initializer if t.name.endswith("word_embeddings.weight"))
    where = {e.key: e.value for e in table.external_data}
    hidden = table.dims[1]
    data = package / where["location"]
    with data.open("r+b") as f:
        f.seek(int(where.get("offset", 0)) + token_id * hidden * 4)
        f.write(np.full(hidden, np.nan, np.float32).tobytes())
    manifest = json.loads((package / "manifest.json").read_text())
    for entry in manifest["variants"]["fp32"]["files"]:
        if entry["path"] == where["location"]:
            entry["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    (package / "manifest.json").write_text(json.dumps(manifest))


def test_a_model_giving_nan_gets_500_naming_the_text_never_null(package_dir, tmp_path):
    """orjson writes NaN as null; a model output holding NaN is refused with a 500 that
    names the output and the text, and the texts without the poisoned token still work."""
    import shutil

    from m3_runtime.server import ServerConfig, create_app

    pkg = tmp_path / "poisoned"
    shutil.copytree(package_dir, pkg)
    clean = M3Model(package_dir, variant="fp32")
    token = clean.tokenizer.encode(["zebra"], 16)[0][-2]  # its last piece, not the shared "▁"
    assert token not in clean.tokenizer.encode(["a quiet horse"], 16)[0]
    _poison_token(pkg, token)
    model = M3Model(pkg, variant="fp32")
    assert np.isnan(model.encode(["zebra"])["dense_vecs"]).all()  # the oracle: the model itself gives NaN
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(model, ServerConfig()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 60)
        ok = httpx.post(url + "/encode", json={"texts": ["a quiet horse"]})
        assert ok.status_code == 200 and np.isfinite(ok.json()["results"][0]["dense"]).all()
        for path, body in (
            ("/encode", {"texts": ["a quiet horse", "zebra"]}),
            ("/v1/embeddings", {"input": ["a quiet horse", "zebra"]}),
            ("/embed", {"inputs": ["a quiet horse", "zebra"]}),
        ):
            res = httpx.post(url + path, json=body)
            assert res.status_code == 500, (path, res.text)
            assert "dense output for text 1 holds NaN" in res.text and "null" not in res.text, (path, res.text)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
