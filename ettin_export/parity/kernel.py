"""Kernel-level parity (flash-attention's convention): an attention implementation's max error against
the fp32 reference must be within KERNEL_BOUNDS of PyTorch's own low-precision attention on the same
inputs, at awkward lengths (tile edges, one token, many short pairs beside one long), both windows.
`selftest` (check 3), scripts/gpu_check.py and scripts/gpu_kernel_check.py all judge with this."""

from __future__ import annotations

import math
import random

from ettin_export.synthetic.lengths import AWKWARD_LENGTHS
from ettin_export.targets import FP32_OP_TOLERANCE, KERNEL_BOUNDS

KERNEL_WINDOWS = (64, -1)  # Ettin's local half-width, and global


# The case names, once: the GPU scripts and selftest pick cases by these, never by literals of their own.
ONE_TOKEN, TILE_EDGES, ONE_513, SHORT_BESIDE_LONG, RERANKER_BATCH = (
    "one_token", "edges", "one_513", "short_beside_long", "reranker_batch")
QUICK_CASES = (ONE_TOKEN, TILE_EDGES, SHORT_BESIDE_LONG)  # tile edges and the mixed batch: the likeliest bugs


def awkward_attention_cases(seed: int = 0, *, small: bool = False) -> dict[str, list[int]]:
    """Pair lengths of the attention cases: each awkward length alone, the tile edges together, many
    short pairs beside one long, and a reranker-like batch. `small` keeps every case and its name at a
    size a CPU dry run computes in moments (the long pair 140 tokens instead of 1,500)."""
    rng = random.Random(seed)
    short = [rng.randint(1, 9) for _ in range(200)]
    if small:
        return {
            ONE_TOKEN: [1],
            TILE_EDGES: [63, 64, 65, 129],
            ONE_513: [513],
            SHORT_BESIDE_LONG: short[:4] + [140] + short[4:6],
            RERANKER_BATCH: [rng.randint(20, 130) for _ in range(4)],
        }
    return {
        ONE_TOKEN: [1],
        TILE_EDGES: [n for n in AWKWARD_LENGTHS if 60 < n < 140],
        ONE_513: [513],
        SHORT_BESIDE_LONG: short[:150] + [1500] + short[150:],
        RERANKER_BATCH: [rng.randint(20, 512) for _ in range(32)],
    }


def select_cases(cases: dict[str, list[int]], names) -> dict[str, list[int]]:
    """The named subset, refusing a name that is not a case (a typo would otherwise drop it silently)."""
    unknown = [name for name in names if name not in cases]
    if unknown:
        raise KeyError(f"unknown attention case(s) {unknown}; the cases are {sorted(cases)}")
    return {name: cases[name] for name in names}


def lowp_attention(q, k, v, cu_seqlens, window):
    """PyTorch's own attention in q's precision (its fused SDPA kernels): the yardstick's error."""
    from ettin_export.model.attention import reference_varlen_attention

    return reference_varlen_attention(q, k, v, cu_seqlens, window, exact=False)


def attention_accuracy(torch, lengths: list[int], window: int, dtype, *, device: str = "cuda",
                       reference_device: str | None = None, heads: int = 4, seed: int = 0,
                       backends=("auto", "triton"), cpu_standin: bool = False) -> dict:
    """Max |op - fp32 reference| for each backend of ettin::varlen_attention on one case, beside PyTorch's
    own low-precision attention (the bound's yardstick). The reference runs on `reference_device` (the
    CPU reference for gpu_check, the same GPU for selftest) on the low-precision inputs widened to fp32.
    `cpu_standin` (gpu_check's dry run): on the CPU every backend, the Triton kernel's too, is served by
    the reference, so the GPU run's steps and report keys are exercised; its errors prove nothing."""
    from ettin_export.model.attention import attention_backend, cuda_attention_implementation, reference_varlen_attention

    generator = torch.Generator().manual_seed(seed)
    total, head_dim = sum(lengths), 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(dtype) for _ in range(3))
    where = reference_device or device
    reference = reference_varlen_attention(q.float().to(where), k.float().to(where), v.float().to(where),
                                           cu.to(where), window).float().cpu()
    q, k, v, cu = (x.to(device) for x in (q, k, v, cu))
    max_len = max(lengths)
    result = {"pairs": len(lengths), "tokens": total, "window": window, "dtype": str(dtype).replace("torch.", ""),
              "heads": heads, "reference_on": where, "errors": {}, "implementation": {}}
    for backend in backends:
        if backend == "triton" and device != "cuda" and not cpu_standin:
            result["implementation"][backend] = "skipped: the Triton kernel needs a CUDA device"
            continue
        with attention_backend(backend), torch.inference_mode():
            out = torch.ops.ettin.varlen_attention(q, k, v, cu, max_len, window)
        if device == "cuda":
            torch.cuda.synchronize()
        result["errors"][backend] = (out.float().cpu() - reference).abs().max().item()
        if device != "cuda" and cpu_standin:
            result["implementation"][backend] = "stand-in (dry run): the CPU reference"
        elif backend == "triton":
            result["implementation"][backend] = "ettin_plugins Triton kernel (JIT)"
        elif device != "cuda" or dtype == torch.float32:
            result["implementation"][backend] = "reference (fp32 math)"
        else:
            result["implementation"][backend] = cuda_attention_implementation()
    if dtype != torch.float32:
        baseline = lowp_attention(q, k, v, cu, window)
        result["errors"]["torch_sdpa"] = (baseline.float().cpu() - reference).abs().max().item()
        auto_impl = result["implementation"].get("auto", "")
        yardstick = "auto" if "flash" in auto_impl or "varlen" in auto_impl else "torch_sdpa"
        result["yardstick"] = f"{yardstick} ({auto_impl if yardstick == 'auto' else 'PyTorch SDPA in ' + result['dtype']})"
        bound = KERNEL_BOUNDS.limit(result["errors"][yardstick])
        if "triton" in result["errors"]:
            result["bound"] = bound
            result["pass"] = bool(math.isfinite(result["errors"]["triton"]) and result["errors"]["triton"] <= bound)
    else:
        result["bound"] = FP32_OP_TOLERANCE
        result["pass"] = all(math.isfinite(e) and e <= FP32_OP_TOLERANCE for e in result["errors"].values())
    return result


def kernel_parity(torch, *, device: str = "cuda", seed: int = 0, heads: int = 4) -> dict:
    """Every awkward case, both windows, bf16; passes when the kernel is within KERNEL_BOUNDS."""
    cases = {}
    for name, lengths in awkward_attention_cases(seed).items():
        for window in KERNEL_WINDOWS:
            cases[f"{name}/window{window}"] = attention_accuracy(
                torch, lengths, window, torch.bfloat16, device=device, heads=heads, seed=seed)
    failed = [name for name, case in cases.items() if not case.get("pass")]
    return {"cases": cases, "failed": failed, "pass": not failed}
