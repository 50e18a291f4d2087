"""Token-length profiles for benchmarks, as data: what (query, document) pairs `ettin-export bench` scores.

A profile fixes the distribution of query and document lengths *in tokens* (the tokenizer's own
tokens, special tokens excluded); text is generated from the project's word list so that, under the
tokenizer of the model being measured, every query and document has exactly its sampled token count
(verified by tokenizing, see `make_pairs`). Each pair then gets the tokenizer's pair template
(`[CLS] query [SEP] document [SEP]`: +3 tokens) and CrossEncoder's `longest_first` truncation at
`max_length` (512, as in the published benchmark), which trims the document of a long pair.

Lengths are log-normal (`median`, `sigma` of the log), rounded to integers and clipped to
[`low`, `high`]. Statistics below are of 200,000 samples (p5 / median / p95; "at low" is the share
clipped up to `low`):

nq-like — Natural Questions pairs as the published Ettin benchmark runs them
(sentence-transformers/natural-questions, documents truncated at max_length 512):
    query     median 11.3, sigma 0.35, clipped to [4, 48]:    mean 12.0, p5 6, median 11, p95 20;
              0.45 % at low
    document  median 90, sigma 0.55, clipped to [16, 1024]:   mean 104.5 (sd 62), p5 36, median 90,
              p95 222; 0.12 % at low
    pair      mean 119.4 tokens, p5 51, median 105, p95 237; 0.10 % truncated at 512
short — titles or snippets against a short query:
    query     median 7, sigma 0.30, clipped to [2, 24]:       mean 7.3, p5 4, median 7, p95 11
    document  median 32, sigma 0.40, clipped to [8, 128]:     mean 34.6 (sd 14), p5 17, median 32, p95 62
    pair      mean 44.9 tokens, p5 26, median 42, p95 72; none truncated
long — full passages, a third of them cut at the 512-token limit:
    query     median 14, sigma 0.35, clipped to [4, 64]:      mean 14.9, p5 8, median 14, p95 25
    document  median 420, sigma 0.35, clipped to [128, 2048]: mean 446 (sd 161), p5 236, median 420, p95 746
    pair      mean 420 tokens, p5 254, median 438, p95 512; 31.8 % truncated at 512

A user file is JSON lines of {"query": ..., "document": ...}, used as is (`read_pairs_file`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ettin_runtime.errors import EttinError

from ettin_export.pairs import PairsFileError, read_pairs_jsonl
from ettin_export.synthetic.text import WORDS

# Lengths in tokens where packed attention goes wrong first (flash-attention's habit): one token, the
# 3-4 tokens of an empty pair's template, both sides of the local window (half-width 64) and of tile and
# power-of-two edges, and one beyond 512. Tests and kernel checks draw their cases from these.
AWKWARD_LENGTHS = (1, 3, 4, 63, 64, 65, 127, 128, 129, 130, 513)

# The published benchmark truncates pairs at 512 tokens; the profiles' statistics above are at that
# length. A benchmark truncates at the model's own max_length (pass --max-length 512 to match).
PUBLISHED_MAX_LENGTH = 512


@dataclass(frozen=True)
class TokenDistribution:
    """Log-normal token counts: round(exp(N(ln median, sigma))), clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        raw = rng.lognormal(np.log(self.median), self.sigma, count)
        return np.clip(np.rint(raw), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class LengthProfile:
    name: str
    description: str
    query: TokenDistribution
    document: TokenDistribution
    # Expected statistics (documented above; the tests check generated pairs against them).
    query_mean: float
    document_mean: float
    truncated_share: float  # of pairs longer than max_length, before truncation
    max_length: int = PUBLISHED_MAX_LENGTH  # the length the documented statistics are taken at

    def token_lengths(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(query tokens, document tokens) of `count` pairs, special tokens excluded."""
        rng = np.random.default_rng(seed)
        return self.query.sample(rng, count), self.document.sample(rng, count)


PROFILES: dict[str, LengthProfile] = {
    p.name: p
    for p in (
        LengthProfile(
            "nq-like", "Natural Questions pairs as in the published benchmark (query ~12, document ~105 tokens)",
            TokenDistribution(11.3, 0.35, 4, 48), TokenDistribution(90.0, 0.55, 16, 1024),
            query_mean=12.0, document_mean=104.5, truncated_share=0.001,
        ),
        LengthProfile(
            "short", "titles or snippets (query ~7, document ~35 tokens)",
            TokenDistribution(7.0, 0.30, 2, 24), TokenDistribution(32.0, 0.40, 8, 128),
            query_mean=7.3, document_mean=34.6, truncated_share=0.0,
        ),
        LengthProfile(
            "long", "full passages (query ~15, document ~446 tokens, a third cut at 512)",
            TokenDistribution(14.0, 0.35, 4, 64), TokenDistribution(420.0, 0.35, 128, 2048),
            query_mean=14.9, document_mean=446.0, truncated_share=0.318,
        ),
    )
}


class LengthsError(EttinError, ValueError):
    """An unknown profile or an unreadable pairs file; the message says what to pass instead."""


def get_profile(name: str) -> LengthProfile:
    if name not in PROFILES:
        raise LengthsError(
            f"Unknown length profile {name!r}. Known: {', '.join(PROFILES)}; or pass a JSON-lines file of "
            '{"query": ..., "document": ...} pairs.'
        )
    return PROFILES[name]


class _WordTokens:
    """Token counts of each word under one tokenizer: as the first word of a text, and after a space.

    Byte-level BPE never merges across pre-tokens (a word and its leading space), so a text's token
    count is the sum of its words' counts; `make_text` still verifies every text by tokenizing it."""

    def __init__(self, tokenizer):
        self.tokenizer = plain_tokenizer(tokenizer)
        words = sorted(set(WORDS))
        self.words = words
        self.first = np.array([self.count(w) for w in words])
        self.inner = np.array([self.count(" " + w) for w in words])

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def make_text(self, rng: random.Random, target: int) -> str:
        """Text of exactly `target` tokens (0 gives the empty string)."""
        for _ in range(20):
            text = self._draw(rng, target)
            if self.count(text) == target:
                return text
        raise LengthsError(
            f"could not make a text of exactly {target} tokens from the word list under this tokenizer "
            "(its pre-tokenizer merges across words); use a JSON-lines pairs file instead."
        )

    def _draw(self, rng: random.Random, target: int) -> str:
        chosen: list[str] = []
        remaining = target
        while remaining > 0:
            counts = self.inner if chosen else self.first
            fitting = np.flatnonzero(counts <= remaining)
            if len(fitting) == 0:  # no first word short enough: start with a space-prefixed word
                fitting, counts = np.flatnonzero(self.inner <= remaining), self.inner
                chosen.append("")
            index = int(fitting[rng.randrange(len(fitting))])
            chosen.append(self.words[index])
            remaining -= int(counts[index])
        return " ".join(chosen)


def plain_tokenizer(tokenizer):
    """A copy without truncation or padding, so counting a 1,000-token document gives 1,000."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def make_pairs(profile: LengthProfile, tokenizer, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (query, document) pairs whose texts have exactly the profile's sampled token counts under
    `tokenizer` (a `tokenizers.Tokenizer`, e.g. `PairEncoder._tokenizer`, or anything with
    `encode(text, add_special_tokens=False).ids`)."""
    query_tokens, document_tokens = profile.token_lengths(count, seed)
    words = _WordTokens(tokenizer)
    rng = random.Random(seed)
    return [(words.make_text(rng, int(q)), words.make_text(rng, int(d))) for q, d in zip(query_tokens, document_tokens)]


def read_pairs_file(path: str | Path) -> list[tuple[str, str]]:
    """JSON lines with "query" and "document" strings (`pairs.read_pairs_jsonl`)."""
    try:
        return read_pairs_jsonl(path)
    except PairsFileError as error:
        raise LengthsError(str(error)) from error


def load_pairs(lengths: str, tokenizer, count: int, seed: int = 0) -> tuple[list[tuple[str, str]], str]:
    """A profile name or a JSON-lines file -> (pairs, description). A file is used whole, or its first
    `count` pairs when it holds more."""
    if lengths in PROFILES:
        profile = PROFILES[lengths]
        return make_pairs(profile, tokenizer, count, seed), f"{profile.name}: {profile.description}"
    if Path(lengths).is_file():
        pairs = read_pairs_file(lengths)
        return pairs[:count] if count else pairs, f"file {lengths}"
    raise LengthsError(
        f"--lengths {lengths!r} is neither a profile ({', '.join(PROFILES)}) nor an existing JSON-lines file "
        'of {"query": ..., "document": ...} pairs.'
    )


def length_statistics(pairs: list[tuple[str, str]], tokenizer, max_length: int) -> dict:
    """Measured token statistics of pairs under `tokenizer`: query and document alone (no special
    tokens), the pair with its template before truncation, and the share cut at `max_length`."""
    tokenizer = plain_tokenizer(tokenizer)
    queries = np.array([len(e.ids) for e in tokenizer.encode_batch([q for q, _ in pairs], add_special_tokens=False)])
    documents = np.array([len(e.ids) for e in tokenizer.encode_batch([d for _, d in pairs], add_special_tokens=False)])
    overhead = len(tokenizer.encode("", "", add_special_tokens=True).ids)
    full = queries + documents + overhead
    packed = np.minimum(full, max_length)

    def describe(values: np.ndarray) -> dict:
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        return {"mean": float(values.mean()), "std": float(values.std()), "p5": float(p5), "median": float(p50),
                "p95": float(p95), "min": int(values.min()), "max": int(values.max())}

    return {
        "pairs": len(pairs), "max_length": max_length, "template_tokens": overhead,
        "query_tokens": describe(queries), "document_tokens": describe(documents),
        "pair_tokens": describe(packed), "truncated_share": float((full > max_length).mean()),
        "total_tokens": int(packed.sum()),
    }
