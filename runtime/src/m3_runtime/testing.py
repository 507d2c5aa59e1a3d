"""Helpers for tests and load tests of a server on loopback (no effect on the runtime)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll ``url/health`` until it answers 200; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f} s")


def start_server(app: Any, *, host: str = "127.0.0.1", timeout_s: float = 60) -> tuple[str, Any, threading.Thread]:
    """Run ``app`` under uvicorn on a free loopback port in a daemon thread, once healthy.

    Returns ``(url, server, thread)``; stop with ``server.should_exit = True`` and
    ``thread.join()``. Needs the server extra (uvicorn)."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    wait_until_healthy(url, timeout_s)
    return url, server, thread
