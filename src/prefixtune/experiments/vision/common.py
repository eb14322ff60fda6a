"""What the image experiments share: the data beside the repository, the fixed test sample, the
machine line, the learning-rate choice of the protocol and the paired accuracy interval."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..catalogue import ExperimentError
from ..protocol import Protocol, choose, extend_grid, grid_around
from ..stats import paired_bootstrap

DEFAULT_MODEL = "dinov2-small"
PROTOCOL = Protocol()  # the text experiments' grid (3 points spanning 10x) and edge extensions


def shared_data_dir(data_dir):
    """`data_dir`, or the shared data beside the repository where it holds CIFAR-10, else None (download)."""
    if data_dir:
        return data_dir
    here = Path(__file__).resolve().parents[5] / "shared" / "data"  # src/prefixtune/experiments/vision/ -> beside the repo
    return str(here) if (here / "cifar10").exists() else None


def balanced_test(examples, n: int, seed: int = 0):
    """A fixed class-balanced sample of n test examples (n / classes per class), seeded."""
    by_class: dict[str, list] = {}
    for e in examples:
        by_class.setdefault(e.target, []).append(e)
    per = n // len(by_class)
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        out += [items[i] for i in sorted(rng.permutation(len(items))[:per])]
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def read_finished(row_path: Path, bf16: bool) -> dict | None:
    """A finished run's row, or None where it has not finished. A run recorded in the other precision is
    refused rather than mixed into this one's table (rows from before precision was recorded ran in bf16,
    the image scales' setting then)."""
    if not row_path.exists():
        return None
    row = json.loads(row_path.read_text())
    if row.get("bf16", True) != bf16:
        recorded, asked = ("bf16", "fp32") if row.get("bf16", True) else ("fp32", "bf16")
        raise ExperimentError(f"{row_path.parent}: recorded in {recorded}, this run asks for {asked}; "
                              f"give --precision {recorded} or another --out")
    return row


def scale_with(sc, seeds=None, bf16: bool | None = None):
    """A scale dataclass with the command line's seeds and precision in place of its own (None: keep)."""
    return dataclasses.replace(sc, **({"seeds": tuple(seeds)} if seeds is not None else {}),
                               **({"bf16": bf16} if bf16 is not None else {}))


def run_id(arm: str, lr: float, seed: int) -> str:
    """The folder name of one run under OUT/runs/."""
    return f"{arm}-lr{lr:g}-s{seed}"


def select_lr(name: str, centre: float, train_at: Callable[[float], dict], loss_of: Callable[[dict], float],
              print_fn=print) -> list[dict]:
    """The protocol's choice for one arm (seed 0): `train_at(lr)` (a row with "lr") at every point of the 3-point
    grid around `centre`, the grid grown past a winning edge (up to PROTOCOL.max_extensions times); the lowest
    `loss_of(row)` wins. Returns the grid's rows, each with `best_dev_loss`, `chosen_lr` and `at_edge`."""
    grid, extensions = grid_around(centre, PROTOCOL), 0
    while True:
        tried = [train_at(lr) for lr in grid]
        points = {r["lr"]: loss_of(r) for r in tried}
        best, edge = choose(points)
        if not edge or extensions == PROTOCOL.max_extensions:
            break
        grid, extensions = extend_grid(grid, centre, edge, PROTOCOL), extensions + 1
    print_fn(f"{name}: dev loss " + ", ".join(f"lr {lr:g}: {loss:.4f}" for lr, loss in sorted(points.items()))
             + f" -> lr {best:g}" + (f" (at the grid's {edge} edge)" if edge else ""))
    return [dict(r, best_dev_loss=points[r["lr"]], chosen_lr=best, at_edge=edge) for r in tried]


def paired_accuracy_difference(rows: list[dict], arm: str, reference: str):
    """Interval of mean over seeds of (arm's test accuracy - reference's), resampling the test images (the
    same images for both; seeds paired), or None where either lacks per-image results on a common seed."""
    def hits(a):
        return {r["seed"]: np.frombuffer(r["test_correct"].encode(), np.uint8) - ord("0")
                for r in rows if r["arm"] == a and r.get("chosen") and r.get("test_correct")}
    mine, theirs = hits(arm), hits(reference)
    seeds = sorted(set(mine) & set(theirs))
    if arm == reference or not seeds:
        return None
    return paired_bootstrap([(mine[s], theirs[s]) for s in seeds], lambda x: float(x.mean()))
