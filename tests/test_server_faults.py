"""Faults on a real loopback server: clients that vanish or dawdle, bodies over the limit,
SIGTERM under load, and a package file corrupted while the server runs.

Forward passes are observed through ``Engine.run`` (the scheduler's only way to the
model), as in test_server.py's timeout test; raw sockets give the byte-level control
that an HTTP client library hides.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.testing import free_port, start_server, wait_until_healthy

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

TEXTS = ["What is BGE M3?", "北京是中华人民共和国的首都。", ""]


_start = start_server  # url, server, thread of a live loopback server


def _stop(srv, thread) -> None:
    srv.should_exit = True
    thread.join(timeout=30)


def _until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.01)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _head(path: str, url: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.removeprefix('http://')}", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


class Recorder:
    """Wraps ``engine.run``: records each pass's token-id rows; ``hold`` blocks passes
    containing given ids until released."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.run = engine.run
        self.rows: list[tuple[int, ...]] = []
        self.hold_ids: tuple[int, ...] | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        engine.run = self

    def __call__(self, batch, outputs, **kw):
        rows = [
            tuple(int(t) for t, m in zip(r, k, strict=True) if m)
            for r, k in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]
        self.rows += rows
        if self.hold_ids is not None and self.hold_ids in rows:
            self.holding.set()
            self.release.wait(30)
        return self.run(batch, outputs, **kw)


def _ids(model: M3Model, text: str) -> tuple[int, ...]:
    return tuple(model.engine.tokenize([text], model.passage_max_length)[0])


def _queued(service) -> int:
    return len(service.scheduler.pending)


@pytest.fixture()
def held(package_dir):
    """A one-worker server whose passes over the text "hold the worker" wait for
    ``release``: what comes after them queues."""
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    recorder = Recorder(model.engine)
    app = create_app(model, ServerConfig(max_wait_ms=1, request_timeout_s=30, workers=1))
    url, srv, thread = _start(app)
    recorder.hold_ids = _ids(model, "hold the worker")
    yield url, model, recorder, app.state.service
    recorder.release.set()
    _stop(srv, thread)


def test_client_that_disconnects_while_queued_has_its_work_dropped(held):
    url, model, recorder, service = held
    want = model.encode(TEXTS)["dense_vecs"]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/encode", json={"texts": ["hold the worker"]}, timeout=60)
        assert recorder.holding.wait(20)  # the only worker is busy with it now
        body = json.dumps({"texts": ["gone before its turn"]}).encode()
        sock = _connect(url)
        sock.sendall(_head("/encode", url, Content_Length=str(len(body))) + body)
        _until(lambda: _queued(service) == 1, what="the vanishing client's text queued")
        sock.close()
        _until(lambda: _queued(service) == 0, what="the disconnect noticed")
        other = pool.submit(httpx.post, url + "/encode", json={"texts": TEXTS}, timeout=60)
        recorder.release.set()
        res_first, res_other = first.result(), other.result()
    assert res_first.status_code == 200 and res_other.status_code == 200
    got = np.array([row["dense"] for row in res_other.json()["results"]])
    np.testing.assert_allclose(got, want, atol=1e-5)  # others unaffected
    np.testing.assert_allclose(
        res_first.json()["results"][0]["dense"], model.encode("hold the worker")["dense_vecs"], atol=1e-5
    )
    assert _ids(model, "gone before its turn") not in recorder.rows  # never reached the model
    metrics = httpx.get(url + "/metrics").text
    assert 'm3_requests_total{path="/encode",status="499"} 1.0' in metrics
    assert service.scheduler.queued_texts == 0


def test_client_that_disconnects_mid_body_never_reaches_the_queue(held):
    url, _model, _recorder, service = held
    before = service.scheduler.stats.texts
    sock = _connect(url)
    sock.sendall(_head("/encode", url, Content_Length="1000") + b'{"texts": ["half a bo')
    time.sleep(0.2)  # let the server start reading the body
    sock.close()
    _until(lambda: 'status="499"' in httpx.get(url + "/metrics").text, what="the aborted upload counted as 499")
    res = httpx.post(url + "/encode", json={"texts": TEXTS})
    assert res.status_code == 200
    assert service.scheduler.stats.texts == before + len(TEXTS)  # nothing of the aborted request ran


def test_slow_body_does_not_block_others_and_gets_its_answer(held):
    """The slow client sends half its body, waits until other clients were answered, then the rest."""
    url, model, _, _ = held
    body = json.dumps({"texts": ["a slow upload"], "sparse": True}).encode()
    sock = _connect(url)
    sock.sendall(_head("/encode", url, Content_Length=str(len(body))))
    half = len(body) // 2
    for i in range(0, half, 4):  # a few bytes at a time
        sock.sendall(body[i : min(i + 4, half)])
        time.sleep(0.01)
    others = [httpx.post(url + "/encode", json={"texts": [f"meanwhile {i}"]}, timeout=30) for i in range(5)]
    assert [r.status_code for r in others] == [200] * 5  # served while the slow body is incomplete
    sock.sendall(body[half:])
    status, headers, data = _response(sock)
    sock.close()
    assert status == 200 and headers["x-request-id"]
    want = model.encode(["a slow upload"], return_sparse=True)
    row = json.loads(data)["results"][0]
    np.testing.assert_allclose(row["dense"], want["dense_vecs"][0], atol=1e-5)
    assert row["sparse"].keys() == want["lexical_weights"][0].keys()


def test_body_not_received_within_the_timeout_gets_408(package_dir):
    from m3_runtime.server import ServerConfig, create_app

    app = create_app(M3Model(package_dir, variant="fp32"), ServerConfig(request_timeout_s=1))
    url, srv, thread = _start(app)
    try:
        sock = _connect(url)
        sock.sendall(_head("/encode", url, Content_Length="100") + b'{"texts": ')  # and then nothing
        status, headers, data = _response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert "not received within 1 s" in json.loads(data)["error"]["message"]
        assert sock.recv(1) == b""  # the server closed the connection
        sock.close()
        assert httpx.post(url + "/encode", json={"texts": ["fine"]}).status_code == 200
    finally:
        _stop(srv, thread)


def test_body_over_the_limit_gets_413_before_it_is_read(package_dir):
    from m3_runtime.server import ServerConfig, create_app

    app = create_app(M3Model(package_dir, variant="fp32"), ServerConfig(max_body_bytes=1000))
    service = app.state.service
    url, srv, thread = _start(app)
    try:
        before = service.scheduler.stats.texts
        # Content-Length over the limit: answered from the headers alone (no body byte is sent).
        sock = _connect(url)
        sock.sendall(_head("/encode", url, Content_Length=str(10**9)))
        status, headers, data = _response(sock)
        sock.close()
        message = json.loads(data)["error"]["message"]
        assert status == 413 and "1000000000 bytes (Content-Length)" in message and "1000" in message
        assert headers["connection"] == "close"  # the unread body makes the connection unusable
        # Chunked: refused once the count passes the limit, before the final chunk is sent.
        sock = _connect(url)
        sock.sendall(_head("/encode", url, Transfer_Encoding="chunked"))
        piece = b'{"texts": ["' + b"x" * 300
        for _ in range(4):  # 1,248 bytes > 1,000
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        status, _headers, data = _response(sock)
        sock.close()
        assert status == 413 and "over the limit of 1000 bytes" in json.loads(data)["error"]["message"]
        # An ordinary client.
        res = httpx.post(url + "/encode", json={"texts": ["y" * 2000]})
        assert res.status_code == 413 and res.json()["error"]["code"] == 413
        # At the limit exactly: read and parsed.
        at_limit = json.dumps({"texts": ["z" * (1000 - len(json.dumps({"texts": [""]})))]})
        assert len(at_limit) == 1000
        assert httpx.post(url + "/encode", content=at_limit).status_code == 200
        assert service.scheduler.stats.texts == before + 1  # only the last request reached the model
    finally:
        _stop(srv, thread)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _arrived(url: str, n: int, queued: int) -> bool:
    """All ``n`` requests reached the server (answered, queued, or the one pass running) and
    at least ``queued`` of them wait in the queue."""
    text = httpx.get(url + "/metrics", timeout=10).text
    done = sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith('m3_requests_total{path="/encode"')
    )
    waiting = _metric(url, "m3_queue_texts")
    return done + waiting >= n - 1 and waiting >= queued


def _serve(package_dir, port: int, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "m3"),
            "serve",
            str(package_dir),
            "--variant",
            "fp32",
            "--port",
            str(port),
            "--max-wait-ms",
            "1",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, **(env or {})},
    )


def test_sigterm_under_load_answers_in_flight_and_queued_refuses_new(package_dir, tmp_path):
    model = M3Model(package_dir, variant="fp32")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(package_dir, port, log, "--drain-timeout-s", "60")
    url = f"http://127.0.0.1:{port}"
    texts = [f"request {i} " + "long " * 6000 for i in range(8)]  # ~0.4 s a pass here, one worker
    try:
        wait_until_healthy(url, 120)
        with ThreadPoolExecutor(len(texts)) as pool:
            pending = [
                pool.submit(
                    httpx.post, url + "/encode", json={"texts": [t]}, headers={"X-Request-ID": f"load-{i}"}, timeout=120
                )
                for i, t in enumerate(texts)
            ]
            _until(lambda: _arrived(url, len(texts), 3), what="every request in, three queued")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            def refused() -> bool:
                try:
                    # Accepted before the listening socket closed: answered (200) like the others.
                    return httpx.post(url + "/encode", json={"texts": ["late"]}, timeout=60).status_code == 503
                except (httpx.ConnectError, httpx.RemoteProtocolError):  # refused, or closed unanswered
                    return True

            _until(refused, what="a new request refused")
            unanswered = sum(not f.done() for f in pending)
            answers = [f.result() for f in pending]
        assert unanswered >= 1  # refusals began while earlier requests were still being answered
        assert [r.status_code for r in answers] == [200] * len(texts)
        got = np.array([r.json()["results"][0]["dense"] for r in answers])
        np.testing.assert_allclose(got, model.encode(texts)["dense_vecs"], atol=1e-5)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 60
        out = log.read_text()
        assert "Application shutdown complete" in out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        logged = {r["request_id"]: r["status"] for r in lines if r["request_id"].startswith("load-")}
        assert logged == {f"load-{i}": 200 for i in range(len(texts))}
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_exits_within_the_drain_timeout_when_work_outlasts_it(package_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(package_dir, port, log, "--drain-timeout-s", "2")
    url = f"http://127.0.0.1:{port}"
    texts = [f"request {i} " + "long " * 6000 for i in range(40)]  # tens of seconds of passes
    try:
        wait_until_healthy(url, 120)
        with ThreadPoolExecutor(len(texts)) as pool:
            pending = [pool.submit(httpx.post, url + "/encode", json={"texts": [t]}, timeout=120) for t in texts]
            _until(lambda: _arrived(url, len(texts), 20), what="every request in, twenty queued")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = proc.wait(timeout=30)
            took = time.monotonic() - signalled
            answers = [f.result() for f in pending]
        assert code in (0, -signal.SIGTERM)
        assert took < 2 + 5  # the drain timeout plus at most a running pass and the exit
        statuses = [r.status_code for r in answers]
        assert set(statuses) == {200, 503}, statuses  # each answered or told, none run to the end
        cut = next(r for r in answers if r.status_code == 503)
        assert "shut down before the answer (drain timeout 2 s)" in cut.json()["error"]["message"]
        assert "timeout graceful shutdown exceeded" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_package_corrupted_while_serving_is_refused_not_read(package_dir, tmp_path):
    """The data file is overwritten in place under a running server. Its weights are
    memory-mapped (see server.PackageWatch), so the server stops answering (503, and
    /health says why) instead of computing with the changed bytes; a restart verifies
    the SHA-256 again and refuses the package with PackageError."""
    from m3_runtime.package import PackageError
    from m3_runtime.server import ServerConfig, create_app

    copy = tmp_path / "pkg"
    shutil.copytree(package_dir, copy)
    cache = tmp_path / "cache"
    model = M3Model(copy, variant="fp32", cache_dir=cache / "m3-runtime")
    want = M3Model(package_dir, variant="fp32").encode(TEXTS, return_sparse=True)
    url, srv, thread = _start(create_app(model, ServerConfig(max_wait_ms=1)))
    data = next(copy.glob("model.fp32.onnx.data"))
    try:
        before = httpx.post(url + "/encode", json={"texts": TEXTS, "sparse": True}).json()["results"]
        np.testing.assert_allclose([r["dense"] for r in before], want["dense_vecs"], atol=1e-6)
        size = data.stat().st_size
        with data.open("r+b") as fh:  # in place: same file, same size
            fh.seek(size // 2)
            block = fh.read(4096)
            fh.seek(size // 2)
            fh.write(bytes(255 - b for b in block))
        res = httpx.post(url + "/encode", json={"texts": TEXTS})
        assert res.status_code == 503 and str(data) in res.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "package-changed"
    finally:
        _stop(srv, thread)
    # A restart, with the same verification record as the first load: the changed file is hashed again.
    with pytest.raises(PackageError, match="does not match its SHA-256"):
        M3Model(copy, variant="fp32", cache_dir=cache / "m3-runtime")
    port = free_port()
    log = tmp_path / "restart.log"
    proc = _serve(copy, port, log, env={"XDG_CACHE_HOME": str(cache)})
    assert proc.wait(timeout=120) == 2
    assert "does not match its SHA-256" in log.read_text()


def test_package_changed_during_a_pass_is_not_answered(package_dir, tmp_path):
    """A request whose forward pass ran while the file changed gets 503, not its numbers."""
    from m3_runtime.server import ServerConfig, create_app

    copy = tmp_path / "pkg"
    shutil.copytree(package_dir, copy)
    model = M3Model(copy, variant="fp32", cache_dir=tmp_path / "cache")
    data = next(copy.glob("model.fp32.onnx.data"))
    run = model.engine.run
    trigger = _ids(model, "change the weights now")

    def run_and_touch(batch, outputs, **kw):
        rows = [
            tuple(int(t) for t, m in zip(r, k, strict=True) if m)
            for r, k in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]
        out = run(batch, outputs, **kw)
        if trigger in rows:  # after the pass: its numbers are the old weights', but the file is no longer
            os.utime(data)
        return out

    model.engine.run = run_and_touch  # type: ignore[method-assign]
    url, srv, thread = _start(create_app(model, ServerConfig(max_wait_ms=1)))
    try:
        assert httpx.post(url + "/encode", json={"texts": ["fine"]}).status_code == 200
        res = httpx.post(url + "/encode", json={"texts": ["change the weights now"]})
        assert res.status_code == 503 and "changed on disk" in res.json()["error"]["message"]
    finally:
        _stop(srv, thread)
