"""The runtime contract, once, as assertions every backend must pass (tests/test_runtime_contract.py
runs the local ones, tests/test_deploy.py the Triton client against the real server).

`check_contract(reranker, pairs, expected)`: `expected` are the fp32 scores of `pairs` from the
reference runtime (all backends here compute the same fp32 model)."""

from __future__ import annotations

import numpy as np
import pytest

TOLERANCE = 1e-4  # another fp32 path (batching, padding) of the same model, not another model


def contract_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """Awkward inputs: an empty document, an empty query, one far beyond any max length, repeated
    queries (grouped by the Triton client), many short pairs beside long ones, unicode."""
    import random

    from ettin_export.synthetic.text import random_sentence

    rng = random.Random(seed)
    pairs = [("what is it", ""), ("", "a document"), ("a question", random_sentence(rng, 3000)), ("q", "d"),
             ("café über naïve", "日本語 and emoji 🙂 in a document")]
    query = random_sentence(rng, 6)
    pairs += [(query, random_sentence(rng, rng.randint(0, 120))) for _ in range(12)]
    pairs += [(random_sentence(rng, rng.randint(1, 8)), random_sentence(rng, rng.randint(1, 9))) for _ in range(20)]
    rng.shuffle(pairs)
    return pairs


def check_contract(reranker, pairs, expected: np.ndarray, *, max_length: int) -> None:
    scores = reranker.predict(pairs)
    assert scores.dtype == np.float32 and scores.shape == (len(pairs),)
    assert np.max(np.abs(scores - expected)) <= TOLERANCE, type(reranker).__name__
    # input order, whatever the batching
    reversed_scores = reranker.predict(pairs[::-1], batch_size=3)
    assert np.max(np.abs(reversed_scores[::-1] - scores)) <= TOLERANCE
    assert np.max(np.abs(reranker.predict(pairs, batch_size=1) - scores)) <= TOLERANCE
    # edges of the interface
    empty = reranker.predict([])
    assert empty.dtype == np.float32 and empty.shape == (0,)
    with pytest.raises(TypeError, match="wrap a single pair"):
        reranker.predict(("a query", "a document"))
    assert reranker.max_length == max_length
    # activations: raw unless asked; sigmoid in float32 from the raw scores
    sigmoid = reranker.predict(pairs, activation="sigmoid")
    assert sigmoid.dtype == np.float32 and np.all((sigmoid > 0) & (sigmoid < 1))
    assert np.allclose(sigmoid, 1 / (1 + np.exp(-scores.astype(np.float64))), atol=1e-6)
    assert np.array_equal(reranker.predict(pairs, activation="default"), reranker.predict(pairs, activation=reranker.activation))
    # rank = predict + a stable sort, CrossEncoder's dicts
    query, documents = pairs[0][0], [d for _, d in pairs[:9]]
    ranked = reranker.rank(query, documents, return_documents=True)
    raw = reranker.predict([(query, d) for d in documents])
    assert [r["corpus_id"] for r in ranked] == np.argsort(-raw, kind="stable").tolist()
    assert all(r["text"] == documents[r["corpus_id"]] and abs(r["score"] - raw[r["corpus_id"]]) <= TOLERANCE
               for r in ranked)
    top = reranker.rank(query, documents, top_k=2)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked[:2]] and set(top[0]) == {"corpus_id", "score"}
    assert reranker.rank(query, []) == []
    with pytest.raises(TypeError, match="documents must be a list of strings"):
        reranker.rank(query, "one string")
    with pytest.raises(TypeError, match="query must be a string"):
        reranker.rank(None, documents)
