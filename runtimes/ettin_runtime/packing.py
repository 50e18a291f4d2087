"""Tokenize (query, document) pairs exactly as sentence-transformers' CrossEncoder does, then pack them
with no padding at all: the inputs every backend (PyTorch, ONNX Runtime, TensorRT, Triton) consumes.

numpy + tokenizers only: no torch, no transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# transformers' "no limit" sentinel for model_max_length (tokenization_utils_base.VERY_LARGE_INTEGER).
_VERY_LARGE_INTEGER = int(1e30)

Pair = tuple[str, str]


try:  # inside the ettin_runtime package: under the project's one error root
    from .checks import whole_number
    from .errors import EttinError

    _ERROR_BASES: tuple[type, ...] = (EttinError, ValueError)
except ImportError:  # copied alone into a Triton model repository (as ettin_packing.py)
    _ERROR_BASES = (ValueError,)

    def whole_number(value, *, minimum: int = 1, allow_numpy: bool = False) -> bool:
        """ettin_runtime.checks.whole_number, for this file on its own."""
        kinds = (int, np.integer) if allow_numpy else int
        return isinstance(value, kinds) and not isinstance(value, bool) and value >= minimum


class PackingError(*_ERROR_BASES):
    """A setting or input the packer cannot use; the message says what to pass instead."""


class PairInputError(PackingError):
    """A pair that is not (str, str)."""


class TokenizerMissing(PackingError, FileNotFoundError):
    """A folder without the tokenizer.json that every runtime tokenizes with."""


@dataclass(frozen=True)
class PackedBatch:
    """One batch in flash-attention's varlen layout."""

    input_ids: np.ndarray  # int32 [T]
    position_ids: np.ndarray  # int32 [T], restarting at 0 for each pair
    cu_seqlens: np.ndarray  # int32 [B+1]: 0, len0, len0+len1, ..., T
    max_seqlen: int
    order: np.ndarray  # int64 [B]: the caller's index of each packed pair

    @property
    def num_pairs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


def resolve_max_length(checkpoint_dir: str | Path, override: int | None = None) -> int:
    """CrossEncoder's max-length rule, read from a saved checkpoint folder.

    An explicit override wins; then the Transformer module's saved `max_seq_length`
    (sentence_bert_config.json, which CrossEncoder reads only through modules.json); otherwise the
    smaller of the tokenizer's `model_max_length` and the model's `max_position_embeddings`."""
    root = Path(checkpoint_dir)
    if override is not None:
        check_max_length(override, smallest_max_length_of(root))
        positions = read_json(root / "config.json").get("max_position_embeddings")
        if positions not in (None, -1) and override > int(positions):
            raise PackingError(
                f"max_length {override} is beyond the model's {positions} positions (max_position_embeddings in "
                f"{root / 'config.json'}); pass at most {positions}."
            )
        return int(override)
    st_config = read_json(root / "sentence_bert_config.json") if (root / "modules.json").is_file() else {}
    if st_config.get("max_seq_length") is not None:
        return check_max_length(st_config["max_seq_length"], smallest_max_length_of(root),
                                where=f" (max_seq_length in {root / 'sentence_bert_config.json'})")
    tokenizer_limit = read_json(root / "tokenizer_config.json").get("model_max_length") or _VERY_LARGE_INTEGER
    model_limit = read_json(root / "config.json").get("max_position_embeddings")
    limits = [int(tokenizer_limit)] + ([int(model_limit)] if model_limit not in (None, -1) else [])
    limit = min(limits)
    if limit >= _VERY_LARGE_INTEGER:
        raise PackingError(
            f"{root} sets no maximum length (no max_seq_length, tokenizer model_max_length or "
            "max_position_embeddings): pass max_length explicitly."
        )
    return check_max_length(limit, smallest_max_length_of(root), where=f" (the limit {root} sets)")


def smallest_max_length(tokenizer: Tokenizer) -> int:
    """The pair template's special tokens and one token each of query and document. Below the template's
    own count the tokenizers library does not truncate at all (a 1 MB document stays whole), and at it
    every pair would be the special tokens alone."""
    return tokenizer.num_special_tokens_to_add(is_pair=True) + 2


def smallest_max_length_of(root: str | Path) -> int:
    """`smallest_max_length` of the tokenizer.json in `root`; 2 when there is none (it is refused, by
    name, when a runtime loads it)."""
    tokenizer_file = Path(root) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return 2
    try:
        return smallest_max_length(Tokenizer.from_file(str(tokenizer_file)))
    except Exception:  # noqa: BLE001 - a broken tokenizer.json is named where it is loaded
        return 2


def check_max_length(value, smallest: int, where: str = "") -> int:
    """`value` as a max length of at least `smallest` tokens, or a PackingError saying what to pass."""
    if not whole_number(value, minimum=smallest, allow_numpy=True):
        template = f"the pair template's {smallest - 2} special tokens and " if smallest > 2 else ""
        raise PackingError(
            f"max_length must be an integer of at least {smallest} tokens ({template}one token each of query and "
            f"document; below the template's own count the tokenizer does not truncate at all), got {value!r}"
            f"{where}. Pass a max_length of {smallest} or more."
        )
    return int(value)


def read_json(path: Path):
    """A config file's JSON ({} when the file is absent); a broken one is named with what to do."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PackingError(f"{path} is not valid JSON ({error}); repair it or save the checkpoint again.") from error


class PairEncoder:
    """Turns (query, document) pairs into token ids the way CrossEncoder's tokenizer call does:
    the tokenizer's own pair template, `longest_first` truncation to `max_length` (special tokens
    included), no padding. Any padding/truncation saved inside tokenizer.json is overridden."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, truncation_side: str = "right"):
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}.")
        self.max_length = check_max_length(max_length, smallest_max_length(tokenizer))
        self.truncation_side = truncation_side
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(
            max_length=self.max_length, stride=0, strategy="longest_first", direction=truncation_side
        )

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int | None = None) -> PairEncoder:
        """Load tokenizer.json (+ tokenizer_config.json) from a checkpoint or artifact folder."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerMissing(
                f"{root} has no tokenizer.json. ettin-export needs a fast (tokenizers) tokenizer file; "
                "re-save the tokenizer with transformers' save_pretrained to create one."
            )
        tokenizer_config = read_json(root / "tokenizer_config.json")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise PackingError(f"{tokenizer_file} cannot be read as a tokenizer ({error}); save the tokenizer "
                               "again with transformers' save_pretrained.") from error
        return cls(
            tokenizer,
            resolve_max_length(root, max_length),
            tokenizer_config.get("truncation_side", "right"),
        )

    def encode(self, pairs: Sequence[Pair]) -> list[np.ndarray]:
        """Token ids (int32) of each pair, in the caller's order."""
        queries, documents = _split_pairs(pairs)
        if not queries:
            return []
        try:
            encodings = self._tokenizer.encode_batch(list(zip(queries, documents)), add_special_tokens=True)
        except TypeError:  # the tokenizers library's answer to a str that is not text: name the pair instead
            for index, (query, document) in enumerate(zip(queries, documents)):
                for role, text in (("query", query), ("document", document)):
                    if (problem := not_text(text)) is not None:
                        raise PairInputError(f"Pair {index}: the {role} {problem}.") from None
            raise
        token_ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        for index, ids in enumerate(token_ids):
            if len(ids) > self.max_length:  # no runtime is ever handed a pair beyond the limit it was built for
                raise PackingError(
                    f"Pair {index} is {len(ids)} tokens after truncation to max_length {self.max_length}: the "
                    "tokenizer did not truncate it. Check the tokenizer's truncation settings, or report it."
                )
        return token_ids


def _split_pairs(pairs: Sequence[Pair]) -> tuple[list[str], list[str]]:
    queries, documents = [], []
    for index, pair in enumerate(pairs):
        if isinstance(pair, dict):
            pair = (pair.get("query"), pair.get("document"))
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise PairInputError(
                f"Pair {index} is {type(pair).__name__} {_preview(pair)}; expected a (query, document) "
                "tuple of two strings."
            )
        query, document = pair
        for role, text in (("query", query), ("document", document)):
            if not isinstance(text, str):
                raise PairInputError(
                    f"Pair {index}: the {role} is {type(text).__name__} {_preview(text)}, expected a string."
                )
        queries.append(query)
        documents.append(document)
    return queries, documents


def not_text(text: str) -> str | None:
    """What keeps a str from being text (a lone surrogate, as JSON's "\\udc80" escape makes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds a lone surrogate {text[error.start]!r} at character {error.start}, which is no character (a "
                "JSON escape such as \\udc80 makes one); remove it, or decode the source with errors='replace'")
    return None


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cu_seqlens_of(lengths) -> np.ndarray:
    """flash-attention's offsets of pairs of these lengths: int32 [B+1] = 0, len0, len0+len1, ..., T."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return cu_seqlens


def pack(token_ids: Sequence[np.ndarray], order: np.ndarray | None = None) -> PackedBatch:
    """Concatenate pairs into one varlen batch. Every pair must have at least one token."""
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
    if len(lengths) == 0:
        raise ValueError("Cannot pack an empty batch.")
    if lengths.min() < 1:
        raise ValueError("Every packed pair needs at least one token.")
    cu_seqlens = cu_seqlens_of(lengths)
    total = int(cu_seqlens[-1])
    input_ids = np.concatenate(token_ids).astype(np.int32, copy=False)
    position_ids = (np.arange(total, dtype=np.int32) - np.repeat(cu_seqlens[:-1], lengths)).astype(np.int32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        order=np.arange(len(lengths)) if order is None else np.asarray(order, dtype=np.int64),
    )


def plan_batches(lengths: Sequence[int], max_tokens: int, max_pairs: int) -> list[np.ndarray]:
    """Cut pairs into batches of at most `max_pairs` pairs and `max_tokens` tokens, longest first.

    Returns the caller's indices for each batch. A pair longer than `max_tokens` cannot occur when
    `max_tokens >= max_length` (pairs are truncated first); it would get a batch of its own."""
    if max_pairs < 1 or max_tokens < 1:
        raise ValueError(f"max_pairs and max_tokens must be positive, got {max_pairs} and {max_tokens}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, tokens = 0, 0
    for position, index in enumerate(order):
        length = int(lengths[index])
        count = position - start
        if count and (count >= max_pairs or tokens + length > max_tokens):
            batches.append(order[start:position])
            start, tokens = position, 0
        tokens += length
    if len(order):
        batches.append(order[start:])
    return batches


def packed_batches(
    token_ids: Sequence[np.ndarray], max_tokens: int, max_pairs: int
) -> list[PackedBatch]:
    """Plan and pack: each batch remembers which caller indices it holds."""
    plan = plan_batches([len(ids) for ids in token_ids], max_tokens, max_pairs)
    return [pack([token_ids[i] for i in indices], order=indices) for indices in plan]
