"""Build targets as data: what `--target NAME` means (precision, engine, GPU, bounds) in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ettin_runtime.errors import EttinError


@dataclass(frozen=True)
class ScoreBounds:
    """DESIGN.md "Numbers that define same scores", as data.

    A candidate's scores are judged against an anchor run (the packed model in float64) next to a
    reference computed at the candidate's own precision (CrossEncoder fp32 for fp32 candidates, the
    packed model in bf16 with flash attention for bf16 ones). The candidate passes when

        max |candidate - anchor| <= error_ratio x max |own reference - anchor| + error_slack

    and the ranking bounds hold, so the bound grows with what rounding alone does to this checkpoint
    (its depth, its score spread) and nothing else."""

    error_ratio: float
    error_slack: float
    own_reference: str  # what the "own reference" is, for reports and errors
    min_spearman: float = 0.999
    min_top1_agreement: float = 0.99
    min_top10_overlap: float = 0.98

    def limit(self, own_error: float) -> float:
        return self.error_ratio * own_error + self.error_slack

    def describe(self, own_error: float) -> str:
        slack = f" + {self.error_slack:g}" if self.error_slack else ""
        return f"{self.error_ratio:g} x {own_error:.3g}{slack} = {self.limit(own_error):.3g}"


FP32_BOUNDS = ScoreBounds(2.0, 1e-5, "sentence-transformers CrossEncoder fp32")
BF16_BOUNDS = ScoreBounds(1.5, 0.0, "packed PyTorch bf16 with flash attention")
# Kernel level (flash-attention's convention): the attention kernel's error against the fp32 reference
# within 2 x PyTorch's own bf16 attention error on the same inputs (+ a hair for ties at zero error).
KERNEL_BOUNDS = ScoreBounds(2.0, 1e-5, "PyTorch's own bf16 attention")
# An fp32 attention implementation against the fp32 reference, on outputs of order 1.
FP32_OP_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Target:
    name: str
    precision: str  # graph precision: "fp32" | "bf16"
    engine: str  # "onnx" (ONNX Runtime) | "tensorrt"
    description: str
    bounds: ScoreBounds
    compute_capability: tuple[int, int] | None = None  # the GPU the engine is built for
    ptx_arch: str | None = None  # the plugin kernel's PTX target
    default_max_batch_pairs: int = 64


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "fp32", "onnx", "fp32 ONNX graph for ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)",
               FP32_BOUNDS),
        Target(
            "h100", "bf16", "tensorrt", "bf16 TensorRT engine for NVIDIA H100 / H200 (Hopper, sm_90a)",
            BF16_BOUNDS, compute_capability=(9, 0), ptx_arch="sm_90a",
        ),
    )
}


class UnknownTarget(EttinError, ValueError):
    """A --target that is not one of TARGETS."""


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownTarget(f"Unknown target {name!r}. Known targets: {', '.join(TARGETS)}.")
    return TARGETS[name]
