"""Shared fixtures: the committed tiny checkpoints exported once per test session.

``M3_TEST_PACKAGES=DIR`` makes ``package_dir`` and ``reranker_dir`` use packages that
``m3-export`` already wrote (``DIR/tiny-m3`` from models/tiny-m3, ``DIR/tiny-reranker``
from models/tiny-reranker) instead of exporting, so the runtime's tests run where only
the runtime is installed: ``M3_TEST_PACKAGES=DIR pytest -m "not exporter"``
(scripts/check_wheels.sh does this in a virtualenv without torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from m3_runtime.session import ACTIVATION_BITS_ENV
from m3_runtime.testing import saturating_cpu

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "tiny-m3"
GOLDEN = Path(__file__).resolve().parent / "golden"
RERANKER_CHECKPOINT = ROOT / "models" / "tiny-reranker"
RERANKER_GOLDEN = GOLDEN / "reranker"
PACKAGES_ENV = "M3_TEST_PACKAGES"


@pytest.fixture(scope="session", autouse=True)
def _int8_activation_bits_for_tiny_checkpoints():
    """On an x86 CPU without VNNI the tiny checkpoints' int8 (hidden 64: weights near their
    column's maximum are common) saturates ONNX Runtime's u8 x s8 kernel at the default
    8-bit activations (dense cosine min 0.940): there the suite runs int8 at 7 bits, as
    docs/runtime.md tells users whose m3 check fails that way. test_int8_cpu.py checks
    both widths; the real-weight test (test_dense_models.py) pins the default 8."""
    if saturating_cpu() and ACTIVATION_BITS_ENV not in os.environ:
        os.environ[ACTIVATION_BITS_ENV] = "7"
        yield
        del os.environ[ACTIVATION_BITS_ENV]
    else:
        yield


# These modules import torch or the exporter at module level, so where those are absent
# they cannot even be collected (every test in them is marked `exporter`).
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("m3_exporter") is None:
    collect_ignore = ["test_int8.py", "test_reranker_export.py"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prebuilt(root: str, name: str, checkpoint: Path) -> Path:
    """``root/name``, checked to be a package exported from ``checkpoint`` as it is now:
    a stale package would fail the golden tests with numbers, not with this reason."""
    path = Path(root) / name
    hint = f"write it with `m3-export {checkpoint} {path}`"
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"{PACKAGES_ENV}={root}: {path} has no readable manifest.json ({exc}); {hint}") from exc
    recorded = manifest.get("source", {}).get("weights_sha256", {})
    stale = (
        sorted(f for f, sha in recorded.items() if _sha256(checkpoint / f) != sha) if recorded else ["(none recorded)"]
    )
    if stale:
        raise pytest.UsageError(
            f"{PACKAGES_ENV}={root}: {path} was not exported from {checkpoint} as it is now "
            f"(weights differ: {', '.join(stale)}); {hint}"
        )
    return path


def _package(tmp_path_factory: pytest.TempPathFactory, name: str, checkpoint: Path) -> Path:
    prebuilt = os.environ.get(PACKAGES_ENV)
    if prebuilt:
        return _prebuilt(prebuilt, name, checkpoint)
    from m3_exporter import export_package

    out = tmp_path_factory.mktemp("pkg") / name
    export_package(str(checkpoint), out, say=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package(tmp_path_factory, "tiny-m3", CHECKPOINT)


@pytest.fixture(scope="session")
def golden() -> dict:
    """The contract written by scripts/make_goldens.py from FlagEmbedding 1.4.2."""
    texts = json.loads((GOLDEN / "texts.json").read_text(encoding="utf-8"))
    ref = json.loads((GOLDEN / "reference.json").read_text(encoding="utf-8"))
    arrays = dict(np.load(GOLDEN / "reference.npz"))
    return {**texts, "ref": ref, "arrays": arrays}


@pytest.fixture(scope="session")
def fp32(package_dir: Path):
    from m3_runtime import M3Model

    return M3Model(package_dir, variant="fp32")


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package(tmp_path_factory, "tiny-reranker", RERANKER_CHECKPOINT)


@pytest.fixture(scope="session")
def reranker_golden() -> dict:
    """Written by scripts/make_reranker_goldens.py from FlagEmbedding 1.4.2's FlagReranker."""
    pairs = json.loads((RERANKER_GOLDEN / "pairs.json").read_text(encoding="utf-8"))
    ref = json.loads((RERANKER_GOLDEN / "reference.json").read_text(encoding="utf-8"))
    return {**pairs, "ref": ref}
