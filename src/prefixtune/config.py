"""Configuration dataclasses. Each field says what it does; each class checks itself on creation.

Nothing here imports torch: configs are plain data that can be written to JSON and read back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

REPARAMS = ("mlp", "flat")
INITS = ("random", "zeros", "text")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


def check_field(ok: bool, cls: str, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{name}: {message}")


class MethodConfig:
    """Base of every method's config dataclass: JSON round trip, unknown fields refused by name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        # files written by prefixtune 0.2 carry the method's name inside its config too (now only in the file's
        # own "method" field, which chose this class)
        d = {k: v for k, v in d.items() if k != "method"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class PrefixConfig(MethodConfig):
    """How the prefix is shaped, parametrized and initialized (paper §4, §4.3, §7.4)."""

    length: int = field(default=10, metadata={"help": "Number of virtual prefix tokens per attention layer."})
    reparam: Literal["mlp", "flat"] = field(
        default="mlp",
        metadata={"help": "'mlp': train P' and compute P = MLP(P') (paper §4.3, more stable); "
                  "'flat': train the prefix activations directly."},
    )
    mlp_hidden: int = field(default=512, metadata={"help": "Hidden width of the reparametrization MLP (800 for XSum in the paper)."})
    mlp_input_dim: int | None = field(
        default=None, metadata={"help": "Width d' of P' (length x d'). None: the model's hidden size, as in the paper's code."}
    )
    init: Literal["random", "zeros", "text"] | None = field(
        default=None,
        metadata={"help": "'random', 'zeros', or 'text' (activations of init_text run through the frozen LM, §7.4). "
                  "None: 'text' when init_text is set, else 'random'."},
    )
    init_text: str | None = field(
        default=None,
        metadata={"help": "Text whose per-layer keys/values start the prefix, e.g. 'table-to-text:'. Its tokens are "
                  "cycled or cut to exactly `length` tokens."},
    )
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of the random initialization."})
    kinds: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Which attention kinds get a prefix: subset of the model's kinds ('self' for decoder-only; "
                  "'encoder', 'decoder', 'cross' for encoder-decoder). None: all of them."},
    )

    def __post_init__(self) -> None:
        c = type(self).__name__
        check_field(isinstance(self.length, int) and self.length >= 1, c, "length", f"must be an int >= 1, got {self.length!r}")
        check_field(self.reparam in REPARAMS, c, "reparam", f"must be one of {REPARAMS}, got {self.reparam!r}")
        check_field(isinstance(self.mlp_hidden, int) and self.mlp_hidden >= 1, c, "mlp_hidden", f"must be >= 1, got {self.mlp_hidden!r}")
        check_field(self.mlp_input_dim is None or self.mlp_input_dim >= 1, c, "mlp_input_dim", f"must be >= 1, got {self.mlp_input_dim!r}")
        if self.init is None:
            self.init = "text" if self.init_text else "random"
        check_field(self.init in INITS, c, "init", f"must be one of {INITS}, got {self.init!r}")
        check_field(self.init != "text" or bool(self.init_text), c, "init_text", "init='text' needs a non-empty init_text")
        check_field(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std!r}")
        if self.kinds is not None:
            self.kinds = tuple(self.kinds)
            check_field(len(self.kinds) > 0, c, "kinds", "must name at least one attention kind, or be None for all")


@dataclass
class TrainConfig:
    """How to train. Defaults are generic; `recipes.RECIPES` holds the paper's per-dataset, per-method values."""

    lr: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    epochs: int = field(default=5, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=5, metadata={"help": "Examples per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps, then linear decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Seeds data order and initialization."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    time_budget_s: float | None = field(default=None, metadata={
        "help": "Opt-in: stop training after this many seconds (the result then depends on the machine's speed)."})
    checkpoint_every: int = field(default=50, metadata={"help": "Write a resumable checkpoint every N steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Dev loss every N steps (default: each epoch)."})
    patience: int | None = field(default=None, metadata={"help": "Early stop after N dev evaluations without improvement."})
    dev_max_examples: int = field(default=200, metadata={"help": "Dev pairs used for the dev loss."})
    max_source_len: int = field(default=256, metadata={"help": "Source tokens kept (longer sources are cut)."})
    max_target_len: int = field(default=128, metadata={"help": "Target tokens kept."})
    log_every: int = field(default=10, metadata={"help": "Print progress every N steps (every step goes to log.jsonl)."})
    compile: bool = field(default=False, metadata={"help": "torch.compile every transformer layer of the frozen "
                                                 "LM for the run (prefixtune's attention runs eagerly between the "
                                                 "compiled parts; the same loss and gradients). The first steps "
                                                 "compile; see docs/performance.md for what it gained where measured."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 for the frozen LM's matmuls (its linear weights "
                                                "stored in bf16 for the run; the method's parameters, optimizer and "
                                                "loss stay float32). Faster or slower by CPU, measured: a SmolLM2 step "
                                                "1.34x faster on a Xeon with AMX-BF16, 1.8x slower on a Xeon with "
                                                "AVX512-BF16 but no AMX; the step-shaped workload 19.7x slower on an "
                                                "AMD EPYC without AVX-512. --precision auto measures this machine."})

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every", "dev_max_examples",
                     "max_source_len", "max_target_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"TrainConfig.{name}: must be a finite number, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr: must be > 0, got {self.lr}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: must be >= 1 (or unset), got {getattr(self, name)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"TrainConfig.time_budget_s: must be > 0 (or unset), got {self.time_budget_s}")
