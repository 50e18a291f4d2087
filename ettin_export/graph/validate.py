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

from ettin_export.graph.export import DIM_NAMES, INPUT_NAMES, OUTPUT_NAMES, ExportError
from ettin_export.parity import check_bound
from ettin_export.targets import FP32_BOUNDS

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
    attention = attention_nodes(proto)
    if len(attention) != expected_attention_nodes:
        raise ExportError(f"{len(attention)} {spec.OP_NAME} nodes for a model with {expected_attention_nodes} layers.")
    problems = attention_node_problems(proto)
    if problems:
        raise ExportError(f"the graph's {spec.OP_NAME} nodes break the op's contract: " + "; ".join(problems))


def attention_nodes(proto) -> list:
    """The graph's VarlenAttention nodes (by op type and domain, as the exporter writes them)."""
    return [n for n in proto.graph.node if n.op_type == spec.OP_NAME and n.domain == spec.PLUGIN_NAMESPACE]


# The types q, k, v may have in an exported graph: fp32 (CPU), bf16 (TensorRT), fp16.
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16"}


def attention_node_problems(proto, *, inputs=spec.INPUTS, attributes=spec.ATTRIBUTES,
                            float_types=None) -> list[str]:
    """What is wrong with the graph's VarlenAttention nodes: empty when every rule holds. The one set of
    node rules, used by the exporter's contract (the op's own spec) and by the TensorRT build (with the
    plugin's registration signature and the types it offers).

    Rules (shared/reference/tensorrt-notes.md §4-5): op_type is the op's name; `plugin_namespace` is
    its namespace (TensorRT >= 10.15 otherwise inlines the local function); `aot` = 1 (strict AOT, so
    the plan needs no Python); every attribute is present (QDP has no defaults, the parser only warns)
    as an INT that fits int32; the inputs are in order, cu_seqlens int32 (no int64 auto-cast for user
    plugins), q/k/v of one type among `float_types`; the model carries the local function."""
    from onnx import AttributeProto

    namespace, name = spec.PLUGIN_ID.split("::")
    float_types = float_types or FLOAT_TYPES
    types = _tensor_types(proto)
    problems: list[str] = []
    nodes = [n for n in proto.graph.node if n.op_type == name]
    if not nodes:
        return [f"the graph has no {name} node: nothing for the plugin {spec.PLUGIN_ID} to replace."]
    for index, node in enumerate(nodes):
        where = node.name or f"{name} node #{index}"
        attrs = {a.name: a for a in node.attribute}
        found_namespace = attrs.get("plugin_namespace")
        if found_namespace is None:
            problems.append(f"{where}: no plugin_namespace attribute; TensorRT >= 10.15 would inline the local "
                            "function instead of using the plugin.")
        elif found_namespace.type != AttributeProto.STRING or found_namespace.s.decode() != namespace:
            problems.append(f"{where}: plugin_namespace is {_attribute_text(found_namespace)}, the plugin is "
                            f"registered in namespace {namespace!r}.")
        aot = attrs.get("aot")
        if aot is None or aot.type != AttributeProto.INT or aot.i != 1:
            problems.append(f"{where}: aot must be INT 1 (the ahead-of-time plugin, so the plan runs without "
                            f"Python); found {_attribute_text(aot)}.")
        version = attrs.get("plugin_version")
        if version is not None and version.s.decode() != "1":
            problems.append(f"{where}: plugin_version {version.s.decode()!r}; Python plugins register version '1'.")
        for attribute in attributes:
            value = attrs.get(attribute)
            if value is None:
                problems.append(f"{where}: lacks attribute {attribute!r}, which the op declares (Python plugins "
                                "have no defaults and the parser only warns).")
            elif value.type != AttributeProto.INT:
                problems.append(f"{where}: attribute {attribute!r} is {AttributeProto.AttributeType.Name(value.type)}; "
                                "the plugin takes an int (ONNX INT -> kINT32).")
            elif not -(2**31) <= value.i < 2**31:
                problems.append(f"{where}: attribute {attribute!r} = {value.i} does not fit int32 "
                                "(the parser narrows it).")
        if len(node.input) != len(inputs):
            problems.append(f"{where}: {len(node.input)} inputs, the op takes {len(inputs)} {tuple(inputs)}.")
            continue
        element_types = []
        for position, input_name in enumerate(inputs):
            tensor = node.input[position]
            elem = types.get(tensor)
            if elem is None:
                problems.append(f"{where}: the type of input {input_name} ({tensor}) is not recorded in the graph.")
            elif input_name == "cu_seqlens":
                if elem != TensorProto.INT32:
                    problems.append(f"{where}: cu_seqlens ({tensor}) is {TensorProto.DataType.Name(elem)}; the plugin "
                                    "takes INT32 and the parser does not cast for user plugins.")
            elif elem not in float_types:
                problems.append(f"{where}: {input_name} ({tensor}) is {TensorProto.DataType.Name(elem)}; this graph "
                                f"needs {' or '.join(float_types.values())}.")
            else:
                element_types.append(elem)
        if len(set(element_types)) > 1:
            problems.append(f"{where}: q, k and v have different types; the op ties them to one.")
        shape = _tensor_shapes(proto).get(node.input[0])
        if shape is not None and (len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:])):
            problems.append(f"{where}: q has shape {shape}; the plugin needs [tokens, heads, head_dim] with "
                            "static heads and head_dim.")
    if not any(f.name == name and f.domain == namespace for f in proto.functions):
        problems.append(f"the model lacks the local function {namespace}::{name} (ONNX Runtime needs its body).")
    if not any(o.domain == namespace for o in proto.opset_import):
        problems.append(f"the model imports no opset for domain {namespace!r}.")
    return problems


def _tensor_types(proto) -> dict[str, int]:
    graph = proto.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _tensor_shapes(proto) -> dict[str, list]:
    shapes = {}
    for value in list(proto.graph.input) + list(proto.graph.value_info):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                  for d in tensor.shape.dim]
    return shapes


def _attribute_text(attribute) -> str:
    if attribute is None:
        return "nothing"
    from onnx import AttributeProto, helper

    return f"{AttributeProto.AttributeType.Name(attribute.type)} {helper.get_attribute_value(attribute)!r}"


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
    from ettin_export.synthetic.text import random_sentence

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
    exercised) and judge all scores against the fp64 anchor with the fp32 rule (docs/design.md, "Same scores"); return
    max |ONNX - anchor|. `references` holds the anchor and the own reference for the flattened batches."""
    from ettin_runtime.packing import pack

    got = []
    for pairs in batches:
        packed = pack(encoder.encode(pairs))
        (scores,) = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (packed.input_ids, packed.cu_seqlens))))
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
