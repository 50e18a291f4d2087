"""Build targets as data: what `--target NAME` means (precision, engine, GPU) in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    precision: str  # graph precision: "fp32" | "bf16"
    engine: str  # "onnx" (ONNX Runtime) | "tensorrt"
    description: str
    compute_capability: tuple[int, int] | None = None  # the GPU the engine is built for
    ptx_arch: str | None = None  # the plugin kernel's PTX target
    default_max_batch_pairs: int = 64
    # Parity bounds (DESIGN.md "Numbers that define same scores").
    max_abs_bound: float | None = 1e-4  # fp32: absolute bound against the fp32 reference
    bf16_error_ratio: float | None = None  # bf16: max error <= ratio x the reference's own bf16 error
    min_spearman: float = 0.999
    min_top1_agreement: float = 0.99
    min_top10_overlap: float = 0.98


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "fp32", "onnx", "fp32 ONNX graph for ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)"),
        Target(
            "h100", "bf16", "tensorrt", "bf16 TensorRT engine for NVIDIA H100 / H200 (Hopper, sm_90a)",
            compute_capability=(9, 0), ptx_arch="sm_90a", max_abs_bound=None, bf16_error_ratio=1.5,
        ),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"Unknown target {name!r}. Known targets: {', '.join(TARGETS)}.")
    return TARGETS[name]
