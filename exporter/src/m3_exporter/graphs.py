"""Writing the three graph variants: fp32 and fp16 (exported from PyTorch), int8 (quantized from fp32)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
from m3_runtime.contract import INPUT_NAMES, OUTPUT_NAMES


class ExportError(RuntimeError):
    """Export produced a graph that is wrong or could not be written."""


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save with every weight in ONE external-data file next to the graph.

    Protobuf caps a graph at 2 GB and BGE-M3 in fp32 is 2.27 GB; a single data file with
    a relative location keeps the package movable as a whole.
    """
    location = path.name + ".data"  # == contract.data_file(variant) for model.<variant>.onnx
    (path.parent / location).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)


def export_graph(model, path: Path, *, opset: int, max_length: int, outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Trace ``model`` (an ``M3Graph``) with dynamic batch and sequence axes (dynamo exporter)."""
    import torch

    # Batch >= 2 and sequence >= 2 with padding, so neither axis is specialised.
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 2, 1, 1, 1]], dtype=torch.int64)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=max_length)
    dynamic = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (input_ids, attention_mask),
            input_names=list(INPUT_NAMES),
            output_names=list(outputs),
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    save_graph(program.model_proto, path)
    check_interface(path, outputs)


def check_interface(path: Path, expected_outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """The graph must have the contract's names with symbolic (not fixed) batch/sequence axes."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    if list(inputs) != list(INPUT_NAMES) or outputs != list(expected_outputs):
        raise ExportError(
            f"{path}: expected inputs {INPUT_NAMES} and outputs {expected_outputs}, got {list(inputs)} and {outputs}"
        )
    for name, dims in inputs.items():
        if len(dims) != 2 or not all(isinstance(d, str) and d for d in dims):
            raise ExportError(f"{path}: input {name} has dims {dims}; batch and sequence must be dynamic")


def export_fp16(model, path: Path, *, opset: int, max_length: int, outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """fp16 weights and compute, int64 inputs and fp32 outputs. Converts ``model`` in place.

    Exported from the half-precision PyTorch module rather than converted from the fp32
    graph: the heads' L2 normalisation upcasts to fp32 in the module itself (see
    ``wrapper.l2_normalize``), where a graph converter would round its 1e-12 epsilon
    to zero between casts and turn padded ColBERT rows into NaN. LayerNormalization keeps
    fp32 statistics under fp16 inputs by the ONNX spec (stash_type=1).
    """
    export_graph(model.half(), path, opset=opset, max_length=max_length, outputs=outputs)


def fuse_for_cpu(path: Path, outputs: tuple[str, ...] = OUTPUT_NAMES) -> dict[str, int]:
    """Replace the graph at ``path`` by its CPU-fused form (see ``fusion``); returns fusion counts."""
    from .fusion import optimize_for_cpu

    fused, counts = optimize_for_cpu(onnx.load(str(path)))
    save_graph(fused, path)
    check_interface(path, outputs)
    return counts


def quantize_int8(
    fp32_path: Path,
    path: Path,
    outputs: tuple[str, ...] = OUTPUT_NAMES,
    exclude: tuple[str, ...] = (),
    *,
    smooth_alpha: float = 0.0,
    channel_max: dict | None = None,
    int8_embeddings: bool = True,
) -> int:
    """int8 MatMuls with per-channel weights and per-token activation scales (see ``int8``),
    except the ``exclude``d node names, after SmoothQuant with ``smooth_alpha`` if it is
    above 0 (``channel_max``: measured per-channel ``max|x|`` of the MatMul inputs), and
    with ``int8_embeddings`` the word-embedding table in int8 with per-row scales (see
    ``int8.quantize_embedding``). Returns how many MatMuls were quantized."""
    from .int8 import quantize_embedding, quantize_per_token, smooth

    model = onnx.load(str(fp32_path))
    if smooth_alpha > 0:
        if channel_max is None:
            raise ValueError("smooth_alpha needs the measured channel_max")
        smooth(model, channel_max, smooth_alpha, exclude)
    model, count = quantize_per_token(model, exclude)
    if int8_embeddings:
        quantize_embedding(model, INPUT_NAMES[0])
    save_graph(model, path)
    del model
    check_interface(path, outputs)
    return count
