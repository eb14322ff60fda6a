"""An experiment's tables in markdown: one line per group of runs (seeds averaged), the learning-rate
grid of every group, and the table.md of an experiment folder.

Rows are the executor's (results.jsonl); a group is the runs that share the experiment's `group_by`
labels. BLEU differences against the reference rows come with a paired bootstrap interval (stats.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..recipes import recipe_for
from .catalogue import Experiment
from .stats import Interval, mean_std, paired_bootstrap, paired_stats


def metric_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.get("scores", {}).items():
            if isinstance(v, (int, float)) and k not in cols:
                cols.append(k)
    return cols


def group_rows(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def file_size(n: int) -> str:
    """Bytes as KiB below 1 MiB, else MiB with one decimal."""
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.0f} KiB"


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, sd = mean_std(values)
    return f"{m:.4g} ± {sd:.2g}" if len(values) > 1 else f"{m:.4g}"


def _predictions(out: Path, run_id: str) -> dict[str, dict] | None:
    path = out / "runs" / run_id / "eval" / "predictions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["source"]: r for r in rows}


def intervals_vs(exp: Experiment, out: Path, rows: list[dict], reference: str | None = None,
                 resamples: int = 1000, seen: bool | None = None) -> dict[tuple, Interval]:
    """Per table group: paired bootstrap 95% interval of (group's headline metric - the reference rows'; BLEU,
    or accuracy for a classification task; default reference: the experiment's `reference`), pairing seed
    with seed at the same training size (same training sample, same evaluation sources). `seen` True or
    False: only the sources of categories trained on (or held out), as their predictions' meta says."""
    reference = reference or exp.reference
    try:
        stats = paired_stats(recipe_for(exp.dataset).metric)
    except ValueError:
        return {}
    ref_rows = {(r.get("train_size"), r.get("seed")): r for r in rows if r.get("label") == reference}
    result = {}
    for key, group in group_rows(rows, exp.group_by).items():
        if group[0].get("label") == reference:
            continue
        pairs = []
        for r in group:
            ref = ref_rows.get((r.get("train_size"), r.get("seed")))
            a, b = _predictions(out, r["id"]), _predictions(out, ref["id"]) if ref else None
            if a is None or b is None:
                continue
            sources = [src for src in a if src in b]
            if len(sources) != len(a) or len(sources) != len(b):
                raise ValueError(f"{r['id']} and {ref['id']} were evaluated on different sources")
            if seen is not None:
                if any("seen" not in a[x].get("meta", {}) for x in sources):
                    continue  # predictions written before they carried the item's meta: no split interval
                sources = [x for x in sources if a[x]["meta"]["seen"] == seen]
                if not sources:
                    continue
            pairs.append((stats.per_source([a[x]["output"] for x in sources], [a[x]["references"] for x in sources]),
                          stats.per_source([b[x]["output"] for x in sources], [b[x]["references"] for x in sources])))
        if pairs:
            result[key] = paired_bootstrap(pairs, stats.score, resamples=resamples)
    return result


def table_markdown(exp: Experiment, rows: list[dict], out: Path | None = None, choices: dict | None = None,
                   reference: str | None = None) -> str:
    """Means ± sample std over seeds, one line per group; the chosen learning rate, how many seeds
    stopped early (the budget rule), and BLEU minus the reference method's with a paired bootstrap 95%
    interval and what it allows saying."""
    reference = reference or exp.reference
    cols = metric_columns(rows)
    split_cols = [f"{c} {g}" for g in ("seen", "unseen") for c in cols[:1]] if any("scores_seen" in r for r in rows) else []
    headline = next((c for c in ("bleu", "accuracy") if c in cols), None)
    subsets = (None, "seen", "unseen") if split_cols else (None,)
    intervals = {g: intervals_vs(exp, out, rows, reference, seen=None if g is None else g == "seen")
                 for g in subsets} if out is not None and headline else {}
    name = "BLEU" if headline == "bleu" else headline
    cmp_cols = [f"{name}{'' if g is None else ' ' + g} − {reference} [95% CI]" for g in subsets if intervals.get(g)]
    head = list(exp.group_by) + ["seeds", "lr", "stopped early", "trainable params"] + cols + split_cols + cmp_cols + \
        ["dev loss", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in group_rows(rows, exp.group_by).items():
        lrs = sorted({r.get("lr") for r in group if r.get("lr")})
        early = [r for r in group if r.get("stopped_early") is not None]
        cells = [str(k) if k is not None else "" for k in key] + [str(len(group)), ", ".join(f"{x:g}" for x in lrs) or "–",
                                                                  f"{sum(bool(r['stopped_early']) for r in early)}/{len(early)}"
                                                                  if early else "–",
                                                                  f"{group[0].get('trainable_params') or 0:,}"]
        cells += [_fmt([r["scores"][c] for r in group if c in r.get("scores", {})]) for c in cols]
        for g in ("seen", "unseen") if split_cols else ():
            cells.append(_fmt([r[f"scores_{g}"][cols[0]] for r in group if f"scores_{g}" in r]))
        for g in (g for g in subsets if intervals.get(g)):
            iv = intervals[g].get(key)
            cells.append(iv.cell() if iv else "–")
        cells.append(_fmt([r["best_dev_loss"] for r in group if isinstance(r.get("best_dev_loss"), (int, float))
                           and math.isfinite(r["best_dev_loss"])]))
        cells.append(_fmt([r["train_seconds"] for r in group]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def partial_choices(selection_rows: list[dict]) -> dict:
    """lr_choice.json's shape from the selection runs recorded so far (a grid still running: no choice)."""
    out: dict = {}
    for r in selection_rows:
        c = out.setdefault(r["group"], {"method": r["method"], "dev_loss": {}, "chosen": None, "runs": []})
        loss = r.get("best_dev_loss")
        c["dev_loss"][f"{r['lr']:g}"] = loss if loss is not None else math.inf
        c["runs"].append(r["id"])
    for c in out.values():
        c["dev_loss"] = dict(sorted(c["dev_loss"].items(), key=lambda kv: float(kv[0])))
    return out


def selection_markdown(choices: dict) -> str:
    """The learning-rate grid of every group: each point's best dev loss, the choice marked."""
    if not choices:
        return ""
    lines = ["| group | method | dev loss at each learning rate (seed 0) | chosen |", "|---|---|---|---|"]
    for g, c in choices.items():
        pts = ", ".join(("**" if float(k) == c.get("chosen") else "") + f"{k}: " +
                        (f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "diverged") +
                        ("**" if float(k) == c.get("chosen") else "") for k, v in c["dev_loss"].items())
        edge = f" (at the {c['at_edge']} edge)" if c.get("at_edge") else ""
        chosen = f"{c['chosen']:g}{edge}" if c.get("chosen") is not None else "grid not finished"
        lines.append(f"| {g} | {c['method']} | {pts} | {chosen} |")
    return "\n".join(lines) + "\n"


def report_markdown(exp: Experiment, rows: list[dict], out: Path, choices: dict | None) -> str:
    lines = [f"# {exp.name} ({exp.scale} scale)", "", f"Model `{exp.model}`, dataset `{exp.dataset}`. "
             "Mean ± sample standard deviation over seeds (each seed samples its own training set).", ""]
    lines += [f"- {n}" for n in exp.notes] + [""]
    lines.append(table_markdown(exp, rows, out, choices))
    if choices:
        lines += ["", "Learning rates (chosen on the dev loss of held-out sources, seed 0):", "",
                  selection_markdown(choices)]
    return "\n".join(lines)
