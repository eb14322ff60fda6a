"""Statistics behind every comparison: mean ± std over seeds, and a paired bootstrap interval of a
corpus-BLEU (or accuracy) difference over evaluation sources.

The bootstrap resamples sources, not sentences of one system: both systems are scored on the same
resampled sources (paired), so what the interval measures is how much the difference depends on
which sources happened to be evaluated. With several seeds, seed s of system A is paired with seed s
of system B (same training sample, same held-out sources), and the statistic is the mean over seeds
of the per-seed corpus-BLEU difference. Corpus BLEU of a resample is computed from per-source
sufficient statistics (n-gram matches, totals, lengths), which is exactly what the corpus score sums.
Seeds are not resampled (three of them would bound little); each interval keeps its per-seed
differences instead, and the tables say in how many seeds the difference is above 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


class BleuStats:
    """Per-source BLEU sufficient statistics for one task's BLEU (the one `metrics.score` reports)."""

    def __init__(self, task: str):
        # sacrebleu: only for bootstrap BLEU; tables and figures import this module for mean_std (start-up time)
        from ..metrics.bleu import mteval_metric, multi_bleu_metric

        if task in ("e2e", "generic"):  # mteval-v13a as e2e-metrics runs it (metrics/bleu.py)
            self.metric, self.webnlg = mteval_metric(), False
        elif task in ("webnlg", "dart"):  # multi-bleu.perl on the 2017 scripts' normalized, padded texts
            self.metric, self.webnlg = multi_bleu_metric(), True
        else:
            raise ValueError(f"no BLEU for task {task!r}")

    def per_source(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """(sources, stats) integer array; summing rows gives the corpus statistics."""
        # sacrebleu: the metrics package imports it; only for bootstrap BLEU (start-up time)
        from ..metrics.bleu import reference_streams
        from ..metrics.tasks import webnlg_texts  # the metrics package, as above (start-up time)

        if self.webnlg:
            hyps, _, refs = webnlg_texts(hyps, refs)
        return np.asarray(self.metric._extract_corpus_statistics(list(hyps), reference_streams(refs)), dtype=np.int64)

    def score(self, stats: np.ndarray) -> float:
        """Corpus BLEU (0-1) of summed statistics."""
        return self.metric._compute_score_from_stats(stats.sum(0).tolist()).score / 100.0


class AccuracyStats:
    """Per-source correctness for a classification task (the label equals the reference label)."""

    def per_source(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        return np.asarray([h.strip() == r[0].strip() for h, r in zip(hyps, refs)], dtype=np.int64)

    def score(self, stats: np.ndarray) -> float:
        return float(stats.mean())


def paired_stats(task: str):
    """The per-source statistics a task's headline metric is bootstrapped with (ValueError where none is wired)."""
    return AccuracyStats() if task == "accuracy" else BleuStats(task)


@dataclass
class Interval:
    estimate: float  # the statistic on the evaluated sources
    low: float
    high: float
    resamples: int
    per_seed: tuple[float, ...] = ()  # each seed's difference on the evaluated sources (the estimate is their mean)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def verdict(self, better: str = "ahead", worse: str = "behind") -> str:
        if not self.excludes_zero:
            return "no difference shown"
        return better if self.low > 0 else worse

    def cell(self, digits: int = 4) -> str:
        """A table's cell: the difference, its interval, what it allows saying, and in how many seeds the
        difference is above 0 (the resampling is over sources only; this shows whether training's
        randomness turns the difference round)."""
        return (f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] {self.verdict()}; "
                f"higher in {sum(d > 0 for d in self.per_seed)}/{len(self.per_seed)} seeds")


def paired_bootstrap(pairs: list[tuple[np.ndarray, np.ndarray]], score, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Interval of mean_over_seeds(score(A_s) - score(B_s)).

    `pairs`: per seed, (A's per-source stats, B's per-source stats) over the SAME sources in the same
    order. Each resample draws every seed's sources with replacement (paired: one draw for A and B).
    """
    if not pairs:
        raise ValueError("paired_bootstrap needs at least one seed")
    for a, b in pairs:
        if len(a) != len(b) or len(a) == 0:
            raise ValueError(f"paired_bootstrap: systems scored on different numbers of sources ({len(a)} vs {len(b)})")
    rng = np.random.default_rng(seed)
    per_seed = tuple(float(score(a) - score(b)) for a, b in pairs)
    estimate = float(np.mean(per_seed))
    values = np.empty(resamples)
    for i in range(resamples):
        diffs = []
        for a, b in pairs:
            idx = rng.integers(0, len(a), len(a))
            diffs.append(score(a[idx]) - score(b[idx]))
        values[i] = np.mean(diffs)
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), resamples, per_seed)
