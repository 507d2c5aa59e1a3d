"""BGE-M3 on OpenVINO's own runtime (issue 23, option a): the IRs and an encoder, for measurement only.

    # 1. the unfused fp32 ONNX graph (needs torch: the dev venv)
    .venv/bin/python benchmarks/openvino_model.py export CHECKPOINT OUT_DIR
    # 2. OpenVINO IRs from it (the OpenVINO venv, benchmarks/requirements-openvino.txt)
    /work/venv-ov/bin/python benchmarks/openvino_model.py convert OUT_DIR [--modes fp32,int8_sym,int8_asym]

``export`` writes ``OUT_DIR/model.fp32.onnx`` with the kit's own exporter
(``m3_exporter.graphs.export_graph``: dynamo, opset 18, dynamic batch and sequence) but
skips ``fuse_for_cpu``: the package's fp32 graph holds ``com.microsoft`` fused ops that
OpenVINO's ONNX frontend does not all read. The graph has the kit's interface, heads
included (``m3_exporter.wrapper``): ``(input_ids, attention_mask) int64 (batch, seq) ->
dense_vecs (batch, 1024), sparse_weights (batch, seq), colbert_vecs (batch, seq - 1, 1024)``,
all float32.

``convert`` writes ``OUT_DIR/ov-<mode>/model.xml`` (+ ``.bin``): ``fp32`` is
``ov.convert_model`` of that graph with fp32 weights kept (``compress_to_fp16=False``);
``int8_sym`` / ``int8_asym`` add ``nncf.compress_weights`` (per output channel int8
weights, embeddings included). Activations are quantized, if at all, by the CPU plugin at
run time (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, ``OVEncoder``). ``int8_static``
(``--package PACKAGE``) is ``nncf.quantize`` instead: static, calibrated activation scales
(``quantize_static``). It prints each step's time
and each IR's size.

``OVEncoder`` runs an IR with the kit's tokenizer, batch plan (``plan_batches``, 256-token
budget on the CPU) and per-text slicing (``heads.split_batch``), and returns what
``M3Model.encode`` returns, so the two compare text by text. The runtime itself never
imports OpenVINO; this module is not part of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("fp32", "int8_sym", "int8_asym", "int8_static")
CPU_BATCH_TOKENS = 256  # m3_runtime.engine.CPU_BATCH_TOKENS: the same batches as the kit's CPU runs
MAX_LENGTH = 8192


def ir_path(out_dir: Path, mode: str) -> Path:
    return out_dir / f"ov-{mode}" / "model.xml"


def _size_mb(paths: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


# -- 1. export (dev venv, torch) -------------------------------------------------
def export(checkpoint: Path, out_dir: Path, *, opset: int = 18) -> Path:
    from m3_exporter import graphs
    from m3_exporter.checkpoint import inspect_checkpoint, load_torch_model

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ckpt = inspect_checkpoint(checkpoint)
    model = load_torch_model(ckpt, sep_id=2)  # XLM-R's </s>; only rerankers read it
    loaded = time.perf_counter()
    path = out_dir / "model.fp32.onnx"
    graphs.export_graph(model, path, opset=opset, max_length=ckpt.max_length)
    done = time.perf_counter()
    size = _size_mb([path, path.with_name(path.name + ".data")])
    print(f"export: load {loaded - start:.1f} s, unfused ONNX {done - loaded:.1f} s, {size:.0f} MB -> {path}")
    return path


# -- 2. convert (OpenVINO venv) ---------------------------------------------------
def convert(out_dir: Path, modes: Sequence[str], package: Path | None = None) -> None:
    import openvino as ov

    onnx_path = out_dir / "model.fp32.onnx"
    if "int8_static" in modes and package is None:
        raise SystemExit("int8_static calibrates on the kit's tokenizer: give --package")
    if not onnx_path.is_file():
        raise SystemExit(f"{onnx_path} not found: run `openvino_model.py export CHECKPOINT {out_dir}` first")
    start = time.perf_counter()
    model = ov.convert_model(str(onnx_path))
    print(f"convert: ov.convert_model {time.perf_counter() - start:.1f} s", flush=True)
    for mode in modes:
        start = time.perf_counter()
        if mode == "fp32":
            out = model
        elif mode == "int8_static" and package is not None:  # refused above without --package
            out = quantize_static(model, package)
        else:
            import nncf

            kind = nncf.CompressWeightsMode.INT8_SYM if mode == "int8_sym" else nncf.CompressWeightsMode.INT8_ASYM
            out = nncf.compress_weights(model.clone(), mode=kind)
        compressed = time.perf_counter()
        path = ir_path(out_dir, mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(out, str(path), compress_to_fp16=False)
        saved = time.perf_counter()
        size = _size_mb([path, path.with_suffix(".bin")])
        print(
            f"convert: {mode}: weights {compressed - start:.1f} s, save {saved - compressed:.1f} s, "
            f"{size:.0f} MB -> {path}",
            flush=True,
        )


def quantize_static(model: Any, package: Path) -> Any:
    """``nncf.quantize``: int8 weights and activations with fixed, calibrated per-tensor scales
    (30 real English paragraphs disjoint from the fidelity texts, one per pass), with NNCF's
    overflow fix (7-bit weights) for CPUs without VNNI, where u8 x s8 pairs saturate in int16."""
    import nncf
    from m3_exporter.texts import calibration_paragraphs
    from m3_runtime.batching import pad_batch
    from m3_runtime.contract import TOKENIZER_FILE
    from m3_runtime.tokenize import M3Tokenizer

    tokenizer = M3Tokenizer(package / TOKENIZER_FILE)
    feeds = []
    for ids in tokenizer.encode(calibration_paragraphs(30), 512):
        input_ids, mask = pad_batch([ids], 1)
        feeds.append({"input_ids": input_ids, "attention_mask": mask})
    advanced = nncf.quantization.advanced_parameters.AdvancedQuantizationParameters(
        overflow_fix=nncf.quantization.advanced_parameters.OverflowFix.ENABLE
    )
    return nncf.quantize(
        model.clone(),
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        advanced_parameters=advanced,
    )


# -- the encoder ---------------------------------------------------------------------
def cpu_config(*, threads: int, group_size: int, precision: str = "f32") -> dict[str, Any]:
    """The CPU plugin's settings: one stream (one request at a time, as M3Model runs),
    ``threads`` inference threads (0: the plugin's choice), fp32 compute where nothing is
    quantized (this host has no bf16), and FullyConnected activations quantized per group of
    ``group_size`` input channels at run time (0: off; the weights are then decompressed)."""
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_PRECISION_HINT": precision,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(group_size),
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


class OVEncoder:
    """An OpenVINO IR behind ``M3Model.encode``'s interface (all three outputs, dict out)."""

    def __init__(
        self,
        package: Path,
        model: Path,
        *,
        threads: int = 0,
        group_size: int = 32,
        precision: str = "f32",
        batch_tokens: int = CPU_BATCH_TOKENS,
        cache_dir: Path | None = None,
        perf_count: bool = False,
    ) -> None:
        import openvino as ov
        from m3_runtime.contract import TOKENIZER_FILE
        from m3_runtime.package import load_package
        from m3_runtime.tokenize import M3Tokenizer

        manifest = load_package(package).manifest
        self.special = manifest.special_tokens
        self.tokenizer = M3Tokenizer(
            package / TOKENIZER_FILE, clean_up_tokenization_spaces=manifest.clean_up_tokenization_spaces
        )
        self.pad_limit = manifest.variants["int8"].flash_min_tokens if "int8" in manifest.variants else None
        self.batch_tokens = batch_tokens
        self.config = cpu_config(threads=threads, group_size=group_size, precision=precision)
        if perf_count:
            self.config["PERF_COUNT"] = True
        core = ov.Core()
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.compiled = core.compile_model(str(model), "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in ("dense_vecs", "sparse_weights", "colbert_vecs")]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """One forward pass; the outputs are copies (the request reuses its buffers)."""
        got = self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return {port.get_any_name(): np.array(got[port], copy=True) for port in self.outputs}

    def encode(self, texts: Sequence[str], *, max_length: int = MAX_LENGTH, batch_size: int = 256) -> dict:
        from m3_runtime.batching import pad_batch, plan_batches
        from m3_runtime.heads import split_batch

        ids = self.tokenizer.encode(list(texts), max_length)
        per_text: list[Any] = [None] * len(ids)
        unused = self.special.unused_for_sparse
        for rows in plan_batches(
            [len(x) for x in ids], batch_size=batch_size, max_tokens=self.batch_tokens, pad_limit=self.pad_limit
        ):
            input_ids, mask = pad_batch([ids[i] for i in rows], self.special.pad)
            results = self.run(input_ids, mask)
            for i, out in zip(rows, split_batch(results, input_ids, mask.sum(axis=1), unused), strict=True):
                per_text[i] = out
        return {
            "dense_vecs": np.stack([o.dense for o in per_text]) if per_text else np.zeros((0, 1024), np.float32),
            "lexical_weights": [o.lexical for o in per_text],
            "colbert_vecs": [o.colbert for o in per_text],
        }

    def matmul_kernels(self) -> dict[str, int]:
        """Which kernels ran the last pass's matrix products (needs ``perf_count=True``):
        ``{"NodeType exec_type": count}`` over the FullyConnected nodes, e.g.
        ``"FullyConnectedCompressed brgemm_avx2_f32"`` (int8 weights decompressed, fp32
        compute) or an ``i8``/``u8`` kernel where activations were quantized."""
        counts: dict[str, int] = {}
        for info in self.request.profiling_info:
            if info.node_type.startswith("FullyConnected"):
                key = f"{info.node_type} {info.exec_type}"
                counts[key] = counts.get(key, 0) + 1
        return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="unfused fp32 ONNX from a checkpoint (needs torch)")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("out_dir", type=Path)
    conv = sub.add_parser("convert", help="OpenVINO IRs from OUT_DIR/model.fp32.onnx (needs openvino, nncf)")
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--modes", default="fp32,int8_sym,int8_asym", help=f"comma-separated, of {', '.join(MODES)}")
    conv.add_argument("--package", type=Path, help="the kit's package: its tokenizer, for int8_static's calibration")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        export(args.checkpoint, args.out_dir)
        return
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes: {bad or args.modes!r} not in {', '.join(MODES)}")
    convert(args.out_dir, modes, args.package)


if __name__ == "__main__":
    sys.exit(main())
