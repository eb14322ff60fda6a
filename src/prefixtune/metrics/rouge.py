"""ROUGE-1/2/L for summarization (XSum) with Google's rouge-score package.

Porter stemming on, F-measure per item (the best reference when there are several),
averaged over items. Keys follow rouge-score's names: rouge1, rouge2, rougeL
(sentence-level LCS, not rougeLsum).
"""

from typing import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, item in zip(hyps, refs):
        best = scorer.score_multi(list(item), hyp)
        for key in ROUGE_TYPES:
            totals[key] += best[key].fmeasure
    return {key: total / len(hyps) for key, total in totals.items()}
