"""Helpers for tests, benchmarks and checks (no effect on the runtime): a server on
loopback, and the measures that compare one variant's outputs with another's."""

from __future__ import annotations

import platform
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def saturating_cpu() -> bool:
    """An x86 CPU without VNNI, where 8-bit int8 activations can saturate ONNX Runtime's
    u8 x s8 kernel (``session.int8_activation_bits``); read from /proc/cpuinfo."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return False
    return not flags & {"avx512_vnni", "avx_vnni"}


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


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (last axis)."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def top10_overlaps(got: Sequence[Mapping[str, float]], ref: Sequence[Mapping[str, float]]) -> list[float]:
    """Per text with lexical weights in ``ref``: the share of its 10 heaviest tokens that
    are also among the 10 heaviest in ``got`` (texts are paired in order)."""
    overlaps = []
    for g, r in zip(got, ref, strict=True):
        top_ref = sorted(r, key=r.__getitem__, reverse=True)[:10]
        top_got = sorted(g, key=g.__getitem__, reverse=True)[:10]
        if top_ref:
            overlaps.append(len(set(top_ref) & set(top_got)) / len(top_ref))
    return overlaps


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 in float64, ties given their mean rank (Spearman's convention)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; 1.0 when either side is constant and both are (nothing to order)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    da, db = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((da * da).sum() * (db * db).sum()))
    if den == 0:
        return 1.0 if (da == 0).all() and (db == 0).all() else 0.0
    return float((da * db).sum() / den)
