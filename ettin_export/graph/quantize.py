"""int8 for the CPU target: ONNX Runtime's dynamic quantization of the exported fp32 graph.

The recipe was chosen by measurement (2-core AMD EPYC Zen 5, 17m and 150m, built-in parity set against
fp32; see the README): weights int8 symmetric per output channel, activations quantized per batch at
run time (MatMulInteger), every linear layer of the backbone quantized; the embeddings, the attention
(the VarlenAttention function body: scores and softmax), norms and rotary stay fp32 because the
quantizer only rewrites MatMul/Gemm with constant weights, and the head (its Dense and the classifier)
is excluded so the score keeps fp32 precision. Static QDQ with calibration, MatMulNBits blocks and
keeping more layers in fp32 ranked closer to fp32 but ran no faster than fp32 itself.

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


def quantize_int8(source: Path, destination: Path) -> dict:
    """Write the int8 graph of `source` to `destination`; return the recipe as recorded in the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source), load_external_data=False)
    linears = linear_nodes(proto)
    head = linears[-2:]
    del proto
    with _quiet_root_logger():
        quantize_dynamic(
            str(source), str(destination), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8, nodes_to_exclude=head + [f"{name}_MatMul" for name in head],
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=Path(str(source) + ".data").is_file(),
        )
    return {"quantized_linear_layers": len(linears) - len(head), "kept_fp32_linear_layers": head,
            "weight_bits": 7}


def quantized_nodes(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of the quantized kinds the graph holds (MatMulInteger, DynamicQuantizeLinear)."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
