"""NIST score exactly as mteval-v13a defines it (NLTK's corpus_nist differs).

* Text is lower-cased and tokenized with mteval's default ("13a") tokenizer.
* Information weight of an n-gram, from counts over *all reference sentences*:
  info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), and for unigrams
  log2(total reference words / count(w)).
* Score = sum over n=1..5 of (info of the hypothesis n-grams matched in the references,
  clipped to the largest count in any one reference) / (hypothesis n-grams, at least 1),
  times a length penalty exp(-beta * ln(r)^2) for r = hyp words / reference words < 1,
  with beta set so that r = 2/3 gives 0.5.
* The reference length is the sum over items of that item's *average* reference length.
  That is mteval-v13a's total-words / number-of-references when every item has the same
  number of references, and what e2e-metrics reports for variable counts (its padded
  Perl run would divide by the largest count instead).
"""

import math
from collections import Counter
from typing import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

MAX_N = 5
# Penalty 0.5 at a length ratio of 2/3 (mteval: ratio_x = 1.5, score_x = 0.5).
BETA = -math.log(0.5) / math.log(1.5) ** 2

_tokenize_13a = Tokenizer13a()


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's normalization (lower-case, then its default tokenizer)."""
    return _tokenize_13a(text.lower()).split()


def nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-BETA * math.log(ratio) ** 2)


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = MAX_N) -> float:
    tok_hyps = [mteval_tokens(h) for h in hyps]
    tok_refs = [[mteval_tokens(r) for r in item] for item in refs]

    # n-gram counts over every reference sentence; () holds the total word count.
    ref_counts: Counter = Counter()
    for item in tok_refs:
        for ref in item:
            ref_counts.update(_ngrams(ref, max_n))
            ref_counts[()] += len(ref)

    def info(gram: tuple[str, ...]) -> float:
        return math.log2(ref_counts[gram[:-1]] / ref_counts[gram])

    matched_info = [0.0] * (max_n + 1)
    hyp_ngrams = [0] * (max_n + 1)
    ref_length = 0.0
    for hyp, item in zip(tok_hyps, tok_refs):
        best = Counter()  # per n-gram, the largest count in any single reference
        for ref in item:
            best |= _ngrams(ref, max_n)
        for gram, count in _ngrams(hyp, max_n).items():
            if gram in best:
                matched_info[len(gram)] += info(gram) * min(count, best[gram])
        for n in range(1, max_n + 1):
            hyp_ngrams[n] += max(len(hyp) - n + 1, 0)
        ref_length += sum(len(ref) for ref in item) / len(item)

    score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, max_n + 1))
    penalty = nist_length_penalty(hyp_ngrams[1] / ref_length) if ref_length else 0.0
    return score * penalty


def _ngrams(words: list[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))
