"""int8 for the CPU target: ONNX Runtime's dynamic quantization of the exported fp32 graph.

The recipe was chosen by measurement (2-core AMD EPYC Zen 5, 17m and 150m, built-in parity set against
fp32; see docs/results.md): weights int8 symmetric per output channel, activations quantized at run time
per token (MatMulInteger; see below), every linear layer of the backbone quantized; the embeddings, the attention
(the VarlenAttention function body: scores and softmax), norms and rotary stay fp32 because the
quantizer only rewrites MatMul/Gemm with constant weights, and the head (its Dense and the classifier)
is excluded so the score keeps fp32 precision. Static QDQ with calibration, MatMulNBits blocks and
keeping more layers in fp32 ranked closer to fp32 but ran no faster than fp32 itself.

Activations are quantized per token, not per batch: ONNX Runtime's dynamic quantization computes one
scale for the whole packed batch, so a pair's score moved with whichever pairs shared its batch (measured,
random 17m on 297 built-in parity pairs, AMD EPYC Zen 3: up to 1.9 between a pair alone and in a batch of
32). `per_token_activations` rewrites each DynamicQuantizeLinear as a row-wise symmetric quantizer; the
same pairs then score bit-identically alone, in a batch or beside a long pair, rank closer to fp32
(Spearman 0.9943 against 0.9874 per batch) and ran at the same speed (20.9 pairs/s both).

Weights use 7 of their 8 bits (ONNX Runtime's `reduce_range`). On x86 CPUs without VNNI (AVX2 only)
ONNX Runtime's u8s8 kernels add pairs of uint8 x int8 products in int16 (vpmaddubsw), which saturates
with full-range weights: measured on a 2-core AMD EPYC Zen 3 (AVX2, no VNNI), a random tiny checkpoint's
int8 scores moved up to 4.37 from fp32 with Spearman 0.978 at 8-bit weights, and 0.97 / 0.9966 at
7-bit, which also ran no slower (uint8 weights: 1.08 / 0.9970, 28 % slower). With 7-bit weights no
pair sum can overflow, so the integer products are exact on every x86 CPU and an artifact scores the
same on a VNNI machine as on an AVX2 one.

ONNX Runtime rewrites each Gemm as a MatMul named `<name>_MatMul` before it quantizes, so the head is
excluded by both names.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantizer logs through the root logger ("Please consider to run pre-processing": shape
    inference ONNX Runtime's tool would add, which this graph has from its exporter)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def linear_nodes(proto: onnx.ModelProto) -> list[str]:
    """The graph's MatMul/Gemm nodes with a constant weight, in graph order (the head's two come last)."""
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in weights]


def per_token_activations(proto: onnx.ModelProto, *, fused: bool = True) -> int:
    """Rewrite in place each DynamicQuantizeLinear (one scale and zero point for the whole packed batch)
    as symmetric per-token quantization: row scale max|x| / 127, uint8 = round(x / scale) + 128 with the
    scalar zero point 128 (ONNX Runtime's MatMulInteger takes a per-tensor activation zero point only).
    The downstream Mul(activation scale, weight scales) broadcasts the [tokens, 1] scale. `fused` (the
    default, for the packed graph's 2-D activations): the rounding is one QuantizeLinear per axis 0 (a
    scale and zero point per token row) instead of Div, Add, Round, Clip and Cast, each a pass over the
    activations; both round half to even and saturate to [0, 255] (QuantizeLinear may compute x / scale as
    x times 1 / scale: scores then differ in the last bits, 7e-05 at most on the trained 17m). Returns the
    number of nodes rewritten."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 18:
        raise ValueError(f"per-token activation scales need opset >= 18 (ReduceMax axes as an input); got {opset}.")
    graph = proto.graph
    rank_of = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.value_info) + list(graph.input)
               if v.type.tensor_type.HasField("shape")}
    constants = {"pt_127": np.float32(127.0), "pt_eps": np.float32(1e-12), "pt_128": np.float32(128.0),
                 "pt_lo": np.float32(1.0), "pt_hi": np.float32(255.0), "pt_zero_point": np.uint8(128),
                 "pt_last_axis": np.array([-1], np.int64), "pt_flat": np.array([-1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items())
    nodes, zero_points, scales = [], set(), set()
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (quantized, scale, zero_point) = node.input[0], node.output
        zero_points.add(zero_point)
        scales.add(scale)
        p = node.name + "_per_token"
        nodes += [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_Abs"),
            helper.make_node("ReduceMax", [p + "_abs", "pt_last_axis"], [p + "_amax"], name=p + "_ReduceMax",
                             keepdims=1),
            helper.make_node("Max", [p + "_amax", "pt_eps"], [p + "_amax_safe"], name=p + "_Max"),
            helper.make_node("Div", [p + "_amax_safe", "pt_127"], [scale], name=p + "_Scale"),
        ]
        if fused and rank_of.get(x) == 2:
            # one pass: QuantizeLinear per axis 0 (a scale and zero point per token row, rounding half to
            # even and saturating, as Round + Clip + Cast below), instead of four elementwise passes
            nodes += [
                helper.make_node("Reshape", [scale, "pt_flat"], [p + "_scale_1d"], name=p + "_Flat"),
                helper.make_node("Shape", [p + "_scale_1d"], [p + "_rows"], name=p + "_Rows"),
                helper.make_node("Expand", ["pt_zero_point", p + "_rows"], [p + "_zero_1d"], name=p + "_Zero"),
                helper.make_node("QuantizeLinear", [x, p + "_scale_1d", p + "_zero_1d"], [quantized],
                                 name=p + "_Quantize", axis=0),
            ]
            continue
        nodes += [
            helper.make_node("Div", [x, scale], [p + "_scaled"], name=p + "_Div"),
            helper.make_node("Add", [p + "_scaled", "pt_128"], [p + "_shifted"], name=p + "_Add"),
            helper.make_node("Round", [p + "_shifted"], [p + "_rounded"], name=p + "_Round"),
            helper.make_node("Clip", [p + "_rounded", "pt_lo", "pt_hi"], [p + "_clipped"], name=p + "_Clip"),
            helper.make_node("Cast", [p + "_clipped"], [quantized], name=p + "_Cast", to=TensorProto.UINT8),
        ]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in zero_points:
                node.input[i] = "pt_zero_point"
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    unused = [t for t in graph.initializer if t.name in constants and t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    kept = [v for v in graph.value_info if v.name not in scales and v.name not in zero_points]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(scales)


def quantize_int8(source: Path, destination: Path, *, per_token: bool = True, keep_fp32: Sequence[str] = ()) -> dict:
    """Write the int8 graph of `source` to `destination`; return the recipe as recorded in the manifest.
    `per_token=False` keeps ONNX Runtime's per-batch activation scales (for comparison only: a pair's
    score then moves with its batch neighbours). `keep_fp32`: further linear nodes (names from
    `linear_nodes`) left in fp32 beside the head."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source), load_external_data=False)
    linears = linear_nodes(proto)
    unknown = sorted(set(keep_fp32) - set(linears))
    if unknown:
        raise ValueError(f"keep_fp32 names no linear node of {source}: {unknown}")
    head = [name for name in linears[:-2] if name in set(keep_fp32)] + linears[-2:]  # the classifier last
    del proto
    with _quiet_root_logger():
        quantize_dynamic(
            str(source), str(destination), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8, nodes_to_exclude=head + [f"{name}_MatMul" for name in head],
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=Path(str(source) + ".data").is_file(),
        )
    recipe = {"quantized_linear_layers": len(linears) - len(head), "kept_fp32_linear_layers": head,
              "weight_bits": 7, "activation_scales": "per batch"}
    if per_token:
        proto = onnx.load(str(destination), load_external_data=False)  # weights stay where the quantizer put them
        if not per_token_activations(proto) or quantized_nodes(proto).get("DynamicQuantizeLinear"):
            raise ValueError(f"{destination}: ONNX Runtime's quantizer wrote no rewritable activation quantizers.")
        onnx.save(proto, str(destination))
        recipe["activation_scales"] = "per token"
    return recipe


def quantized_nodes(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of the quantized kinds the graph holds (MatMulInteger, DynamicQuantizeLinear)."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def int8_graph(source: Path, destination: Path, num_layers: int, *, keep_fp32: Sequence[str] = ()) -> dict:
    """The int8 precision's graph (targets.CPU_PRECISIONS["int8"].graph_maker): `source` quantized into
    `destination`, its contract re-checked (the attention op, its body and the I/O survive), and what the
    recipe records: the quantizer's settings and the node counts."""
    from ettin_export.graph.validate import check_graph_contract

    recipe = quantize_int8(source, destination, keep_fp32=keep_fp32)
    quantized = onnx.load(str(destination), load_external_data=False)
    check_graph_contract(quantized, num_layers)
    recipe["nodes"] = quantized_nodes(quantized)
    return recipe
