"""Stages 3-4, the packed model: the whole reranker on packed tokens (packed.py), its varlen attention
op `ettin::varlen_attention` (attention.py), and the PyTorch runtime over it (torch_reranker.py)."""

from ettin_export.model.packed import (
    HeadConfig,
    PackedConfig,
    PackedReranker,
    init_random_weights,
    modernbert_config,
    num_parameters,
)

__all__ = ["HeadConfig", "PackedConfig", "PackedReranker", "init_random_weights", "modernbert_config", "num_parameters"]
