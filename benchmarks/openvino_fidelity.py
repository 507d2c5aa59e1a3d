"""OpenVINO's own runtime against the kit's fp32 on real English text: issue 23's number guarantees.

    PYTHONPATH=runtime/src:exporter/src /work/venv-ov/bin/python benchmarks/openvino_fidelity.py \\
        PACKAGE OV_DIR [--engines int8,ov:int8_sym:32,ov:int8_sym:0,ov:fp32:0] [--paragraphs 48] [--queries 32]

``PACKAGE`` is the kit's package of the model (its fp32 is the reference, its int8 the
engine to beat); ``OV_DIR`` holds the IRs of ``openvino_model.py convert``. Engines:
``int8`` / ``fp32`` are ``M3Model`` variants; ``ov:MODE:GROUP`` is ``OVEncoder`` on
``OV_DIR/ov-MODE/model.xml`` with ``DYNAMIC_QUANTIZATION_GROUP_SIZE=GROUP`` (0: activations
stay fp32). Texts: ``m3_exporter.texts.english_paragraphs`` (real English, 30-120 words)
and ``run.py``'s short queries. For each engine, against the kit's fp32 on the same texts:

- dense cosine mean / min, ColBERT row cosine mean / min (every real token row),
  lexical top-10 overlap (mean share of each text's 10 heaviest ids kept in its top 10,
  as ``m3_exporter.validate``), whether any output had a NaN;
- batch invariance: ``--invariance`` texts (paragraphs and queries alternating) alone
  against the same texts in padded batches of 8 (token budget 4,096): max abs difference of dense, ColBERT and
  lexical weights (the kit guarantees 1e-5);
- for ``ov`` engines, which kernels ran the FullyConnected nodes (OpenVINO's profiling
  counters): whether activations were really quantized.

``--saturation`` also runs one FullyConnected with int8 weights at 127 (or -127) on
constant positive activations, which any per-group quantization represents exactly (255
or 127 after scaling): the output must be ``K x 127 x x``; a kernel that adds two u8 x s8
products in int16 (AVX2 without VNNI) returns less.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from openvino_model import OVEncoder, cpu_config, ir_path  # noqa: E402
from run import make_texts  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.where(den > 0, (a64 * b64).sum(-1) / np.maximum(den, 1e-30), 1.0)


def _top10(weights: dict) -> set:
    return {k for k, _ in sorted(weights.items(), key=lambda kv: -kv[1])[:10]}


def _lexical_max_abs(a: list[dict], b: list[dict]) -> float:
    return max(
        (abs(x.get(k, 0.0) - y.get(k, 0.0)) for x, y in zip(a, b, strict=True) for k in x.keys() | y.keys()),
        default=0.0,
    )


def compare(ref: dict, got: dict) -> dict[str, float]:
    dense = _cos(ref["dense_vecs"], got["dense_vecs"])
    col = _cos(np.concatenate(ref["colbert_vecs"]), np.concatenate(got["colbert_vecs"]))
    overlaps = [
        len(_top10(r) & _top10(g)) / len(_top10(r))
        for r, g in zip(ref["lexical_weights"], got["lexical_weights"], strict=True)
        if r
    ]
    nan = bool(np.isnan(got["dense_vecs"]).any() or any(np.isnan(c).any() for c in got["colbert_vecs"]))
    nan |= any(np.isnan(v) for w in got["lexical_weights"] for v in w.values())
    return {
        "dense_cos_mean": float(dense.mean()),
        "dense_cos_min": float(dense.min()),
        "colbert_cos_mean": float(col.mean()),
        "colbert_cos_min": float(col.min()),
        "top10_overlap": float(np.mean(overlaps)),
        "nan": float(nan),
    }


def invariance(alone: dict, batched: dict) -> dict[str, float]:
    return {
        "dense_max_abs": float(np.abs(alone["dense_vecs"] - batched["dense_vecs"]).max()),
        "colbert_max_abs": max(
            float(np.abs(a - b).max()) for a, b in zip(alone["colbert_vecs"], batched["colbert_vecs"], strict=True)
        ),
        "lexical_max_abs": _lexical_max_abs(alone["lexical_weights"], batched["lexical_weights"]),
    }


def load(
    spec: str, package: Path, ov_dir: Path, *, batch_tokens: int | None, threads: int, perf: bool = False
):  # -> encode(texts, bs)
    kind, *rest = spec.split(":")
    if kind == "ov":
        mode, group = rest[0], int(rest[1])
        enc = OVEncoder(
            package,
            ir_path(ov_dir, mode),
            threads=threads,
            group_size=group,
            perf_count=perf,
            **({} if batch_tokens is None else {"batch_tokens": batch_tokens}),
        )
        return (lambda texts, bs: enc.encode(texts, batch_size=bs)), enc
    from m3_runtime import M3Model

    model = M3Model(package, variant=kind, max_batch_tokens=batch_tokens)  # type: ignore[arg-type]

    def encode(texts: list[str], bs: int) -> dict:
        return model.encode(texts, batch_size=bs, return_dense=True, return_sparse=True, return_colbert_vecs=True)  # type: ignore[return-value]

    return encode, model


def saturation(threads: int) -> None:
    import openvino as ov
    from openvino import opset13 as ops

    k, n, m = 1024, 64, 4
    for sign in (1, -1):
        w = np.full((n, k), 127 * sign, dtype=np.int8)
        x = ops.parameter([m, k], np.float32, name="x")
        weights = ops.multiply(
            ops.convert(ops.constant(w), np.float32), ops.constant(np.full((n, 1), 0.01, np.float32))
        )
        y = ops.matmul(x, weights, transpose_a=False, transpose_b=True)
        model = ov.Model([y], [x], "fc")
        for group in (0, 32, 1024):
            config = cpu_config(threads=threads, group_size=group) | {"PERF_COUNT": True}
            request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
            xv = np.full((m, k), 0.5, np.float32)
            got = request.infer({"x": xv})[0]
            exact = float(k * 127 * sign * 0.01 * 0.5)
            kernels = {f"{p.node_type} {p.exec_type}" for p in request.profiling_info if "Fully" in p.node_type}
            print(
                f"saturation: weights {127 * sign:+d}, group {group:4d}: got {got.min():.3f}..{got.max():.3f}, "
                f"exact {exact:.3f} (relative error {abs(got - exact).max() / abs(exact):.2e}); kernel {kernels}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("ov_dir", type=Path)
    parser.add_argument("--engines", default="int8,ov:int8_sym:32,ov:int8_sym:0,ov:fp32:0")
    parser.add_argument("--paragraphs", type=int, default=48)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--invariance", type=int, default=16, help="texts checked alone against batched")
    parser.add_argument("--saturation", action="store_true")
    args = parser.parse_args()
    if args.saturation:
        saturation(args.threads)
    from m3_exporter.texts import english_paragraphs

    texts = english_paragraphs(240)[: args.paragraphs] + make_texts(args.queries, 0)["queries"]
    mixed = [t for pair in zip(texts[: len(texts) // 2], texts[len(texts) // 2 :], strict=False) for t in pair]
    print(f"{len(texts)} texts ({args.paragraphs} real English paragraphs, {args.queries} queries)", flush=True)

    start = time.perf_counter()
    ref_enc, holder = load("fp32", args.package, args.ov_dir, batch_tokens=None, threads=args.threads)
    ref = ref_enc(texts, 256)
    del ref_enc, holder
    gc.collect()
    print(f"reference: the kit's fp32, {time.perf_counter() - start:.0f} s", flush=True)
    for spec in args.engines.split(","):
        start = time.perf_counter()
        enc, holder = load(spec, args.package, args.ov_dir, batch_tokens=None, threads=args.threads)
        loaded = time.perf_counter() - start
        got = enc(texts, 256)
        fid = compare(ref, got)
        del enc, holder
        gc.collect()
        # Batch invariance: alone (one text per pass) against padded batches of 8.
        enc, holder = load(spec, args.package, args.ov_dir, batch_tokens=4096, threads=args.threads, perf=True)
        alone = enc(mixed[: args.invariance], 1)
        batched = enc(mixed[: args.invariance], 8)
        inv = invariance(alone, batched)
        extra = f"; matrix products: {holder.matmul_kernels()}" if spec.startswith("ov:") else ""
        del enc, holder
        gc.collect()
        print(
            f"{spec:<18} load {loaded:5.1f} s | dense cos mean {fid['dense_cos_mean']:.6f} min {fid['dense_cos_min']:.6f}"
            f" | ColBERT cos mean {fid['colbert_cos_mean']:.6f} min {fid['colbert_cos_min']:.6f}"
            f" | top-10 {fid['top10_overlap']:.3f} | NaN {bool(fid['nan'])}"
            f" | batch invariance dense {inv['dense_max_abs']:.1e} ColBERT {inv['colbert_max_abs']:.1e}"
            f" lexical {inv['lexical_max_abs']:.1e}{extra}",
            flush=True,
        )


if __name__ == "__main__":
    main()
