"""ettin_plugins: the packed varlen flash-attention kernel (OpenAI Triton) and its TensorRT plugin.

Importable without TensorRT or Triton installed; those are imported when first used.
"""

from .spec import ATTRIBUTES, OP_NAME, PLUGIN_ID, PLUGIN_NAMESPACE

__all__ = ["ATTRIBUTES", "OP_NAME", "PLUGIN_ID", "PLUGIN_NAMESPACE", "varlen_attention"]


def varlen_attention(q, k, v, cu_seqlens, window: int, **launch_options):
    """Packed flash attention with the project's Triton kernel (GPU, or CPU under TRITON_INTERPRET=1).

    launch_options: block_m, block_n, num_warps, num_stages (see ettin_plugins.kernel).
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        from ettin_runtime.errors import MissingDependency

        raise MissingDependency(
            "The ettin varlen-attention kernel needs OpenAI Triton: `pip install triton` "
            "(or `pip install ettin-export[kernel]`)."
        ) from exc
    from .kernel import varlen_attention as _impl

    return _impl(q, k, v, cu_seqlens, window, **launch_options)
