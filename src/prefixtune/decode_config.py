"""Decoding settings (paper §5.3): one dataclass, each field with its help text, checked on creation.

Kept apart from decode.py, which needs torch: the CLI builds its decoding options from this class, and
`prefixtune --help` should not pay for importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import ConfigError
from .recipes import decode_settings

# The number formats a frozen model decodes (and serves) in; "auto" is training's measured choice (precision.py).
PRECISIONS = ("fp32", "bf16", "auto")
PRECISION_HELP = ("Number format of the frozen model while decoding: fp32 (as loaded); bf16 (its weights cast to "
                  "bfloat16 once, so weights and activations run in bf16, no autocast: faster where the CPU has "
                  "fast bf16, outputs may differ a little from fp32's); auto (bf16 only where this machine measured "
                  "it at least 1.10x faster: the measurement training uses, cached per CPU).")


@dataclass
class DecodeConfig:
    """How outputs are generated. Paper: beam 5 for table-to-text; beam 6, length penalty 0.8 for XSum."""

    num_beams: int = field(default=5, metadata={"help": "Beam width (1 = greedy unless sampling; an ensemble "
                                                        "decodes greedily or by sampling)."})
    max_new_tokens: int = field(default=60, metadata={"help": "Most tokens generated per output."})
    min_new_tokens: int = field(default=1, metadata={"help": "Fewest tokens generated per output."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam-search length penalty (0.8 for XSum)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of searching."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    batch_size: int = field(default=16, metadata={"help": "Sources per generate() call."})
    stop_at_newline: bool = field(default=True, metadata={"help": "End an output at the first newline."})
    max_source_len: int = field(default=512, metadata={"help": "Source tokens kept."})
    precision: str = field(default="fp32", metadata={"help": PRECISION_HELP})

    def __post_init__(self):
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"DecodeConfig.{name}: {message}, got {getattr(self, name)!r}")

        check(self.num_beams >= 1, "num_beams", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be from 0 to max_new_tokens")
        check(math.isfinite(self.length_penalty), "length_penalty", "must be a finite number")
        # below 1e-5, logits / temperature can overflow to inf and sampling to NaN; greedy is the limit there
        check(math.isfinite(self.temperature) and self.temperature >= 1e-5, "temperature",
              "must be a number of at least 1e-5 (for greedy decoding, leave out --do-sample)")
        check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be above 0 and at most 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_source_len >= 1, "max_source_len", "must be >= 1")
        check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")


def decode_config_for(dataset: str, **overrides) -> DecodeConfig:
    """The dataset recipe's decoding settings (paper §5.3), with any non-None override applied."""
    base = asdict(DecodeConfig())
    base.update(decode_settings(dataset))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DecodeConfig(**base)
