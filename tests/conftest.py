"""Shared fixtures: the committed tiny checkpoint exported once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "tiny-m3"
GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m3_exporter import export_package

    out = tmp_path_factory.mktemp("pkg") / "tiny-m3"
    export_package(str(CHECKPOINT), out, say=lambda _msg: None)
    return out


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


RERANKER_CHECKPOINT = ROOT / "models" / "tiny-reranker"
RERANKER_GOLDEN = GOLDEN / "reranker"


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m3_exporter import export_package

    out = tmp_path_factory.mktemp("pkg") / "tiny-reranker"
    export_package(str(RERANKER_CHECKPOINT), out, say=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def reranker_golden() -> dict:
    """Written by scripts/make_reranker_goldens.py from FlagEmbedding 1.4.2's FlagReranker."""
    pairs = json.loads((RERANKER_GOLDEN / "pairs.json").read_text(encoding="utf-8"))
    ref = json.loads((RERANKER_GOLDEN / "reference.json").read_text(encoding="utf-8"))
    return {**pairs, "ref": ref}
