"""chrF (0-1) via sacrebleu defaults: character 6-grams, beta 2, no word n-grams.

Used by the "generic" task because it needs no tokenizer and no Java.
"""

from typing import Sequence

from sacrebleu.metrics import CHRF

from .bleu import reference_streams


def chrf(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return CHRF().corpus_score(list(hyps), reference_streams(refs)).score / 100.0
