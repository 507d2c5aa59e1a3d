"""How fast could fused work around the int8 products make BGE-M3? (issue 23, option b)

    python benchmarks/fusion_ceiling.py PACKAGE [--repeats 3] [--profile [today|b free|b + LN free]] [--epilogue] [--queries 64] [--passages 16]

Option (b) of the CPU issue would write ONNX Runtime custom ops that fuse the passes
around the int8 matrix products: per-token quantization into SkipLayerNormalization's
output, and the per-row scale, the bias and GELU into the product's epilogue. Before
writing them, this measures what they could win at best. It rewrites the package's
int8 graph so that those passes cost (almost) nothing, and times the rewrites against
the graph as it is, in interleaved passes (every configuration once per pass, the
order reversed each pass), with all three outputs, through ``M3Model`` (its tokenizer,
batch plan and heads; only the session is swapped):

- ``today``: the int8 graph as exported.
- ``b free``: what option (b) would fuse, at zero cost. Each per-token quantization
  chain (ReduceMax, ReduceMin, Neg, Max, Mul, Max, Shape, Expand, QuantizeLinear and
  the reshapes) becomes one ``Cast`` to uint8 (the write of the uint8 copy that a
  fused op still makes); each per-row scale ``Mul`` goes; each bias ``Add`` and
  ``BiasGelu`` after a product goes, its bias handed to ``MatMulIntegerToFloat``'s
  bias input (which ORT applies while writing the output), GELU dropped.
- ``b + LN free``: also SkipLayerNormalization dropped (its output is its first
  input): everything but the products, attention and the heads at zero cost. No
  fusion can beat it while the products and attention stay ORT's kernels.

The rewrites compute wrong numbers (values are not normalized, GELU is gone); only
their time means anything. Matrix products take the same time whatever the values,
and ``Cast`` and attention do not slow down on large values. The same run times the
bare ``MatMulInteger`` kernel (``gemm_bound.rate``, M = 256) and prints each
configuration's share of the bound it allows: the issue's target is >= 0.70 and >= 1.5x
today's tokens/s.

``--profile`` instead runs ONNX Runtime's profiler on today's graph, or on a rewrite
(one pass of each workload after a warm-up) and prints where the time goes by operator
type. On a rewrite it shows what the stand-in ``Cast``s still cost: a fused op writes
its uint8 copy in the pass that makes its input, so the rewrites' ``Cast`` share is
time a ceiling could still take off.

``--epilogue`` times one bare ``MatMulIntegerToFloat`` (M x 1024 x 4096, M = 256 and
768) as today's graph runs it (then a row-scale ``Mul``), alone, and with the bias as
its input (as the rewrites run it), in interleaved passes: what ORT's own bias
epilogue costs, which a fused epilogue might not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_bound import OPS_PER_TOKEN, rate  # noqa: E402
from run import MAX_LENGTH, make_texts  # noqa: E402

QUANT_OPS = {"ReduceMax", "ReduceMin", "Neg", "Max", "Mul", "Shape", "Expand", "QuantizeLinear", "Reshape"}
MS = "com.microsoft"


def _input_slots(graph: onnx.GraphProto):
    """(node holding the slot, its input list, index) for every input, subgraphs' included;
    the holder of a subgraph's input is the node that owns the subgraph."""
    for node in graph.node:
        for i in range(len(node.input)):
            yield node, node.input, i
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for sub in attr.g.node:
                    for i in range(len(sub.input)):
                        yield node, sub.input, i


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node, inputs, i in _input_slots(graph):
        out[inputs[i]].append(node)
    return out


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Every use of a name in ``names`` (inputs and graph outputs) now reads its new name,
    followed to the end where a new name is itself renamed."""

    def final(name: str) -> str:
        while name in names:
            name = names[name]
        return name

    names = {old: final(old) for old in names}
    for _, inputs, i in _input_slots(graph):
        inputs[i] = names.get(inputs[i], inputs[i])
    for output in graph.output:
        output.name = names.get(output.name, output.name)


def rewrite(model: onnx.ModelProto, drop_layernorm: bool) -> dict[str, int]:
    """Rewrite the int8 graph in place (see the module's docstring); returns counts."""
    graph = model.graph
    counts = {"quant chains": 0, "row scales": 0, "biases": 0, "bias_gelu": 0, "skip_layernorm": 0}
    # 1. Per-token quantization chains -> Cast to uint8. The chain's nodes carry the
    # "_m3_q_" infix on their outputs; the product's input is "<x>_m3_q_u8".
    drop: set[int] = set()
    casts: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        outs = list(node.output)
        if node.op_type in QUANT_OPS and outs and "_m3_q_" in outs[0] and not node.name.endswith("_rowscale"):
            drop.add(i)
            if outs[0].endswith("_m3_q_u8"):
                x = outs[0][: -len("_m3_q_u8")]
                casts.append(helper.make_node("Cast", [x], [outs[0]], to=TensorProto.UINT8, name=f"{x}_cast_u8"))
                counts["quant chains"] += 1
    nodes = [n for i, n in enumerate(graph.node) if i not in drop]
    # Put each Cast where its chain's QuantizeLinear was: right after its input is made.
    by_input = {c.input[0]: c for c in casts}
    ordered: list[onnx.NodeProto] = []
    for node in nodes:
        ordered.append(node)
        for out in node.output:
            if out in by_input:
                ordered.append(by_input.pop(out))
    assert not by_input, f"quantized inputs never produced: {sorted(by_input)}"
    del graph.node[:]
    graph.node.extend(ordered)

    # 2. Row-scale Mul after each product: gone. 3. Bias Add / BiasGelu after it: into the product.
    inits = {t.name for t in graph.initializer}
    consumers = _consumers(graph)
    remove: set[str] = set()
    renames: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat":
            continue
        mul = next(n for n in consumers[node.output[0]] if n.name.endswith("_rowscale"))
        remove.add(mul.name)
        counts["row scales"] += 1
        after = consumers[mul.output[0]]
        final = mul.output[0]
        if len(after) == 1 and after[0].op_type in ("Add", "BiasGelu") and after[0].input[1] in inits:
            nxt = after[0]
            while len(node.input) < 6:
                node.input.append("")
            node.input.append(nxt.input[1])  # input 6: bias
            remove.add(nxt.name)
            counts["biases" if nxt.op_type == "Add" else "bias_gelu"] += 1
            final = nxt.output[0]
        renames[final] = node.output[0]
    kept = [n for n in graph.node if n.name not in remove]
    del graph.node[:]
    graph.node.extend(kept)
    _rename(graph, renames)

    # 4. SkipLayerNormalization -> its first input (every output it has).
    if drop_layernorm:
        kept, to_input = [], {}
        for node in graph.node:
            if node.op_type == "SkipLayerNormalization" and node.domain == MS:
                to_input.update((out, node.input[0]) for out in node.output if out)
                counts["skip_layernorm"] += 1
            else:
                kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)
        _rename(graph, to_input)
    return counts


def write_rewrite(package: Path, out_dir: Path, drop_layernorm: bool) -> tuple[Path, dict[str, int]]:
    model = onnx.load(str(package / "model.int8.onnx"))
    counts = rewrite(model, drop_layernorm)
    path = out_dir / ("b_ln_free.onnx" if drop_layernorm else "b_free.onnx")
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path, counts


def _swap_session(model, graph: Path, *, profile: bool = False) -> None:
    """Run ``model`` on ``graph`` with the session options its engine chose (threads, arena,
    int8 bits), optionally with ONNX Runtime's profiler on."""
    import onnxruntime as ort
    from m3_runtime.session import _session_options, run_options

    engine = model.engine
    _, config, _ = engine._open
    options = _session_options(ort, config, cpu_only=True)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "m3_profile")
    engine.session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    engine._run_options = run_options(engine.session)


def _model(package: Path, graph: Path | None):
    from m3_runtime import M3Model

    model = M3Model(package, variant="int8")
    if graph is not None:
        _swap_session(model, graph)
    return model


def _encode(model, texts: list[str]) -> None:
    model.encode(texts, max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)


def profile(package: Path, texts: dict[str, list[str]], graph_path: Path | None = None) -> None:
    model = _model(package, None)
    graph = graph_path or model.engine._open[0]
    for workload in ("queries", "passages"):
        _swap_session(model, graph, profile=True)
        engine = model.engine
        _encode(model, texts[workload][:4])  # warm-up: its events are left out below
        cutoff_us = (time.monotonic_ns() - engine.session.get_profiling_start_time_ns()) / 1000
        _encode(model, texts[workload])
        path = Path(engine.session.end_profiling())
        by_op: dict[str, float] = defaultdict(float)
        for event in json.loads(path.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= cutoff_us:
                by_op[event["args"]["op_name"]] += event["dur"]
        path.unlink()
        # An If's time holds its branch's MultiHeadAttention, which is also listed itself.
        by_op.pop("If", None)
        total = sum(by_op.values())
        print(f"\n{workload}: {len(texts[workload])} texts, kernel time {total / 1e6:.2f} s")
        for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
            if us / total >= 0.005:
                print(f"  {op:<32}{us / total:7.1%}")


def epilogue(repeats: int = 5, calls: int = 10) -> None:
    import onnxruntime as ort
    from onnx import numpy_helper

    k, n = 1024, 4096
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array((rng.random(n) * 0.01).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"),
    ]
    forms = {"product + row-scale Mul (today)": (False, True), "product alone": (False, False)}
    forms["product with bias input"] = (True, False)

    def session(bias: bool, row_scale: bool):
        inputs = ["a", "w", "one", "w_scale", "zp"] + (["", "bias"] if bias else [])
        nodes = [helper.make_node("MatMulIntegerToFloat", inputs, ["y0" if row_scale else "y"], domain=MS)]
        graph_inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])]
        if row_scale:
            nodes.append(helper.make_node("Mul", ["y0", "s"], ["y"]))
            graph_inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["m", 1]))
        used = [t for t in weights if bias or t.name != "bias"]
        out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])]
        graph = helper.make_graph(nodes, "epilogue", graph_inputs, out, used)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    sessions = {name: session(*form) for name, form in forms.items()}
    for m in (256, 768):
        feeds = {"a": rng.integers(0, 256, (m, k), dtype=np.uint8), "s": rng.random((m, 1)).astype(np.float32)}
        times: dict[str, list[float]] = {name: [] for name in forms}
        for p in range(repeats):
            for name in forms if p % 2 == 0 else reversed(list(forms)):
                feed = {key: feeds[key] for key in ("a", "s") if key == "a" or forms[name][1]}
                sessions[name].run(None, feed)
                start = time.perf_counter()
                for _ in range(calls):
                    sessions[name].run(None, feed)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
        print(f"M = {m}: " + ", ".join(f"{name} {statistics.median(t):.2f} ms" for name, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="a full-size BGE-M3 package with an int8 variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument(
        "--profile",
        nargs="?",
        const="today",
        choices=("today", "b free", "b + LN free"),
        help="profile this graph (default today's) by operator type instead of timing",
    )
    parser.add_argument("--epilogue", action="store_true", help="time ORT's bias epilogue on a bare product instead")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.epilogue:
        epilogue()
        return
    texts = make_texts(args.queries, args.passages)
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="m3-ceiling-") as tmp:
            path = None
            if args.profile != "today":
                path, _ = write_rewrite(args.package, Path(tmp), drop_layernorm=args.profile == "b + LN free")
            profile(args.package, texts, path)
        return

    with tempfile.TemporaryDirectory(prefix="m3-ceiling-") as tmp:
        graphs: dict[str, Path | None] = {"today": None}
        for drop_ln, name in ((False, "b free"), (True, "b + LN free")):
            path, counts = write_rewrite(args.package, Path(tmp), drop_ln)
            print(f"{name}: rewrote {counts}", flush=True)
            graphs[name] = path
        models = {name: _model(args.package, g) for name, g in graphs.items()}
        tokenizer = models["today"].tokenizer
        tokens = {w: sum(len(x) for x in tokenizer.encode(texts[w], MAX_LENGTH)) for w in ("queries", "passages")}
        for model in models.values():  # warm-up
            _encode(model, texts["queries"][:8])
        runs: dict[str, dict[str, list[float]]] = {n: {"queries": [], "passages": []} for n in models}
        bounds: list[float] = []
        order = list(models)
        for p in range(args.repeats):
            bounds.append(rate(True, 256, 0, 2.0) / OPS_PER_TOKEN)
            for name in order if p % 2 == 0 else reversed(order):
                for w in ("queries", "passages"):
                    start = time.perf_counter()
                    _encode(models[name], texts[w])
                    tps = tokens[w] / (time.perf_counter() - start)
                    runs[name][w].append(tps)
                    print(f"  pass {p + 1} {name:<12} {w:<9}{tps:9.1f} tokens/s", flush=True)
        bound = statistics.median(bounds)
        print(
            f"\nint8 products' bound (MatMulInteger 256x1024x4096, median of {len(bounds)}): {bound:,.0f} tokens/s "
            f"[{min(bounds):,.0f}-{max(bounds):,.0f}]; tokens: {tokens}"
        )
        print(f"{'configuration':<14}{'workload':<10}{'tokens/s':>10}{'x today (min-max)':>22}{'share of bound':>16}")
        report: dict[str, dict] = {"bound_tokens_per_s": bounds, "tokens": tokens, "results": {}}
        for name in models:
            for w in ("queries", "passages"):
                r = runs[name][w]
                ratios = [a / b for a, b in zip(r, runs["today"][w], strict=True)]
                med = statistics.median(r)
                print(
                    f"{name:<14}{w:<10}{med:10.1f}{statistics.median(ratios):10.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}){med / bound:16.2f}"
                )
                report["results"].setdefault(name, {})[w] = {"tokens_per_s": r, "x_today": ratios}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
