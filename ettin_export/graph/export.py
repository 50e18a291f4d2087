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
from ettin_runtime.artifact import CU_SEQLENS, GRAPH_INPUTS, GRAPH_OUTPUTS, SCORES

from ettin_export.errors import ExportError  # noqa: F401  (raised here; importers take it from here too)

from ettin_export.model import PackedReranker

OPSET = 20  # parsed by ONNX Runtime >= 1.16 and TensorRT >= 10.0 (Gelu, LayerNormalization native)
TWO_GIB = 2**31
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)  # protobuf's hard limit is 2 GiB; leave room for the graph
# The serving contract (ettin_runtime.artifact): names, and the dynamic first axis of each.
INPUT_NAMES = tuple(t.name for t in GRAPH_INPUTS)
OUTPUT_NAMES = tuple(t.name for t in GRAPH_OUTPUTS)
DIM_NAMES = {t.name: t.shape[0] for t in GRAPH_INPUTS + GRAPH_OUTPUTS}


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
    dims[CU_SEQLENS] = {0: torch.export.Dim(DIM_NAMES[CU_SEQLENS], min=2)}
    with torch.inference_mode(False), torch.no_grad(), quiet_exporter():
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
def quiet_exporter():
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
    output_dims[0].dim_param = DIM_NAMES[SCORES]
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

    Each pair is laid out in a padded block of L positions (L = the longest pair of this batch; the
    runtimes batch pairs of similar length together), cut into n chunks of C queries; each chunk
    attends to a span of S keys of its own pair, so the scores are [B * n, H, C, S]:
      * global layers, and local layers whose blocks are short (L <= 2 * C + 2 * window): one chunk
        of the whole block, C = S = L (plain dense attention with a key mask, and for local layers
        the |i - j| <= window band);
      * local layers with longer blocks: chunks of C = max(window, 16) queries against the
        S = C + 2 * window keys around them (the span clamped inside the block), so the work is
        B x L x S instead of B x L^2: 2.7x fewer scores at L = 512 on Ettin's window of 64.
    Masks are additive (0 / -1e30, built once per call on [B * n, 1, C, S]), the 1/sqrt(D) scale is
    applied to q on [T, H, D] rather than to the scores, and every transpose is one of the two 4-D
    permutations ONNX Runtime's CPU kernels do fast. Work is at most B x L^2 per head and no tensor
    has two token-sized dimensions.
    """
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    node = helper.make_node

    def const(name, value, dtype=i64):
        values = value if isinstance(value, list) else [value]
        dims = [len(values)] if isinstance(value, list) else []
        return node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    window = node("Constant", [], ["window"])  # its value is the call site's `window` attribute
    reference = onnx.AttributeProto()
    reference.name, reference.ref_attr_name, reference.type = "value_int", "window", onnx.AttributeProto.INT
    window.attribute.append(reference)
    nodes = [
        const("zero", 0), const("one", 1), const("two", 2), const("min_chunk", 16), const("ax0", [0]),
        const("ax1", [1]), const("ax2", [2]), const("ax23", [2, 3]), const("minus1", [-1]), const("big", [2**62]),
        const("masked", -1.0e30, f32), const("unmasked", 0.0, f32), window,
        # pair bounds
        node("Cast", ["cu_seqlens"], ["cu"], to=i64),
        node("Slice", ["cu", "ax0", "minus1"], ["starts"]),
        node("Slice", ["cu", "ax1", "big"], ["ends"]),
        node("Sub", ["ends", "starts"], ["lengths"]),
        node("ReduceMax", ["lengths"], ["max_len_1"], keepdims=1),
        node("Squeeze", ["max_len_1"], ["max_len"]),  # L
        node("Shape", ["q"], ["q_shape"]),
        node("Gather", ["q_shape", "zero"], ["total"], axis=0),
        node("Sub", ["total", "one"], ["last_token"]),
        # chunk C, span S, padded block length Lp = n * C
        node("Less", ["window", "zero"], ["is_global"]),
        node("Max", ["window", "min_chunk"], ["band_chunk"]),
        node("Add", ["window", "window"], ["two_window"]),
        node("Add", ["band_chunk", "two_window"], ["band_span"]),
        node("Add", ["band_chunk", "band_span"], ["banded_above"]),
        node("LessOrEqual", ["max_len", "banded_above"], ["is_short"]),
        node("Or", ["is_global", "is_short"], ["dense"]),
        node("Where", ["dense", "max_len", "band_chunk"], ["chunk"]),
        node("Add", ["max_len", "chunk"], ["len_plus_chunk"]),
        node("Sub", ["len_plus_chunk", "one"], ["len_round_up"]),
        node("Div", ["len_round_up", "chunk"], ["n_chunks"]),
        node("Mul", ["n_chunks", "chunk"], ["padded_len"]),
        node("Min", ["band_span", "padded_len"], ["band_span_fit"]),
        node("Where", ["dense", "padded_len", "band_span_fit"], ["span"]),
        # positions inside the block: queries [n, C], keys [n, S] (chunk start - window, clamped)
        node("Range", ["zero", "n_chunks", "one"], ["chunk_ids"]),
        node("Mul", ["chunk_ids", "chunk"], ["chunk_starts"]),
        node("Sub", ["chunk_starts", "window"], ["key_starts_unclamped"]),
        node("Sub", ["padded_len", "span"], ["last_key_start"]),
        node("Clip", ["key_starts_unclamped", "zero", "last_key_start"], ["key_starts"]),
        node("Range", ["zero", "chunk", "one"], ["chunk_offsets"]),
        node("Range", ["zero", "span", "one"], ["span_offsets"]),
        node("Unsqueeze", ["chunk_starts", "ax1"], ["chunk_starts_col"]),
        node("Unsqueeze", ["chunk_offsets", "ax0"], ["chunk_offsets_row"]),
        node("Add", ["chunk_starts_col", "chunk_offsets_row"], ["query_pos"]),
        node("Unsqueeze", ["key_starts", "ax1"], ["key_starts_col"]),
        node("Unsqueeze", ["span_offsets", "ax0"], ["span_offsets_row"]),
        node("Add", ["key_starts_col", "span_offsets_row"], ["key_pos"]),
        # additive mask [B * n, 1, C, S]: the band (local layers) plus the pair's own keys
        node("Unsqueeze", ["query_pos", "minus1"], ["query_pos_col"]),  # [n, C, 1]
        node("Unsqueeze", ["key_pos", "ax1"], ["key_pos_row"]),  # [n, 1, S]
        node("Sub", ["query_pos_col", "key_pos_row"], ["signed_distance"]),
        node("Abs", ["signed_distance"], ["distance"]),
        node("LessOrEqual", ["distance", "window"], ["in_band"]),
        node("Or", ["in_band", "is_global"], ["in_window"]),
        node("Where", ["in_window", "unmasked", "masked"], ["band_bias_3d"]),  # [n, C, S]
        node("Unsqueeze", ["band_bias_3d", "ax1"], ["band_bias"]),  # [n, 1, C, S]
        node("Unsqueeze", ["lengths", "ax1"], ["lengths_col"]),
        node("Unsqueeze", ["lengths_col", "ax1"], ["lengths_3d"]),  # [B, 1, 1]
        node("Unsqueeze", ["key_pos", "ax0"], ["key_pos_3d"]),  # [1, n, S]
        node("Less", ["key_pos_3d", "lengths_3d"], ["key_valid"]),  # [B, n, S]
        node("Where", ["key_valid", "unmasked", "masked"], ["key_bias_3d"]),
        node("Unsqueeze", ["key_bias_3d", "ax23"], ["key_bias"]),  # [B, n, 1, 1, S]
        node("Add", ["key_bias", "band_bias"], ["bias_5d"]),  # [B, n, 1, C, S]
        node("Shape", ["bias_5d"], ["bias_5d_shape"]),
        node("Slice", ["bias_5d_shape", "ax2", "big"], ["bias_inner_shape"]),
        node("Concat", ["minus1", "bias_inner_shape"], ["bias_shape"], axis=0),
        node("Reshape", ["bias_5d", "bias_shape"], ["bias"]),  # [B * n, 1, C, S]
        # token indices of the blocks; padding reads a real token (masked as a key, never copied out)
        node("Unsqueeze", ["starts", "ax1"], ["starts_col"]),
        node("Range", ["zero", "padded_len", "one"], ["block_offsets"]),
        node("Unsqueeze", ["block_offsets", "ax0"], ["block_offsets_row"]),
        node("Add", ["starts_col", "block_offsets_row"], ["query_index_unclamped"]),
        node("Min", ["query_index_unclamped", "last_token"], ["query_index"]),  # [B, Lp]
        node("Unsqueeze", ["starts_col", "ax1"], ["starts_3d"]),
        node("Add", ["starts_3d", "key_pos_3d"], ["key_index_unclamped"]),
        node("Min", ["key_index_unclamped", "last_token"], ["key_index"]),  # [B, n, S]
        node("Cast", ["q"], ["qf"], to=f32),
        node("Cast", ["k"], ["kf"], to=f32),
        node("Cast", ["v"], ["vf"], to=f32),
        node("Gather", ["q_shape", "two"], ["head_dim"], axis=0),
        node("Cast", ["head_dim"], ["head_dim_f"], to=f32),
        node("Sqrt", ["head_dim_f"], ["sqrt_d"]),
        node("Reciprocal", ["sqrt_d"], ["scale"]),
        node("Mul", ["qf", "scale"], ["q_scaled"]),
        node("Gather", ["q_scaled", "query_index"], ["q_blocks"], axis=0),  # [B, Lp, H, D]
        node("Gather", ["kf", "key_index"], ["k_spans"], axis=0),  # [B, n, S, H, D]
        node("Gather", ["vf", "key_index"], ["v_spans"], axis=0),
        node("Slice", ["q_shape", "ax1", "big"], ["hd_shape"]),
        node("Unsqueeze", ["chunk", "ax0"], ["chunk_1"]),
        node("Unsqueeze", ["span", "ax0"], ["span_1"]),
        node("Concat", ["minus1", "chunk_1", "hd_shape"], ["query_chunks_shape"], axis=0),
        node("Concat", ["minus1", "span_1", "hd_shape"], ["key_spans_shape"], axis=0),
        node("Reshape", ["q_blocks", "query_chunks_shape"], ["q_chunks"]),  # [B * n, C, H, D]
        node("Reshape", ["k_spans", "key_spans_shape"], ["k_chunks"]),  # [B * n, S, H, D]
        node("Reshape", ["v_spans", "key_spans_shape"], ["v_chunks"]),
        node("Transpose", ["q_chunks"], ["qb"], perm=[0, 2, 1, 3]),  # [B * n, H, C, D]
        node("Transpose", ["k_chunks"], ["kb_t"], perm=[0, 2, 3, 1]),  # [B * n, H, D, S]
        node("Transpose", ["v_chunks"], ["vb"], perm=[0, 2, 1, 3]),  # [B * n, H, S, D]
        node("MatMul", ["qb", "kb_t"], ["scores"]),  # [B * n, H, C, S]
        node("Add", ["scores", "bias"], ["masked_scores"]),
        # Padding query rows may have no allowed key: the finite fill keeps them NaN-free (never read).
        node("Softmax", ["masked_scores"], ["probs"], axis=-1),
        node("MatMul", ["probs", "vb"], ["chunk_out_bhcd"]),  # [B * n, H, C, D]
        node("Transpose", ["chunk_out_bhcd"], ["chunk_out"], perm=[0, 2, 1, 3]),  # [B * n, C, H, D]
        node("Concat", ["minus1", "hd_shape"], ["flat_shape"], axis=0),
        node("Reshape", ["chunk_out", "flat_shape"], ["flat_out"]),  # [B * Lp, H, D]
        # token t of pair b at position p reads row b * Lp + p
        node("Range", ["zero", "total", "one"], ["tokens"]),
        node("Slice", ["cu", "ax1", "minus1"], ["inner_starts"]),
        node("Unsqueeze", ["total", "ax0"], ["total_1"]),
        node("ConstantOfShape", ["total_1"], ["zeros_t"], value=helper.make_tensor("z", i64, [1], [0])),
        node("Shape", ["inner_starts"], ["inner_shape"]),
        node("Expand", ["one", "inner_shape"], ["ones_inner"]),
        node("ScatterElements", ["zeros_t", "inner_starts", "ones_inner"], ["marks"], axis=0),
        node("CumSum", ["marks", "zero"], ["pair_of_token"]),
        node("Gather", ["cu", "pair_of_token"], ["start_of_token"], axis=0),
        node("Sub", ["tokens", "start_of_token"], ["position"]),
        node("Mul", ["pair_of_token", "padded_len"], ["row_base"]),
        node("Add", ["row_base", "position"], ["row"]),
        node("Gather", ["flat_out", "row"], ["out_f"], axis=0),  # [T, H, D]
        node("CastLike", ["out_f", "q"], ["out"]),
    ]
    return helper.make_function(
        spec.PLUGIN_NAMESPACE, spec.OP_NAME, list(spec.INPUTS), list(spec.OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(spec.ATTRIBUTES),
    )
