"""ONNX Runtime: an artifact's model.onnx behind the common Reranker contract.

No torch. One InferenceSession, shared by every caller: `InferenceSession.run` is thread-safe, and
nothing else here keeps per-call state, so one OnnxRuntimeReranker can serve concurrent threads.
"""

from __future__ import annotations

import numpy as np

from ..artifact import CU_SEQLENS, INPUT_IDS, SCORES, Artifact
from ..errors import ArtifactError, MissingDependency, RuntimeRefused
from ..loading import LoadOptions
from ..machine import ort_session_options
from ..packing import PackedBatch, PairEncoder
from ..reranker import PackedBatchReranker

# bf16 CPU artifacts hold the fp32 graph for OpenVINO's bf16 compute (ONNX Runtime's CPU provider has
# no bf16 MatMul); the H100's bf16 graph is TensorRT's.
_RUNNABLE_PRECISIONS = {"CPUExecutionProvider": {"fp32", "int8"}, "CUDAExecutionProvider": {"fp32"}}


def cpu_batch_tokens(hidden_size: int | None, max_length: int | None = None, precision: str = "fp32") -> int:
    """The token budget per forward pass on the CPU provider, when the caller sets none (a longer pair
    runs alone; with `max_length`, at least that, for a caller whose batches must hold a full pair).

    Measured with `ettin-export bench` (2-core AMD EPYC, fp32, nq-like and long profiles, 17m, 150m and
    a 64-wide test model): packed batches of ~1-2K tokens run fastest, up to 2x faster than 16K. MLAS
    GEMMs lose ~15% from 1K to 8K rows (operands fall out of cache), and a length-sorted small batch
    keeps its padded attention blocks close to the real pair lengths. 150m (hidden 768) was ~10%
    faster at 1024 than at 2048, 17m (256) the same at both, the 64-wide model ~10% faster at 2048.
    int8 (dynamic quantization, activations quantized per run) ran best at 1024 at 17m too: 1024 / 2048 / 4096
    tokens gave 3.36x / 2.96x / 2.70x CrossEncoder (2-core AMD EPYC Zen 5, nq-like, `ettin-export bench
    --candidate-batch-tokens`)."""
    best = 1024 if precision == "int8" or (hidden_size or 0) >= 512 else 2048
    return max(int(max_length or 0), best)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingDependency(
            "ONNX Runtime is not installed: pip install 'ettin-export[ort]' (or onnxruntime-gpu for CUDA)."
        ) from error
    return onnxruntime


def choose_providers(device: str = "auto") -> list[str]:
    """CPU by default; CUDA when asked (or on "auto" when onnxruntime-gpu is installed)."""
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ArtifactError(
            f"CUDA was asked for but this ONNX Runtime offers only {available}. Install onnxruntime-gpu."
        )
    return ["CPUExecutionProvider"]


class OnnxRuntimeReranker(PackedBatchReranker):
    def __init__(self, session, encoder: PairEncoder, artifact: Artifact, *, max_batch_tokens: int,
                 max_batch_pairs: int, token_limit: int | None = None):
        super().__init__(encoder, activation=artifact.score_activation, max_batch_tokens=max_batch_tokens,
                         max_batch_pairs=max_batch_pairs, token_limit=token_limit)
        self.session = session
        self.artifact = artifact

    @classmethod
    def from_artifact(cls, artifact: Artifact, options: LoadOptions) -> OnnxRuntimeReranker:
        ort = _import_onnxruntime()
        if artifact.engine.format != "onnx":
            raise ArtifactError(f"{artifact.root} holds a {artifact.engine.format} engine, not ONNX.")
        artifact.require_complete()
        providers = choose_providers(options.device)
        if artifact.precision not in _RUNNABLE_PRECISIONS[providers[0]]:
            raise ArtifactError(
                f"{artifact.root} is a {artifact.precision} artifact (target {artifact.target}); ONNX Runtime's "
                f"{providers[0]} runs {' and '.join(sorted(_RUNNABLE_PRECISIONS[providers[0]]))} ones. Run it with "
                f"its own runtime ({artifact.engine.runtime}), or build `ettin-export build ... --target cpu`."
            )
        session_options = ort_session_options(ort, options.threads)
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(artifact.path(artifact.engine.file)), session_options, providers=providers)
        encoder = PairEncoder.from_dir(artifact.root, options.max_length or artifact.max_length)
        max_batch_tokens = options.max_batch_tokens
        if max_batch_tokens is None:
            # The artifact's limit is the most the graph was validated with; the CPU runs best below it.
            max_batch_tokens = artifact.limits.max_batch_tokens
            if providers[0] == "CPUExecutionProvider":
                max_batch_tokens = min(max_batch_tokens, cpu_batch_tokens(artifact.model.hidden_size,
                                                                           precision=artifact.precision))
        return cls(session, encoder, artifact, max_batch_tokens=max_batch_tokens,
                   max_batch_pairs=options.max_batch_pairs or artifact.limits.max_batch_pairs,
                   token_limit=max(artifact.limits.max_batch_tokens, max_batch_tokens))

    def _score(self, batch: PackedBatch) -> np.ndarray:
        if self.session is None:
            raise RuntimeRefused(f"this reranker of {self.artifact.root} was closed; load the artifact again.")
        (scores,) = self.session.run([SCORES], {INPUT_IDS: batch.input_ids, CU_SEQLENS: batch.cu_seqlens})
        return scores.reshape(-1)

    def close(self) -> None:
        self.session = None
