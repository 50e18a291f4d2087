"""One reranker contract for every runtime, shaped like sentence-transformers' CrossEncoder, in two layers.

`Reranker`: the interface callers hold, local or remote — `predict(pairs)` (float32 scores in the
caller's order), `rank(query, documents)` (predict plus a stable sort; written once, here), `close()`
and the context manager. `Reranker.load(artifact_dir)` opens an artifact with the runtime its
manifest names.

`PackedBatchReranker`: the local layer under ONNX Runtime, TensorRT and PyTorch. It owns tokenizing
(CrossEncoder's template and truncation), budgeted batching (a caller's `batch_size` is clamped to the
backend's limits, so no batch ever exceeds what the engine was built for) and putting scores back in
order; a backend only implements `_score(batch) -> float32 [B]` on one packed batch.

A remote runtime (TritonReranker) implements `predict` itself and inherits the rest.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from .artifact import Artifact
from .checks import whole_number
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

    `activation` is the checkpoint's own score activation ("identity" for Ettin, "sigmoid" for plain
    sequence-classification rerankers under CrossEncoder); it is applied only when asked."""

    activation: str = "identity"

    @staticmethod
    def load(artifact_dir, *, allow_unverified: bool = False, **options) -> Reranker:
        """Open an artifact folder with the runtime its manifest names (or `runtime=`); the other
        `options` are ettin_runtime.loading.LoadOptions'. An artifact that failed or never reached its
        parity gate is refused unless `allow_unverified`."""
        return Artifact.open(artifact_dir, allow_unverified=allow_unverified).load(**options)

    @property
    @abc.abstractmethod
    def max_length(self) -> int | None:
        """Tokens per pair; longer pairs are truncated (None: the server decides)."""

    @abc.abstractmethod
    def predict(self, pairs: Sequence[Pair], *, batch_size: int | None = None,
                activation: str | None = None) -> np.ndarray:
        """Score (query, document) pairs: float32 [len(pairs)] in the caller's order.

        Args:
            batch_size: at most this many pairs per forward pass (or per request).
            activation: None for the model's raw scores; "sigmoid", "identity", or "default" for the
                checkpoint's own activation (what CrossEncoder.predict applies by default).
        """

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
        if documents is None:
            raise TypeError("documents must be a list of strings, got None.")
        if top_k is not None and not whole_number(top_k, minimum=0, allow_numpy=True):
            raise ValueError(f"top_k must be None (all documents) or a non-negative integer, got {top_k!r}.")
        scores = self.predict([(query, doc) for doc in documents], batch_size=batch_size, activation=activation)
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[: int(top_k)]
        results = []
        for index in order:
            entry = {"corpus_id": int(index), "score": float(scores[index])}
            if return_documents:
                entry["text"] = documents[index]
            results.append(entry)
        return results

    def close(self) -> None:
        """Release what the runtime holds (sessions, GPU memory, connections). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _activation(self, scores: np.ndarray, activation: str | None) -> np.ndarray:
        return apply_activation(scores, self.activation if activation == "default" else activation)


def _check_pairs(pairs) -> None:
    """predict()'s argument must be a sequence of (query, document) pairs (each pair is checked when it is
    tokenized, by index)."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
        raise TypeError("predict() takes a list of pairs; wrap a single pair as [(query, document)].")
    if pairs is None or isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"predict() takes a list of (query, document) pairs, got {type(pairs).__name__}.")


def _check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    if not whole_number(batch_size, allow_numpy=True):
        raise ValueError(f"batch_size must be a positive integer (or None for the runtime's own), got {batch_size!r}.")
    return int(batch_size)


class PackedBatchReranker(Reranker):
    """The local layer: tokenize, cut into packed batches within the backend's limits, score, reorder.

    Attributes:
        encoder: tokenizes pairs exactly as CrossEncoder does (template, truncation, max length).
        max_batch_tokens: the packing budget: pairs share a `_score` call up to this many tokens; a
            pair longer than the budget runs alone (so a CPU backend can pack at its fastest size
            whatever the max length).
        max_batch_pairs: the most pairs one `_score` call gets.
        token_limit: the most tokens one `_score` call can take (an engine profile's maximum); default
            the budget. It must hold one full-length pair.
    """

    def __init__(self, encoder: PairEncoder, *, activation: str = "identity", max_batch_tokens: int,
                 max_batch_pairs: int, token_limit: int | None = None):
        token_limit = max_batch_tokens if token_limit is None else token_limit
        if token_limit < encoder.max_length:
            raise ValueError(
                f"a run takes at most {token_limit} tokens, below max_length ({encoder.max_length}): a single "
                "full-length pair would not fit."
            )
        if not 1 <= max_batch_tokens <= token_limit:
            raise ValueError(f"max_batch_tokens must be between 1 and {token_limit} tokens per run, got {max_batch_tokens}.")
        if max_batch_pairs < 1:
            raise ValueError(f"max_batch_pairs must be at least 1, got {max_batch_pairs}.")
        self.encoder = encoder
        self.activation = activation
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_pairs = int(max_batch_pairs)
        self.token_limit = int(token_limit)

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @abc.abstractmethod
    def _score(self, batch: PackedBatch) -> np.ndarray:
        """Raw float32 scores [B] for one packed batch (within the limits), in packed order."""

    def predict(self, pairs: Sequence[Pair], *, batch_size: int | None = None,
                activation: str | None = None) -> np.ndarray:
        _check_pairs(pairs)
        batch_size = _check_batch_size(batch_size)
        token_ids = self.encoder.encode(pairs)
        scores = np.empty(len(token_ids), dtype=np.float32)
        max_pairs = self.max_batch_pairs if batch_size is None else min(batch_size, self.max_batch_pairs)
        for batch in packed_batches(token_ids, self.max_batch_tokens, max_pairs):
            batch_scores = np.asarray(self._score(batch), dtype=np.float32).reshape(-1)
            if batch_scores.shape[0] != batch.num_pairs:
                raise RuntimeError(
                    f"{type(self).__name__} returned {batch_scores.shape[0]} scores for {batch.num_pairs} pairs."
                )
            scores[batch.order] = batch_scores
        return self._activation(scores, activation)
