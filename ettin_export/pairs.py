"""(query, document) pairs as data, without torch: the JSON-lines file format every command reads
(`score`, `verify --pairs`, `bench --lengths FILE`)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from ettin_runtime.errors import EttinError
from ettin_runtime.packing import not_text

class PairsFileError(EttinError, ValueError):
    """A pairs file that cannot be read or does not hold {"query": str, "document": str} lines."""


def read_pairs_jsonl(path: str | Path, allow_empty: bool = False) -> list[tuple[str, str]]:
    """JSON lines of {"query": "...", "document": "..."} ("-" reads standard input); blank lines are
    skipped. Errors name the file and line and show what was found there."""
    try:
        handle = _stdin_bytes() if str(path) == "-" else open(path, "rb")
    except OSError as error:
        raise PairsFileError(f"cannot read pairs file {path}: {error.strerror}") from error
    pairs = []
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM (Windows editors) is no text
            except UnicodeDecodeError as error:
                raise PairsFileError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PairsFileError(f"{path}:{number}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("query", "document")):
                raise PairsFileError(
                    f'{path}:{number}: expected {{"query": "...", "document": "..."}} with string values, '
                    f"got {line.strip()[:80]}"
                )
            for role in ("query", "document"):
                if (problem := not_text(record[role])) is not None:
                    raise PairsFileError(f"{path}:{number}: the {role} {problem}.")
            pairs.append((record["query"], record["document"]))
    if not pairs and not allow_empty:
        raise PairsFileError(f"{path} holds no pairs.")
    return pairs


def _stdin_bytes():
    """Standard input as bytes (a text stream put in its place, as by a test or an embedding app, is encoded)."""
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer if buffer is not None else io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))
