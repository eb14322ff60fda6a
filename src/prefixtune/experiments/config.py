"""The `experiment` command's settings as a dataclass that checks itself: its fields are the command's
options (cli_options.py), as TrainConfig's are `train`'s and ServeConfig's are `serve`'s.

Torch-free: the CLI builds the command's options from it when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")


@dataclass
class ExperimentConfig:
    """How to run one of the paper's experiments (the experiment's name and output folder are arguments)."""

    model: str | None = field(default=None, metadata={"help": "Base model (default: the experiment's, e.g. smollm2-135m)."})
    data_dir: str | None = field(default=None, metadata={"help": "Data folder (default: $PREFIXTUNE_DATA or the cache)."})
    dataset: str | None = field(default=None, metadata={"help": "Override the experiment's dataset (e.g. jsonl with --path)."})
    path: str | None = field(default=None, metadata={"help": "File for the jsonl dataset."})
    methods: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Methods instead of the experiment's (ptuning-v2: its arms ptuning-v2, prompt, finetune, probe; "
                "image experiments: their arms)."})
    scale: str = field(default="quick", metadata={
        "help": "quick (3 seeds, 200 evaluation sources, learning rate chosen per method on dev loss, early "
                "stopping under a 200-step cap; docs/results.md gives the measured time per run), paper, or tiny "
                "(tests); image experiments name their own."})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, bf16 (recorded in every row) or auto (measured once per machine, cached; bf16 only when "
                "at least 1.10x faster)."})
    seeds: tuple[int, ...] | None = field(default=None, metadata={"help": "Seeds instead of the scale's (e.g. 0)."})
    sizes: tuple[int, ...] | None = field(default=None, metadata={
        "help": "Training sizes instead of the scale's (text experiments: low-data, init)."})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (default: a local Ray instance; text experiments only)."})
    cpus_per_run: int | None = field(default=None, metadata={
        "help": "CPUs (and torch threads) per run; runs share the machine's CPUs (default: a local run takes them "
                "all, one run at a time; text experiments only). On a busy machine 1 can be several times faster per run."})

    def __post_init__(self):
        c = type(self).__name__
        # the scale is checked by the experiment: image experiments have scales of their own
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{c}.precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.methods is not None:
            self.methods = tuple(str(m).strip() for m in self.methods if str(m).strip()) or None
        for name, least in (("seeds", 0), ("sizes", 1)):
            values = getattr(self, name)
            if values is None:
                continue
            try:  # from the command line they arrive as text
                values = tuple(int(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(f"{c}.{name}: must be integers >= {least}, got {list(values)}") from None
            if not values or any(v < least for v in values):
                raise ConfigError(f"{c}.{name}: must be integers >= {least}, got {list(values)}")
            setattr(self, name, values)
        if self.cpus_per_run is not None and self.cpus_per_run < 1:
            raise ConfigError(f"{c}.cpus_per_run: must be at least 1, got {self.cpus_per_run}")
