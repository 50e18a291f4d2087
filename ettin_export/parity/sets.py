"""Parity sets: queries with 30-100 candidate documents each, so that ranking metrics (top-1
agreement, top-10 overlap) mean something beside the score differences. The built-in set is fresh
random text of NQ-like lengths with a share of over-long and near-empty documents; a user's set is a
JSON-lines pairs file grouped by query."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from ettin_export.pairs import read_pairs_jsonl
from ettin_export.synthetic.text import random_sentence

Group = tuple[str, list[str]]  # (query, candidate documents)


def builtin_parity_set(seed: int = 0, queries: int = 10) -> list[Group]:
    """Queries of 3-20 words with 30-100 candidates each; documents mostly 20-200 words (NQ-like
    passages), some beyond 512 tokens (truncated), a few empty or one word."""
    rng = random.Random(seed)
    groups = []
    for _ in range(queries):
        query = random_sentence(rng, rng.randint(3, 20)) + "?"
        documents = []
        for _ in range(rng.randint(30, 100)):
            roll = rng.random()
            if roll < 0.03:
                documents.append(rng.choice(["", "yes", random_sentence(rng, 1)]))
            elif roll < 0.10:
                documents.append(random_sentence(rng, rng.randint(450, 700)))
            else:
                documents.append(random_sentence(rng, rng.randint(20, 200)) + ".")
        groups.append((query, documents))
    return groups


def read_parity_file(path: str | Path) -> list[Group]:
    """JSON lines {"query", "document"}; documents are grouped by their query, in file order."""
    groups: dict[str, list[str]] = {}
    for query, document in read_pairs_jsonl(path):
        groups.setdefault(query, []).append(document)
    return list(groups.items())


def flatten(groups: Sequence[Group]) -> tuple[list[tuple[str, str]], list[slice]]:
    pairs, spans = [], []
    for query, documents in groups:
        spans.append(slice(len(pairs), len(pairs) + len(documents)))
        pairs.extend((query, d) for d in documents)
    return pairs, spans
