"""Random text for tests, benchmarks and parity sets: a fixed word list, sentences and pairs of it.

The words are common English ones, so every tokenizer (the project's own BPE, a WordPiece, the real
ModernBERT one) turns them into a few tokens each; `synthetic.lengths` builds exact token counts on top.
"""

from __future__ import annotations

import random

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


def random_pairs(n: int, seed: int = 0, query_words=(2, 16), document_words=(4, 160)) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (random_sentence(rng, rng.randint(*query_words)), random_sentence(rng, rng.randint(*document_words)))
        for _ in range(n)
    ]
