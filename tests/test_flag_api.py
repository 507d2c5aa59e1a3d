"""Drop-in means FlagEmbedding's constructors work: README calls and constructor arguments
side by side with ``BGEM3FlagModel`` / ``FlagReranker``.

The oracle is tests/golden/flag_api.json, written by scripts/make_flag_api_goldens.py,
which runs FlagEmbedding 1.4.2 itself (on the CPU, where it computes in fp32 whatever
``use_fp16`` says). The same functions of that script make the same calls here on
``M3Model`` / ``M3Reranker`` with the fp32 variant; values and result types must match.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from m3_runtime import M3Model, M3Reranker, compat
from m3_runtime.contract import CPU, CUDA
from m3_runtime.engine import Engine, EngineOptions
from m3_runtime.errors import InputError, InputTypeError
from m3_runtime.session import GPU_PROVIDERS, available_providers

from tests.conftest import GOLDEN, ROOT

SCRIPT = ROOT / "scripts" / "make_flag_api_goldens.py"
_spec = importlib.util.spec_from_file_location("make_flag_api_goldens", SCRIPT)
assert _spec is not None and _spec.loader is not None
flag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flag)

GOLDENS = json.loads((GOLDEN / "flag_api.json").read_text(encoding="utf-8"))
ATOL = 2e-5  # fp32 graph against PyTorch fp32 (dense/ColBERT rows, scores)
# BGEM3FlagModel(use_fp16=True), its default, loads the weights as float16 and on the CPU
# casts them back to float32: fp32 arithmetic on fp16-rounded weights (up to 2e-3 on tiny-m3).
FP16_WEIGHTS_ATOL = 5e-3  # and as much relative (summed sparse scores)
HAS_GPU = any(p in GPU_PROVIDERS for p in available_providers())


def same(got: Any, ref: Any, where: str, *, values: bool = True, atol: float = ATOL) -> None:
    """``got`` (a runtime result, already ``flag.record``-ed) against the golden record."""
    if "kind" not in ref:  # encode's dict: per output
        assert set(got) == set(ref), where
        for key in ref:
            same(got[key], ref[key], f"{where}.{key}", values=values, atol=atol)
        return
    assert got["kind"] == ref["kind"], f"{where}: {got['kind']} here, {ref['kind']} in FlagEmbedding"
    if values:
        _close(got["value"], ref["value"], where, atol)


def _close(got: Any, ref: Any, where: str, atol: float) -> None:
    if ref is None:
        assert got is None, where
    elif isinstance(ref, dict):
        assert set(got) == set(ref), f"{where}: keys {sorted(set(got) ^ set(ref))[:5]} differ"
        for k in ref:
            _close(got[k], ref[k], f"{where}[{k!r}]", atol)
    elif isinstance(ref, list) and ref and isinstance(ref[0], (dict, list)):
        assert len(got) == len(ref), where
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            _close(g, r, f"{where}[{i}]", atol)
    else:
        np.testing.assert_allclose(
            np.asarray(got, dtype=np.float64),
            np.asarray(ref),
            atol=atol,
            rtol=0 if atol == ATOL else atol,
            err_msg=where,
        )


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch) -> None:
    monkeypatch.setattr(compat, "_warned", set())


def test_model_readme_runs_unchanged_with_a_package_path(package_dir: Path) -> None:
    """BGE-M3's README, word for word but the path: ``BGEM3FlagModel('BAAI/bge-m3', use_fp16=True)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_fp16=True on a CPU says so once (tested below)
        model = M3Model(str(package_dir), use_fp16=True)
    got = flag.embedder_readme(model)
    for key, ref in GOLDENS["embedder_readme"].items():
        same(got[key], ref, key, values=False)  # the CPU default variant (int8): types and shapes
    fp32 = flag.embedder_readme(M3Model(str(package_dir), use_fp16=True, variant="fp32"))
    for key, ref in GOLDENS["embedder_readme"].items():
        if key.startswith("colbert_score"):  # FlagEmbedding returns a 0-d torch tensor; a float here
            assert isinstance(fp32[key]["value"], float)
        same(fp32[key], ref, key, atol=FP16_WEIGHTS_ATOL)
        same(fp32[key], GOLDENS["embedder_readme_fp32"][key], key)  # FlagEmbedding's use_fp16=False


def test_reranker_readme_runs_unchanged_with_a_package_path(reranker_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reranker = M3Reranker(str(reranker_dir), use_fp16=True)
    for key, ref in GOLDENS["reranker_readme"].items():
        same(flag.reranker_readme(reranker)[key], ref, key, values=False)
    got = flag.reranker_readme(M3Reranker(str(reranker_dir), use_fp16=True, variant="fp32"))
    for key, ref in GOLDENS["reranker_readme"].items():
        same(got[key], ref, key)


@pytest.mark.parametrize("row", range(len(flag.EMBEDDER_ARGS)))
def test_model_constructor_arguments_as_flagembedding(row: int, package_dir: Path) -> None:
    golden = GOLDENS["embedder_args"][row]
    assert golden["args"] == flag.EMBEDDER_ARGS[row]  # the goldens belong to this table
    model = M3Model(package_dir, variant="fp32", **golden["args"])
    got = flag.embedder_calls(model)
    atol = FP16_WEIGHTS_ATOL if golden["args"].get("use_fp16", True) else ATOL
    for call, ref in golden["calls"].items():
        same(got[call], ref, f"{golden['args']} {call}", atol=atol)


@pytest.mark.parametrize("row", range(len(flag.RERANKER_ARGS)))
def test_reranker_constructor_arguments_as_flagembedding(row: int, reranker_dir: Path) -> None:
    golden = GOLDENS["reranker_args"][row]
    assert golden["args"] == flag.RERANKER_ARGS[row]
    reranker = M3Reranker(reranker_dir, variant="fp32", **golden["args"])
    got = flag.reranker_calls(reranker)
    for call, ref in golden["calls"].items():
        same(got[call], ref, f"{golden['args']} {call}")


def test_every_flagembedding_constructor_argument_is_accepted() -> None:
    """BGEM3FlagModel's and FlagReranker's constructor arguments, as FlagEmbedding 1.4.2 declares them."""
    for cls, reference in ((M3Model, "BGEM3FlagModel"), (M3Reranker, "FlagReranker")):
        theirs = set(GOLDENS["arguments"][reference])
        assert len(theirs) >= 12, theirs
        missing = theirs - set(inspect.signature(cls).parameters)
        assert not missing, f"{cls.__name__} lacks {reference}'s {sorted(missing)}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normalize_embeddings": False}, r"normalize_embeddings=False: the graph of .* normalises its vectors"),
        ({"pooling_method": "mean"}, r"pooling_method='mean': the graph of .* pools with 'cls'.*pass 'cls'"),
        ({"colbert_dim": 32}, r"colbert_dim=32: the package's ColBERT head .*pass colbert_dim=-1, or truncate_dim"),
        ({"use_bf16": True}, r"use_bf16=True: packages have no bfloat16 variant; pass use_fp16=True"),
        ({"devices": ["cuda:0", "cuda:1"]}, r"one model runs on one device here .* load one model per device"),
        ({"devices": "npu:0"}, r"devices='npu:0': ONNX Runtime here runs on 'cpu' or a CUDA device"),
        ({"devices": "cpu", "providers": [CPU]}, r"give devices='cpu' or providers=\['CPUExecutionProvider'\]"),
        ({"truncate_dim": 0}, r"truncate_dim must be a positive integer or None, got 0"),
    ],
)
def test_values_the_package_cannot_honour_are_refused(package_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        M3Model(package_dir, variant="fp32", **kwargs)


def test_use_fp16_without_a_gpu_keeps_the_cpu_default_and_says_so_once(package_dir: Path, reranker_dir) -> None:
    if HAS_GPU:
        pytest.skip("this ONNX Runtime has a GPU provider: use_fp16=True picks fp16 there")
    with pytest.warns(RuntimeWarning, match=r"M3Model\(use_fp16=True\): no GPU provider .* CPU default variant"):
        model = M3Model(package_dir, use_fp16=True)
    assert model.variant == "int8" == M3Model(package_dir).variant
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second model says nothing
        M3Model(package_dir, use_fp16=True)
        assert M3Model(package_dir, use_fp16=False).variant == "int8"  # False: the CPU default too
    with pytest.warns(RuntimeWarning, match=r"M3Reranker\(use_fp16=True\)"):
        assert M3Reranker(reranker_dir, use_fp16=True).variant == "int8"


def test_devices_map_to_providers_and_a_device_id(package_dir: Path, reranker_dir: Path) -> None:
    assert M3Model(package_dir, devices="cpu").providers == [CPU]
    assert M3Reranker(reranker_dir, devices=["cpu"]).providers == [CPU]
    gpu = tuple(p for p in GPU_PROVIDERS if p in available_providers()) or (CUDA,)
    for devices, device_id in (("cuda:1", 1), (2, 2), (["cuda"], 0), ("CUDA:3", 3)):
        options = compat.engine_options(variant=None, providers=None, devices=devices)
        assert (options.providers, options.device_id) == ((*gpu, CPU), device_id), devices
    assert compat.engine_options(variant=None, providers=None, devices=None) == EngineOptions()


def test_engine_options_are_one_typed_object(package_dir: Path, reranker_dir: Path) -> None:
    model = M3Model(package_dir, variant="fp32", workers=2, max_batch_tokens=512, cache_dir=str(package_dir))
    assert model.engine.options == EngineOptions(variant="fp32", workers=2, max_batch_tokens=512, cache_dir=package_dir)
    assert M3Reranker(reranker_dir, batch_size=4, providers=[CPU]).engine.options == EngineOptions(
        batch_size=4, providers=(CPU,)
    )
    engine = Engine(package_dir, EngineOptions(variant="fp32", pad_batches=False))
    assert engine.variant == "fp32" and engine.pad_batches is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.options.workers = 3  # type: ignore[misc]
    with pytest.raises(InputTypeError, match="options must be an EngineOptions, got str"):
        Engine(package_dir, "fp32")  # type: ignore[arg-type]
    # Declared once: the loading keywords of both constructors are EngineOptions' fields.
    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    loading = {"max_batch_tokens", "verify", "device_id", "intra_op_threads", "allow_spinning", "workers"}
    assert loading <= fields
    for cls in (M3Model, M3Reranker):
        assert loading <= set(inspect.signature(cls).parameters)
