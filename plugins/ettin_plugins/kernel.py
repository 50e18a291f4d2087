"""Packed (varlen) flash-attention forward in OpenAI Triton: the project's own `ettin::varlen_attention`.

Contract (ettin_export/attention.py): q, k, v [T, H, D] contiguous, cu_seqlens int32 [B+1]
(0, len0, len0+len1, ..., T; every pair >= 1 token); token i sees token j of the same pair iff
|i - j| <= window (window = -1: the whole pair); softmax scale 1/sqrt(D); output [T, H, D] in q's dtype.

Reads top to bottom: the tile schedule -> the key-block update -> the kernel -> the Python wrapper.

Tile schedule. The grid is (cdiv(T, BLOCK_M) + B, H): shapes only, never values inside cu_seqlens,
because TensorRT's AOT launch parameters are expressions of shapes. Pair b owns the program ids
[start(b), start(b+1)) with start(b) = cu_seqlens[b] // BLOCK_M + b. That range holds
floor-difference + 1 >= cdiv(len_b, BLOCK_M) ids, so every real query tile has a program, and
start(B) <= cdiv(T, BLOCK_M) + B keeps them all inside the grid. start() is strictly increasing, so a
program finds its pair by binary search and returns at once when its tile lies past its pair's end
(at most B + 1 idle programs in all).

Local layers (window >= 0) loop only over the keys [m0 - window, m0 + BLOCK_M + window) of the query
tile [m0, m0 + BLOCK_M), clipped to the pair: blocks outside the band are never loaded.

The kernel needs no global scratch, no TMA descriptors and no atomics, so the compiled PTX runs from
the declared arguments alone (aot.py checks this).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# Defaults for Hopper at D = 64, the same as aot.KernelConfig() (48 KiB of shared memory); the tests
# use smaller blocks so the interpreter crosses many tile and block boundaries on short inputs.
BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
_LOG2_E = 1.4426950408889634


@triton.jit
def _find_tile(cu_seqlens_ptr, num_pairs, pid, BLOCK_M: tl.constexpr):
    """(pair, tile within the pair) of program `pid` under the schedule in the module docstring."""
    lo = num_pairs * 0  # a runtime int32, so the loop-carried values keep one type
    hi = num_pairs
    # Invariant: start(lo) <= pid < start(hi), with start(B) taken as +infinity.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_start = tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid
        lo = tl.where(mid_start <= pid, mid, lo)
        hi = tl.where(mid_start <= pid, hi, mid)
    pair_start_pid = tl.load(cu_seqlens_ptr + lo) // BLOCK_M + lo
    return lo, pid - pair_start_pid


@triton.jit
def _attend_key_block(
    acc, m_i, l_i, q, k_head_ptr, v_head_ptr, row_stride, offs_m, start_n, key_end,
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, QK_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [start_n, min(start_n + BLOCK_N, key_end)) (fp32 state).
    Keys at or past key_end are neither loaded nor counted."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offsets = offs_n.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    if MASKED:
        key_in_range = offs_n < key_end
        k = tl.load(k_head_ptr + kv_offsets, mask=key_in_range[:, None], other=0.0)
        v = tl.load(v_head_ptr + kv_offsets, mask=key_in_range[:, None], other=0.0)
    else:
        k = tl.load(k_head_ptr + kv_offsets)
        v = tl.load(v_head_ptr + kv_offsets)

    # Scores in log2 units: exp2 is the native instruction, and QK_SCALE folds in log2(e).
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
    if MASKED:
        allowed = key_in_range[None, :]
        if WINDOW >= 0:
            distance = offs_m[:, None] - offs_n[None, :]
            allowed = allowed & (distance <= WINDOW) & (distance >= -WINDOW)
        qk = tl.where(allowed, qk, float("-inf"))

    # m_i starts finite (see the kernel), so a row whose keys are all masked in this block keeps
    # alpha = 1 and p = 0 instead of producing NaN from (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# num_pairs is never specialized (Triton would fold B == 1 into a constant), so the JIT-launched
# kernel and the AOT-compiled one are the same code.
@triton.jit(do_not_specialize=["num_pairs"])
def varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr,  # tensor inputs, in the plugin's input order
    num_pairs,  # int32 scalar B = cu_seqlens.shape[0] - 1: a shape, so TensorRT can pass it (SymInt32)
    out_ptr,  # the output comes last: TensorRT AOT order is inputs, extra scalars, outputs
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, QK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)  # the grid's y extent is H, so H needs no argument of its own
    row_stride = num_heads * HEAD_DIM

    pair, tile = _find_tile(cu_seqlens_ptr, num_pairs, pid, BLOCK_M)
    seq_start = tl.load(cu_seqlens_ptr + pair)
    seq_len = tl.load(cu_seqlens_ptr + pair + 1) - seq_start
    m0 = tile * BLOCK_M
    if m0 >= seq_len:
        return

    # int64 offsets: T * H * D passes 2**31 for large packed batches of the bigger models.
    head_offset = seq_start.to(tl.int64) * row_stride + head * HEAD_DIM
    q_head_ptr = q_ptr + head_offset
    k_head_ptr = k_ptr + head_offset
    v_head_ptr = v_ptr + head_offset
    out_head_ptr = out_ptr + head_offset

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_offsets = offs_m.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    query_in_pair = offs_m < seq_len
    q = tl.load(q_head_ptr + row_offsets, mask=query_in_pair[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if WINDOW >= 0:
        # Only the band of keys some query of this tile can see, [lo, hi); every block needs the
        # window mask, and the last one stops loading at hi.
        lo = tl.maximum(m0 - WINDOW, 0)
        hi = tl.minimum(m0 + BLOCK_M + WINDOW, seq_len)
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_key_block(
                acc, m_i, l_i, q, k_head_ptr, v_head_ptr, row_stride, offs_m, start_n, hi,
                HEAD_DIM, WINDOW, QK_SCALE, BLOCK_N, True, DOT_PRECISION,
            )
    else:
        # Whole blocks of the pair need no mask; only the ragged last block does.
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_key_block(
                acc, m_i, l_i, q, k_head_ptr, v_head_ptr, row_stride, offs_m, start_n, seq_len,
                HEAD_DIM, WINDOW, QK_SCALE, BLOCK_N, False, DOT_PRECISION,
            )
        if full_end < seq_len:
            acc, m_i, l_i = _attend_key_block(
                acc, m_i, l_i, q, k_head_ptr, v_head_ptr, row_stride, offs_m, full_end, seq_len,
                HEAD_DIM, WINDOW, QK_SCALE, BLOCK_N, True, DOT_PRECISION,
            )

    # Every real query sees at least itself (l_i > 0); padding rows past the pair may see nothing and
    # are never stored, so they divide by 1 rather than produce 0/0.
    out = acc / tl.where(query_in_pair, l_i, 1.0)[:, None]
    tl.store(out_head_ptr + row_offsets, out.to(out_ptr.dtype.element_ty), mask=query_in_pair[:, None])


def kernel_constexprs(head_dim: int, window: int, dtype_name: str, block_m: int, block_n: int) -> dict:
    """The compile-time constants of one kernel variant (shared by the wrapper and aot.py)."""
    return {
        "HEAD_DIM": head_dim,
        "WINDOW": window,
        "QK_SCALE": _LOG2_E / math.sqrt(head_dim),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        # fp32 is the exact test path: IEEE products, never TF32. 16-bit inputs ignore the setting.
        "DOT_PRECISION": "ieee" if dtype_name == "fp32" else "tf32",
    }


def launch_grid(total_tokens: int, num_pairs: int, num_heads: int, block_m: int) -> tuple[int, int, int]:
    """Shapes in, grid out: the same formula aot.py hands to TensorRT."""
    return (triton.cdiv(total_tokens, block_m) + num_pairs, num_heads, 1)


_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _validate(q, k, v, cu_seqlens, window) -> None:
    import torch

    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D]; got shape {tuple(q.shape)}.")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if str(q.dtype) not in _DTYPE_NAMES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one dtype among bfloat16, float16, float32; got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Head dim {q.shape[2]} is not supported; the kernel compiles for {SUPPORTED_HEAD_DIMS}.")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q must hold at least one token and one head; got shape {tuple(q.shape)}.")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [B+1] with B >= 1; got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}. "
            "Convert with cu_seqlens.to(torch.int32)."
        )
    devices = {t.device for t in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v and cu_seqlens must be on one device; got {sorted(map(str, devices))}.")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = the whole pair); got {window!r}.")


def varlen_attention(q, k, v, cu_seqlens, window: int, *, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                     num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES):
    """Packed flash attention on torch tensors: CUDA, or CPU under TRITON_INTERPRET=1.

    The values in cu_seqlens are trusted (as the kernel must on the GPU): monotone, 0 first, T last.
    """
    import torch

    _validate(q, k, v, cu_seqlens, window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    total, heads, head_dim = q.shape
    num_pairs = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    grid = launch_grid(total, num_pairs, heads, block_m)
    varlen_attention_kernel[grid](
        q, k, v, cu_seqlens, num_pairs, out,
        **kernel_constexprs(head_dim, window, _DTYPE_NAMES[str(q.dtype)], block_m, block_n),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
