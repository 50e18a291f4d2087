"""ettin_runtime: thin runtime wrappers for exported Ettin rerankers (numpy + tokenizers, no torch).

    from ettin_runtime import Reranker
    reranker = Reranker.load("artifacts/17m")      # picks the backend from the artifact's manifest
    reranker.predict([("query", "document")])       # float32 raw scores, input order
    reranker.rank("query", ["doc a", "doc b"], top_k=1)
"""

from .base import Reranker, apply_activation
from .packing import PackedBatch, PairEncoder, PairInputError, pack, packed_batches, plan_batches

__all__ = [
    "OnnxRuntimeReranker",
    "PackedBatch",
    "PairEncoder",
    "PairInputError",
    "Reranker",
    "TensorRTReranker",
    "TritonReranker",
    "apply_activation",
    "pack",
    "packed_batches",
    "plan_batches",
]
__version__ = "0.1.0"

_LAZY = {
    "OnnxRuntimeReranker": "onnxruntime_backend",
    "TensorRTReranker": "tensorrt_backend",
    "TritonReranker": "triton_client",
}


def __getattr__(name):
    """Backends import their own runtime (onnxruntime, tensorrt, tritonclient) only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
