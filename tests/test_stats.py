"""Statistics behind the comparisons: BLEU from per-source statistics equals the corpus score, the paired
bootstrap interval covers what it should, and the learning-rate choice rule."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from prefixtune.metrics import score, scorer_ready
from prefixtune.experiments.protocol import Protocol, choose
from prefixtune.experiments.stats import BleuStats, Interval, mean_std, paired_bootstrap

WORDS = "the eagle is a coffee shop near the river serving cheap french food family friendly".split()


def _corpus(n: int, seed: int, noise: float):
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(n):
        ref = [" ".join(rng.sample(WORDS, 8)) for _ in range(3)]
        hyp = [w if rng.random() > noise else rng.choice(WORDS) for w in ref[0].split()]
        refs.append(ref)
        hyps.append(" ".join(hyp))
    return hyps, refs


def test_bleu_from_summed_source_statistics_is_the_e2e_corpus_bleu():
    hyps, refs = _corpus(40, 0, 0.3)
    bleu = BleuStats("e2e")
    stats = bleu.per_source(hyps, refs)
    assert stats.shape[0] == 40
    assert bleu.score(stats) == pytest.approx(score("e2e", hyps, refs)["bleu"], abs=1e-12)
    half = stats[:20]  # a subset's statistics give that subset's corpus BLEU
    assert bleu.score(half) == pytest.approx(score("e2e", hyps[:20], refs[:20])["bleu"], abs=1e-12)


def test_paired_bootstrap_separates_a_real_difference_and_not_a_null_one():
    bleu = BleuStats("e2e")
    good, refs = _corpus(200, 1, 0.1)
    bad = [" ".join(random.Random(i).sample(WORDS, 8)) for i in range(200)]
    a, b = bleu.per_source(good, refs), bleu.per_source(bad, refs)
    iv = paired_bootstrap([(a, b)], bleu.score, resamples=300)
    assert iv.low > 0 and iv.verdict() == "ahead" and iv.low <= iv.estimate <= iv.high
    assert iv.estimate == pytest.approx(bleu.score(a) - bleu.score(b))
    behind = paired_bootstrap([(b, a)], bleu.score, resamples=300)
    assert behind.high < 0 and behind.verdict() == "behind"
    # the same system against itself: the interval is exactly [0, 0] and says nothing
    same = paired_bootstrap([(a, a.copy())], bleu.score, resamples=100)
    assert same.low == same.high == 0 and same.verdict() == "no difference shown"
    # two systems of equal quality (different noise draws): the interval holds 0
    other, _ = _corpus(200, 1, 0.1)
    assert paired_bootstrap([(a, bleu.per_source(other, refs))], bleu.score, resamples=300).excludes_zero is False


def test_paired_bootstrap_averages_seeds_and_refuses_unpaired_sources():
    s1 = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]] * 5)
    with pytest.raises(ValueError, match="different numbers of sources"):
        paired_bootstrap([(s1, s1[:3])], lambda st: 0.0)
    iv = paired_bootstrap([(s1, s1), (s1, s1)], lambda st: float(st.sum()), resamples=10)
    assert iv == Interval(0.0, 0.0, 0.0, 10, (0.0, 0.0))


def test_an_interval_keeps_each_seeds_difference_and_says_in_how_many_it_is_above_zero():
    ones, zeros = np.ones((50, 1)), np.zeros((50, 1))
    mean = lambda st: float(st.mean())  # noqa: E731
    # seed 0: A all right, B all wrong (+1); seed 1: the other way round (-1); seed 2: A half right (+0.5)
    half = np.concatenate([ones[:25], zeros[:25]])
    iv = paired_bootstrap([(ones, zeros), (zeros, ones), (half, zeros)], mean, resamples=200)
    assert iv.per_seed == (1.0, -1.0, 0.5) and iv.estimate == pytest.approx(0.5 / 3)
    assert iv.cell(3).startswith(f"{iv.estimate:+.3f} [") and iv.cell().endswith("; higher in 2/3 seeds")
    assert iv.verdict() in iv.cell()


def test_webnlg_bleu_from_summed_source_statistics_is_the_challenge_scripts_corpus_bleu():
    hyps, refs = _corpus(60, 2, 0.3)
    refs = [r[:1] if i % 3 == 0 else r for i, r in enumerate(refs)]  # some items with fewer references: padded
    hyps = [h.capitalize() + " ." for h in hyps]                      # normalization (case, punctuation) counts
    # a short output of an item with one reference: the padding's empty references are the closest length
    hyps = [h.split()[0] if i % 6 == 0 else h for i, h in enumerate(hyps)]
    bleu = BleuStats("webnlg")
    stats = bleu.per_source(hyps, refs)
    with scorer_ready("webnlg"):  # one METEOR JVM for both scores
        assert bleu.score(stats) == pytest.approx(score("webnlg", hyps, refs)["bleu"], abs=1e-12)
        assert bleu.score(stats[:30]) == pytest.approx(score("webnlg", hyps[:30], refs[:30])["bleu"], abs=1e-12)
    assert BleuStats("dart").webnlg  # DART is scored by the same scripts


def test_mean_std_and_the_learning_rate_rule():
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert choose({1e-4: 2.0, 1e-3: 1.5, 1e-2: 1.7}) == (1e-3, None)
    assert choose({1e-4: 2.0, 1e-3: 1.8, 1e-2: 1.7}) == (1e-2, "high")
    assert choose({1e-4: 1.0, 1e-3: 1.8, 1e-2: math.inf}) == (1e-4, "low")  # inf: diverged
    with pytest.raises(RuntimeError, match="diverged"):
        choose({1e-3: math.inf, 1e-2: math.inf})
    with pytest.raises(ValueError, match="grid_factors"):
        Protocol(grid_factors=(1.0,))


def test_the_grid_is_log_spaced_around_its_centre_and_grows_past_the_edge_that_won():
    from prefixtune.experiments.protocol import extend_grid, grid_around

    p = Protocol()
    grid = grid_around(1e-3, p)
    assert grid == [0.000316, 0.001, 0.00316]
    once = extend_grid(grid, 1e-3, "high", p)
    assert once == [0.000316, 0.001, 0.00316, 0.01]
    assert extend_grid(once, 1e-3, "high", p)[-1] == 0.0316  # from the centre: no drift to 0.0315 or 0.00999
    assert extend_grid(grid, 1e-3, "low", p) == [0.0001, 0.000316, 0.001, 0.00316]


def test_accuracy_is_bootstrapped_from_per_question_correctness():
    from prefixtune.experiments.stats import AccuracyStats, paired_stats

    stats = paired_stats("accuracy")
    assert isinstance(stats, AccuracyStats) and isinstance(paired_stats("e2e"), BleuStats)
    refs = [["True"], ["False"], ["True"], ["True"]]
    a = stats.per_source(["True", "False", "False ", "True"], refs)
    assert a.tolist() == [1, 1, 0, 1] and stats.score(a) == 0.75
    b = stats.per_source(["False"] * 4, refs)
    diff = paired_bootstrap([(np.tile(a, 50), np.tile(b, 50))], stats.score)
    assert diff.estimate == pytest.approx(0.5) and diff.verdict() == "ahead"
    with pytest.raises(ValueError, match="no BLEU for task 'nope'"):
        paired_stats("nope")
