"""Tokenization exactly as CrossEncoder's tokenizer call, packing, batching, input order."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ettin_export.synthetic.checkpoints import write_random_checkpoint
from ettin_export.synthetic.text import random_pairs, random_sentence
from ettin_runtime.packing import PairEncoder, PairInputError, pack, packed_batches, plan_batches, resolve_max_length


@pytest.fixture(scope="module")
def padded_tokenizer_checkpoint(tmp_path_factory):
    return write_random_checkpoint(
        tmp_path_factory.mktemp("padtok") / "ckpt", None, seed=2, max_seq_length=90, tokenizer_padding=True
    )


def test_encoder_matches_transformers_tokenizer_call(padded_tokenizer_checkpoint):
    from transformers import AutoTokenizer

    encoder = PairEncoder.from_dir(padded_tokenizer_checkpoint)
    assert encoder.max_length == 90
    hf = AutoTokenizer.from_pretrained(str(padded_tokenizer_checkpoint))
    rng = random.Random(7)
    pairs = [("", ""), ("a", ""), ("", "b")] + [
        (random_sentence(rng, rng.randint(0, 120)), random_sentence(rng, rng.randint(0, 200))) for _ in range(150)
    ]
    expected = hf(pairs, truncation="longest_first", max_length=90, padding=False)["input_ids"]
    got = encoder.encode(pairs)
    assert [ids.tolist() for ids in got] == expected
    assert all(ids.dtype == np.int32 for ids in got)
    assert max(len(ids) for ids in got) == 90  # truncated, never padded to tokenizer.json's saved 96
    assert min(len(ids) for ids in got) == 3
    assert got[0].tolist() == [50281, 50282, 50282]  # [CLS] [SEP] [SEP]


def test_pack_layout():
    ids = [np.array([5, 6, 7], dtype=np.int32), np.array([8], dtype=np.int32), np.array([9, 10], dtype=np.int32)]
    batch = pack(ids)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert batch.cu_seqlens.dtype == np.int32 and batch.input_ids.dtype == np.int32
    assert batch.max_seqlen == 3 and batch.num_pairs == 3 and batch.num_tokens == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_batches_respects_limits_and_covers_every_pair_once(seed):
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 40, 300), rng.integers(200, 513, 20), [513, 1]])
    rng.shuffle(lengths)
    batches = plan_batches(lengths, max_tokens=1024, max_pairs=32)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 32
        assert lengths[batch].sum() <= 1024
    assert (np.diff(lengths[flat]) <= 0).all(), "longest first"


def test_batches_carry_the_callers_indices():
    rng = np.random.default_rng(3)
    token_ids = [rng.integers(0, 500, n).astype(np.int32) for n in rng.integers(1, 60, 50)]
    seen = {}
    for batch in packed_batches(token_ids, max_tokens=200, max_pairs=8):
        for b, index in enumerate(batch.order):
            s, e = batch.cu_seqlens[b], batch.cu_seqlens[b + 1]
            seen[int(index)] = batch.input_ids[s:e]
    assert len(seen) == 50
    for index, ids in seen.items():
        assert np.array_equal(ids, token_ids[index])


def test_scores_come_back_in_input_order_whatever_the_batching(tiny_checkpoint):
    from ettin_export.model.torch_reranker import TorchReranker

    pairs = random_pairs(60, seed=12, document_words=(0, 150))
    reference = TorchReranker.from_checkpoint(str(tiny_checkpoint))
    one_by_one = np.array([reference.predict([p])[0] for p in pairs])
    for tokens, batch_size in [(16384, None), (200, None), (16384, 7), (400, 1)]:
        reranker = TorchReranker.from_checkpoint(str(tiny_checkpoint), max_batch_tokens=tokens)
        scores = reranker.predict(pairs, batch_size=batch_size)
        assert scores.dtype == np.float32 and scores.shape == (60,)
        # Batch composition changes fp32 summation order (~1e-5); a pair in the wrong place is off by ~5.
        assert np.max(np.abs(scores - one_by_one)) < 1e-4


def test_max_length_rule(tmp_path, tiny_checkpoint):
    assert resolve_max_length(tiny_checkpoint) == 200  # ST checkpoint's own max_seq_length
    assert resolve_max_length(tiny_checkpoint, 64) == 64
    hf = write_random_checkpoint(tmp_path / "hf", None, layout="hf-sequence-classification", max_seq_length=120)
    assert resolve_max_length(hf) == 120  # tokenizer model_max_length below max_position_embeddings
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    assert resolve_max_length(hf) == 7999  # no tokenizer limit: the model's max_position_embeddings
    # sentence_bert_config.json only counts with modules.json (CrossEncoder reads it through modules.json)
    (hf / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 50}))
    assert resolve_max_length(hf) == 7999
    with pytest.raises(ValueError, match="at least 5 tokens"):
        resolve_max_length(hf, 1)


def test_bad_pairs_are_refused_with_their_index(tiny_checkpoint):
    encoder = PairEncoder.from_dir(tiny_checkpoint)
    with pytest.raises(PairInputError, match=r"Pair 1: the document is NoneType None, expected a string"):
        encoder.encode([("q", "d"), ("q", None)])
    with pytest.raises(PairInputError, match=r"Pair 0 is str 'just a string'; expected a \(query, document\)"):
        encoder.encode(["just a string"])
    assert encoder.encode([]) == []


def test_missing_tokenizer_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        PairEncoder.from_dir(tmp_path)
