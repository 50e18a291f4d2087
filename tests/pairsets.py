"""Pair sets for parity tests: fresh random text at awkward lengths (in tokens, template included)."""

from __future__ import annotations

import random

from ettin_export.synthetic.lengths import AWKWARD_LENGTHS
from ettin_export.synthetic.text import random_sentence



def parity_pairs(encoder, seed: int, count: int = 220, max_words: int = 700) -> list[tuple[str, str]]:
    """`count` pairs from 3 tokens (empty query and document) to beyond the encoder's max_length,
    including one pair at each awkward length that fits, long queries with long documents, and
    many short pairs, shuffled."""
    rng = random.Random(seed)
    # Edge pairs first: empty query and document (3 tokens: [CLS] [SEP] [SEP]), one-token texts.
    candidates = [("", ""), ("", "a"), ("a", ""), ("b", "c")]
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.15:
            pair = (random_sentence(rng, rng.randint(0, 3)), random_sentence(rng, rng.randint(0, 4)))
        elif kind < 0.3:  # query and document both long
            pair = (random_sentence(rng, rng.randint(60, 250)), random_sentence(rng, rng.randint(60, max_words)))
        else:
            pair = (random_sentence(rng, rng.randint(1, 20)), random_sentence(rng, rng.randint(0, max_words)))
        candidates.append(pair)
    lengths = [len(ids) for ids in encoder.encode(candidates)]
    chosen = {}
    shortest = min(lengths)  # the pair template alone: 3 for [CLS] A [SEP] B [SEP], 4 with a double [SEP]
    for target in AWKWARD_LENGTHS:
        if shortest <= target <= encoder.max_length:
            index = next((i for i, n in enumerate(lengths) if n == target), None)
            assert index is not None, f"no candidate pair of exactly {target} tokens"
            chosen[index] = True
    truncated = [i for i, n in enumerate(lengths) if n == encoder.max_length]
    chosen.update({i: True for i in truncated[:10]})
    for i in rng.sample(range(len(candidates)), len(candidates)):
        if len(chosen) >= count:
            break
        chosen[i] = True
    pairs = [candidates[i] for i in chosen]
    rng.shuffle(pairs)
    return pairs
