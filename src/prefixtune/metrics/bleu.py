"""Corpus BLEU (0-1) via sacrebleu, set up to match two reference scripts.

* `mteval_bleu`: NIST mteval-v13a as e2e-metrics runs it (case-insensitive, 13a
  tokenization, and mteval's smoothing, which sacrebleu calls "exp").
* `multi_bleu`: Moses multi-bleu.perl as the WebNLG 2017 scripts run it on text they
  have already lower-cased and tokenized: whitespace tokens, no smoothing.
"""

from typing import Sequence

from sacrebleu.metrics import BLEU


def mteval_metric() -> BLEU:
    """mteval-v13a as e2e-metrics runs it. force=True only silences sacrebleu's "looks tokenized" warning."""
    return BLEU(lowercase=True, tokenize="13a", smooth_method="exp", force=True)


def multi_bleu_metric() -> BLEU:
    """multi-bleu.perl on text already lower-cased and tokenized: whitespace tokens, no smoothing."""
    return BLEU(lowercase=False, tokenize="none", smooth_method="none", force=True)


def mteval_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return mteval_metric().corpus_score(list(hyps), reference_streams(refs)).score / 100.0


def multi_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return multi_bleu_metric().corpus_score(list(hyps), reference_streams(refs)).score / 100.0


def reference_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-item reference lists -> sacrebleu's reference streams (one per position).

    Items with fewer references are padded with None, which sacrebleu skips; an empty
    string would instead count as a zero-length reference in the brevity penalty.
    """
    width = max(len(item) for item in refs)
    return [[item[k] if k < len(item) else None for item in refs] for k in range(width)]
