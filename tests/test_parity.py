"""fp32 parity of the packed PyTorch model with sentence-transformers' CrossEncoder.predict (<= 1e-4),
and proof that the check is sensitive: each classic porting mistake makes it fail."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ettin_export import model as model_module
from ettin_export.random_checkpoint import write_random_checkpoint
from ettin_export.torch_runtime import TorchReranker

from .pairsets import parity_pairs

BOUND = 1e-4


def crossencoder_predict(path, pairs, **kwargs) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(path), activation_fn=torch.nn.Identity(), device="cpu", **kwargs)
    return model.predict(pairs, batch_size=16, show_progress_bar=False, convert_to_numpy=True)


@pytest.fixture(scope="module")
def ettin_long(tmp_path_factory):
    """Exact 17m config at 4 layers (global 0, 3; local 1, 2 with window 64), max length 600."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("e17m-long") / "ckpt", "17m", seed=23, num_layers=4, max_seq_length=600
    )


@pytest.fixture(scope="module")
def ettin_case(ettin_long):
    reranker = TorchReranker.from_checkpoint(str(ettin_long))
    pairs = parity_pairs(reranker.encoder, seed=101, count=220)
    expected = crossencoder_predict(ettin_long, pairs)
    return reranker, pairs, expected


def test_parity_pairs_cover_the_awkward_lengths(ettin_case):
    reranker, pairs, _ = ettin_case
    lengths = [len(ids) for ids in reranker.encoder.encode(pairs)]
    assert len(pairs) >= 200
    for target in (3, 63, 64, 65, 127, 128, 129, 130, 513):
        assert target in lengths
    assert lengths.count(reranker.max_length) >= 5, "some pairs must be truncated at max_length"
    assert sum(n > 129 for n in lengths) >= 40, "many pairs must be longer than the local window"


def test_ettin_config_matches_crossencoder(ettin_case):
    reranker, pairs, expected = ettin_case
    scores = reranker.predict(pairs)
    assert expected.std() >= 3.0, "scores must spread like a trained reranker's for the bound to mean anything"
    assert np.max(np.abs(scores - expected)) <= BOUND


def test_one_pair_alone_and_many_short_beside_one_long(ettin_case):
    reranker, pairs, expected = ettin_case
    lengths = [len(ids) for ids in reranker.encoder.encode(pairs)]
    longest = int(np.argmax(lengths))
    alone = reranker.predict([pairs[longest]])
    assert alone.shape == (1,)
    assert abs(alone[0] - expected[longest]) <= BOUND
    short = [i for i, n in enumerate(lengths) if n <= 12][:40]
    assert len(short) >= 20
    mixed = [pairs[longest]] + [pairs[i] for i in short]
    scores = reranker.predict(mixed)
    assert np.max(np.abs(scores - expected[[longest] + short])) <= BOUND


@pytest.mark.parametrize(
    "kind",
    [
        dict(size=None, seed=3, max_seq_length=200),  # local half-window 16: the window at short lengths
        dict(size=None, seed=4, layout="hf-sequence-classification", pooling="mean", max_seq_length=150),
        dict(size=None, seed=6, layout="hf-sequence-classification", pooling="cls"),
        dict(size=None, seed=7, tokenizer_padding=True, max_seq_length=180),  # tokenizer.json saved with padding
        dict(size="150m", seed=8, num_layers=2, max_seq_length=160),
    ],
    ids=["tiny-window16", "hf-mean", "hf-cls-default-length", "tokenizer-saved-with-padding", "150m-2layers"],
)
def test_other_checkpoints_match_crossencoder(tmp_path, kind):
    path = write_random_checkpoint(tmp_path / "ckpt", **kind)
    reranker = TorchReranker.from_checkpoint(str(path))
    pairs = parity_pairs(reranker.encoder, seed=kind["seed"], count=60, max_words=260)
    if kind.get("max_seq_length") is None:
        # No saved limit: CrossEncoder takes min(tokenizer, model) = 7999; keep the test fast.
        pairs = [(q[:200], d[:900]) for q, d in pairs]
    expected = crossencoder_predict(path, pairs)
    scores = reranker.predict(pairs)
    assert np.max(np.abs(scores - expected)) <= BOUND


# --- sensitivity: every deliberate mistake below must break the parity check -------------------------


def _mutated_scores(reranker, pairs, mutate, monkeypatch) -> np.ndarray:
    mutated = copy.deepcopy(reranker.model)
    try:
        mutate(mutated, monkeypatch)
        return TorchReranker(mutated, reranker.encoder).predict(pairs)
    finally:
        monkeypatch.undo()


def _window_65(model, _):
    for layer in model.layers:
        if layer.attn.window >= 0:
            layer.attn.window = 65


def _local_theta_10000(model, _):
    model.local_rotary = model_module.Rotary(model.config.head_dim, 10_000.0)


def _positions_not_restarting(_, monkeypatch):
    monkeypatch.setattr(
        model_module, "positions_from_cu_seqlens", lambda cu, total: torch.arange(total, device=cu.device)
    )


def _cls_from_wrong_index(model, monkeypatch):
    monkeypatch.setattr(model, "pool", lambda hidden, cu: hidden[cu.long()[:-1] + 1])


def _head_norm_without_bias(model, _):
    with torch.no_grad():
        model.head.norm.bias.zero_()


@pytest.mark.parametrize(
    "mutate",
    [_window_65, _local_theta_10000, _positions_not_restarting, _cls_from_wrong_index, _head_norm_without_bias],
    ids=["window-65", "local-theta-10000", "positions-not-restarting", "cls-wrong-index", "head-norm-no-bias"],
)
def test_parity_check_catches_porting_mistake(ettin_case, mutate, monkeypatch):
    reranker, pairs, expected = ettin_case
    scores = _mutated_scores(reranker, pairs, mutate, monkeypatch)
    # RoPE is relative: positions that keep counting across pairs shift every q and k of a pair by the
    # same angle and cancel in q.k exactly in real arithmetic. They show only through fp32 precision of
    # the large angles (~1e-3 in the score here), still far beyond the bound; the others are gross.
    assert np.max(np.abs(scores - expected)) > 5 * BOUND
    # and the unmutated model is still exact afterwards (the mutation was undone)
    assert np.max(np.abs(reranker.predict(pairs[:20]) - expected[:20])) <= BOUND


def test_rank_matches_crossencoder_rank(tiny_checkpoint):
    from sentence_transformers import CrossEncoder

    from ettin_export.random_checkpoint import random_pairs

    reranker = TorchReranker.from_checkpoint(str(tiny_checkpoint))
    cross_encoder = CrossEncoder(str(tiny_checkpoint), activation_fn=torch.nn.Identity(), device="cpu")
    documents = [d for _, d in random_pairs(40, seed=77, document_words=(0, 120))]
    query = "which university city has the most national history"
    expected = cross_encoder.rank(query, documents, return_documents=True, show_progress_bar=False)
    got = reranker.rank(query, documents, return_documents=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in expected]
    assert all(abs(a["score"] - b["score"]) <= BOUND and a["text"] == b["text"] for a, b in zip(got, expected))
    top = reranker.rank(query, documents, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in expected[:3]]
    assert set(top[0]) == {"corpus_id", "score"}
    assert reranker.rank(query, []) == []
    with pytest.raises(TypeError, match="documents must be a list of strings"):
        reranker.rank(query, "one string")
