"""Which examples a run trains on, which give its dev loss, which are evaluated: one dataclass, each field
with its help text, checked on creation.

Kept apart from experiments/run.py (which turns a plan into data and needs torch): `train` and `evaluate`
build their data options from this class, and a command's `--help` should not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError


@dataclass
class DataPlan:
    """Which examples train, which give the dev loss, which are evaluated (never overlapping sources)."""

    dataset: str = field(metadata={"help": "e2e, webnlg, dart, xsum, boolq, an image dataset (docs/vision.md), or "
                                           "jsonl (with --path)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with the data (default: $PREFIXTUNE_DATA or the cache)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="dev", metadata={
        "help": "Split to evaluate on (train: also the split the dev loss comes from)."})
    train_size: int | None = field(default=None, metadata={
        "help": "Low-data: sample this many training pairs, grouped by source; on a split that is also "
                "evaluated, only the sources not sampled are evaluated (evaluate: by default the sample of the "
                "run.json beside the artifact, when it trained on this split)."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the low-data sample (evaluate: by default the run.json's, as for --train-size)."})
    dev_sources: int = field(default=30, metadata={
        "help": "Held-out sources that give the dev loss when training and evaluating on the same split."})
    eval_size: int | None = field(default=None, metadata={"help": "Evaluate at most this many sources."})
    path: str | None = field(default=None, metadata={"help": "The JSONL file, for --dataset jsonl."})
    exclude_categories: tuple[str, ...] | None = field(default=None, metadata={
        "help": "WebNLG: categories kept out of training; evaluation marks them 'unseen' (paper §6.4)."})

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"DataPlan.{name}: {message}, got {getattr(self, name)!r}")

        check(isinstance(self.dataset, str) and self.dataset.strip() != "", "dataset", "must name a dataset")
        check(self.train_size is None or self.train_size >= 1, "train_size", "must be >= 1")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.dev_sources >= 1, "dev_sources", "must be >= 1")
        check(self.eval_size is None or self.eval_size >= 1, "eval_size", "must be >= 1")
