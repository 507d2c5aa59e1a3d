"""The server's settings (``ServerConfig``) and the warning for a non-loopback bind."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Default --max-body-bytes. The largest useful request is --max-texts (512) texts each
# filling the model's 8,192 tokens: at ~4 bytes of JSON per token that is 16 MiB.
# Bigger bodies carry text the model would truncate away; max_texts * max_chars
# (102 M characters, up to 400 MB of UTF-8) would let one request pin that much memory.
DEFAULT_MAX_BODY_BYTES = 16 << 20


@dataclass
class ServerConfig:
    """The server's settings; ``m3 serve``'s option defaults are read from here."""

    max_wait_ms: float = 5.0  # how long the first queued text waits for company
    max_queue: int = 4096  # texts waiting before requests get 429
    max_texts: int = 512  # texts per request (413 above)
    max_chars: int = 200_000  # characters per text (413 above)
    # A request not answered within this many seconds gets 503: what of it is still
    # queued never runs, a running pass's result is discarded. A body not received
    # within it gets 408. None: no limit.
    request_timeout_s: float | None = 60.0
    workers: int = 2  # N: short passes at once, and N - 1 passages on a second session (scheduler.py)
    # Passes of a text over the engine's budget run on threads this much nicer (Linux).
    long_pass_nice: int = 10
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request bodies over this get 413 (see DEFAULT_MAX_BODY_BYTES)
    # Bearer token every request but gateway.OPEN_PATHS must carry (None: no auth). Not in repr.
    api_key: str | None = field(default=None, repr=False)
    log_texts: bool = False  # put request texts into the access log (off: counts only)
    access_log: bool = True  # one JSON line per request on the m3_runtime.access logger
    # On SIGTERM: seconds to wait for in-flight and queued requests before closing anyway.
    drain_timeout_s: int = 60


def bind_warning(host: str, *, api_key: bool) -> str | None:
    """What ``m3 serve`` says when ``host`` is reachable from other machines (None: loopback only)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    auth = (
        "requests need the API key"
        if api_key
        else "with no --api-key (or M3_API_KEY): anyone who can reach this port can use the model"
    )
    return (
        f"listening on {host}, not on loopback (127.0.0.1): the server is reachable from other machines, {auth}; "
        "traffic is plain HTTP, so put a TLS proxy in front of it for untrusted networks"
    )
