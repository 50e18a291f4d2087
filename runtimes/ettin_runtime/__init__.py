"""ettin_runtime: thin runtime wrappers for exported Ettin rerankers (numpy + tokenizers, no torch).

    from ettin_runtime import Reranker
    reranker = Reranker.load("artifacts/17m")      # picks the backend from the artifact's manifest
    reranker.predict([("query", "document")])       # float32 raw scores, input order
    reranker.rank("query", ["doc a", "doc b"], top_k=1)
"""

from .base import Reranker, apply_activation
from .packing import PackedBatch, PairEncoder, PairInputError, pack, packed_batches, plan_batches

__all__ = [
    "PackedBatch",
    "PairEncoder",
    "PairInputError",
    "Reranker",
    "apply_activation",
    "pack",
    "packed_batches",
    "plan_batches",
]
__version__ = "0.1.0"
