"""CPU graph fusion: MultiHeadAttention, SkipLayerNormalization, BiasGelu, and a flash path.

``onnxscript``'s ORT fusions turn the dynamo export's attention into
``com.microsoft.MultiHeadAttention`` fed with an additive bias built from the mask,
``(batch, 1, seq, seq)``. ONNX Runtime's CPU MultiHeadAttention only runs its flash
kernel (no ``seq x seq`` score matrix) when it gets no mask and no bias; with one it
materialises ``heads x seq x seq`` floats, 4 GB per layer at 8,192 tokens. So each
attention becomes

    If(min(attention_mask) == 1 and sequence > FLASH_MIN_TOKENS,
       then: MultiHeadAttention(q, k, v)                        # long, no padding: flash
       else: MultiHeadAttention(q, k, v, key_padding_mask=mask)) # padded or short

which is exact either way (masked keys get weight 0), and the bias chain is dropped.
Short texts take the masked kernel even alone: its result for a text is bitwise the
same whatever the padding and the batch companions (measured), while flash and masked
differ by ~1e-7, which int8 rounding turns into ~1e-3. So a text up to
FLASH_MIN_TOKENS gets the same numbers alone or in any padded batch, and a longer one
(whose ``heads x seq x seq`` scores would be large) runs unpadded, alone or with texts
of its length; the manifest records the limit for the runtime's batching.
The graph keeps its interface; TensorRT cannot run these com.microsoft ops, which is
why the fp16 (GPU) variant is left unfused.
"""

from __future__ import annotations

import onnx
from m3_runtime.contract import INPUT_NAMES
from onnx import TensorProto, helper

MS_DOMAIN = "com.microsoft"


def fuse_transformer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply onnxscript's ORT fusions (stopping at MultiHeadAttention, no packed QKV)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers

    fused, counts = fuse_xformers(ir.from_proto(model))
    return ir.to_proto(fused), {k: v for k, v in counts.items() if v}


def _implicit_inputs(graph: onnx.GraphProto) -> set[str]:
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _implicit_inputs(attr.g)
    return used - produced


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    keep: set[int] = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_implicit_inputs(attr.g))
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


FLASH_MIN_TOKENS = 512


def add_flash_path(model: onnx.ModelProto, mask_input: str = INPUT_NAMES[1], min_tokens: int = FLASH_MIN_TOKENS) -> int:
    """Rewrite every masked MultiHeadAttention into the If above; returns how many."""
    graph = model.graph
    mha_nodes = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]
    if not mha_nodes:
        return 0
    mask_i32, min_mask, one = "m3_mask_i32", "m3_mask_min", "m3_one"
    no_padding, seq, limit, long_seq, flash = "m3_no_padding", "m3_seq", "m3_flash_min", "m3_long", "m3_flash"
    prelude = [
        helper.make_node("Cast", [mask_input], [mask_i32], name="m3_cast_mask", to=TensorProto.INT32),
        helper.make_node("ReduceMin", [mask_input], [min_mask], name="m3_mask_min", keepdims=0),
        helper.make_node(
            "Constant", [], [one], name="m3_one", value=helper.make_tensor(one, TensorProto.INT64, [], [1])
        ),
        helper.make_node("Equal", [min_mask, one], [no_padding], name="m3_no_padding"),
        helper.make_node("Shape", [mask_input], [seq], name="m3_seq", start=1, end=2),
        helper.make_node(
            "Constant", [], [limit], name=limit, value=helper.make_tensor(limit, TensorProto.INT64, [1], [min_tokens])
        ),
        helper.make_node("Greater", [seq, limit], [long_seq], name="m3_long"),
        helper.make_node("And", [no_padding, long_seq], [flash], name="m3_flash"),
    ]
    replaced: dict[int, onnx.NodeProto] = {}
    for k, node in enumerate(mha_nodes):
        qkv = list(node.input[:3])
        bias = node.input[3] if len(node.input) > 3 else ""
        attrs = [a for a in node.attribute]
        out = node.output[0]

        def branch(tag: str, inputs: list[str], node=node, attrs=attrs, out=out) -> onnx.GraphProto:
            inner = helper.make_node(
                "MultiHeadAttention", inputs, [f"{out}__{tag}"], name=f"{node.name}__{tag}", domain=MS_DOMAIN
            )
            inner.attribute.extend(attrs)
            value = helper.make_tensor_value_info(f"{out}__{tag}", TensorProto.FLOAT, None)
            return helper.make_graph([inner], f"{node.name}_{tag}", [], [value])

        flash_inputs = [*qkv, bias] if bias else qkv
        masked_inputs = [*qkv, bias, mask_i32]
        replaced[id(node)] = helper.make_node(
            "If",
            [flash],
            [out],
            name=f"m3_attention_{k}",
            then_branch=branch("flash", flash_inputs),
            else_branch=branch("masked", masked_inputs),
        )
    nodes = prelude + [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    return len(replaced)


def optimize_for_cpu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    fused, counts = fuse_transformer(model)
    counts["flash_path"] = add_flash_path(fused)
    return fused, counts
