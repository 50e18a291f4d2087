"""fp32 parity of the packed PyTorch model under the rule of docs/design.md ("Same scores") (anchored on an fp64 run, bounded by
2 x CrossEncoder's own fp32 error + 1e-5), and proof that the rule is sensitive: each classic porting
mistake fails it, as a candidate and as an anchor (reference.check_port), and so does a uniform shift
of 10 x the reference's own fp32 error."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ettin_export.model import packed as model_module
from ettin_export.checkpoint import load_checkpoint
from ettin_export.parity import References
from ettin_export.synthetic.checkpoints import write_random_checkpoint
from ettin_export.parity.references import ReferenceMismatch, check_port, fp64_anchor, packed_scores
from ettin_export.model.torch_reranker import TorchReranker

from .pairsets import parity_pairs
from .references import assert_fp32_parity, fails_fp32_parity, references_for


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
    return reranker, pairs, references_for(ettin_long, pairs), reranker.predict(pairs)


def mutation_sample(encoder, pairs) -> list[int]:
    """70 of the 220 pairs: the 30 longest (large RoPE angles, truncation, across the window) and a
    spread of the rest, so each mutation costs a third of a full pass."""
    order = np.argsort([-len(ids) for ids in encoder.encode(pairs)], kind="stable")
    return sorted(order[:30].tolist() + order[30::5][:40].tolist())


def test_parity_pairs_cover_the_awkward_lengths(ettin_case):
    reranker, pairs, _, _ = ettin_case
    lengths = [len(ids) for ids in reranker.encoder.encode(pairs)]
    assert len(pairs) >= 200
    for target in (3, 63, 64, 65, 127, 128, 129, 130, 513):
        assert target in lengths
    assert lengths.count(reranker.max_length) >= 5, "some pairs must be truncated at max_length"
    assert sum(n > 129 for n in lengths) >= 40, "many pairs must be longer than the local window"


def test_ettin_config_matches_crossencoder(ettin_case):
    reranker, pairs, refs, scores = ettin_case
    assert refs.own.std() >= 3.0, "scores must spread like a trained reranker's for the bound to mean anything"
    check = assert_fp32_parity(scores, refs)
    assert check.own_error > 0  # CrossEncoder fp32 is not the fp64 anchor: the bound is measured, not assumed
    check_port(refs, scores)  # and CrossEncoder lies within the bound the packed model's fp32 error sets


def test_one_pair_alone_and_many_short_beside_one_long(ettin_case):
    reranker, pairs, refs, _ = ettin_case
    lengths = [len(ids) for ids in reranker.encoder.encode(pairs)]
    longest = int(np.argmax(lengths))
    alone = reranker.predict([pairs[longest]])
    assert alone.shape == (1,)
    assert_fp32_parity(alone, refs.subset([longest]))
    short = [i for i, n in enumerate(lengths) if n <= 12][:40]
    assert len(short) >= 20
    mixed = [pairs[longest]] + [pairs[i] for i in short]
    assert_fp32_parity(reranker.predict(mixed), refs.subset([longest] + short))


@pytest.mark.parametrize(
    "kind",
    [
        dict(size=None, seed=3, max_seq_length=200),  # local half-window 16: the window at short lengths
        dict(size=None, seed=4, layout="hf-sequence-classification", pooling="mean", max_seq_length=150),
        dict(size=None, seed=6, layout="hf-sequence-classification", pooling="cls"),
        dict(size=None, seed=7, tokenizer_padding=True, max_seq_length=180),  # tokenizer.json saved with padding
        dict(size="150m", seed=8, num_layers=2, max_seq_length=160),
        # deep and narrow with a wide score spread: fp32 rounding alone passes the old absolute 1e-4 here
        dict(size=None, seed=9, hidden=128, layers=9, heads=4, intermediate=192, local_attention=128,
             score_std=14.0, max_seq_length=400),
    ],
    ids=["tiny-window16", "hf-mean", "hf-cls-default-length", "tokenizer-saved-with-padding", "150m-2layers",
         "deep-wide-spread"],
)
def test_other_checkpoints_match_crossencoder(tmp_path, kind):
    path = write_random_checkpoint(tmp_path / "ckpt", **kind)
    reranker = TorchReranker.from_checkpoint(str(path))
    pairs = parity_pairs(reranker.encoder, seed=kind["seed"], count=60, max_words=260)
    if kind.get("max_seq_length") is None:
        # No saved limit: CrossEncoder takes min(tokenizer, model) = 7999; keep the test fast.
        pairs = [(q[:200], d[:900]) for q, d in pairs]
    refs = references_for(path, pairs)
    scores = reranker.predict(pairs)
    assert_fp32_parity(scores, refs)
    check_port(refs, scores)


def test_foreign_checkpoints_match_crossencoder(tmp_path):
    """Checkpoints made by transformers and sentence-transformers themselves (tests/foreign_checkpoint.py):
    HF init, HF's own config defaults, a WordPiece tokenizer with a double-[SEP] template."""
    from .foreign_checkpoint import write_foreign_crossencoder, write_foreign_sequence_classification

    for path in (write_foreign_crossencoder(tmp_path / "st", seed=31, layers=8),
                 write_foreign_sequence_classification(tmp_path / "hf", seed=32, layers=8)):
        reranker = TorchReranker.from_checkpoint(str(path))
        pairs = parity_pairs(reranker.encoder, seed=33, count=60, max_words=90)  # WordPiece: ~4 tokens a word
        refs = references_for(path, pairs)
        assert refs.own.std() >= 10.0, "the foreign checkpoints spread their scores like a trained reranker"
        scores = reranker.predict(pairs)
        assert_fp32_parity(scores, refs)
        check_port(refs, scores)


def test_a_uniform_shift_of_ten_times_the_own_error_fails(ettin_case):
    reranker, pairs, refs, scores = ettin_case
    assert_fp32_parity(scores, refs)
    own_error = float(np.max(np.abs(refs.own - refs.anchor)))
    check = fails_fp32_parity(scores + np.float32(10 * own_error), refs)
    assert check.error > check.limit
    # a uniform shift keeps every ranking: only the error bound can catch it
    assert np.array_equal(np.argsort(scores + np.float32(10 * own_error)), np.argsort(scores))


# --- sensitivity: every deliberate mistake below must break the rule --------------------------------


def _mutated(reranker, mutate, monkeypatch):
    mutated = copy.deepcopy(reranker.model)
    mutate(mutated, monkeypatch)
    return mutated


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


MUTATIONS = [_window_65, _local_theta_10000, _positions_not_restarting, _cls_from_wrong_index,
             _head_norm_without_bias]
MUTATION_IDS = ["window-65", "local-theta-10000", "positions-not-restarting", "cls-wrong-index", "head-norm-no-bias"]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=MUTATION_IDS)
def test_rule_catches_porting_mistake_in_the_candidate(ettin_case, mutate, monkeypatch):
    reranker, all_pairs, all_refs, _ = ettin_case
    sample = mutation_sample(reranker.encoder, all_pairs)
    pairs, refs = [all_pairs[i] for i in sample], all_refs.subset(sample)
    try:
        scores = TorchReranker(_mutated(reranker, mutate, monkeypatch), reranker.encoder).predict(pairs)
    finally:
        monkeypatch.undo()
    # RoPE is relative: positions that keep counting across pairs shift every q and k of a pair by the
    # same angle and cancel in q.k exactly in real arithmetic. They show only through fp32 precision of
    # the large angles (~1e-3 in the score here), still far beyond the bound; the others are gross.
    check = fails_fp32_parity(scores, refs)
    assert check.error > 5 * check.limit
    # and the unmutated model still passes afterwards (the mutation was undone)
    assert_fp32_parity(reranker.predict(pairs[:20]), refs.subset(range(20)))


@pytest.mark.parametrize("mutate", MUTATIONS, ids=MUTATION_IDS)
def test_port_check_catches_porting_mistake_in_the_anchor(ettin_long, ettin_case, mutate, monkeypatch):
    """The build's anchor is the packed model itself: if the packed model had the mistake, its fp64 and
    fp32 runs would agree with each other, and only CrossEncoder can tell. check_port must refuse."""
    reranker, pairs, refs, _ = ettin_case
    sample = mutation_sample(reranker.encoder, pairs)
    try:
        mutated = _mutated(reranker, mutate, monkeypatch)
        with torch.no_grad():
            anchor = packed_scores(copy.deepcopy(mutated).double(), reranker.encoder, [pairs[i] for i in sample])
            packed = packed_scores(mutated, reranker.encoder, [pairs[i] for i in sample])
    finally:
        monkeypatch.undo()
    wrong_anchor = References(anchor, "mutated packed fp64", refs.own[sample], refs.own_name)
    with pytest.raises(ReferenceMismatch, match="porting difference|loses more than CrossEncoder"):
        check_port(wrong_anchor, packed)
    check_port(refs.subset(sample), reranker.predict([pairs[i] for i in sample]))  # the real model passes


def test_anchor_is_the_fp64_packed_model(ettin_long, ettin_case):
    reranker, pairs, refs, _ = ettin_case
    checkpoint = load_checkpoint(str(ettin_long))
    anchor, name = fp64_anchor(checkpoint, pairs[:10], reranker.encoder)
    assert anchor.dtype == np.float64 and "fp64" in name
    assert np.allclose(anchor, refs.anchor[:10], rtol=0, atol=1e-10)  # other batches: fp64 summation order only
    # fp64 digits are kept: the anchor is not an fp32 value
    assert np.any(anchor != anchor.astype(np.float32).astype(np.float64))


def test_rank_matches_crossencoder_rank(tiny_checkpoint):
    from sentence_transformers import CrossEncoder

    from ettin_export.synthetic.text import random_pairs

    reranker = TorchReranker.from_checkpoint(str(tiny_checkpoint))
    cross_encoder = CrossEncoder(str(tiny_checkpoint), activation_fn=torch.nn.Identity(), device="cpu")
    documents = [d for _, d in random_pairs(40, seed=77, document_words=(0, 120))]
    query = "which university city has the most national history"
    expected = cross_encoder.rank(query, documents, return_documents=True, show_progress_bar=False)
    got = reranker.rank(query, documents, return_documents=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in expected]
    refs = references_for(tiny_checkpoint, [(query, d) for d in documents])
    assert_fp32_parity(np.array([r["score"] for r in sorted(got, key=lambda r: r["corpus_id"])]), refs)
    assert all(a["text"] == b["text"] for a, b in zip(got, expected))
    top = reranker.rank(query, documents, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in expected[:3]]
    assert set(top[0]) == {"corpus_id", "score"}
    assert reranker.rank(query, []) == []
    with pytest.raises(TypeError, match="documents must be a list of strings"):
        reranker.rank(query, "one string")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_ranks_forgive_swaps_within_one_bf16_ulp_and_no_others(seed):
    """The bf16 rank bounds' tie rule (targets.ScoreBounds.tie_bits): a swap of two candidates whose anchor
    scores differ by less than one bf16 ulp of the query's top score is not a disagreement, one by more is,
    and the strict rule (fp32, int8) holds every swap against the candidate."""
    from ettin_export.parity.rule import ParityMetrics, _ulp
    from ettin_export.targets import CPU_PRECISIONS, get_target

    assert _ulp(4.7, 8) == 2.0 ** -5 and _ulp(3.99, 8) == 2.0 ** -6 and _ulp(0.3, 8) == 2.0 ** -9
    assert _ulp(4.7, None) == 0.0 and _ulp(0.0, 8) == 0.0
    bits = CPU_PRECISIONS["bf16"].bounds.tie_bits
    assert bits == 8 and get_target("h100").bounds.tie_bits == 8
    assert CPU_PRECISIONS["int8"].bounds.tie_bits is None and CPU_PRECISIONS["fp32"].bounds.tie_bits is None
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 11, 20, 63][: 3 + seed]
    anchor = np.concatenate([rng.normal(0, 2, n) for n in sizes])
    spans, start = [], 0
    for n in sizes:
        spans.append(slice(start, start + n))
        start += n
    big = max(sizes)
    query = next(s for s in spans if s.stop - s.start == big)
    block = anchor[query]
    order = np.argsort(-block)
    top, second, tenth, eleventh = (query.start + order[i] for i in (0, 1, 9, 10))
    ulp = _ulp(np.abs(block).max(), bits)

    def swapped(i, j, gap):
        """The anchor with candidates i and j `gap` apart (i the better) and then their scores exchanged."""
        a = anchor.copy()
        a[j] = a[i] - gap
        c = a.copy()
        c[i], c[j] = a[j], a[i]
        return a, c

    for i, j in ((top, second), (tenth, eleventh)):
        a, c = swapped(i, j, 0.4 * ulp)
        tied, strict = ParityMetrics.compute(a, c, spans, bits), ParityMetrics.compute(a, c, spans)
        assert tied.top1_agreement == 1.0 and tied.top10_overlap == 1.0
        assert strict.top1_agreement < 1.0 or strict.top10_overlap < 1.0
        a, c = swapped(i, j, 3.0 * ulp)
        far = ParityMetrics.compute(a, c, spans, bits)
        assert far.top1_agreement < 1.0 or far.top10_overlap < 1.0
    same = ParityMetrics.compute(anchor, anchor + rng.normal(0, 1e-9, len(anchor)), spans, bits)
    assert same.top1_agreement == 1.0 and same.top10_overlap == 1.0 and same.tie_bits == 8


@pytest.mark.parametrize("seed", [0, None])  # None: a fresh seed (checked over 100 seeds, none failed)
def test_bf16_rank_bounds_follow_the_own_bf16_reference_down_to_a_floor(seed):
    """bf16's rank bounds are relative to what the own reference (the packed model in bf16) loses itself, as
    the error bound is (targets.ScoreBounds.rank_ratio): a candidate as faithful as a reference that ranks below
    the fixed bounds (rounding at depth) passes; one that loses more than 1.5x the reference's disagreement
    fails, saying why; where the reference itself ranks below the floor, nothing passes; fp32 and int8 keep
    fixed bounds."""
    from ettin_export.parity.rule import ParityMetrics, judge
    from ettin_export.targets import CPU_PRECISIONS, get_target

    seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else seed
    print(f"seed {seed}")  # shown with a failure
    rng = np.random.default_rng(seed)
    sizes = rng.integers(25, 40, 300)
    blocks = []
    for n in sizes:  # a trained reranker's shape: three relevant candidates well ahead of the rest
        block = rng.normal(0, 1.5, n)
        block[:3] += (6.0, 4.5, 3.0)
        blocks.append(rng.permutation(block))
    anchor = np.concatenate(blocks)
    spans = [slice(int(a), int(b)) for a, b in zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))]

    def noisy(base, sigma):
        return base + rng.normal(0, sigma, len(base))

    h100, cpu = get_target("h100"), get_target("cpu")
    for target, precision in ((h100, "bf16"), (cpu, "bf16")):
        bounds = target.bounds_for(precision)
        fixed = bounds.rank_bounds()

        def verdict(own, candidate):
            return judge(target, "candidate", candidate, References(anchor, "fp64", own, "bf16 reference"), spans,
                         precision=precision)

        close_own = noisy(anchor, 1e-3)  # a reference that ranks like the anchor: the fixed bounds
        assert verdict(close_own, noisy(close_own, 1e-3)).bounds["spearman"] == fixed["spearman"] == 0.995
        own = noisy(anchor, 0.2)  # Spearman ~0.992: below the fixed 0.995, as bf16 at depth may be
        own_metrics = ParityMetrics.compute(anchor, own, spans, bounds.tie_bits)
        assert own_metrics.spearman < fixed["spearman"]
        faithful = verdict(own, noisy(own, 0.02))
        assert faithful.passed, faithful.failures
        assert faithful.bounds["spearman"] == pytest.approx(1 - 1.5 * (1 - own_metrics.spearman))
        assert fixed["spearman"] > faithful.bounds["spearman"] > bounds.rank_floor[0]
        assert faithful.metrics.spearman < fixed["spearman"]  # the fixed bounds would have refused it
        worse = verdict(own, noisy(anchor, 0.3))  # independent error of 1.5x the size: ~2.2x the disagreement
        assert bounds.rank_floor[0] < worse.metrics.spearman < worse.bounds["spearman"]
        assert any(f.startswith("spearman") and "1.5 x what the own reference loses" in f for f in worse.failures)
        coarse = noisy(anchor, 0.5)  # a reference that ranks below the floor: bf16 is too coarse for this model
        floored = verdict(coarse, noisy(coarse, 0.02))
        assert floored.bounds["spearman"] == bounds.rank_floor[0]
        assert any(f.startswith("spearman") and "the floor" in f and "build it in fp32" in f for f in floored.failures)
        looser = dataclasses.replace(bounds, min_spearman=0.97)  # a fixed bound below the floor stays the bound
        assert looser.rank_bounds(floored.reference_lowp_metrics)["spearman"] == 0.97
    for name in ("fp32", "int8"):
        bounds = CPU_PRECISIONS[name].bounds
        assert bounds.rank_ratio is None and bounds.rank_bounds(own_metrics) == bounds.rank_bounds()
