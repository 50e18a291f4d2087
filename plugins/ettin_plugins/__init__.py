"""ettin_plugins: the packed varlen flash-attention kernel (OpenAI Triton) and its TensorRT plugin.

Importable without TensorRT or Triton installed; those are imported when first used.
"""

from .spec import ATTRIBUTES, OP_NAME, PLUGIN_ID, PLUGIN_NAMESPACE

__all__ = ["ATTRIBUTES", "OP_NAME", "PLUGIN_ID", "PLUGIN_NAMESPACE", "varlen_attention"]


def varlen_attention(q, k, v, cu_seqlens, window: int):
    """Packed flash attention with the project's Triton kernel (GPU, or CPU under TRITON_INTERPRET=1)."""
    from .kernel import varlen_attention as _impl

    return _impl(q, k, v, cu_seqlens, window)
