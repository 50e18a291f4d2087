"""The ONNX Runtime backend: an artifact's model.onnx behind the common Reranker interface.

No torch. One InferenceSession, shared by every caller: `InferenceSession.run` is thread-safe, and
nothing else here keeps per-call state, so one OnnxRuntimeReranker can serve concurrent threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Reranker
from .manifest import ArtifactError, Manifest, read_manifest
from .packing import PackedBatch, PairEncoder

_RUNNABLE_PRECISIONS = {"CPUExecutionProvider": {"fp32"}, "CUDAExecutionProvider": {"fp32"}}


def cpu_batch_tokens(hidden_size: int | None, max_length: int) -> int:
    """The token budget per forward pass on the CPU provider, when the caller sets none.

    Measured with `ettin-export bench` (2-core AMD EPYC, fp32, nq-like and long profiles, 17m, 150m and
    a 64-wide test model): packed batches of ~1-2K tokens run fastest, up to 2x faster than 16K. MLAS
    GEMMs lose ~15% from 1K to 8K rows (operands fall out of cache), and a length-sorted small batch
    keeps its padded attention blocks close to the real pair lengths. 150m (hidden 768) was ~10%
    faster at 1024 than at 2048, 17m (256) the same at both, the 64-wide model ~10% faster at 2048."""
    return max(int(max_length), 2048 if (hidden_size or 0) < 512 else 1024)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
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


class OnnxRuntimeReranker(Reranker):
    def __init__(self, session, encoder: PairEncoder, manifest: Manifest, **kwargs):
        super().__init__(encoder, activation=manifest.score_activation, **kwargs)
        self.session = session
        self.manifest = manifest

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        manifest: Manifest | None = None,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
        max_batch_pairs: int | None = None,
    ) -> OnnxRuntimeReranker:
        ort = _import_onnxruntime()
        root = Path(artifact_dir)
        manifest = manifest or read_manifest(root)
        if manifest.engine.get("format") != "onnx":
            raise ArtifactError(f"{root} holds a {manifest.engine.get('format')} engine, not ONNX.")
        if manifest.engine.get("complete") is False:
            raise ArtifactError(
                f"{root} holds only the {manifest.precision} ONNX of a {manifest.target} build (--onnx-only); "
                "it has no engine yet. Finish it on a machine with TensorRT and the target GPU: "
                f"{manifest.engine.get('finish_command') or 'ettin-export build ... --target ' + manifest.target}"
            )
        providers = choose_providers(device)
        if manifest.precision not in _RUNNABLE_PRECISIONS[providers[0]]:
            raise ArtifactError(
                f"{root} is a {manifest.precision} graph (target {manifest.target}); ONNX Runtime's "
                f"{providers[0]} runs fp32 graphs only. Build a CPU artifact with "
                "`ettin-export build ... --target cpu`, or run this one with its own runtime (TensorRT)."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)
        session = ort.InferenceSession(str(root / manifest.engine["file"]), options, providers=providers)
        encoder = PairEncoder.from_dir(root, max_length or manifest.max_length)
        limits = manifest.limits or {}
        if max_batch_tokens is None:
            # The manifest's limit is the most the graph was validated with; the CPU runs best below it.
            max_batch_tokens = limits.get("max_batch_tokens", 16384)
            if providers[0] == "CPUExecutionProvider":
                budget = cpu_batch_tokens((manifest.model or {}).get("hidden_size"), encoder.max_length)
                max_batch_tokens = max(min(max_batch_tokens, budget), encoder.max_length)
        return cls(
            session, encoder, manifest,
            max_batch_tokens=max_batch_tokens,
            max_batch_pairs=max_batch_pairs or limits.get("max_batch_pairs", 256),
        )

    def _score(self, batch: PackedBatch) -> np.ndarray:
        (scores,) = self.session.run(
            ["scores"], {"input_ids": batch.input_ids, "cu_seqlens": batch.cu_seqlens}
        )
        return scores.reshape(-1)
