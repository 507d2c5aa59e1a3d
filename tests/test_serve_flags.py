"""``m3 serve``'s flags from the environment (TEI's launcher convention), --help, and the
busy port found before any model loads."""

from __future__ import annotations

import os
import socket

import pytest
from m3_runtime import cli


def _serve_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["serve"]


def test_every_serve_flag_names_its_variable_and_default_in_help(monkeypatch):
    for name in [k for k in os.environ if k.startswith("M3_")]:
        monkeypatch.delenv(name)
    serve = _serve_parser()
    text = " ".join(serve.format_help().split())
    options = [a for a in serve._actions if a.dest not in ("help",)]
    assert len(options) >= 18
    for action in options:
        env = "M3_" + action.dest.upper()
        assert f"(env {env}" in text, (action.dest, text)
    assert "--max-wait-ms MAX_WAIT_MS how long a text waits for company (env M3_MAX_WAIT_MS; default: 5.0)" in text
    assert "TCP port to listen on (env M3_PORT; default: 8000)" in text
    assert "address to listen on" in text


def test_variables_set_defaults_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("M3_MAX_BATCH_TOKENS", "300")
    monkeypatch.setenv("M3_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("M3_LOG_TEXTS", "true")
    monkeypatch.setenv("M3_VARIANT", "int8")
    monkeypatch.setenv("M3_PACKAGE", "/some/package")
    monkeypatch.setenv("M3_API_KEY", "secret-key-123")
    serve = _serve_parser()
    args = serve.parse_args([])
    assert (args.max_batch_tokens, args.max_wait_ms, args.log_texts, args.variant) == (300, 7.5, True, "int8")
    assert args.package == "/some/package" and args.api_key == "secret-key-123"
    assert "secret-key-123" not in serve.format_help()  # the key's value is never shown
    args = serve.parse_args(["--max-batch-tokens", "512", "other"])
    assert args.max_batch_tokens == 512 and args.package == "other"


def test_a_bad_variable_names_the_flag_and_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("M3_MAX_BATCH_TOKENS", "lots")
    with pytest.raises(SystemExit):
        cli.main(["serve", "pkg"])
    err = capsys.readouterr().err
    assert "--max-batch-tokens" in err and "M3_MAX_BATCH_TOKENS" in err and "'lots'" in err
    monkeypatch.delenv("M3_MAX_BATCH_TOKENS")
    monkeypatch.setenv("M3_LOG_TEXTS", "maybe")
    assert cli.main(["serve", "pkg"]) == 2
    err = capsys.readouterr().err
    assert "M3_LOG_TEXTS='maybe'" in err and "--log-texts" in err
    monkeypatch.delenv("M3_LOG_TEXTS")
    monkeypatch.setenv("M3_VARIANT", "int4")
    assert cli.main(["serve", "pkg"]) == 2
    assert "M3_VARIANT='int4' (--variant) must be one of fp32, fp16, int8" in capsys.readouterr().err
    monkeypatch.delenv("M3_VARIANT")
    monkeypatch.setenv("M3_WORKERS", "0")
    assert cli.main(["serve", "pkg"]) == 2
    assert "--workers (or M3_WORKERS) must be >= 1, got 0" in capsys.readouterr().err


def test_a_busy_port_is_found_before_any_model_loads(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The package does not exist: had it been loaded first, the error would name it.
        assert cli.main(["serve", str(tmp_path / "no-such-package"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} (M3_PORT)" in err and "already in use" in err and "no-such-package" not in err
