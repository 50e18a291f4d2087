"""The PyTorch references every exported path is judged against.

fp32: the packed model with the CPU-reference attention math (exact softmax in fp32), on the CPU or a
GPU. bf16 (the reference's own low-precision error, shown beside the engine's): the same packed model
in bf16 on CUDA running flash-attn or PyTorch's varlen flash attention, never this project's kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ettin_runtime.packing import PairEncoder

from .attention import attention_backend, cuda_attention_implementation
from .checkpoint import Checkpoint
from .torch_runtime import TorchReranker


def weights_fingerprint(checkpoint: Checkpoint) -> str:
    """sha256 over the checkpoint's tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.state_dict):
        tensor = checkpoint.state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fp32_reference(
    checkpoint: Checkpoint, pairs: Sequence[tuple[str, str]], encoder: PairEncoder, device: str = "cpu"
) -> tuple[np.ndarray, str]:
    model = checkpoint.build_model(torch.float32, device)
    with attention_backend("reference"):
        scores = TorchReranker(model, encoder).predict(pairs)
    where = "CPU" if device == "cpu" else torch.cuda.get_device_name(device)
    return scores, f"packed PyTorch fp32 (exact attention, {where})"


def bf16_reference(
    checkpoint: Checkpoint, pairs: Sequence[tuple[str, str]], encoder: PairEncoder, device: str = "cuda"
) -> tuple[np.ndarray, str]:
    """The reference's own bf16 error. On CUDA this is flash attention (flash-attn, else
    torch.nn.attention.varlen); on a CPU only the bf16 reference math exists, and the label says so."""
    model = checkpoint.build_model(torch.bfloat16, device)
    scores = TorchReranker(model, encoder).predict(pairs)
    if device == "cpu":
        return scores, "packed PyTorch bf16 (CPU, reference attention: no flash kernel on a CPU)"
    return scores, f"packed PyTorch bf16 ({cuda_attention_implementation()}, {torch.cuda.get_device_name(device)})"
