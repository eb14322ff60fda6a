"""Optional model-based metrics (BERTScore): used when the package and its weights are present.

They need a pretrained scorer model that is usually downloaded from a hub; when it cannot be had,
evaluation goes on without it and says so, instead of failing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def model_based_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], lang: str = "en") -> tuple[dict, list[str]]:
    """Returns (scores, notes): {'bertscore_f1': ...} when computable, else {} and a note why not."""
    if importlib.util.find_spec("bert_score") is None:
        return {}, ["BERTScore skipped: the bert-score package is not installed (pip install bert-score)"]
    try:
        # bert_score: optional dependency (not installed by default), only for BERTScore
        from bert_score import score as bert_score

        _, _, f1 = bert_score(list(hyps), [list(r) for r in refs], lang=lang, verbose=False)
    except Exception as e:  # no weights offline, hub unreachable, ...
        return {}, [f"BERTScore skipped: its scorer model could not be loaded ({type(e).__name__}: {e})"]
    return {"bertscore_f1": float(f1.mean())}, []
