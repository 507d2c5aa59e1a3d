"""The per-token int8 rewrite against a NumPy implementation of the same arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from m3_exporter.int8 import quantize_per_token
from onnx import TensorProto, helper, numpy_helper

K, N = 48, 40


def _graph(w: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """y = x @ w and z = x @ second share their input; kept = y @ I is excluded from int8."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "kept")]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm_y"),
        helper.make_node("MatMul", ["x", "w2"], ["z"], name="mm_z"),
        helper.make_node("MatMul", ["y", "w3"], ["kept"], name="mm_kept"),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(second, "w2"),
        numpy_helper.from_array(np.eye(N, dtype=np.float32), "w3"),
    ]
    return helper.make_model(
        helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 18)]
    )


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output column for w, per row (token) for x, exact integer product."""
    sw = np.abs(w).max(axis=0) / 127
    wq = np.round(w / sw)
    sx = np.abs(x).max(axis=-1, keepdims=True) / 127
    xq = np.round(x / sx)  # ONNX rounds half to even, like np.round
    return (xq.astype(np.float64) @ wq.astype(np.float64)) * sx * sw


@pytest.fixture(scope="module")
def session():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w2 = rng.standard_normal((K, N)).astype(np.float32)
    model, count = quantize_per_token(_graph(w, w2), exclude=("mm_kept",))
    assert count == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1  # the shared input is quantized once
    assert ops.count("MatMul") == 1 and ops.count("MatMulIntegerToFloat") == 2
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), w, w2


def test_matches_numpy_per_token_arithmetic(session):
    sess, w, w2 = session
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    x[1, 2] *= 40  # an outlier token: its own scale only
    y, z, kept = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, _reference(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, _reference(x, w2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, y, rtol=1e-6, atol=1e-6)  # the excluded MatMul stays float
    plain = x @ w
    assert 1e-4 < np.abs(y - plain).max() < 0.05 * np.abs(plain).max()


def test_each_token_independent_of_the_others(session):
    sess, _, _ = session
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, K)).astype(np.float32)
    together = sess.run(None, {"x": x})[0]
    x_big = x.copy()
    x_big[1:] *= 1000  # other texts with huge activations, as padding or outliers could be
    alone = sess.run(None, {"x": x[:1]})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": x_big})[0][0], together[0])
    np.testing.assert_array_equal(alone[0], together[0])


def test_zero_row_gives_zero_not_nan(session):
    sess, _, _ = session
    x = np.zeros((1, 2, K), dtype=np.float32)
    x[0, 1] = 1.0
    y = sess.run(None, {"x": x})[0]
    assert not np.isnan(y).any() and np.all(y[0, 0] == 0)


def test_smoothing_keeps_the_float_function_and_flattens_channels():
    """SmoothQuant rescales x by 1/s and W by s: the float graph computes the same thing,
    and an outlier channel of x comes much closer to the others."""
    from m3_exporter.int8 import smooth

    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w2 = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[..., 7] *= 50  # one outlier channel, as trained transformers have
    model = _graph(w, w2)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    channel_max = {"x": np.abs(x).reshape(-1, K).max(axis=0)}
    assert smooth(model, channel_max, 0.5, exclude=("mm_kept",)) == 1
    smoothed_input = next(n.output[0] for n in model.graph.node if n.op_type == "Mul")
    model.graph.output.append(helper.make_tensor_value_info(smoothed_input, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    *got, xs = sess.run(None, {"x": x})
    for a, b in zip(plain, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    before = channel_max["x"][7] / np.median(channel_max["x"])
    top = np.abs(xs).reshape(-1, K).max(axis=0)
    after = top[7] / np.median(top)
    assert before > 30 and after < before / 4  # alpha 0.5: the ratio falls to about its square root


def test_smoothing_improves_int8_on_an_outlier_channel(session):
    """Per-token int8 of x with an outlier channel: error with SmoothQuant is lower."""
    from m3_exporter.int8 import smooth

    rng = np.random.default_rng(8)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((4, 6, K)).astype(np.float32)
    x[..., 3] *= 60
    exact = x @ w
    errors = []
    for alpha in (0.0, 0.5):
        model = _graph(w, w)
        if alpha:
            smooth(model, {"x": np.abs(x).reshape(-1, K).max(axis=0)}, alpha)
        model, _ = quantize_per_token(model)
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors.append(np.abs(y - exact).mean())
    assert errors[1] < 0.5 * errors[0], errors


def test_both_quantizer_forms_match_numpy():
    """The widest inputs take a per-axis QuantizeLinear over (tokens, K), narrower ones a
    blocked one over the 3-D tensor; both give the NumPy per-token arithmetic."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((K, N)).astype(np.float32)
    model, count = quantize_per_token(_graph(w, w))  # y (width N < K) is quantized too
    assert count == 3
    ql = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(any(a.name == "block_size" for a in n.attribute) for n in ql) == [False, True]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    y, _, kept = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, _reference(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, _reference(y, np.eye(N, dtype=np.float32)), rtol=1e-5, atol=1e-5)
