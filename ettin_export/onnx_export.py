"""Export the packed model to one ONNX graph, token ids in, scores out.

    inputs   input_ids int32 [total_tokens], cu_seqlens int32 [num_pairs_plus_1]
    output   scores float32 [num_pairs, 1]

Each attention is one `ettin::VarlenAttention` node with its INT attributes (`window`), plus
`plugin_namespace` and `aot=1` so the TensorRT parser swaps in the AOT plugin, and the model carries an
ONNX local function of the same name and domain whose body computes the op from standard operators, so
ONNX Runtime (or any ONNX consumer) runs the same file. fp32 for ONNX Runtime; bf16-typed for TensorRT,
with rotary angles, LayerNorm, softmax and the score in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from ettin_plugins import spec

from .model import PackedReranker

OPSET = 20  # parsed by ONNX Runtime >= 1.16 and TensorRT >= 10.0 (Gelu, LayerNormalization native)
TWO_GIB = 2**31
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)  # protobuf's hard limit is 2 GiB; leave room for the graph
INPUT_NAMES = ("input_ids", "cu_seqlens")
OUTPUT_NAMES = ("scores",)
DIM_NAMES = {"input_ids": "total_tokens", "cu_seqlens": "num_pairs_plus_1", "scores": "num_pairs"}


class ExportError(RuntimeError):
    """The exported graph does not satisfy the contract; the message names what differs."""


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    external_data: Path | None
    precision: str
    num_attention_nodes: int


_schema_registered = False


def _register_schema() -> None:
    """onnxscript only emits operators with a registered schema (onnx-custom-op-notes.md)."""
    global _schema_registered
    if _schema_registered:
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        spec.OP_NAME,
        spec.PLUGIN_NAMESPACE,
        1,
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("cu_seqlens", "tensor(int32)")],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"], "q, k, v and out")],
        attributes=[onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType.INT, "") for name in spec.ATTRIBUTES]
        + [
            # For the TensorRT parser only; ONNX Runtime ignores them and runs the local function.
            onnx.defs.OpSchema.Attribute("plugin_namespace", onnx.defs.OpSchema.AttrType.STRING, "", required=False),
            onnx.defs.OpSchema.Attribute("aot", onnx.defs.OpSchema.AttrType.INT, "", required=False),
        ],
    )
    onnx.defs.register_schema(schema)
    _schema_registered = True


def _translation_table():
    import onnxscript

    _register_schema()
    ettin = onnxscript.values.Opset(spec.PLUGIN_NAMESPACE, 1)

    def varlen_attention(q, k, v, cu_seqlens, max_seqlen, window):
        # max_seqlen is a host-side hint for flash kernels; the graph derives what it needs from cu_seqlens.
        return getattr(ettin, spec.OP_NAME)(q, k, v, cu_seqlens, window=window)

    return {torch.ops.ettin.varlen_attention.default: varlen_attention}


class _GraphInterface(torch.nn.Module):
    """Exactly the serving inputs: what a batcher hands over. max_seqlen is not an input (the graph
    never needs it); T stands in for it as the op's host hint."""

    def __init__(self, model: PackedReranker):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, cu_seqlens, input_ids.shape[0])


def _example_inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Three pairs of distinct lengths, so no dimension is specialised to 0 or 1.
    lengths = [7, 19, 11]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(vocab_size, 1000), (sum(lengths),), generator=generator, dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 7, 26, 37], dtype=torch.int32)
    return input_ids, cu_seqlens


def export_onnx(model: PackedReranker, out_path: str | Path, precision: str = "fp32") -> ExportedGraph:
    """Trace the packed model (in the precision asked) into ONNX at out_path (+ external data if large).

    The model is cast in place to the export precision (no copy: the 1b model is 4 GB in fp32)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}.")
    out_path = Path(out_path)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = model.to(device="cpu", dtype=dtype).eval()
    example = _example_inputs(model.config.vocab_size)
    dims = {name: {0: torch.export.Dim(DIM_NAMES[name], min=1)} for name in INPUT_NAMES}
    dims["cu_seqlens"] = {0: torch.export.Dim(DIM_NAMES["cu_seqlens"], min=2)}
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            _GraphInterface(model).eval(), example, dynamo=True, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_shapes=dims, opset_version=OPSET,
            custom_translation_table=_translation_table(), verbose=False,
        )
    proto = program.model_proto
    num_nodes = finalize_graph(proto)
    external = save_model(proto, out_path)
    onnx.checker.check_model(str(out_path), full_check=True)
    return ExportedGraph(out_path, external, precision, num_nodes)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns about things that do not concern this graph (torchvision ops,
    deprecations in its own dependencies); keep the user's terminal for our progress and errors."""
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def finalize_graph(proto: onnx.ModelProto) -> int:
    """Add the TensorRT plugin attributes and the local-function body; name the output dimension."""
    attention_nodes = [n for n in proto.graph.node if n.domain == spec.PLUGIN_NAMESPACE and n.op_type == spec.OP_NAME]
    for node in attention_nodes:
        present = {a.name for a in node.attribute}
        missing = [a for a in spec.ATTRIBUTES if a not in present]
        if missing:
            raise ExportError(f"{node.name} lacks attributes {missing}: the TensorRT plugin needs all of {spec.ATTRIBUTES}.")
        node.attribute.extend([
            helper.make_attribute("plugin_namespace", spec.PLUGIN_NAMESPACE),
            helper.make_attribute("aot", 1),
        ])
    default_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.name == spec.OP_NAME and f.domain == spec.PLUGIN_NAMESPACE for f in proto.functions):
        proto.functions.append(varlen_attention_function(default_opset))
    output_dims = proto.graph.output[0].type.tensor_type.shape.dim
    output_dims[0].Clear()
    output_dims[0].dim_param = DIM_NAMES["scores"]
    return len(attention_nodes)


def save_model(proto: onnx.ModelProto, out_path: Path) -> Path | None:
    """Save; weights go to `<name>.data` beside it when the file would pass protobuf's 2 GiB limit."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(out_path))
        return None
    data_name = out_path.name + ".data"
    (out_path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(
        proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_name, size_threshold=1024,
    )
    return out_path.parent / data_name


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    size = math.prod(tensor.dims) if tensor.dims else 1
    return size * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def varlen_attention_function(opset: int) -> onnx.FunctionProto:
    """The body of ettin::VarlenAttention from standard operators, in fp32 whatever the input type.

    Pairs are gathered into padded blocks [B, L, H, D] (L = the longest pair of this batch), attended
    with a key mask and, for window >= 0, a |i - j| <= window band, and gathered back token by token.
    Work is B x L^2 per head, never T^2; no tensor has two token-sized dimensions."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64

    def const(name, value, dtype=i64):
        values = value if isinstance(value, list) else [value]
        dims = [len(values)] if isinstance(value, list) else []
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    nodes = [
        const("zero", 0), const("one", 1), const("ax0", [0]), const("ax1", [1]), const("ax01", [0, 1]),
        const("ax12", [1, 2]), const("minus1", [-1]), const("big", [2**62]), const("masked", -1.0e30, f32),
        helper.make_node("Constant", [], ["window"], value_int=0),  # replaced by the attribute reference
        helper.make_node("Cast", ["cu_seqlens"], ["cu"], to=i64),
        helper.make_node("Slice", ["cu", "zero_1", "minus1"], ["starts"]),
        helper.make_node("Slice", ["cu", "ax1", "big"], ["ends"]),
        helper.make_node("Sub", ["ends", "starts"], ["lengths"]),
        helper.make_node("ReduceMax", ["lengths"], ["max_len_1"], keepdims=1),
        helper.make_node("Squeeze", ["max_len_1"], ["max_len"]),
        helper.make_node("Range", ["zero", "max_len", "one"], ["offsets"]),
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Gather", ["q_shape", "zero"], ["total"], axis=0),
        helper.make_node("Sub", ["total", "one"], ["last_token"]),
        helper.make_node("Unsqueeze", ["starts", "ax1"], ["starts_col"]),
        helper.make_node("Unsqueeze", ["offsets", "ax0"], ["offsets_row"]),
        helper.make_node("Add", ["starts_col", "offsets_row"], ["block_index_raw"]),
        helper.make_node("Min", ["block_index_raw", "last_token"], ["block_index"]),  # [B, L], padding clamped
        helper.make_node("Cast", ["q"], ["qf"], to=f32),
        helper.make_node("Cast", ["k"], ["kf"], to=f32),
        helper.make_node("Cast", ["v"], ["vf"], to=f32),
        helper.make_node("Gather", ["qf", "block_index"], ["qg"], axis=0),  # [B, L, H, D]
        helper.make_node("Gather", ["kf", "block_index"], ["kg"], axis=0),
        helper.make_node("Gather", ["vf", "block_index"], ["vg"], axis=0),
        helper.make_node("Transpose", ["qg"], ["qb"], perm=[0, 2, 1, 3]),  # [B, H, L, D]
        helper.make_node("Transpose", ["kg"], ["kb_t"], perm=[0, 2, 3, 1]),  # [B, H, D, L]
        helper.make_node("Transpose", ["vg"], ["vb"], perm=[0, 2, 1, 3]),
        const("two", 2),
        helper.make_node("Gather", ["q_shape", "two"], ["head_dim"], axis=0),
        helper.make_node("Cast", ["head_dim"], ["head_dim_f"], to=f32),
        helper.make_node("Sqrt", ["head_dim_f"], ["sqrt_d"]),
        helper.make_node("MatMul", ["qb", "kb_t"], ["raw_scores"]),
        helper.make_node("Div", ["raw_scores", "sqrt_d"], ["scores"]),  # [B, H, L, L]
        helper.make_node("Unsqueeze", ["lengths", "ax1"], ["lengths_col"]),
        helper.make_node("Less", ["offsets_row", "lengths_col"], ["key_valid"]),  # [B, L]
        helper.make_node("Unsqueeze", ["key_valid", "ax12"], ["key_mask"]),  # [B, 1, 1, L]
        helper.make_node("Unsqueeze", ["offsets", "ax1"], ["offsets_col"]),
        helper.make_node("Sub", ["offsets_col", "offsets_row"], ["signed_distance"]),
        helper.make_node("Abs", ["signed_distance"], ["distance"]),  # [L, L]
        helper.make_node("LessOrEqual", ["distance", "window"], ["in_band"]),
        helper.make_node("Less", ["window", "zero"], ["is_global"]),
        helper.make_node("Or", ["in_band", "is_global"], ["in_window"]),
        helper.make_node("And", ["key_mask", "in_window"], ["allowed"]),  # [B, 1, L, L]
        # Padding query rows may have no allowed key: a finite fill keeps them NaN-free (never read).
        helper.make_node("Where", ["allowed", "scores", "masked"], ["masked_scores"]),
        helper.make_node("Softmax", ["masked_scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vb"], ["block_out_bhld"]),  # [B, H, L, D]
        helper.make_node("Transpose", ["block_out_bhld"], ["block_out"], perm=[0, 2, 1, 3]),  # [B, L, H, D]
        helper.make_node("Slice", ["q_shape", "ax1", "big"], ["hd_shape"]),
        helper.make_node("Concat", ["minus1", "hd_shape"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["block_out", "flat_shape"], ["flat_out"]),  # [B * L, H, D]
        # token t of pair b at position p reads row b * L + p
        helper.make_node("Range", ["zero", "total", "one"], ["tokens"]),
        helper.make_node("Slice", ["cu", "ax1", "minus1"], ["inner_starts"]),
        helper.make_node("Unsqueeze", ["total", "ax0"], ["total_1"]),
        helper.make_node("ConstantOfShape", ["total_1"], ["zeros_t"], value=helper.make_tensor("z", i64, [1], [0])),
        helper.make_node("Shape", ["inner_starts"], ["inner_shape"]),
        helper.make_node("Expand", ["one", "inner_shape"], ["ones_inner"]),
        helper.make_node("ScatterElements", ["zeros_t", "inner_starts", "ones_inner"], ["marks"], axis=0),
        helper.make_node("CumSum", ["marks", "zero"], ["pair_of_token"]),
        helper.make_node("Gather", ["cu", "pair_of_token"], ["start_of_token"], axis=0),
        helper.make_node("Sub", ["tokens", "start_of_token"], ["position"]),
        helper.make_node("Mul", ["pair_of_token", "max_len"], ["row_base"]),
        helper.make_node("Add", ["row_base", "position"], ["row"]),
        helper.make_node("Gather", ["flat_out", "row"], ["out_f"], axis=0),  # [T, H, D]
        helper.make_node("CastLike", ["out_f", "q"], ["out"]),
    ]
    # `window` comes from the call site's attribute.
    window_node = nodes[9]
    window_node.ClearField("attribute")
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", "window", onnx.AttributeProto.INT
    window_node.attribute.append(ref)
    nodes.insert(0, const("zero_1", [0]))
    return helper.make_function(
        spec.PLUGIN_NAMESPACE, spec.OP_NAME, list(spec.INPUTS), list(spec.OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(spec.ATTRIBUTES),
    )
