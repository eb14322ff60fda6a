"""The fair-comparison protocol every experiment runs through.

1. Learning rate per method, chosen on dev data. For each group of runs (one method at one setting,
   e.g. prefix at 50 training pairs), seed 0 trains at every point of a log grid around the method's
   rate (`Protocol.grid_factors`) at the experiment's own budget, and the rate with the lowest best
   dev loss (held-out sources) is chosen. A choice at the grid's edge adds the next point beyond it,
   up to `max_extensions` times, so the optimum is bracketed where the budget allows. A run that
   diverges (NaN) counts as an infinite dev loss. Every point is recorded (OUT/lr_selection.jsonl,
   with its dev-loss curve) and the choices in OUT/lr_choice.json.
2. The budget rule: every run trains until its dev loss has not improved for `patience` evaluations
   (early stopping), capped at `max_steps` (quick scale: 200); the artifact kept is the best dev-loss state. A run that
   reaches the cap without stopping is marked "still improving" in the tables.
3. The comparison: every seed at the chosen rate (seed 0 reuses the selection run's training), plus
   a zero-step row (the untrained model, same input format, same sources) per training sample.

The rate a grid is centred on (`centre_learning_rate`) is the one learning-rate rule of the experiments:
methods carry their own rates (`Method.learning_rate`, `Method.short_run_learning_rate`), this reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import atomic_write_bytes
from ..recipes import configs_for
from .executor import ZERO_STEP, RunSpec, run_sweep


@dataclass(frozen=True)
class Protocol:
    # three points spanning 10x, log-spaced around the method's rate for the experiment's scale
    grid_factors: tuple[float, ...] = (10 ** -0.5, 1.0, 10 ** 0.5)
    max_extensions: int = 2
    zero_step: bool = True  # generation experiments only (a classifier's untrained head is chance)

    def __post_init__(self):
        f = sorted(self.grid_factors)
        if len(f) < 2 or any(x <= 0 for x in f):
            raise ValueError(f"Protocol.grid_factors: at least 2 positive factors, got {self.grid_factors}")


def centre_learning_rate(dataset: str, method: str, short_run: bool) -> float:
    """The rate the learning-rate grid of `method` on `dataset` is centred on: in a run capped at a few
    hundred steps the method's `short_run_learning_rate` where it has one (the recipes carry long-run
    rates, set for thousands of steps), else its recipe rate (its own `learning_rate`, or the dataset's)."""
    # torch: the methods import it; planning a sweep does not need it (start-up time)
    from ..methods import get_method
    short = get_method(method).short_run_learning_rate
    if short_run and short is not None:
        return short
    return configs_for(dataset, method)[1].lr


def _round_lr(lr: float) -> float:
    return float(f"{lr:.3g}")


def lr_id(group: str, seed: int, lr: float) -> str:
    return f"{group}-s{seed}-lr{_round_lr(lr):g}"


def _groups(specs: list[RunSpec]) -> dict[str, list[RunSpec]]:
    out: dict[str, list[RunSpec]] = {}
    for s in specs:
        if s.method != ZERO_STEP:
            out.setdefault(s.group or s.id, []).append(s)
    return out


def _with_lr(spec: RunSpec, lr: float, evaluate: bool) -> RunSpec:
    seed = spec.plan.get("seed", 0)
    return dataclasses.replace(spec, id=lr_id(spec.group or spec.id, seed, lr),
                               overrides={**spec.overrides, "lr": _round_lr(lr)}, evaluate=evaluate)


def _loss(row: dict) -> float:
    v = row.get("best_dev_loss")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def choose(points: dict[float, float]) -> tuple[float, str | None]:
    """(chosen lr, 'low'/'high' when it lies at that edge of the grid, else None)."""
    lrs = sorted(points)
    best = min(lrs, key=lambda lr: (points[lr], lr))
    if math.isinf(points[best]):
        raise RuntimeError(f"every learning rate of the grid {lrs} diverged")
    edge = "low" if best == lrs[0] else "high" if best == lrs[-1] else None
    return best, edge


def grid_around(centre: float, protocol: Protocol) -> list[float]:
    """The protocol's log grid around `centre`, rounded to 3 significant digits."""
    return sorted({_round_lr(centre * f) for f in protocol.grid_factors})


def extend_grid(grid: list[float], centre: float, edge: str, protocol: Protocol) -> list[float]:
    """`grid` with the next point of the same log grid beyond its `edge` ('low' or 'high'), computed from
    the centre (no rounding drift: 1e-4, not 9.99e-5)."""
    factors = sorted(protocol.grid_factors)
    ratio = factors[1] / factors[0]
    beyond = [lr for lr in grid if (lr > _round_lr(centre * factors[-1]) if edge == "high"
                                    else lr < _round_lr(centre * factors[0]))]
    k = len(beyond) + 1
    factor = factors[-1] * ratio ** k if edge == "high" else factors[0] / ratio ** k
    return sorted(grid + [_round_lr(centre * factor)])


def select_learning_rates(specs: list[RunSpec], model: str, out: Path, protocol: Protocol,
                          ray_address=None, print_fn: Callable[[str], None] = print, progress=None,
                          cpus_per_run: int | None = None) -> dict:
    """Run the grid for every group (seed 0 of the group, train + dev loss only); returns
    {group: {"grid": [...], "dev_loss": {lr: loss}, "chosen": lr, "at_edge": ..., "method": ...}}."""
    groups = _groups(specs)
    base = {g: min(ss, key=lambda s: s.plan.get("seed", 0)) for g, ss in groups.items()}
    grids = {g: grid_around(s.overrides["lr"], protocol) for g, s in base.items() if "lr" in s.overrides}
    missing = sorted(set(groups) - set(grids))
    if missing:
        raise ValueError(f"groups {missing} have no learning rate to search around")
    extensions = {g: 0 for g in groups}
    while True:
        sel = [_with_lr(base[g], lr, evaluate=False) for g in groups for lr in grids[g]]
        print_fn(f"learning-rate selection: {len(sel)} runs over {len(groups)} groups (seed 0, dev loss only)")
        rows = {r["id"]: r for r in run_sweep(sel, model, out, ray_address=ray_address, print_fn=print_fn,
                                               progress=progress, cpus_per_run=cpus_per_run)}
        choices, grown = {}, False
        for g in groups:
            seed = base[g].plan.get("seed", 0)
            points = {lr: _loss(rows[lr_id(g, seed, lr)]) for lr in grids[g]}
            chosen, edge = choose(points)
            if edge and extensions[g] < protocol.max_extensions:
                grids[g] = extend_grid(grids[g], base[g].overrides["lr"], edge, protocol)
                extensions[g] += 1
                grown = True
                print_fn(f"  {g}: best dev loss at the {edge} edge ({chosen:g}); extending the grid")
            choices[g] = {"method": base[g].method, "grid": sorted(points),
                          "dev_loss": {f"{lr:g}": points[lr] for lr in sorted(points)}, "chosen": chosen,
                          "at_edge": edge, "extensions": extensions[g], "seed": seed,
                          "runs": [lr_id(g, seed, lr) for lr in sorted(points)]}
        if not grown:
            break
    # choices of groups from earlier commands (other methods or sizes) are kept beside this command's
    path = out / "lr_choice.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    atomic_write_bytes(path, json.dumps({**recorded, **choices}, indent=2).encode())
    for g, c in choices.items():
        note = f" (at the grid's {c['at_edge']} edge after {c['extensions']} extensions)" if c["at_edge"] else ""
        print_fn(f"  {g}: lr {c['chosen']:g}{note}; dev loss " +
                 ", ".join(f"{k}: {v:.4f}" for k, v in c["dev_loss"].items()))
    return choices


def comparison_specs(specs: list[RunSpec], choices: dict, protocol: Protocol, generates: bool) -> list[RunSpec]:
    """Every run at its group's chosen rate, plus one zero-step run per (training size, seed)."""
    out = [_with_lr(s, choices[s.group or s.id]["chosen"], evaluate=True) for s in specs if s.method != ZERO_STEP]
    if protocol.zero_step and generates:
        seen = set()
        for s in specs:
            key = (s.plan.get("train_size"), s.plan.get("seed", 0))
            if key in seen:
                continue
            seen.add(key)
            size = f"n{key[0]}" if key[0] else "full"
            out.append(RunSpec(id=f"{ZERO_STEP}-{size}-s{key[1]}", method=ZERO_STEP, dataset=s.dataset, plan=s.plan,
                               overrides={}, decode=s.decode, eval_limit=s.eval_limit,
                               labels={**{k: None for k in s.labels}, "label": ZERO_STEP},
                               group=f"{ZERO_STEP}-{size}"))
    return out
