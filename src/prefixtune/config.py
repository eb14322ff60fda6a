"""Configuration dataclasses. Each field says what it does; each class checks itself on creation.

Nothing here imports torch: configs are plain data that can be written to JSON and read back.
"""

from __future__ import annotations

import dataclasses
import json
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
