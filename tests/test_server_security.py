"""Bearer-token auth, request ids, the JSON access log and the bind warning, on real loopback servers."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.testing import free_port, start_server, wait_until_healthy

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "s3cret-key"
SECRET_TEXT = "my private medical note 4711"


_start = start_server  # url, server, thread of a live loopback server


class Spy:
    """Counts what reaches the model: ``engine.tokenize`` (the scheduler's first step) and ``engine.run``."""

    def __init__(self, engine) -> None:
        self.tokenized: list[list[str]] = []
        self.runs = 0
        tokenize, run = engine.tokenize, engine.run

        def spy_tokenize(texts, max_length):
            self.tokenized.append(list(texts))
            return tokenize(texts, max_length)

        def spy_run(batch, outputs, **kw):
            self.runs += 1
            return run(batch, outputs, **kw)

        engine.tokenize, engine.run = spy_tokenize, spy_run


@pytest.fixture(scope="module")
def guarded(package_dir):
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    spy = Spy(model.engine)
    app = create_app(model, ServerConfig(api_key=KEY, max_wait_ms=1))
    url, srv, thread = _start(app)
    yield url, model, spy, app.state.service
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.mark.parametrize(
    "headers, words",
    [
        ({}, "needs an API key"),
        ({"Authorization": "Bearer wrong"}, "wrong API key"),
        ({"Authorization": f"Bearer {KEY}x"}, "wrong API key"),
        ({"Authorization": KEY}, "must be 'Bearer KEY'"),
        ({"Authorization": f"Basic {KEY}"}, "must be 'Bearer KEY'"),
        ({"Authorization": "Bearer"}, "must be 'Bearer KEY'"),
    ],
)
def test_requests_without_the_key_get_401_and_never_reach_the_queue(guarded, headers, words):
    url, _, spy, service = guarded
    tokenized, runs, texts = len(spy.tokenized), spy.runs, service.scheduler.stats.texts
    for path, body in [
        ("/encode", {"texts": [SECRET_TEXT]}),
        ("/v1/embeddings", {"input": SECRET_TEXT}),
        ("/score", {"pairs": [[SECRET_TEXT, "x"]]}),
        ("/rerank", {"query": "q", "texts": [SECRET_TEXT]}),
    ]:
        res = httpx.post(url + path, json=body, headers=headers)
        assert res.status_code == 401, (path, res.text)
        assert words in res.json()["error"]["message"] and res.json()["error"]["code"] == 401
        assert res.headers["www-authenticate"].startswith("Bearer") and res.headers["x-request-id"]
    for path in ("/info", "/metrics"):  # /metrics too: it tells traffic; Prometheus can send a bearer token
        assert httpx.get(url + path, headers=headers).status_code == 401
    assert (len(spy.tokenized), spy.runs, service.scheduler.stats.texts) == (tokenized, runs, texts)
    assert service.scheduler.queued_texts == 0


def test_unauthorized_body_is_not_read(guarded):
    """401 comes from the headers alone: the client announces a gigabyte and sends none of it."""
    url, *_ = guarded
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 401")


def test_health_and_openapi_stay_open_and_the_key_works(guarded):
    url, model, spy, _ = guarded
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/openapi.json").status_code == 200
    runs = spy.runs
    res = httpx.post(url + "/encode", json={"texts": ["with the key"]}, headers={"Authorization": f"bearer {KEY}"})
    assert res.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    np.testing.assert_allclose(res.json()["results"][0]["dense"], model.encode("with the key")["dense_vecs"], atol=1e-6)
    assert spy.runs > runs
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert re.search(r'm3_requests_total\{path="/encode",status="401"\} \d+', metrics)


def test_request_ids_are_echoed_or_generated_on_every_response(guarded):
    url, *_ = guarded
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ("post", "/encode", {"json": {"texts": ["a"]}}, 200),
        ("post", "/encode", {"json": {"texts": 5}}, 422),
        ("post", "/encode", {"content": b"x" * 10, "headers": {"Content-Type": "text/plain"}}, 415),
        ("get", "/nowhere", {}, 404),
        ("get", "/health", {}, 200),
    ]
    for method, path, kwargs, status in cases:
        headers = {**auth, **kwargs.pop("headers", {})}
        res = getattr(httpx, method)(url + path, headers={**headers, "X-Request-ID": "trace-42/a:b"}, **kwargs)
        assert res.status_code == status and res.headers["x-request-id"] == "trace-42/a:b", path
        generated = {
            getattr(httpx, method)(url + path, headers=headers, **kwargs).headers["x-request-id"] for _ in range(3)
        }
        assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated), generated
    unauthorized = httpx.post(url + "/encode", json={"texts": ["a"]}, headers={"X-Request-ID": "no-key-1"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "no-key-1"
    # Too long, or not visible ASCII: replaced, so that logs stay one clean line per request.
    for bad in ("x" * 129, "tab\there", "caf\xe9".encode("latin-1")):
        got = httpx.get(url + "/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", got), (bad, got)


def _access_lines(caplog, *request_ids: str, timeout_s: float = 5.0) -> list[dict]:
    """The access log's lines once those of ``request_ids`` are there: the server writes a
    request's line after its last byte is sent, so the client can read the answer first."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "m3_runtime.access"]
        if {line["request_id"] for line in lines} >= set(request_ids) or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_access_log_is_one_json_line_per_request_without_texts(guarded, caplog):
    url, model, _, _ = guarded
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = [SECRET_TEXT, "another private line"]
    with caplog.at_level(logging.INFO, logger="m3_runtime.access"):
        ok = httpx.post(url + "/encode", json={"texts": texts}, headers={**auth, "X-Request-ID": "log-1"})
        httpx.post(url + "/encode", json={"texts": texts, "max_length": 1}, headers={**auth, "X-Request-ID": "log-2"})
        httpx.post(url + "/encode", json={"texts": texts}, headers={"X-Request-ID": "log-3"})
        lines = {r["request_id"]: r for r in _access_lines(caplog, "log-1", "log-2", "log-3")}
    assert ok.status_code == 200
    first = lines["log-1"]
    assert first["method"] == "POST" and first["path"] == "/encode" and first["status"] == 200
    assert first["texts"] == 2 and first["client"] == "127.0.0.1" and first["duration_ms"] > 0
    assert first["tokens"] == sum(len(x) for x in model.engine.tokenize(texts, model.passage_max_length))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert lines["log-2"]["status"] == 422 and "max_length" in lines["log-2"]["error"]
    assert lines["log-3"]["status"] == 401 and "texts" not in lines["log-3"]  # refused before parsing
    assert SECRET_TEXT not in caplog.text and "private" not in caplog.text
    assert "inputs" not in first


def test_log_texts_puts_the_texts_in_the_access_log(package_dir, caplog):
    from m3_runtime.server import ServerConfig, create_app

    url, srv, thread = _start(create_app(M3Model(package_dir, variant="fp32"), ServerConfig(log_texts=True)))
    try:
        with caplog.at_level(logging.INFO, logger="m3_runtime.access"):
            httpx.post(url + "/encode", json={"texts": [SECRET_TEXT]}, headers={"X-Request-ID": "with-texts"})
            line = next(r for r in _access_lines(caplog, "with-texts") if r["request_id"] == "with-texts")
        assert line["inputs"] == [SECRET_TEXT] and line["texts"] == 1
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_no_bind_warning_on_loopback(host):
    from m3_runtime.server import bind_warning

    assert bind_warning(host, api_key=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "my-host.example"])
def test_bind_warning_elsewhere(host):
    from m3_runtime.server import bind_warning

    open_ = bind_warning(host, api_key=False)
    assert open_ is not None and host in open_ and "--api-key" in open_ and "anyone" in open_
    keyed = bind_warning(host, api_key=True)
    assert keyed is not None and host in keyed and "anyone" not in keyed and "TLS" in keyed


def test_m3_serve_reads_the_key_from_the_environment_and_logs_json(package_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "m3"), "serve", str(package_dir), "--variant", "fp32", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, "M3_API_KEY": KEY},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 120)
        assert httpx.post(url + "/encode", json={"texts": [SECRET_TEXT]}).status_code == 401
        res = httpx.post(url + "/encode", json={"texts": [SECRET_TEXT]}, headers={"Authorization": f"Bearer {KEY}"})
        assert res.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = log.read_text()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["status"] for r in lines if r["path"] == "/encode"] == [401, 200]
    assert SECRET_TEXT not in out and KEY not in out
    assert "not on loopback" not in out  # 127.0.0.1 by default
    assert '"POST /encode HTTP/1.1"' not in out  # uvicorn's own access lines are off


def test_empty_api_key_is_refused(package_dir, capsys):
    from m3_runtime.cli import main

    assert main(["serve", str(package_dir), "--api-key", "  "]) == 2
    assert "API key" in capsys.readouterr().err
