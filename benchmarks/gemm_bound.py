"""The machine's bare matrix-product speed, and the BGE-M3 tokens/s it allows.

    python benchmarks/gemm_bound.py [--m 64,256,1024] [--threads 0] [--seconds 3] [--signed]

Times one ONNX Runtime ``MatMulInteger`` (uint8 activations x int8 weights, the
kernel the int8 variant's products use; ``--signed``: int8 activations too, also timed)
and one fp32 ``MatMul`` of M x 1024 x 4096
on the CPU, each for about ``--seconds``, and prints TOPS / TFLOPS. BGE-M3's
products are 24 layers x (4 x 1024 x 1024 + 2 x 1024 x 4096) multiply-adds per token
(0.604 GOP), so the int8 TOPS over that is how many tokens/s the int8 products alone
allow: a ceiling for the whole model, which also runs attention, LayerNorm,
quantization and GELU. Run it in the same hour as the model's benchmark (this VM
drifts between runs) and alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

K, N = 1024, 4096
LAYERS = 24
OPS_PER_TOKEN = 2 * LAYERS * (4 * K * K + 2 * K * N)  # Q, K, V, output; FFN up, down: 0.604e9


def _graph(int8: bool, signed: bool = False) -> bytes:
    a_int = TensorProto.INT8 if signed else TensorProto.UINT8
    a_type, out_type = (a_int, TensorProto.INT32) if int8 else (TensorProto.FLOAT, TensorProto.FLOAT)
    rng = np.random.default_rng(0)
    b = rng.integers(-127, 128, (K, N), dtype=np.int8) if int8 else rng.standard_normal((K, N), dtype=np.float32)
    node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("a", a_type, ["m", K])],
        [helper.make_tensor_value_info("y", out_type, ["m", N])],
        [onnx.numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def rate(int8: bool, m: int, threads: int, seconds: float, signed: bool = False) -> float:
    """Operations per second (2 per multiply-add) of ``m`` x 1024 x 4096."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(_graph(int8, signed), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a: np.ndarray
    if not int8:
        a = rng.standard_normal((m, K), dtype=np.float32)
    else:
        a = rng.integers(-128, 128, (m, K), dtype=np.int8) if signed else rng.integers(0, 256, (m, K), dtype=np.uint8)
    session.run(None, {"a": a})
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(None, {"a": a})
        runs += 1
    return 2 * m * K * N * runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="64,256,1024", help="rows of the activations, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--signed", action="store_true", help="also time int8 x int8 (signed activations)")
    args = parser.parse_args()
    try:
        sizes = [int(x) for x in args.m.split(",")]
    except ValueError:
        parser.error(f"--m takes integers separated by commas, got {args.m!r}")
    if not sizes or min(sizes) < 1 or args.threads < 0 or args.seconds <= 0:
        parser.error("--m must be positive integers, --threads >= 0 and --seconds > 0")
    for m in sizes:
        int8 = rate(True, m, args.threads, args.seconds)
        fp32 = rate(False, m, args.threads, args.seconds)
        signed = f" (int8 x int8: {rate(True, m, args.threads, args.seconds, True) / 1e12:.2f})" if args.signed else ""
        print(
            f"M={m:5d}: uint8 x int8 MatMulInteger {int8 / 1e12:5.2f} TOPS{signed}, fp32 MatMul "
            f"{fp32 / 1e12:5.3f} TFLOPS; BGE-M3's int8 products alone allow {int8 / OPS_PER_TOKEN:6.0f} tokens/s, "
            f"fp32's {fp32 / OPS_PER_TOKEN:5.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
