"""int8 with per-token activation scales: every text's result is independent of its batch.

ONNX Runtime's dynamic int8 (``quantize_dynamic``) takes ONE activation scale per run,
over the whole batch and its padding, so a text's output moved by up to 2.5e-2 with
its batch companions, and the runtime had to run int8 texts one per call. Here each
MatMul with a constant weight ``W [K, N]`` becomes

    amax  = max(ReduceMax(x, -1), -ReduceMin(x, -1))     # per token (row), [.., 1]
    s     = max(amax / 127, 1e-30)
    q     = QuantizeLinear(x, s, 128, axis=-1, block_size=K)   # uint8, symmetric about 128
            (per-axis over x as (tokens, K) for the widest inputs: see below)
    y     = MatMulIntegerToFloat(q, Wq, 1, sw, 128) * s         # Wq int8 per output channel

Each row's scale comes from that row alone, so padding and neighbours change nothing
(batches are exact to float rounding), and a token is never flattened by another
token's outlier. ``uint8`` around 128 rather than ``int8``: ONNX Runtime's CPU
``MatMulIntegerToFloat`` takes its fast (VNNI/AMX) path for u8 x s8 only; an s8 left
operand ran 20-30x slower here. The blocked ``QuantizeLinear`` needs opset 21.

The word-embedding table (the ``Gather`` on ``input_ids``: 1 GB of the full-size
package in float32) is stored in int8 too, one scale per row: ``quantize_embedding``.

Measured (this repo's 2-vCPU box, ONNX Runtime 1.32): all-MiniLM-L6-v2 on real English
text, dense cosine to fp32 mean 0.9978 / min 0.9939 against 0.9940 / 0.9845 for
per-run dynamic int8; full-size random BGE-M3, 200-token passages one per call 1,199
against 1,397 tokens/s (the extra reductions and the scale multiply), 32 queries of 16
tokens in one call 1,396 tokens/s against 537 for one query per call.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from m3_runtime.contract import INT8_INV_RANGE, INT8_ZERO_POINT, INT8_ZERO_POINT_3D
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"
_PREFIX = "m3_q"


def _quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (int8 [K, N], float32 scales [N])."""
    scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / 127
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def constant_weight(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The weight of a MatMul whose right operand is a 2-D float initializer, else None:
    the MatMuls that int8, SmoothQuant and the outlier measurement work on."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    w = weights.get(node.input[1])
    if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
        return None
    return w


def quantize_per_token(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> tuple[onnx.ModelProto, int]:
    """Rewrite every MatMul with a 2-D constant float weight (except ``exclude``d node
    names) in place; returns the model and how many MatMuls were quantized."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    skip = set(exclude)
    consts: dict[str, np.ndarray] = {
        "inv127": np.array(1 / 127, np.float32),
        "tiny": np.array(1e-30, np.float32),
        "one": np.array(1.0, np.float32),
        "zp": np.array(128, np.uint8),
        "flat": np.array([-1], np.int64),
        "zp3": np.full((1, 1, 1), 128, np.uint8),
        "axes": np.array([-1], np.int64),
    }
    c = {k: f"{_PREFIX}_{k}" for k in consts}
    # The runtime overrides these three by name (contract: 7-bit activations on x86 without VNNI).
    c.update(inv127=INT8_INV_RANGE, zp=INT8_ZERO_POINT, zp3=INT8_ZERO_POINT_3D)
    new_inits: list[onnx.TensorProto] = [numpy_helper.from_array(v, c[k]) for k, v in consts.items()]
    replaced: set[str] = set()
    widest = max((int(w.dims[0]) for n in graph.node if (w := constant_weight(n, weights)) is not None), default=0)
    rows_shapes: set[str] = set()
    done: dict[str, tuple[str, str]] = {}  # activation -> (quantized, per-row scale)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        w_proto = constant_weight(node, weights)
        if w_proto is None or node.name in skip:
            nodes.append(node)
            continue
        w_name = w_proto.name
        x = node.input[0]
        k = int(w_proto.dims[0])
        wq, sw = _quantize_weight(numpy_helper.to_array(w_proto))
        new_inits += [
            numpy_helper.from_array(wq, f"{w_name}_{_PREFIX}"),
            numpy_helper.from_array(sw, f"{w_name}_{_PREFIX}_scale"),
        ]
        replaced.add(w_name)
        if x not in done:  # Q, K and V share their input: quantize it once
            p = f"{x}_{_PREFIX}"
            nodes += [
                helper.make_node("ReduceMax", [x, c["axes"]], [f"{p}_max"], keepdims=1),
                helper.make_node("ReduceMin", [x, c["axes"]], [f"{p}_min"], keepdims=1),
                helper.make_node("Neg", [f"{p}_min"], [f"{p}_negmin"]),
                helper.make_node("Max", [f"{p}_max", f"{p}_negmin"], [f"{p}_amax"]),
                helper.make_node("Mul", [f"{p}_amax", c["inv127"]], [f"{p}_scale0"]),
                helper.make_node("Max", [f"{p}_scale0", c["tiny"]], [f"{p}_scale"]),
            ]
            if k < widest:  # blocked: one QuantizeLinear on the 3-D x, the faster kernel
                nodes += [
                    helper.make_node("Shape", [f"{p}_scale"], [f"{p}_shape"]),
                    helper.make_node("Expand", [c["zp3"], f"{p}_shape"], [f"{p}_zp"]),
                    helper.make_node(
                        "QuantizeLinear", [x, f"{p}_scale", f"{p}_zp"], [f"{p}_u8"], axis=-1, block_size=k
                    ),
                ]
            else:
                # The widest inputs (the FFN down-projections') take a per-axis
                # QuantizeLinear over x seen as (tokens, K): the blocked one held about
                # one byte per element of x more at its peak (+31 MB at 8,192 tokens,
                # 681 vs 650 MB), while per-axis everywhere was 2-9% slower.
                rows_k = f"{_PREFIX}_rows_{k}"
                if rows_k not in rows_shapes:
                    rows_shapes.add(rows_k)
                    new_inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), rows_k))
                nodes += [
                    helper.make_node("Reshape", [x, rows_k], [f"{p}_2d"]),
                    helper.make_node("Reshape", [f"{p}_scale", c["flat"]], [f"{p}_scale1d"]),
                    helper.make_node("Shape", [f"{p}_scale1d"], [f"{p}_count"]),
                    helper.make_node("Expand", [c["zp"], f"{p}_count"], [f"{p}_zp"]),
                    helper.make_node("QuantizeLinear", [f"{p}_2d", f"{p}_scale1d", f"{p}_zp"], [f"{p}_u8_2d"], axis=0),
                    helper.make_node("Shape", [x], [f"{p}_xshape"]),
                    helper.make_node("Reshape", [f"{p}_u8_2d", f"{p}_xshape"], [f"{p}_u8"]),
                ]
            done[x] = (f"{p}_u8", f"{p}_scale")
        q, scale = done[x]
        out = node.output[0]
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [q, f"{w_name}_{_PREFIX}", c["one"], f"{w_name}_{_PREFIX}_scale", c["zp"]],
                [f"{out}_{_PREFIX}_unscaled"],
                name=f"{node.name}_int8",
                domain=MS_DOMAIN,
            ),
            helper.make_node("Mul", [f"{out}_{_PREFIX}_unscaled", scale], [out], name=f"{node.name}_rowscale"),
        ]
        count += 1
    still_used = {i for n in nodes for i in n.input}
    still_used |= {
        i for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for m in a.g.node for i in m.input
    }
    kept = [t for t in graph.initializer if t.name not in replaced or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, count


_ROWS_PER_CHUNK = 16384  # rows quantized at a time: the float temporaries stay ~64 MB at hidden 1024
# Columns per embedding scale (when the hidden size is a multiple; else one scale per row).
# all-MiniLM-L6-v2's [CLS]/[SEP] rows have max/rms 11-13 (vocabulary median 3.1): with one
# scale per row, the 6-token keyword query most hurt fell to dense cosine 0.9889 against
# fp32 (0.9939 with a float table) and the keyword queries whose target changed rank rose
# from 3.75% to 5.0%; blocks of 128 gave 0.9931 and 3.75%, the other 599 texts alike
# (1 - cosine mean 2.42e-3 / 2.43e-3 / 2.40e-3 per row / 128 / float). Blocks of 64 and 32
# measured the same as 128 (0.9927, 0.9938); 128 costs 8 scales per XLM-R row, 8 MB.
EMBEDDING_BLOCK = 128


def quantize_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of ``block`` columns in each row: (int8 [V, H], float32
    scales [V, H // block]); scale = max|block| / 127, rounding half to even
    (``np.round``), in float32 like the graph's dequantization."""
    table = np.asarray(table, dtype=np.float32)
    rows, hidden = table.shape
    if block < 1 or hidden % block:
        raise ValueError(f"block {block} does not divide the hidden size {hidden}")
    q = np.empty(table.shape, dtype=np.int8)
    scale = np.empty((rows, hidden // block), dtype=np.float32)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        blocks = table[start : start + _ROWS_PER_CHUNK].reshape(-1, hidden // block, block)
        # an all-zero block (the padding row) gets a tiny scale and stays 0
        s = np.maximum(np.abs(blocks).max(axis=2), np.float32(1e-30)) / np.float32(127)
        q[start : start + len(blocks)] = np.clip(np.round(blocks / s[..., None]), -127, 127).reshape(-1, hidden)
        scale[start : start + len(blocks)] = s
    return q, scale


def embedding_gather(model: onnx.ModelProto, ids_input: str) -> onnx.NodeProto | None:
    """The largest ``Gather`` of a 2-D float initializer on axis 0 indexed by the graph input
    ``ids_input`` (the word embeddings: XLM-R's and BERT's alike), if that initializer is
    read by nothing else; else None. Position and token-type tables are gathered with
    computed indices, so they are never picked."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    best, best_size = None, 0
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        table = weights.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or node.input[1] != ids_input or axis != 0 or len(table.dims) != 2:
            continue
        if table.data_type != TensorProto.FLOAT or readers[table.name] != 1:
            continue
        size = int(table.dims[0]) * int(table.dims[1])
        if size > best_size:
            best, best_size = node, size
    return best


def quantize_embedding(model: onnx.ModelProto, ids_input: str) -> tuple[int, int] | None:
    """Store the word-embedding table (see ``embedding_gather``) in int8, each row (token
    id) with its own scales, one per ``EMBEDDING_BLOCK`` columns (one per row when that
    does not divide the hidden size), in place; returns (rows, hidden) or None if there
    is no such table.

    ``Gather`` of the int8 rows and of their scales (``[rows, hidden / block]``), then a
    blocked ``DequantizeLinear`` (opset 21): ``float(q) * scale`` per element, exactly
    the NumPy arithmetic. XLM-R's table is 250,002 x 1,024: 1,024 MB in float32, 264 MB
    so (full-size int8 package 1,363 -> 603 MB). ONNX Runtime maps the data file, so
    untouched rows were never resident either way: peak RSS of 64 queries unchanged
    (475-478 MB before, 468-469 after, 2-vCPU box; see ``benchmarks/memory_int8.py``). ONNX Runtime's contrib
    ``GatherBlockQuantized`` (uint8, bits 8) measured the same size, RSS and exact output,
    but returns zero rows for an out-of-range id where ``Gather`` refuses it, as the float
    graph does.
    """
    node = embedding_gather(model, ids_input)
    if node is None:
        return None
    graph = model.graph
    proto = next(t for t in graph.initializer if t.name == node.input[0])
    rows, hidden = int(proto.dims[0]), int(proto.dims[1])
    block = EMBEDDING_BLOCK if hidden % EMBEDDING_BLOCK == 0 else hidden
    q, scale = quantize_rows(numpy_helper.to_array(proto), block)
    name, out = proto.name, node.output[0]
    p = f"{name}_{_PREFIX}"
    inits = [numpy_helper.from_array(q, p), numpy_helper.from_array(scale, f"{p}_scale")]
    del q
    new_nodes = [
        helper.make_node("Gather", [p, ids_input], [f"{out}_{_PREFIX}_rows"], name=f"{node.name}_int8"),
        helper.make_node("Gather", [f"{p}_scale", ids_input], [f"{out}_{_PREFIX}_scale"], name=f"{node.name}_scales"),
        helper.make_node(
            "DequantizeLinear",
            [f"{out}_{_PREFIX}_rows", f"{out}_{_PREFIX}_scale"],
            [out],
            name=f"{node.name}_dequantize",
            axis=-1,
            block_size=block,
        ),
    ]
    nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        nodes.extend(new_nodes if list(n.output) == [out] and n.op_type == "Gather" else [n])
    del graph.node[:]
    graph.node.extend(nodes)
    # Deleted by index, not rebuilt: rebuilding the list copies every initializer (2 GB at full size).
    del graph.initializer[next(i for i, t in enumerate(graph.initializer) if t.name == name)]
    graph.initializer.extend(inits)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    return rows, hidden


def smooth(
    model: onnx.ModelProto, channel_max: dict[str, np.ndarray], alpha: float, exclude: Iterable[str] = ()
) -> int:
    """SmoothQuant: move activation outliers into the weights before quantizing.

    For an activation ``x`` whose per-channel ``max|x_c|`` was measured (``channel_max``)
    and the MatMuls that read it with constant weights ``W_i`` (``exclude``d names left
    alone), ``s_c = max|x_c|^alpha / max_i max_n |W_i[c, n]|^(1 - alpha)``; then
    ``x @ W_i == (x / s) @ (s * W_i)``: a ``Mul(x, 1/s)`` feeds those MatMuls and their
    weights are scaled, so the float graph computes the same function while ``x / s``
    has flatter channels for per-token int8. Returns how many activations were smoothed.
    """
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    skip = set(exclude)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if constant_weight(node, weights) is not None and node.name not in skip and node.input[0] in channel_max:
            readers.setdefault(node.input[0], []).append(node)
    inserted: dict[str, onnx.NodeProto] = {}
    for x, nodes in readers.items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        a_max = np.asarray(channel_max[x], dtype=np.float64)
        if a_max.shape != w_max.shape:
            continue
        scale = np.power(np.maximum(a_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        scale = scale.astype(np.float32)
        inv = f"{x}_{_PREFIX}_smooth_inv"
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inv))
        inserted[x] = helper.make_node("Mul", [x, inv], [f"{x}_{_PREFIX}_smooth"], name=f"{x}_smooth")
        for node, w in zip(nodes, arrays, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
            node.input[0] = f"{x}_{_PREFIX}_smooth"
    smoothed = len(inserted)
    if inserted:  # each Mul goes right before the first node that reads it
        nodes_out: list[onnx.NodeProto] = []
        for node in graph.node:
            for x, mul in list(inserted.items()):
                if mul.output[0] in node.input:
                    nodes_out.append(inserted.pop(x))
            nodes_out.append(node)
        del graph.node[:]
        graph.node.extend(nodes_out)
    return smoothed
