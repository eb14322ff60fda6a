"""An experiment's figures: the paper's figure shape (metric against training size or prefix length,
one line per method; otherwise grouped bars) and the dev-loss curves of every learning-rate grid."""

from __future__ import annotations

import math
from pathlib import Path

from ..plots import save_png
from .catalogue import Experiment
from .executor import SELECTION, read_results
from .stats import mean_std
from .tables import group_rows, metric_columns


def draw_figure(exp: Experiment, rows: list[dict], path: str | Path) -> Path | None:
    """The paper's figure shape: metric vs training size / prefix length with one line per method
    (error bars: std over seeds); otherwise grouped bars (seen/unseen for extrapolation)."""
    # matplotlib: only when a figure is drawn (start-up time of report and table commands)
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib.pyplot: after choosing the Agg backend above
    import matplotlib.pyplot as plt


    cols = metric_columns(rows)
    if not cols:
        return None
    metric = "bleu" if "bleu" in cols else cols[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if exp.x:
        by_label = group_rows(rows, ("label",))
        for (label,), group in by_label.items():
            xs = sorted({r[exp.x] for r in group if r.get(exp.x) is not None})
            stats = [mean_std([r["scores"][metric] for r in group if r.get(exp.x) == x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label=label)
        ax.set_xlabel(exp.x.replace("_", " "))
        if exp.x == "train_size":
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(sorted({r["train_size"] for r in rows}), [str(v) for v in sorted({r["train_size"] for r in rows})])
    else:
        parts = ("seen", "unseen") if any("scores_seen" in r for r in rows) else (None,)
        labels = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / len(parts)
        for j, part in enumerate(parts):
            key = f"scores_{part}" if part else "scores"
            stats = [mean_std([r[key][metric] for r in rows if r["label"] == lab and key in r] or [float("nan")])
                     for lab in labels]
            ax.bar([i + j * width for i in range(len(labels))], [m for m, _ in stats], width,
                   yerr=[sd for _, sd in stats], capsize=3, label=part)
        ax.set_xticks([i + width * (len(parts) - 1) / 2 for i in range(len(labels))], labels, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{exp.name} ({exp.scale}) · {exp.model}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def draw_dev_curves(out: Path, choices: dict, path: Path) -> Path | None:
    """One panel per group: the seed-0 dev-loss curve at every learning rate of its grid (the chosen
    one bold), so anyone can see where each run stopped improving."""
    # matplotlib: only when a figure is drawn (start-up time of report and table commands)
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib.pyplot: after choosing the Agg backend above
    import matplotlib.pyplot as plt


    sel = {r["id"]: r for r in read_results(out, SELECTION)}
    groups = list(choices)
    if not groups:
        return None
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        c = choices[g]
        for run_id in c["runs"]:
            r = sel.get(run_id)
            if not r or not r.get("dev_curve"):
                continue
            xs, ys = zip(*r["dev_curve"])
            chosen = r.get("lr") == c["chosen"]
            ax.plot(xs, ys, lw=2.2 if chosen else 1, label=f"{r.get('lr'):g}" + (" *" if chosen else ""))
        ax.set_title(g, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("dev loss", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
