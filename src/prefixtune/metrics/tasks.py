"""`score(task, hyps, refs)`: the metric set each benchmark reports, computed the way its
official script computes it.

| task    | keys                                  | reference script |
|---------|---------------------------------------|------------------|
| e2e     | bleu, nist, meteor, rouge_l, cider    | tuetschek/e2e-metrics (mteval-v13a + MS-COCO caption eval) |
| webnlg  | bleu, meteor, ter                     | WebNLG 2017 challenge scripts (multi-bleu -lc, METEOR 1.5 -norm, tercom 0.7.25), first 3 references |
| dart    | bleu, meteor, ter                     | same as webnlg (DART's evaluation folder reuses those scripts) |
| xsum    | rouge1, rouge2, rougeL                | rouge-score, stemming, mean F-measure |
| generic | bleu, rouge_l, chrf                   | E2E's BLEU and ROUGE-L, plus sacrebleu chrF |
| accuracy | accuracy                             | classification (BoolQ): the predicted label equals the first reference |

All values are on a 0-1 scale except nist and cider. ter is lower-is-better. Java is
needed for meteor (e2e, webnlg, dart) and for the PTB tokenizer behind rouge_l/cider
(e2e, generic); xsum needs no Java.
"""

import contextlib
from typing import Callable, ContextManager, Sequence

from .bleu import mteval_bleu, multi_bleu
from .chrf import chrf
from .coco import coco_rouge_l, coco_scores, coco_tokenize
from .meteor import meteor, shared_meteor
from .nist import nist
from .rouge import rouge
from .ter import ter
from .validate import check_inputs
from .webnlg import normalize_hypothesis, normalize_reference

# The 2017 scripts write reference files 0..2 only and score against those three.
WEBNLG_MAX_REFS = 3


def _e2e(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    coco = coco_scores(hyps, refs)
    return {
        "bleu": mteval_bleu(hyps, refs),
        "nist": nist(hyps, refs),
        "meteor": coco["meteor"],
        "rouge_l": coco["rouge_l"],
        "cider": coco["cider"],
    }


def webnlg_texts(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """What the 2017 scripts score: normalized outputs, the first 3 normalized references of each item, and
    those references padded to 3 with empty ones, as multi-bleu.perl reads them (for BLEU only)."""
    norm_hyps = [normalize_hypothesis(h) for h in hyps]
    norm_refs = [[normalize_reference(r) for r in item[:WEBNLG_MAX_REFS]] for item in refs]
    # multi-bleu.perl reads the blank lines that pad short items in reference files 1-2
    # as zero-length references, which can win the closest-length brevity choice.
    padded = [item + [""] * (WEBNLG_MAX_REFS - len(item)) for item in norm_refs]
    return norm_hyps, norm_refs, padded


def _webnlg(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    norm_hyps, norm_refs, padded = webnlg_texts(hyps, refs)
    return {
        "bleu": multi_bleu(norm_hyps, padded),
        "meteor": meteor(norm_hyps, norm_refs),
        "ter": ter(norm_hyps, norm_refs),
    }


def _xsum(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    return rouge(hyps, refs)


def _generic(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    tok_hyps, tok_refs = coco_tokenize(hyps, refs)
    return {
        "bleu": mteval_bleu(hyps, refs),
        "rouge_l": coco_rouge_l(tok_hyps, tok_refs),
        "chrf": chrf(hyps, refs),
    }


def _accuracy(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    # one gold label per item (the first reference), compared after stripping whitespace
    return {"accuracy": sum(h.strip() == r[0].strip() for h, r in zip(hyps, refs)) / len(hyps)}


_SCORERS: dict[str, Callable[[list[str], list[list[str]]], dict[str, float]]] = {
    "e2e": _e2e,
    "webnlg": _webnlg,
    "dart": _webnlg,
    "xsum": _xsum,
    "generic": _generic,
    "accuracy": _accuracy,
}
TASKS = tuple(_SCORERS)
_METEOR_TASKS = ("e2e", "webnlg", "dart")


def scorer_ready(task: str) -> ContextManager:
    """A block within which `score(task, ...)` finds its slow parts started (METEOR's JVM, for the tasks
    that report METEOR): enter it before decoding, score inside it."""
    return shared_meteor() if task in _METEOR_TASKS else contextlib.nullcontext()


def score(task: str, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus-level scores of `hyps` (one string per item) against `refs` (one non-empty
    list of reference strings per item; the count may differ between items)."""
    scorer = _SCORERS.get(task) if isinstance(task, str) else None
    if scorer is None:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    checked_hyps, checked_refs = check_inputs(hyps, refs)
    return scorer(checked_hyps, checked_refs)
