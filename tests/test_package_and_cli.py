"""End to end through both commands, the package round trip, and the torch-free runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model

from .conftest import CHECKPOINT

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, input=stdin, timeout=600)


def test_package_round_trip_after_move(package_dir, fp32, tmp_path):
    texts = ["moved packages load", "北京", ""]
    before = fp32.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    moved = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(package_dir, tmp_path / "staging")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "staging").rename(moved)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative external-data paths must not depend on the working directory
    try:
        after = M3Model(Path("elsewhere/pkg"), variant="fp32").encode(
            texts, return_dense=True, return_sparse=True, return_colbert_vecs=True
        )
    finally:
        os.chdir(cwd)
    np.testing.assert_array_equal(before["dense_vecs"], after["dense_vecs"])
    assert before["lexical_weights"] == after["lexical_weights"]


@pytest.mark.exporter
def test_export_and_runtime_commands_end_to_end(tmp_path, package_dir):
    out = tmp_path / "cli-pkg"
    res = run(str(BIN / "m3-export"), str(CHECKPOINT), str(out), "--variants", "fp32,int8")
    assert res.returncode == 0, res.stderr
    assert (
        "[1/6] loading" in res.stderr
        and "fusions:" in res.stderr
        and "fp32 vs PyTorch" in res.stderr
        and "int8 vs PyTorch" in res.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "manifest.json",
            "model.fp32.onnx",
            "model.fp32.onnx.data",
            "model.int8.onnx",
            "model.int8.onnx.data",
            "reference.npz",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "sentencepiece.bpe.model",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and set(manifest["variants"]) == {"fp32", "int8"}
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert set(manifest["source"]["weights_sha256"]) == {"model.safetensors", "colbert_linear.pt", "sparse_linear.pt"}

    # m3 encode: JSON lines equal the Python API on the session's package.
    res = run(str(BIN / "m3"), "encode", str(out), "--variant", "fp32", "--dense", "--sparse", "hello world", "")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    api = M3Model(package_dir, variant="fp32").encode(["hello world", ""], return_sparse=True)
    np.testing.assert_allclose(rows[0]["dense"], api["dense_vecs"][0], atol=1e-6)
    assert rows[0]["sparse"].keys() == api["lexical_weights"][0].keys()
    assert rows[1]["sparse"] == {}

    res = run(
        str(BIN / "m3"), "encode", str(out), "--variant", "fp32", "--sparse", "--tokens", "-", stdin="hello world\n"
    )
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["sparse"]) == set(
        M3Model(package_dir, variant="fp32").convert_id_to_token(api["lexical_weights"][0])
    )

    res = run(str(BIN / "m3"), "score", str(out), "--variant", "fp32", "What is BGE M3?", "BGE M3 is a model", "BM25")
    assert res.returncode == 0, res.stderr
    scores = [json.loads(line) for line in res.stdout.splitlines()]
    want = M3Model(package_dir, variant="fp32").compute_score(
        [("What is BGE M3?", "BGE M3 is a model"), ("What is BGE M3?", "BM25")]
    )
    for key in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"):
        np.testing.assert_allclose([s[key] for s in scores], want[key], atol=1e-6)

    res = run(str(BIN / "m3"), "info", str(out))
    assert res.returncode == 0, res.stderr
    assert "fp32" in res.stdout and "int8" in res.stdout and "CPUExecutionProvider" in res.stdout

    # A non-empty OUT is refused without --force, and the old package is left as it was.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    res = run(str(BIN / "m3-export"), str(CHECKPOINT), str(out), "--variants", "int8")
    assert res.returncode == 2 and "not empty; pass --force" in res.stderr
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    res = run(str(BIN / "m3-export"), str(CHECKPOINT), str(out), "--variants", "int8", "--force", "--no-validate")
    assert res.returncode == 0, res.stderr
    assert set(json.loads((out / "manifest.json").read_text())["variants"]) == {"int8"}
    assert not (out / "model.fp32.onnx").exists()


@pytest.mark.exporter
def test_force_replaces_only_a_package(tmp_path):
    from m3_exporter import export_package

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds no manifest\.json; not replacing it, even with --force"):
        export_package(str(CHECKPOINT), precious, force=True, say=lambda _m: None)
    assert (precious / "thesis.txt").read_text() == "mine"


@pytest.mark.exporter
def test_cli_errors_are_one_line(tmp_path):
    res = run(str(BIN / "m3"), "encode", str(tmp_path / "none"), "x")
    assert res.returncode == 2 and res.stderr.startswith("m3: error:") and "Traceback" not in res.stderr
    res = run(str(BIN / "m3-export"), str(CHECKPOINT), str(tmp_path / "o"), "--variants", "fp64")
    assert res.returncode == 2 and "fp64" in res.stderr


def _broken_checkpoint(tmp_path: Path, how: str) -> Path:
    ckpt = tmp_path / how
    shutil.copytree(CHECKPOINT, ckpt)
    if how == "no-heads":
        (ckpt / "sparse_linear.pt").unlink()
    elif how == "no-weights":
        (ckpt / "model.safetensors").unlink()
    elif how == "no-config":
        (ckpt / "config.json").unlink()
    elif how in ("bert", "gpt2"):
        config = json.loads((ckpt / "config.json").read_text())
        config["model_type"] = how
        (ckpt / "config.json").write_text(json.dumps(config))
    elif how == "bad-tokenizer":
        (ckpt / "tokenizer.json").write_text("{broken")
    return ckpt


@pytest.mark.exporter
@pytest.mark.parametrize(
    "how, message",
    [
        ("no-heads", "missing the M3 head file(s) sparse_linear.pt"),
        ("no-weights", "has no backbone weights"),
        ("no-config", "has no config.json"),
        ("bert", "BGE-M3 needs an xlm-roberta backbone, found 'bert'"),
        ("gpt2", "model_type 'gpt2' is not a supported backbone"),
        ("bad-tokenizer", "cannot read tokenizer"),
    ],
)
def test_bad_checkpoint_is_refused_before_heavy_work(tmp_path, how, message, monkeypatch):
    import m3_exporter.export as export
    from m3_exporter import CheckpointError

    def no_heavy_work(*_a, **_k):
        raise AssertionError("weights were loaded for a checkpoint that should have been refused")

    monkeypatch.setattr(export, "load_torch_model", no_heavy_work)
    ckpt = _broken_checkpoint(tmp_path, how)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export.export_package(str(ckpt), tmp_path / "out", say=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_runtime_never_imports_torch_or_transformers(package_dir):
    code = (
        "import sys; from m3_runtime import M3Model; "
        f"m = M3Model({str(package_dir)!r}); m.encode(['x'], return_sparse=True, return_colbert_vecs=True); "
        "m.compute_score([('a', 'b')]); "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = run(sys.executable, "-c", code)
    assert res.returncode == 0, res.stdout + res.stderr


def test_runtime_distribution_does_not_depend_on_torch():
    from importlib.metadata import requires

    reqs = " ".join(requires("m3-runtime") or []).lower()
    assert "torch" not in reqs and "transformers" not in reqs


@pytest.mark.exporter
def test_sigterm_leaves_no_partial_package(tmp_path):
    """A killed export removes its temporary folder and writes nothing at OUT."""
    import signal

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(BIN / "m3-export"), str(CHECKPOINT), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".killed.partial-*")), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not list(tmp_path.glob(".killed.partial-*")) and not out.exists()
