"""Build targets as data: what `--target NAME` means (precision, engine, GPU, bounds) in one place."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ettin_runtime.errors import EttinError


@dataclass(frozen=True)
class ScoreBounds:
    """docs/design.md, "Same scores: the numbers", as data.

    A candidate's scores are judged against an anchor run (the packed model in float64) next to a
    reference computed at the candidate's own precision (CrossEncoder fp32 for fp32 candidates, the
    packed model in bf16 with flash attention for bf16 ones). The candidate passes when

        max |candidate - anchor| <= error_ratio x max |own reference - anchor| + error_slack

    and the ranking bounds hold, so the bound grows with what rounding alone does to this checkpoint
    (its depth, its score spread) and nothing else."""

    error_ratio: float | None  # None: no error bound, max |Δ| reported only (reduced CPU precisions)
    error_slack: float
    own_reference: str  # what the "own reference" is, for reports and errors
    min_spearman: float = 0.999
    min_top1_agreement: float = 0.99
    min_top10_overlap: float = 0.98
    # |slope - 1| of the least-squares fit candidate ~ anchor: ranks are blind to a uniform rescaling of
    # the scores (a wrong head scale keeps every order), so reduced precisions also bound the scale.
    max_scale_error: float | None = None
    # bf16: top-1 and top-10 are judged up to ties the precision cannot resolve, i.e. anchor scores within
    # one ulp at this many significant bits of the query's largest |score| (bf16: 8; 2^-5 = 0.031 for a top
    # score in [4, 8)). Measured on the trained fixture: every top-1 "disagreement" of PyTorch's own bf16 was
    # such a near-tie (anchor gaps 0.003-0.022 logits; docs/trained-reranker.md, "bf16 numerics"). None: strict.
    tie_bits: int | None = None
    # Rank bounds relative to the own reference (bf16: the packed model in bf16), as the error bound is: each
    # rank bound loosens to 1 - rank_ratio x (1 - the own reference's own agreement with the anchor) where that
    # is below the fixed bound (rounding alone ranks worse at depth), never below rank_floor (Spearman, top-1,
    # top-10): a checkpoint whose bf16 rounding loses more than that is not one bf16 should ship. None: fixed.
    rank_ratio: float | None = None
    rank_floor: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def needs_lowp_reference(self) -> bool:
        """The own reference is the packed model in bf16 (with flash attention on the GPU, the reference
        attention on a CPU), computed beside the anchor rather than CrossEncoder fp32."""
        return self.own_reference in (BF16_FLASH_REFERENCE, BF16_CPU_REFERENCE)

    def rank_bounds(self, own=None) -> dict[str, float]:
        """The rank bounds for a candidate whose own reference has `own` (a parity.ParityMetrics against the
        anchor, or None): the fixed ones, loosened as `rank_ratio` says."""
        fixed = {"spearman": self.min_spearman, "top1_agreement": self.min_top1_agreement,
                 "top10_overlap": self.min_top10_overlap}
        if self.rank_ratio is None or own is None:
            return fixed
        return {name: max(min(floor, bound), min(bound, 1.0 - self.rank_ratio * (1.0 - getattr(own, name))))
                for (name, bound), floor in zip(fixed.items(), self.rank_floor)}  # never above the fixed bound

    def limit(self, own_error: float) -> float:
        return float("inf") if self.error_ratio is None else self.error_ratio * own_error + self.error_slack

    def describe(self, own_error: float) -> str:
        if self.error_ratio is None:
            return "none (reported only)"
        slack = f" + {self.error_slack:g}" if self.error_slack else ""
        return f"{self.error_ratio:g} x {own_error:.3g}{slack} = {self.limit(own_error):.3g}"


BF16_FLASH_REFERENCE = "packed PyTorch bf16 with flash attention"
BF16_CPU_REFERENCE = "packed PyTorch bf16 (reference attention)"
FP32_BOUNDS = ScoreBounds(2.0, 1e-5, "sentence-transformers CrossEncoder fp32")
# bf16's rank bounds (both targets) are calibrated on bf16 rounding of models that rank (scripts/bf16_numerics.py):
# PyTorch's own bf16 has, against the anchor, Spearman 0.9985 / 0.9959 and top-1 100 % / 100 %, top-10 1.000 /
# 0.970 up to ties within one bf16 ulp on the tiny trained fixture / the trained 17m (strictly 83 % / 97.5 %,
# 0.950 / 0.965), while a wrong cast and noise that cost NDCG@10 >= 0.005 fail them. Where the own bf16 reference
# ranks worse than that (deeper sizes: the 17m's 0.9959 is twice the 2-layer fixture's disagreement), the bounds
# follow it at 1.5x its disagreement, as the error bound does, down to floors between the trained models' noise of
# 0.2 logits (Spearman 0.986-0.991, NDCG@10 -0.003 at most) and the fixture's wrong cast (0.971, -0.0057).
BF16_RANKS = {"min_spearman": 0.995, "min_top10_overlap": 0.95, "tie_bits": 8, "rank_ratio": 1.5,
              "rank_floor": (0.98, 0.85, 0.85)}
BF16_BOUNDS = ScoreBounds(1.5, 0.0, BF16_FLASH_REFERENCE, **BF16_RANKS)
# Reduced CPU precisions rank like fp32 (issue 13): rank gates against the fp32 reference (the fp64
# anchor), max |Δ| reported, and the score scale within 5 %.
INT8_BOUNDS = ScoreBounds(None, 0.0, "sentence-transformers CrossEncoder fp32", min_spearman=0.995,
                          min_top1_agreement=0.98, min_top10_overlap=0.98, max_scale_error=0.05)
# bf16 on the CPU: its own reference is the packed model in PyTorch bf16 (the rank bounds follow it); max |Δ| is
# reported only (OpenVINO keeps other ops in bf16 than PyTorch does: not measured against each other yet).
BF16_CPU_BOUNDS = ScoreBounds(None, 0.0, BF16_CPU_REFERENCE, min_top1_agreement=0.99, max_scale_error=0.05,
                              **BF16_RANKS)
# Kernel level (flash-attention's convention): the attention kernel's error against the fp32 reference
# within 2 x PyTorch's own bf16 attention error on the same inputs (+ a hair for ties at zero error).
KERNEL_BOUNDS = ScoreBounds(2.0, 1e-5, "PyTorch's own bf16 attention")
# An fp32 attention implementation against the fp32 reference, on outputs of order 1.
FP32_OP_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Precision:
    """One precision of a target: its bounds, the runtimes that can run it (the build times them and
    keeps the fastest), and how the artifact is made (recorded in the manifest)."""

    name: str  # "fp32" | "int8" | "bf16"
    description: str
    bounds: ScoreBounds
    runtimes: tuple[str, ...]  # ettin_runtime.loading.RUNTIMES keys, the first when nothing is timed
    recipe: tuple[tuple[str, object], ...] = ()
    # Any one of these CPU features (ettin_runtime.machine) makes the precision run natively; () for any CPU.
    # Without them a runtime emulates it in fp32, so a gate judged there would not judge the precision.
    native_features: tuple[str, ...] = ()
    # How it turns the exported fp32 graph into its own: "module:function" (fp32_path, out_path, num_layers)
    # -> what the recipe adds, and the progress line it shows; None keeps the fp32 graph as it is.
    graph_maker: str | None = None
    graph_step: str = ""

    @property
    def recipe_json(self) -> dict:
        return dict(self.recipe)

    def make_graph(self):
        """The function of `graph_maker` (imported now: it needs onnx), or None."""
        if self.graph_maker is None:
            return None
        module, _, name = self.graph_maker.partition(":")
        return getattr(importlib.import_module(module), name)

    def runs_natively(self, features) -> bool:
        return not self.native_features or any(name in features for name in self.native_features)


CPU_PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", "fp32 ONNX graph (the exact contract)", FP32_BOUNDS, ("onnxruntime", "openvino"),
                  (("weights", "fp32"), ("compute", "fp32"))),
        Precision("int8", "int8 linear layers (ONNX Runtime dynamic quantization, per channel)", INT8_BOUNDS,
                  ("onnxruntime",),
                  (("method", "onnxruntime.quantization.quantize_dynamic"), ("weights", "int8 symmetric, per output channel, 7-bit range (reduce_range: no int16 saturation without VNNI)"),
                   ("activations", "uint8 symmetric per token (scale max|x|/127 per row, zero point 128): a pair scores the same whatever its batch"), ("quantized", "every linear layer of the backbone"),
                   ("kept_fp32", "embeddings, attention (softmax, scores), norms, rotary, the head (Dense, classifier)")),
                  graph_maker="ettin_export.graph.quantize:int8_graph",
                  graph_step="quantizing the linear layers to int8 (ONNX Runtime dynamic, per channel, head in fp32)"),
        Precision("bf16", "bf16 matrix products (OpenVINO's bf16 inference precision on AVX512_BF16 / AMX)",
                  BF16_CPU_BOUNDS, ("openvino",),
                  (("method", "the fp32 graph under OpenVINO INFERENCE_PRECISION_HINT=bf16"),
                   ("weights", "fp32 on disk, bf16 in compute"),
                   # What OpenVINO 2026.4's CPU plugin runs (the compiled model's runtimePrecision): it gives
                   # no per-op fp32 override for bf16 (rt_info disable_fp16_compression has no effect there).
                   ("bf16", "matrix products, LayerNorm (MVN: fp32 accumulation inside), rotary, the attention "
                            "subgraph (softmax accumulates in fp32 inside)"),
                   ("kept_fp32", "the score output")), native_features=("avx512_bf16", "amx_bf16")),
    )
}


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
    precisions: tuple[str, ...] = ()  # what --precision may ask for (the first is the default)

    def precision_of(self, name: str | None) -> str:
        name = name or self.precision
        if name not in (self.precisions or (self.precision,)):
            raise UnknownTarget(f"--target {self.name} builds precision {', '.join(self.precisions or (self.precision,))}; "
                                f"got {name!r}.")
        return name

    def bounds_for(self, precision: str) -> ScoreBounds:
        if self.engine == "onnx" and precision in CPU_PRECISIONS:
            return CPU_PRECISIONS[precision].bounds
        return self.bounds


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "fp32", "onnx", "ONNX graph for the CPU: fp32 (exact), int8 or bf16 (rank like fp32)",
               FP32_BOUNDS, precisions=tuple(CPU_PRECISIONS)),
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
