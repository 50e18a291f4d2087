"""Export-time validation, in optimum's order: output names, dynamic axes and types, then values on
shapes other than the export example. Typed errors say exactly what differs."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ettin_plugins import spec

from .onnx_export import DIM_NAMES, INPUT_NAMES, OUTPUT_NAMES, ExportError
from .parity import check_bound
from .targets import FP32_BOUNDS

# Shapes unlike the export example (3 pairs of 7/19/11 tokens): batch 1/3/5 x lengths 8/33/96/154.
VALIDATION_GRID = [(batch, length) for batch in (1, 3, 5) for length in (8, 33, 96, 154)]


def check_graph_contract(proto: onnx.ModelProto, expected_attention_nodes: int) -> None:
    graph = proto.graph
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in graph.input]
    expected_inputs = [(name, TensorProto.INT32) for name in INPUT_NAMES]
    if inputs != expected_inputs:
        raise ExportError(f"graph inputs are {_typed(inputs)}; expected exactly {_typed(expected_inputs)}.")
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in graph.output]
    if outputs != [(OUTPUT_NAMES[0], TensorProto.FLOAT)]:
        raise ExportError(f"graph outputs are {_typed(outputs)}; expected scores:float32.")
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != DIM_NAMES[value.name]:
            found = [d.dim_param or d.dim_value for d in dims]
            raise ExportError(f"{value.name} has dims {found}; its first axis must be dynamic '{DIM_NAMES[value.name]}'.")
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2 or out_dims[1].dim_value != 1:
        raise ExportError("scores must have shape [num_pairs, 1].")
    attention = [n for n in graph.node if n.op_type == spec.OP_NAME and n.domain == spec.PLUGIN_NAMESPACE]
    if len(attention) != expected_attention_nodes:
        raise ExportError(f"{len(attention)} {spec.OP_NAME} nodes for a model with {expected_attention_nodes} layers.")
    for node in attention:
        attrs = {a.name: a for a in node.attribute}
        for name in spec.ATTRIBUTES + ("aot",):
            if name not in attrs or attrs[name].type != onnx.AttributeProto.INT:
                raise ExportError(f"{node.name}: attribute {name!r} missing or not INT.")
        if attrs.get("plugin_namespace") is None or attrs["plugin_namespace"].s.decode() != spec.PLUGIN_NAMESPACE:
            raise ExportError(f"{node.name}: plugin_namespace must be {spec.PLUGIN_NAMESPACE!r}.")
    if not any(f.name == spec.OP_NAME and f.domain == spec.PLUGIN_NAMESPACE for f in proto.functions):
        raise ExportError(f"the model lacks the local function {spec.PLUGIN_NAMESPACE}::{spec.OP_NAME}.")


def _typed(pairs) -> str:
    return ", ".join(f"{n}:{onnx.helper.tensor_dtype_to_np_dtype(t).name if t else '?'}" for n, t in pairs)


def random_packed_inputs(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` pairs of lengths around `length` (distinct), random token ids."""
    from ettin_runtime.packing import pack

    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, length + rng.integers(-length // 4, length // 4 + 1, batch))
    packed = pack([rng.integers(0, vocab, int(n)).astype(np.int32) for n in lengths])
    return packed.input_ids, packed.cu_seqlens


def validation_batches(encoder, seed: int = 0) -> list[list[tuple[str, str]]]:
    """One batch per VALIDATION_GRID cell: `batch` fresh random pairs of about `length` tokens each
    (template included, within a quarter of it where the text allows), in text so that CrossEncoder
    can score the same inputs."""
    from .pairs import random_sentence

    rng = random.Random(seed)
    batches = []
    for batch, length in VALIDATION_GRID:
        candidates = []
        for _ in range(12 * batch):
            query = random_sentence(rng, rng.randint(1, max(1, min(12, length // 4))))
            candidates.append((query, random_sentence(rng, rng.randint(0, max(1, int(length * 1.1))))))
        lengths = [len(ids) for ids in encoder.encode(candidates)]
        target = min(length, encoder.max_length)
        ranked = sorted(range(len(candidates)), key=lambda i: (abs(lengths[i] - target), i))
        batches.append([candidates[i] for i in ranked[:batch]])
    return batches


def check_values(session, encoder, batches, references, bounds=FP32_BOUNDS, what: str = "ONNX Runtime") -> float:
    """Run the session once per batch (each batch one packed execution, so every grid shape is
    exercised) and judge all scores against the fp64 anchor with the fp32 rule (DESIGN.md); return
    max |ONNX - anchor|. `references` holds the anchor and the own reference for the flattened batches."""
    from ettin_runtime.packing import pack

    got = []
    for pairs in batches:
        packed = pack(encoder.encode(pairs))
        (scores,) = session.run([OUTPUT_NAMES[0]], {"input_ids": packed.input_ids, "cu_seqlens": packed.cu_seqlens})
        if scores.shape != (len(pairs), 1):
            raise ExportError(f"scores shape {scores.shape} for {len(pairs)} pairs; expected ({len(pairs)}, 1).")
        got.append(scores.reshape(-1))
    candidate = np.concatenate(got).astype(np.float64)
    check = check_bound(candidate, references, bounds)
    if not check.passed:
        worst = int(np.argmax(np.abs(candidate - np.asarray(references.anchor, np.float64))))
        cell = int(np.searchsorted(np.cumsum([len(b) for b in batches]), worst, side="right"))
        batch, length = VALIDATION_GRID[cell]
        raise ExportError(
            f"{what} scores of the exported graph are {check.error:.3g} from the fp64 anchor "
            f"({references.anchor_name}), beyond {check.rule} ({bounds.error_ratio:g} x the own error of "
            f"{references.own_name}, {check.own_error:.3g}, + {bounds.error_slack:g}); against "
            f"{references.own_name} directly: {check.versus_own:.3g}. Worst at batch {batch}, ~{length} tokens, "
            f"on the {len(candidate)} pairs of the validation grid. The bound already scales with what fp32 "
            "rounding does to this checkpoint, so the export computes something the model does not: check that "
            "onnxruntime is >= 1.20, and report it with this message if it persists."
        )
    return check.error


def bf16_as_fp32(proto: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
    """The same graph with every bf16 type and weight widened to fp32 (values unchanged): runs in ONNX
    Runtime on CPU, which has no bf16 MatMul, to check the bf16 graph's arithmetic."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    if base_dir is not None:
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for node in list(model.graph.node) + [n for f in model.functions for n in f.node]:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.BFLOAT16:
                attribute.i = TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.BFLOAT16:
                array = onnx.numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(onnx.numpy_helper.from_array(array))
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def bf16_islands(proto: onnx.ModelProto) -> dict:
    """Where a bf16 graph computes in fp32: the ops fed by Cast-to-fp32 nodes, and the weight dtypes."""
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    matmul_weight_types = Counter()
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                if name in weights:
                    matmul_weight_types[TensorProto.DataType.Name(weights[name])] += 1
    fp32_ops = Counter()
    for node in proto.graph.node:
        fed_by_upcast = any(
            (p := producers.get(name)) is not None and p.op_type == "Cast"
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in p.attribute)
            for name in node.input
        )
        if fed_by_upcast:
            fp32_ops[node.op_type] += 1
    large_weights = Counter(
        TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if np.prod(t.dims) >= 4096
    )
    return {"matmul_weights": dict(matmul_weight_types), "ops_fed_fp32": dict(fp32_ops), "large_weights": dict(large_weights)}
