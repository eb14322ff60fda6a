"""Loss curves of one run from its log.jsonl (`prefixtune plot RUN_DIR`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .files import atomic_write_bytes


def read_log(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, dev) lists of (step, loss). A resumed run logs some steps twice: the last record wins."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a training run's --out folder")
    train: dict[int, float] = {}
    dev: dict[int, float] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(path.read_text().splitlines()):
                continue  # a line cut by a kill mid-write
            raise ValueError(f"{path}:{n}: not JSON") from None
        if rec.get("loss") is not None:
            train[rec["step"]] = rec["loss"]
        if rec.get("dev_loss") is not None:
            dev[rec["step"]] = rec["dev_loss"]
    return sorted(train.items()), sorted(dev.items())


def plot_run(run_dir: str | Path, out: str | Path | None = None, smooth: int = 10) -> Path:
    """Draw train loss (raw, and a moving average over `smooth` steps) and dev loss; returns the PNG path."""
    # matplotlib: only when a plot is drawn (start-up time of its importers: the CLI, experiments/)
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib.pyplot: after choosing the Agg backend above
    import matplotlib.pyplot as plt

    train, dev = read_log(run_dir)
    if not train and not dev:
        raise ValueError(f"{Path(run_dir) / 'log.jsonl'} has no loss records yet")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        k = max(1, min(smooth, len(losses)))
        avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, avg, color="tab:blue", lw=1.5, label=f"train ({k}-step mean)")
    if dev:
        steps, losses = zip(*dev)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, label="dev")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(str(Path(run_dir).resolve().name), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, Path(out) if out else Path(run_dir) / "loss.png")


def save_png(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a file) and close it."""
    # matplotlib: only when a plot is drawn (start-up time of its importers: the CLI, experiments/)
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
