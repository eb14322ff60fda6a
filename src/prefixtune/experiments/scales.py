"""How big an experiment is: its training sizes, seeds, step budget and evaluation size.

Scales: `paper` (the paper's sizes, seeds and recipe epochs), `quick` (fewer sizes/seeds, at most 200
steps under early stopping: about an hour per experiment where a SmolLM2-135M step takes ~1 s, as on a
2-core CPU with native bf16; several hours on an fp32-only one, measured in docs/results.md), `tiny`
(tests). The catalogue (catalogue.py) turns an experiment's spec and a scale into runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    sizes: tuple[int, ...]          # low-data training sizes (pairs)
    seeds: tuple[int, ...]          # each seed samples its own training set and seeds training
    full_size: int | None           # "full data" size for §7 ablations (None: the whole training split)
    max_steps: int | None           # cap on optimizer steps (None: the recipe's epochs)
    eval_limit: int | None          # evaluation sources per run (None: all)
    num_beams: int
    max_new_tokens: int
    epochs: int | None = None       # override of the recipe's epochs (low data needs more passes)
    # steps capped at a few hundred: each method's grid is centred on its `short_run_learning_rate` where
    # it has one (protocol.centre_learning_rate; the recipes carry long-run rates, set for thousands of steps)
    short_run: bool = False
    # held-out questions a classifier (a method of kind "classifier") is scored on: one forward pass
    # each, so many more than generation sources; accuracy on 40 would have a standard error of about
    # 0.08, on 1,000 about 0.015
    classifier_eval: int | None = None
    # the budget rule (protocol.py): dev loss every `eval_every` steps, stop after `patience` evaluations
    # without improvement, at most `max_steps`; None: the recipe's epochs with one evaluation each
    eval_every: int | None = None
    patience: int | None = None
    warmup_steps: int | None = None


SCALES = {
    "paper": Scale(sizes=(50, 100, 200, 500), seeds=(0, 1, 2, 3, 4), full_size=None, max_steps=None,
                   eval_limit=None, num_beams=5, max_new_tokens=60),
    # quick: three seeds, 200 evaluation sources, early stopping (dev loss every 10 steps, patience 3) under
    # a 200-step cap. The rates searched around: the recipes carry the paper's long-run rates (8e-5 for
    # the prefix on E2E), set for thousands of steps; at a few hundred steps the prefix and the adapter
    # start their grid at 1e-3, their `short_run_learning_rate` (measured 2026-11-28: E2E n50, prefix
    # at 8e-5 still falling at step 80)
    "quick": Scale(sizes=(50, 200), seeds=(0, 1, 2), full_size=200, max_steps=200, eval_limit=200, num_beams=1,
                   max_new_tokens=60, epochs=1000, short_run=True, classifier_eval=1000,
                   eval_every=10, patience=3, warmup_steps=10),
    "tiny": Scale(sizes=(20, 40), seeds=(0,), full_size=40, max_steps=4, eval_limit=4, num_beams=1,
                  max_new_tokens=6, epochs=2, classifier_eval=4, eval_every=2, patience=2),
}
