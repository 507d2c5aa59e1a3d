"""Bad input gets a clear error naming the problem; odd but valid input works."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from m3_runtime import M3Model, PackageError


def test_empty_list_gives_empty_outputs(fp32):
    out = fp32.encode([], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (0, fp32.hidden_size)
    assert out["lexical_weights"] == [] and out["colbert_vecs"] == []
    scores = fp32.compute_score([])
    assert all(v == [] for v in scores.values()) and len(scores) == 5


def test_empty_string_is_a_text(fp32):
    out = fp32.encode("", return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (fp32.hidden_size,)
    assert np.isclose(np.linalg.norm(out["dense_vecs"]), 1.0, atol=1e-5)
    assert out["colbert_vecs"].shape == (1, fp32.hidden_size)  # </s>
    assert out["lexical_weights"] == {}


@pytest.mark.parametrize("bad, index", [(["ok", None], 1), (["ok", "fine", 3], 2), ([b"bytes"], 0)])
def test_non_string_item_names_its_index(fp32, bad, index):
    with pytest.raises(TypeError, match=rf"sentences\[{index}\]"):
        fp32.encode(bad)


def test_non_list_input(fp32):
    with pytest.raises(TypeError, match="str or a list of str"):
        fp32.encode(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 9000}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"return_dense": False}, "at least one"),
    ],
)
def test_bad_arguments(fp32, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fp32.encode(["x"], **kwargs)


def test_bad_score_arguments(fp32):
    with pytest.raises(ValueError, match="weights_for_different_modes"):
        fp32.compute_score([("a", "b")], weights_for_different_modes=[1, 2])
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]\[0\]"):
        fp32.compute_score([("a", "b"), (None, "c")])
    with pytest.raises(TypeError, match=r"sentence_pairs\[0\]"):
        fp32.compute_score([("a", "b", "c")])


def test_long_input_is_truncated_not_refused(fp32):
    out = fp32.encode("word " * 20000, return_colbert_vecs=True)
    assert out["colbert_vecs"].shape == (8191, fp32.hidden_size)


@pytest.fixture()
def copy(package_dir, tmp_path):
    dest = tmp_path / "pkg"
    shutil.copytree(package_dir, dest)
    return dest


def test_missing_file_is_named(copy):
    (copy / "model.int8.onnx.data").unlink()
    with pytest.raises(PackageError, match=r"missing: .*model\.int8\.onnx\.data"):
        M3Model(copy, variant="int8")


def test_truncated_file_is_named(copy):
    data = copy / "model.fp32.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(PackageError, match=r"model\.fp32\.onnx\.data has 1000 bytes"):
        M3Model(copy, variant="fp32")


def test_tampered_file_is_named(copy):
    data = copy / "model.fp32.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match=r"model\.fp32\.onnx\.data does not match its SHA-256"):
        M3Model(copy, variant="fp32")
    M3Model(copy, variant="int8")  # other variants are unaffected


def test_verified_files_are_not_hashed_again_until_they_change(copy, tmp_path, monkeypatch):
    """A load records what it hashed; the next load of unchanged files skips hashing,
    and a file written since (same size) is hashed again and caught."""
    import os

    from m3_runtime import package

    hashed: list[str] = []
    real = package.sha256_file
    monkeypatch.setattr(package, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    cache = tmp_path / "cache"
    M3Model(copy, variant="fp32", cache_dir=cache)
    assert "model.fp32.onnx.data" in hashed and (cache / "verified.json").is_file()
    hashed.clear()
    M3Model(copy, variant="fp32", cache_dir=cache)
    assert hashed == []
    data = copy / "model.fp32.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    stat = data.stat()
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even a 1 ns change is seen
    with pytest.raises(PackageError, match=r"model\.fp32\.onnx\.data does not match its SHA-256"):
        M3Model(copy, variant="fp32", cache_dir=cache)
    assert hashed == ["model.fp32.onnx.data"]


def test_info_says_which_files_the_next_load_hashes(copy, tmp_path):
    """`m3 info` reports, per variant, whether its files are verified and unchanged
    (a load would skip the hash) or how much a load would hash."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def info() -> str:
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        res = subprocess.run(
            [str(Path(sys.executable).parent / "m3"), "info", str(copy)], capture_output=True, text=True, env=env
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = info()
    assert out.count("files to hash at the next load") == 3, out  # fp32, fp16, int8: nothing verified yet
    M3Model(copy, variant="fp32", cache_dir=tmp_path / "xdg" / "m3-runtime")
    lines = info().splitlines()
    fp32 = lines.index(next(line for line in lines if line.lstrip().startswith("fp32")))
    sha = [line for line in lines[fp32:] if "SHA-256" in line]
    assert "verified, unchanged since" in sha[0]  # fp32: just hashed by the load
    assert "files to hash at the next load" in sha[1]  # the next variant still is not
    data = copy / "model.fp32.onnx.data"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1))
    lines = info().splitlines()
    sha = [line for line in lines[fp32:] if "SHA-256" in line]
    mb = data.stat().st_size / 1e6
    assert "1 of" in sha[0] and f"({mb:.1f} MB;" in sha[0], sha[0]


def test_tampered_tokenizer_is_named(copy):
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text(encoding="utf-8").replace('"<unk>"', '"<UNK>"', 1), encoding="utf-8")
    with pytest.raises(PackageError, match=r"tokenizer\.json"):
        M3Model(copy, variant="fp32")


def test_unknown_format_version_is_refused(copy):
    manifest = copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(PackageError, match=r"manifest\.json: manifest format_version 99 is not supported"):
        M3Model(copy)


def test_broken_manifest_is_named(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match=r"cannot read .*manifest\.json"):
        M3Model(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(PackageError, match=r"manifest\.json not found"):
        M3Model(copy)


def test_missing_variant_and_package(copy, tmp_path):
    data = json.loads((copy / "manifest.json").read_text())
    del data["variants"]["fp16"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match=r"no variant 'fp16' .*fp32, int8"):
        M3Model(copy, variant="fp16")
    with pytest.raises(PackageError, match="not a directory"):
        M3Model(tmp_path / "nowhere")


def test_convert_id_to_token_rejects_non_ids(fp32):
    with pytest.raises(ValueError, match="not a token id"):
        fp32.convert_id_to_token({"hello": 1.0})


def test_missing_onnxruntime_names_both_extras(monkeypatch):
    import sys

    from m3_runtime.session import import_ort

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "not installed"
    with pytest.raises(ImportError, match=r"m3-runtime\[cpu\].*m3-runtime\[gpu\]"):
        import_ort()


def test_graph_with_the_wrong_interface_is_refused(copy):
    """A graph whose outputs are not the contract's is refused at load, showing expected and found."""
    import onnx
    from m3_runtime.package import file_entry
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["embeddings"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["embeddings", "w"], ["out"]),
        ],
        "wrong",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s"])],
        [numpy_helper.from_array(np.zeros(1, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (copy / "model.fp32.onnx.data").unlink()
    onnx.save_model(
        model,
        str(copy / "model.fp32.onnx"),
        save_as_external_data=True,
        location="model.fp32.onnx.data",
        size_threshold=0,
    )
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"]["fp32"]["files"] = [
        file_entry(copy, copy / name).__dict__ for name in ("model.fp32.onnx", "model.fp32.onnx.data")
    ]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"does not have the M3 graph interface: expected .* found .*'out'"):
        M3Model(copy, variant="fp32")


@pytest.mark.exporter
def test_export_refuses_a_file_as_out(tmp_path):
    from m3_exporter import export_package

    from .conftest import CHECKPOINT

    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        export_package(str(CHECKPOINT), target, say=lambda _m: None)
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("bad", [b"bytes", {"a": 1}, 3.5])
def test_non_text_containers_are_refused(fp32, bad):
    with pytest.raises(TypeError, match="str or a list of str"):
        fp32.encode(bad)


def test_missing_provider_falls_back_to_cpu_and_says_so(package_dir):
    import warnings

    from m3_runtime import session

    session._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = M3Model(package_dir, variant="fp32", providers=["CUDAExecutionProvider"])
        M3Model(package_dir, variant="fp32", providers=["CUDAExecutionProvider"])
    assert model.providers == ["CPUExecutionProvider"]
    said = [w for w in caught if "has no CUDAExecutionProvider" in str(w.message)]
    assert len(said) == 1  # once, not per model
