"""The PyTorch runtime: the packed model behind the common Reranker contract (its packed-batch layer)."""

from __future__ import annotations

import numpy as np
import torch

from ettin_runtime.artifact import DEFAULT_MAX_BATCH_PAIRS, DEFAULT_MAX_BATCH_TOKENS
from ettin_runtime.packing import PackedBatch, PairEncoder
from ettin_runtime.reranker import PackedBatchReranker

from ettin_export.checkpoint import Checkpoint, load_checkpoint
from ettin_export.model.packed import PackedReranker


class TorchReranker(PackedBatchReranker):
    """predict / rank on the packed PyTorch model (CPU reference, or CUDA with flash attention)."""

    def __init__(self, model: PackedReranker, encoder: PairEncoder, *, activation: str = "identity",
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS):
        super().__init__(encoder, activation=activation, max_batch_tokens=max_batch_tokens,
                         max_batch_pairs=max_batch_pairs)
        self.model = model.eval()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint | str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        **kwargs,
    ) -> TorchReranker:
        if isinstance(checkpoint, str):
            checkpoint = load_checkpoint(checkpoint, max_length=max_length)
        encoder = PairEncoder.from_dir(checkpoint.path, max_length or checkpoint.max_length)
        model = checkpoint.build_model(dtype=dtype, device=device)
        return cls(model, encoder, activation=checkpoint.activation, **kwargs)

    @torch.inference_mode()
    def _score(self, batch: PackedBatch) -> np.ndarray:
        device = self.model.device
        input_ids = torch.from_numpy(batch.input_ids).to(device=device, dtype=torch.long)
        cu_seqlens = torch.from_numpy(batch.cu_seqlens).to(device)
        scores = self.model(input_ids, cu_seqlens, batch.max_seqlen)
        return scores.float().squeeze(-1).cpu().numpy()

    def close(self) -> None:
        self.model = None
