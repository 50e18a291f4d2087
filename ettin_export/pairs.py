"""(query, document) pairs as data, without torch: the JSON-lines file format every command reads
(`score`, `verify --pairs`, `bench --lengths FILE`) and the word list that generated text is made of."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = """
the of and to in is was for on that with as by at from his an were are which this be or has had not but
their first also its new after who they have her she two been other when there all during into school time
may years more most only over city some world would where later up such used many can state about national
out known university united then made he it one year three part between both under well while since game
area through season history government number early four best following became people film series second
album north public life south work name same band team won music member group several each because including
although released american called until season major any like house began war being river end family these
against three around within small another could old based american long church local along high center set
include top final system different company program last children following club league original york west
award led third last record station period however field home took born five main development village days
law term population international served population production power great form late street general took
support line council career town following king due again common county region english water did whether
construction office own started great radio land land side point head among process college official east
order although built released book left less service president central court army held way media design
river language village king character final across established black several song further health open major
""".split()


def random_sentence(rng: random.Random, n_words: int) -> str:
    """Text of about n_words tokens under the generated tokenizer (each word is one or two tokens)."""
    words = [rng.choice(WORDS) for _ in range(max(0, n_words))]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words)


class PairsFileError(ValueError):
    """A pairs file that cannot be read or does not hold {"query": str, "document": str} lines."""


def read_pairs_jsonl(path: str | Path, allow_empty: bool = False) -> list[tuple[str, str]]:
    """JSON lines of {"query": "...", "document": "..."} ("-" reads standard input); blank lines are
    skipped. Errors name the file and line and show what was found there."""
    try:
        handle = sys.stdin if str(path) == "-" else open(path, encoding="utf-8")
    except OSError as error:
        raise PairsFileError(f"cannot read pairs file {path}: {error.strerror}") from error
    pairs = []
    with handle:
        for number, line in enumerate(handle, start=1):
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
            pairs.append((record["query"], record["document"]))
    if not pairs and not allow_empty:
        raise PairsFileError(f"{path} holds no pairs.")
    return pairs
