"""The one definition of the VarlenAttention operator that the ONNX exporter, the TensorRT plugin
registration and the tests all read: names, inputs and attributes.

The ONNX node is `ettin::VarlenAttention` (domain = plugin namespace) with these inputs and INT
attributes, plus `plugin_namespace` and `aot=1` for the TensorRT parser. The TensorRT Python plugin is
registered as "<PLUGIN_NAMESPACE>::<OP_NAME>" with exactly ATTRIBUTES (all INT, all present on the node).
"""

PLUGIN_NAMESPACE = "ettin"
OP_NAME = "VarlenAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_NAME}"
PLUGIN_VERSION = "1"

# Tensor inputs, in order: q, k, v [T, H, D] (bf16 / fp16 / fp32), cu_seqlens int32 [B+1].
INPUTS = ("q", "k", "v", "cu_seqlens")
OUTPUTS = ("out",)
# Attributes (ONNX INT -> TensorRT kINT32): window is the inclusive half-width, -1 = global.
ATTRIBUTES = ("window",)
HEAD_DIM = 64  # every Ettin size; the kernel is compiled for this head dimension
