"""Low-data training sets (paper §7.2): a few training pairs, grouped by source.

Sampling pairs independently would put the same E2E MR (or triple set) in training
and, through its other references, in evaluation. So sources are sampled, not pairs:
the training set takes whole sources, and the evaluation set keeps only the sources
that were not sampled. No source is in both.
"""

from __future__ import annotations

import random

from .base import Dataset, Example


def low_data_split(ds: Dataset, n: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Return ``(train, held_out)``: exactly ``n`` training pairs and the unsampled sources.

    Distinct sources (first-appearance order) are shuffled with ``random.Random(seed)``;
    their pairs (in dataset order) are taken source by source until there are exactly
    ``n``. If the last source taken has more pairs than still needed, only its first ones
    are used: the training set is truncated rather than overshooting ``n``, and that
    source is still counted as sampled, so it is not in ``held_out``. ``held_out`` has
    every pair of every other source, in dataset order. Deterministic for a seed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, not {n!r}")
    if n > len(ds):
        raise ValueError(f"n={n} is more than the {len(ds)} pairs of {ds.name}/{ds.split}")

    pairs: dict[str, list[Example]] = {}
    for ex in ds.examples:
        pairs.setdefault(ex.source, []).append(ex)
    order = list(pairs)
    random.Random(seed).shuffle(order)

    train: list[Example] = []
    sampled: set[str] = set()
    for source in order:
        if len(train) == n:
            break
        train.extend(pairs[source][: n - len(train)])
        sampled.add(source)

    held_out_sources = frozenset(s for s in pairs if s not in sampled)
    about = {"from_split": ds.split, "n": n, "seed": seed, "sampled_sources": len(sampled)}
    train_ds = Dataset(
        ds.name,
        f"{ds.split}-lowdata{n}-seed{seed}",
        train,
        meta={s: m for s, m in ds.meta.items() if s in sampled},
        info={**ds.info, "low_data": {**about, "part": "train"}},
    )
    held_out = ds.restrict(held_out_sources, split=f"{ds.split}-heldout{n}-seed{seed}")
    held_out.info = {**ds.info, "low_data": {**about, "part": "held_out"}}
    return train_ds, held_out
