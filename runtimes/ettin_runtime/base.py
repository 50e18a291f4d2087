"""One reranker interface for every backend, shaped like sentence-transformers' CrossEncoder.

A backend only implements `_score(batch) -> float32 [B]` on a packed batch; tokenization, batching
by a token budget, ordering, activations and ranking live here once.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from .packing import PackedBatch, Pair, PairEncoder, packed_batches

ACTIVATIONS = ("identity", "sigmoid")


def apply_activation(scores: np.ndarray, activation: str | None) -> np.ndarray:
    """Raw scores unless asked. Sigmoid is computed in float32 from the raw logits, never in bf16,
    where large scores would saturate to exactly 1.0."""
    if activation in (None, "identity"):
        return scores
    if activation == "sigmoid":
        scores = scores.astype(np.float32, copy=False)
        out = np.empty_like(scores)
        positive = scores >= 0
        out[positive] = 1.0 / (1.0 + np.exp(-scores[positive]))
        exp = np.exp(scores[~positive])
        out[~positive] = exp / (1.0 + exp)
        return out
    raise ValueError(f"Unknown activation {activation!r}; choose one of {ACTIVATIONS} or None (raw scores).")


class Reranker(abc.ABC):
    """`predict(pairs)` -> float32 scores in input order; `rank(query, documents)` -> sorted dicts.

    Attributes:
        encoder: tokenizes pairs exactly as CrossEncoder does (template, truncation, max length).
        activation: the checkpoint's own score activation ("identity" for Ettin, "sigmoid" for plain
            sequence-classification rerankers under CrossEncoder); applied only when asked.
    """

    def __init__(
        self,
        encoder: PairEncoder,
        *,
        activation: str = "identity",
        max_batch_tokens: int = 16384,
        max_batch_pairs: int = 256,
    ):
        if max_batch_tokens < encoder.max_length:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be at least max_length ({encoder.max_length}), "
                "or a single full-length pair would not fit in a batch."
            )
        self.encoder = encoder
        self.activation = activation
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_pairs = int(max_batch_pairs)

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @staticmethod
    def load(artifact_dir, **kwargs) -> Reranker:
        """Open an artifact folder with the runtime its manifest names (ONNX Runtime or TensorRT).
        Keyword arguments go to that backend's `load` (threads, device, batch limits, max_length)."""
        from .manifest import ArtifactError, read_manifest

        manifest = read_manifest(artifact_dir)
        engine_format = manifest.engine.get("format")
        if engine_format == "onnx":
            from .onnxruntime_backend import OnnxRuntimeReranker

            return OnnxRuntimeReranker.load(artifact_dir, manifest, **kwargs)
        if engine_format == "tensorrt":
            from .tensorrt_backend import TensorRTReranker

            return TensorRTReranker.load(artifact_dir, manifest, **kwargs)
        raise ArtifactError(f"{artifact_dir}: unknown engine format {engine_format!r} in manifest.json.")

    @abc.abstractmethod
    def _score(self, batch: PackedBatch) -> np.ndarray:
        """Raw float32 scores [B] for one packed batch, in packed order."""

    def predict(
        self,
        pairs: Sequence[Pair],
        *,
        batch_size: int | None = None,
        activation: str | None = None,
    ) -> np.ndarray:
        """Score (query, document) pairs. Returns float32 [len(pairs)] in the caller's order.

        Args:
            batch_size: at most this many pairs per forward pass (the token budget still applies).
            activation: None for the model's raw scores; "sigmoid", "identity", or "default" for the
                checkpoint's own activation (what CrossEncoder.predict applies by default).
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
            raise TypeError("predict() takes a list of pairs; wrap a single pair as [(query, document)].")
        token_ids = self.encoder.encode(pairs)
        scores = np.empty(len(token_ids), dtype=np.float32)
        max_pairs = self.max_batch_pairs if batch_size is None else max(1, int(batch_size))
        for batch in packed_batches(token_ids, self.max_batch_tokens, max_pairs):
            batch_scores = np.asarray(self._score(batch), dtype=np.float32).reshape(-1)
            if batch_scores.shape[0] != batch.num_pairs:
                raise RuntimeError(
                    f"{type(self).__name__} returned {batch_scores.shape[0]} scores for {batch.num_pairs} pairs."
                )
            scores[batch.order] = batch_scores
        return apply_activation(scores, self.activation if activation == "default" else activation)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        *,
        batch_size: int | None = None,
        activation: str | None = None,
    ) -> list[dict]:
        """CrossEncoder.rank: `[{"corpus_id", "score", "text"?}]`, highest score first, cut to top_k."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}.")
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not a single string.")
        scores = self.predict(
            [(query, doc) for doc in documents], batch_size=batch_size, activation=activation
        )
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[: max(0, int(top_k))]
        results = []
        for index in order:
            entry = {"corpus_id": int(index), "score": float(scores[index])}
            if return_documents:
                entry["text"] = documents[index]
            results.append(entry)
        return results
