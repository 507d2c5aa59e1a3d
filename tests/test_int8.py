"""The per-token int8 rewrite against a NumPy implementation of the same arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from m3_exporter.int8 import EMBEDDING_BLOCK, quantize_per_token
from m3_runtime.session import int8_activation_bits, set_int8_activation_bits
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
    """Symmetric int8 per output column for w, per row (token) for x in the runtime's
    activation bits (7 on x86 without VNNI in this suite, conftest: 64 steps each side of
    the zero point; else 8: 127), exact integer product."""
    levels = 127 if int8_activation_bits() == 8 else 64
    sw = np.abs(w).max(axis=0) / 127
    wq = np.round(w / sw)
    sx = (np.abs(x).max(axis=-1, keepdims=True) * np.float32(1 / levels)).astype(np.float32)
    xq = np.round(x / sx)  # ONNX rounds half to even, like np.round
    return (xq.astype(np.float64) @ wq.astype(np.float64)) * sx * sw


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session at the activation bits the runtime uses (``set_int8_activation_bits``)."""
    options = ort.SessionOptions()
    set_int8_activation_bits(options, int8_activation_bits())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


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
    return _session(model), w, w2


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
        y = _session(model).run(None, {"x": x})[0]
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
    sess = _session(model)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    y, _, kept = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, _reference(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, _reference(y, np.eye(N, dtype=np.float32)), rtol=1e-5, atol=1e-5)


# -- the word-embedding table in int8 ---------------------------------------------------
def _rows_reference(table: np.ndarray, ids: np.ndarray, block: int) -> np.ndarray:
    """Symmetric int8 per ``block`` columns of each row: scale = max|block| / 127, round
    half to even, dequantized; in float32 as the graph."""
    rows = table[ids].astype(np.float32)
    blocks = rows.reshape(*rows.shape[:-1], -1, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1e-30) / np.float32(127), scale)  # an all-zero row stays zero
    return (np.round(blocks / scale) * scale).reshape(rows.shape)


def _embedding_graph(vocab: int, hidden: int, *, tied: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """BERT's embeddings in miniature: word rows by input_ids, position rows by computed
    indices (a bigger table), token types by zeros; with ``tied`` the word table is also
    read by a MatMul (an output projection), so it must stay float."""
    rng = np.random.default_rng(11)
    tables = {
        "word": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "pos": rng.standard_normal((vocab * 3, hidden)).astype(np.float32),
        "type": rng.standard_normal((2, hidden)).astype(np.float32),
    }
    tables["word"][1] = 0  # the padding row, as XLM-R's and BERT's checkpoints have it
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    outs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)]
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["w"], name="word_gather"),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])
        ),
        helper.make_node("Add", ["input_ids", "zeros"], ["pos_ids"]),
        helper.make_node("Gather", ["pos", "pos_ids"], ["p"], name="pos_gather"),
        helper.make_node("Gather", ["type", "zeros"], ["t"], name="type_gather"),
        helper.make_node("Add", ["w", "p"], ["wp"]),
        helper.make_node("Add", ["wp", "t"], ["emb"]),
    ]
    if tied:
        outs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
        nodes.append(helper.make_node("MatMul", ["emb", "word_t"], ["logits"]))
        nodes.append(helper.make_node("Transpose", ["word"], ["word_t"], perm=[1, 0]))
    inits = [numpy_helper.from_array(v, k) for k, v in tables.items()]
    graph = helper.make_graph(nodes, "g", [ids], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tables


@pytest.mark.parametrize(
    ("hidden", "block"),
    [(48, 48), (64, 64), (384, 128)],  # under 128 or not a multiple: one scale per row; 384 (MiniLM): 3 blocks
)
def test_embedding_matches_numpy_blockwise_arithmetic(hidden, block):
    from m3_exporter.int8 import quantize_embedding

    model, tables = _embedding_graph(40, hidden)
    tables["word"][5, 3] = 40.0  # an outlier channel, as BERT's [CLS]/[SEP] rows have
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(tables["word"], "word"))
    assert quantize_embedding(model, "input_ids") == (40, hidden)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "word" not in inits and "pos" in inits and "type" in inits  # only the word table, the others float
    assert inits["word_m3_q"].dtype == np.int8 and inits["word_m3_q_scale"].shape == (40, hidden // block)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 1, 39, 5, 2], [7, 1, 1, 1, 1, 1]], dtype=np.int64)  # repeats, the zero row, the last id
    (got,) = sess.run(None, {"input_ids": ids})
    expect = _rows_reference(tables["word"], ids, block) + tables["pos"][ids] + tables["type"][0]
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)
    exact_rows = tables["word"][ids] + tables["pos"][ids] + tables["type"][0]
    assert 1e-4 < np.abs(got - exact_rows).max() < 0.2  # really quantized, by half a step at most
    assert not np.isnan(got).any()
    if block < hidden:  # the outlier coarsens its own block only
        err = np.abs(got - exact_rows)[0, 1]
        assert err[block:].max() < 0.1 * err[:block].max()
    with pytest.raises(Exception, match="out of data bounds"):  # an id past the table fails, as in the float graph
        sess.run(None, {"input_ids": np.array([[0, 40]], dtype=np.int64)})


def test_a_table_read_elsewhere_stays_float():
    """Tied weights (the table also read by an output projection) would need two copies: left alone."""
    from m3_exporter.int8 import quantize_embedding

    model, _ = _embedding_graph(40, 16, tied=True)
    assert quantize_embedding(model, "input_ids") is None
    assert "word" in {t.name for t in model.graph.initializer}


def test_quantize_rows_in_chunks_equals_one_pass():
    """The exporter quantizes 16,384 rows at a time (bounded temporaries on a 250k x 1024 table)."""
    from m3_exporter.int8 import quantize_rows

    rng = np.random.default_rng(12)
    table = rng.standard_normal((40_000, 8)).astype(np.float32) * rng.uniform(0.01, 5, (40_000, 1)).astype(np.float32)
    table[123] = 0
    q, scale = quantize_rows(table, 4)
    assert q.shape == table.shape and scale.shape == (40_000, 2)
    blocks = table.reshape(-1, 2, 4)
    ref_scale = np.abs(blocks).max(axis=2) / np.float32(127)
    live = ref_scale[:, 0] > 0
    np.testing.assert_array_equal(scale[live], ref_scale[live])
    ref_q = np.round(blocks[live] / ref_scale[live][..., None]).reshape(-1, 8)
    np.testing.assert_array_equal(q[live], ref_q)
    assert np.all(q[123] == 0) and np.abs(q).max() == 127
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rows(table, 3)


def test_tiny_package_int8_gathers_quantized_word_rows(package_dir):
    """On the exported tiny package: the int8 graph's embedding lookup equals the NumPy
    per-row arithmetic on the fp32 graph's table, and no float word table is left."""
    from m3_runtime.contract import INPUT_NAMES

    fp32 = onnx.load(str(package_dir / "model.fp32.onnx"))
    gather = next(n for n in fp32.graph.node if n.op_type == "Gather" and n.input[1] == INPUT_NAMES[0])
    table = numpy_helper.to_array(next(t for t in fp32.graph.initializer if t.name == gather.input[0]))
    del fp32

    int8 = onnx.load(str(package_dir / "model.int8.onnx"))
    readers = [n for n in int8.graph.node if INPUT_NAMES[0] in n.input and n.op_type == "Gather"]
    tables = {t.name: t for t in int8.graph.initializer}
    assert sorted(tables[n.input[0]].data_type for n in readers) == [
        TensorProto.FLOAT,
        TensorProto.INT8,
    ]  # rows and their scales
    (node,) = [
        n for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {r.output[0] for r in readers}
    ]
    float_tables = [
        t.name for t in int8.graph.initializer if t.data_type == TensorProto.FLOAT and list(t.dims) == list(table.shape)
    ]
    assert float_tables == [], float_tables
    int8.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    sess = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(13)
    ids = rng.integers(0, table.shape[0], (3, 11)).astype(np.int64)
    ids[0, :3] = [0, 1, table.shape[0] - 1]
    feeds = {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: np.ones_like(ids)}
    got = sess.run([node.output[0]], feeds)[0]
    block = EMBEDDING_BLOCK if table.shape[1] % EMBEDDING_BLOCK == 0 else table.shape[1]  # tiny: hidden 64, per row
    np.testing.assert_allclose(got, _rows_reference(table, ids, block), rtol=0, atol=1e-7)
    assert np.abs(got - table[ids]).max() > 1e-4  # quantized, not the float rows
