"""`ettin::varlen_attention`: attention over packed (unpadded) pairs, one contract for every backend.

Contract (docs/design.md, "The attention op"; flash-attention's varlen convention):
    q, k, v     [T, H, D]  after rotary embedding, all pairs concatenated
    cu_seqlens  int32 [B+1]  (0, len0, len0+len1, ..., T); every pair has at least one token
    max_seqlen  host int, the longest pair (computed once per forward, never per layer)
    window      inclusive half-width: token i sees token j of the same pair iff |i - j| <= window;
                -1 means the whole pair (global layers). Ettin's local layers use 64.
    softmax scale 1/sqrt(D); output [T, H, D] in q's dtype.

Implementations: a CPU reference (fp32 math, work bounded by each pair's own length), a CUDA path
(flash-attn's varlen function when installed, else PyTorch's own varlen flash attention, else the
reference with a warning) and a fake for torch.export. The project's Triton kernel (ettin_plugins) is
never the reference: it is chosen explicitly with `attention_backend("triton")`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_BACKEND = "auto"  # "auto" | "reference" | "triton"
_KNOWN_BACKENDS = ("auto", "reference", "triton")


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Choose the implementation behind the op for a block of code (CUDA only; CPU is the reference)."""
    global _BACKEND
    if name not in _KNOWN_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {_KNOWN_BACKENDS}.")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


def _length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Group pair indices by power-of-two length class, so padding inside a group at most doubles a
    pair's length: the reference's work stays within 4x the sum of squared pair lengths."""
    classes = torch.ceil(torch.log2(lengths.clamp(min=1).double())).long()
    return [torch.nonzero(classes == c).flatten() for c in torch.unique(classes)]


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int, *, exact: bool = True
) -> torch.Tensor:
    """Softmax attention inside each pair, honouring the window, in fp32 (fp64 for fp64 inputs); with
    `exact=False` in q's own precision (PyTorch's fused kernels in bf16: the low-precision yardstick
    of kernel parity). Pairs of similar length are gathered into padded blocks [n, L, H, D] with a key
    mask; no tensor ever spans the whole batch in two token dimensions."""
    total, heads, dim = q.shape
    compute = (torch.float64 if q.dtype == torch.float64 else torch.float32) if exact else q.dtype
    out = torch.empty((total, heads, dim), dtype=compute, device=q.device)
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    for members in _length_buckets(lengths):
        block_len = int(lengths[members].max())
        offsets = torch.arange(block_len, device=q.device)
        valid = offsets[None, :] < lengths[members][:, None]  # [n, L]
        index = (starts[members][:, None] + offsets[None, :]).clamp(max=total - 1)  # [n, L]
        qb, kb, vb = (x[index].transpose(1, 2) for x in (qf, kf, vf))  # [n, H, L, D]
        allowed = valid[:, None, None, :]  # keys of the pair only
        if window >= 0:
            distance = (offsets[:, None] - offsets[None, :]).abs()
            allowed = allowed & (distance <= window)[None, None]
        # Rows of padding queries may see no key at all (NaN); they are never copied out.
        block_out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=1.0 / math.sqrt(dim))
        out[index[valid]] = block_out.transpose(1, 2)[valid]
    return out.to(q.dtype)


def _cuda_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: int
) -> torch.Tensor:
    if _BACKEND == "triton":
        from ettin_plugins import varlen_attention as triton_varlen_attention

        return triton_varlen_attention(q, k, v, cu_seqlens, window)
    if _BACKEND == "reference" or q.dtype in (torch.float32, torch.float64):
        # Flash kernels have no fp32/fp64 path; those precisions on a GPU mean "exact": the reference.
        return reference_varlen_attention(q, k, v, cu_seqlens, window)
    flash = _flash_attn_varlen()
    if flash is not None:
        return flash(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False, window_size=(window, window),
        )
    torch_varlen, takes_window = _torch_varlen_attn()
    if torch_varlen is not None and (window < 0 or takes_window):
        kwargs = {"scale": 1.0 / math.sqrt(q.shape[-1])}
        if window >= 0:
            kwargs["window_size"] = (window, window)
        return torch_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    warnings.warn(
        "No flash kernel with a sliding window is available (flash-attn is not installed and this PyTorch's "
        "torch.nn.attention.varlen has no window_size): local layers of ettin::varlen_attention use the slow "
        "reference on CUDA. Install flash-attn or a PyTorch whose varlen_attn takes window_size.",
        RuntimeWarning,
        stacklevel=3,
    )
    return reference_varlen_attention(q, k, v, cu_seqlens, window)


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen_attn():
    """PyTorch's own varlen flash attention, and whether this build's takes a window."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "window_size" in inspect.signature(varlen_attn).parameters


def cuda_attention_implementation(window: int = 64) -> str:
    """Which library serves the op on CUDA for bf16/fp16 under the automatic backend."""
    if _flash_attn_varlen() is not None:
        return "flash-attn varlen"
    torch_varlen, takes_window = _torch_varlen_attn()
    if torch_varlen is not None and (window < 0 or takes_window):
        return "torch.nn.attention.varlen"
    if torch_varlen is not None:
        return "torch.nn.attention.varlen (global layers); reference (local layers: no window_size)"
    return "reference (no flash kernel available)"


@torch.library.custom_op("ettin::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: int
) -> torch.Tensor:
    if q.device.type == "cuda":
        return _cuda_varlen_attention(q, k, v, cu_seqlens, max_seqlen, window)
    return reference_varlen_attention(q, k, v, cu_seqlens, window)


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window):
    return torch.empty_like(q)


def _setup_backward(ctx, inputs, output):
    q, k, v, cu_seqlens, _max_seqlen, window = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.window = window


def _backward(ctx, grad):
    """Gradients through the exact reference math (recomputed): the packed model can be fine-tuned on
    the CPU (the synthetic trained rerankers of the tests), whatever served the forward pass."""
    q, k, v, cu_seqlens = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = reference_varlen_attention(*leaves, cu_seqlens, ctx.window)
        grads = torch.autograd.grad(out, leaves, grad)
    return (*grads, None, None, None)


varlen_attention.register_autograd(_backward, setup_context=_setup_backward)
