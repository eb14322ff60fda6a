"""METEOR, ROUGE-L and CIDEr the way the MS-COCO caption evaluation computes them.

This is the half of e2e-metrics that runs COCOEvalCap: PTB-tokenize and lower-case all
texts (punctuation dropped), then score with pycocoevalcap's scorers. ROUGE-L (F with
beta 1.2, best precision/recall over references) and CIDEr-D (n=4, sigma=6, idf from
the references of this corpus) are pycocoevalcap's own Python classes.
"""

from typing import Sequence

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from .meteor import meteor
from .ptb import ptb_tokenize


def coco_tokenize(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenize hypotheses and references in one JVM run (the tokenizer is line-wise)."""
    flat = list(hyps) + [ref for item in refs for ref in item]
    tokens = ptb_tokenize(flat)
    tok_hyps, rest = tokens[: len(hyps)], iter(tokens[len(hyps) :])
    tok_refs = [[next(rest) for _ in item] for item in refs]
    return tok_hyps, tok_refs


def coco_rouge_l(tok_hyps: list[str], tok_refs: list[list[str]]) -> float:
    gts, res = _as_coco(tok_hyps, tok_refs)
    return float(Rouge().compute_score(gts, res)[0])


def coco_cider(tok_hyps: list[str], tok_refs: list[list[str]]) -> float:
    gts, res = _as_coco(tok_hyps, tok_refs)
    return float(Cider().compute_score(gts, res)[0])


def coco_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """meteor, rouge_l and cider of raw (untokenized) texts, as e2e-metrics reports them."""
    tok_hyps, tok_refs = coco_tokenize(hyps, refs)
    return {
        "meteor": meteor(tok_hyps, tok_refs),
        "rouge_l": coco_rouge_l(tok_hyps, tok_refs),
        "cider": coco_cider(tok_hyps, tok_refs),
    }


def _as_coco(tok_hyps: list[str], tok_refs: list[list[str]]) -> tuple[dict, dict]:
    # pycocoevalcap scorers take {id: [refs...]} and {id: [hyp]}.
    return dict(enumerate(tok_refs)), {i: [hyp] for i, hyp in enumerate(tok_hyps)}
