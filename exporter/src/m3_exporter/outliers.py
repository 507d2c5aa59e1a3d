"""Choose the MatMuls that stay fp32 in the int8 variant, from measured activation outliers.

Dynamic int8 gives each MatMul input one scale per run, so a few huge activations
(trained transformers have them; random weights do not) flatten everything else to
a handful of levels. On all-MiniLM-L6-v2 (real weights, 240 real English paragraphs)
plain dynamic int8 gave dense cosine to fp32 mean 0.9936 / min 0.982 and top-10
overlap 0.895; keeping the FFN down-projections in fp32 gave 0.9970 / 0.994 / 0.94,
and keeping only layer 0's (its input has max/rms 91, the model's highest) gave
0.9952 / 0.988 / 0.933 for 5.6% of the MatMul weights.

Since int8 takes per-token activation scales (``int8``), an outlier token no longer
flattens the others and keeping MatMuls in fp32 buys little (MiniLM: cosine mean
0.9979 / min 0.9934 with layer 0's down-projection kept, 0.9978 / 0.9939 without), so
the budget is 0 by default and this is opt-in (``--int8-fp32-budget``).

The recipe measures ``max|x| / rms(x)`` of every MatMul input on real text with
the fp32 graph and keeps in fp32 the most outlier-heavy ones, those at least
``OUTLIER_FACTOR`` times the model's median ratio, until they hold ``budget`` of the
MatMul weights (default 6%). MiniLM: median 15, layer 0's down-projection 91 (kept).
A random-weight checkpoint has no outliers (every ratio ~9): nothing is kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from m3_runtime.batching import pad_batch
from m3_runtime.contract import CPU, INPUT_NAMES

from .int8 import constant_weight

DEFAULT_BUDGET = 0.0  # opt-in; 0.06 was the default with per-run activation scales
OUTLIER_FACTOR = 3.0


def weighted_matmuls(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """MatMul node name -> (activation input, weight element count), for the MatMuls int8 quantizes."""
    weights = {t.name: t for t in model.graph.initializer}
    return {
        n.name: (n.input[0], int(np.prod(w.dims)))
        for n in model.graph.node
        if (w := constant_weight(n, weights)) is not None
    }


def activation_stats(
    fp32_graph: Path, ids: Sequence[list[int]], pad_id: int, batch: int = 8
) -> dict[str, tuple[np.ndarray, float, int]]:
    """For each weighted MatMul's input, over real (unpadded) tokens: per-channel ``max|x|``,
    the sum of squares and the element count."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_graph))
    wanted = sorted({x for x, _ in weighted_matmuls(model).values()})
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    stats: dict[str, list] = {name: [None, 0.0, 0] for name in wanted}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.onnx"
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="calibration.onnx.data"
        )
        del model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        for start in range(0, len(ids), batch):
            input_ids, mask = pad_batch(ids[start : start + batch], pad_id)
            values = session.run(wanted, {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: mask})
            real = mask.astype(bool)
            for name, x in zip(wanted, values, strict=True):
                x = x[real] if x.shape[:2] == real.shape else x.reshape(-1, x.shape[-1])
                st = stats[name]
                top = np.abs(x).max(axis=0)
                st[0] = top if st[0] is None else np.maximum(st[0], top)
                st[1] += float(np.square(x, dtype=np.float64).sum())
                st[2] += x.size
    return {name: (mx, ss, n) for name, (mx, ss, n) in stats.items()}


def outlier_ratios(stats: dict[str, tuple[np.ndarray, float, int]], model: onnx.ModelProto) -> dict[str, float]:
    """``max|x| / rms(x)`` of each weighted MatMul's input, by MatMul node name."""
    ratio = {name: float(mx.max()) / max(np.sqrt(ss / max(n, 1)), 1e-30) for name, (mx, ss, n) in stats.items()}
    return {node: ratio[x] for node, (x, _) in weighted_matmuls(model).items()}


def keep_in_fp32(model: onnx.ModelProto, ratios: dict[str, float], budget: float) -> list[str]:
    """Outlier-heavy MatMuls (ratio >= OUTLIER_FACTOR x median), worst first, within ``budget`` of the
    weights; the worst one is kept even if it alone exceeds the budget."""
    sizes = {node: size for node, (_, size) in weighted_matmuls(model).items()}
    total = sum(sizes.values())
    chosen: list[str] = []
    used = 0
    floor = OUTLIER_FACTOR * float(np.median(list(ratios.values())))
    for node in sorted(ratios, key=ratios.get, reverse=True):  # type: ignore[arg-type]
        if ratios[node] < floor or (chosen and (used + sizes[node]) / total > budget):
            break
        chosen.append(node)
        used += sizes[node]
    return chosen
