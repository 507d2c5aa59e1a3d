"""Notices a served package's files changing on disk after the load."""

from __future__ import annotations

import logging
from typing import Any

from .errors import RequestError

log = logging.getLogger("m3_runtime.server")


class PackageWatch:
    """Notices a served package's files changing on disk after the load.

    ONNX Runtime memory-maps a graph's external weights (``model.<variant>.onnx.data``)
    and reads them through the page cache on every forward pass: a file overwritten in
    place changes what the running session computes (measured: the tiny package's fp32
    data file overwritten with 0x7f bytes made the next 902-token pass fail in a Gather
    node with an index from the file). So the session does NOT hold the weights in
    memory, and the server checks the files' size, modification time and inode (a
    ``stat``: 1.4 us each here, 6 files a package) before and after each request: from
    the first change on it answers 503 and /health says so, and a restart verifies the
    SHA-256 again (a corrupted package then fails to load with PackageError). An
    in-place write that also restores the modification time goes unnoticed until then."""

    def __init__(self, engines: list[Any]) -> None:
        self.paths = []
        for engine in engines:
            package = engine.package
            entries = package.manifest.tokenizer_files + package.variant(engine.variant).files
            self.paths += [package.path(e) for e in entries]
        self.stamps = {path: self._stamp(path) for path in self.paths}
        self.changed: str | None = None

    @staticmethod
    def _stamp(path: Any) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def check(self) -> None:
        """RequestError(503) once any served file differs from what was loaded."""
        changed = self.poll()
        if changed is not None:
            raise RequestError(503, changed)

    def poll(self) -> str | None:
        """Why the package can no longer be trusted (None: its files are as loaded)."""
        if self.changed is None:
            for path in self.paths:
                if self._stamp(path) != self.stamps[path]:
                    self.changed = (
                        f"package file {path} changed on disk while the server runs (its weights are memory-mapped, "
                        "so answers could come from the changed file): restart the server, which verifies it again"
                    )
                    log.error(self.changed)
                    break
        return self.changed
