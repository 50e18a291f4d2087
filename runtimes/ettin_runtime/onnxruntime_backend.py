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
        return cls(
            session, encoder, manifest,
            max_batch_tokens=max_batch_tokens or limits.get("max_batch_tokens", 16384),
            max_batch_pairs=max_batch_pairs or limits.get("max_batch_pairs", 256),
        )

    def _score(self, batch: PackedBatch) -> np.ndarray:
        (scores,) = self.session.run(
            ["scores"], {"input_ids": batch.input_ids, "cu_seqlens": batch.cu_seqlens}
        )
        return scores.reshape(-1)
