"""TER (0-1, lower is better) via sacrebleu, which reimplements tercom 0.7.25.

Defaults match tercom's: case-insensitive, no extra normalization, punctuation kept.
With several references, edits go to the closest one and are divided by the average
reference length, as tercom does.
"""

from typing import Sequence

from sacrebleu.metrics import TER

from .bleu import reference_streams


def ter(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return TER().corpus_score(list(hyps), reference_streams(refs)).score / 100.0
