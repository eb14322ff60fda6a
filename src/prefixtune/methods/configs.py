"""Every method's config dataclass but the prefix's (prefixtune/config.py): what `--method NAME` can be told.

Torch-free on purpose: the CLI builds `prefixtune train`'s options and checks their values from these
classes before torch loads (start-up time), and the registry (registry.py) pairs each with its
module class, which is imported on first use. Each class validates itself on creation and names the
field at fault; each field's help is its CLI option's help.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, MethodConfig, PrefixConfig, check_field
from ..data.cifar10 import CLASSES


# ---------------------------------------------------------------------------------------------
# Text: soft prompts and prefixes


@dataclass
class InfixConfig(PrefixConfig):
    """An infix is shaped, parametrized and initialized like a prefix (paper §7.3)."""

    def __post_init__(self):
        super().__post_init__()
        if self.kinds not in (None, ("self",)):
            raise ConfigError("InfixConfig.kinds: an infix lives in decoder-only self-attention ('self') only")


PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptConfig(MethodConfig):
    """Soft prompt at the input embeddings (Lester et al. 2021; paper §7.2 EMB-k)."""

    length: int = field(default=10, metadata={"help": "Number of virtual tokens (soft embedding vectors)."})
    init: Literal["random", "vocab", "text"] | None = field(
        default=None,
        metadata={"help": "'random' (normal, init_std), 'vocab' (embeddings of tokens sampled from the first 5,000 "
                  "ids), or 'text' (init_text's token embeddings, cycled or cut to length). None: 'text' when "
                  "init_text is set, else 'vocab'."},
    )
    init_text: str | None = field(default=None, metadata={"help": "Text whose token embeddings start the prompt."})
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of the random initialization."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(isinstance(self.length, int) and self.length >= 1, c, "length", f"must be an int >= 1, got {self.length!r}")
        if self.init is None:
            self.init = "text" if self.init_text else "vocab"
        check_field(self.init in PROMPT_INITS, c, "init", f"must be one of {PROMPT_INITS}, got {self.init!r}")
        check_field(self.init != "text" or bool(self.init_text), c, "init_text", "init='text' needs a non-empty init_text")
        check_field(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std!r}")


_TOKEN = re.compile(r"\[P\](?:\*(\d+))?|\{source\}")


def parse_template(template: str) -> list[tuple[str, object]]:
    """"[P]*3 {source} [P]*3" -> [("v", 3), ("s", None), ("v", 3)]; other text -> ("t", "text")."""
    parts, pos, seen_source = [], 0, False
    for m in _TOKEN.finditer(template):
        text = template[pos:m.start()].strip()
        if text:
            parts.append(("t", text))
        if m.group(0) == "{source}":
            if seen_source:
                raise ValueError(f"template {template!r} names {{source}} twice")
            parts.append(("s", None)); seen_source = True
        else:
            parts.append(("v", int(m.group(1) or 1)))
        pos = m.end()
    if template[pos:].strip():
        parts.append(("t", template[pos:].strip()))
    if not seen_source:
        raise ValueError(f"template {template!r} has no {{source}}")
    if not any(kind == "v" for kind, _ in parts):
        raise ValueError(f"template {template!r} has no virtual token [P]")
    return parts


@dataclass
class PTuningConfig(MethodConfig):
    """P-tuning's prompt encoder and template (Liu et al. 2021)."""

    template: str = field(default="[P]*3 {source} [P]*3",
                          metadata={"help": "Where virtual tokens go: '[P]' or '[P]*n' for n virtual tokens, "
                                    "'{source}' for the input, any other words are fixed anchor tokens."})
    encoder: Literal["lstm", "mlp"] = field(default="lstm", metadata={
        "help": "Prompt encoder: 'lstm' (bidirectional 2-layer LSTM + MLP, as in the paper) or 'mlp'."})
    encoder_hidden: int | None = field(default=None, metadata={
        "help": "Hidden width of the prompt encoder (None: the model's hidden size)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the encoder's random input vectors."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(self.encoder in ("lstm", "mlp"), c, "encoder", f"must be 'lstm' or 'mlp', got {self.encoder!r}")
        check_field(self.encoder_hidden is None or self.encoder_hidden >= 1, c, "encoder_hidden", "must be >= 1")
        check_field(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std!r}")
        try:
            parse_template(self.template)
        except ValueError as e:
            check_field(False, c, "template", str(e))

    @property
    def length(self) -> int:
        return sum(n for kind, n in parse_template(self.template) if kind == "v")


DEEP_PROMPT_DEPTHS = ("deep", "input", "none")


@dataclass
class PTuningV2Config(PrefixConfig):
    """Deep prompts shaped like a prefix (length, flat or MLP, init) plus a linear classification head."""

    length: int = field(default=16, metadata={"help": "Deep-prompt length: key/value slots at every encoder layer."})
    reparam: Literal["mlp", "flat"] = field(default="flat", metadata={
        "help": "'flat': train the per-layer key/values directly (P-tuning v2's default); 'mlp': P = MLP(P')."})
    num_labels: int = field(default=2, metadata={"help": "Number of classes of the head."})
    labels: tuple[str, ...] = field(default=("False", "True"), metadata={
        "help": "Class names in head order; training targets must be one of them (BoolQ: False, True)."})
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout on the [CLS] state before the head (training only)."})
    prompt_depth: Literal["deep", "input", "none"] = field(default="deep", metadata={
        "help": "'deep': key/values at every encoder layer (P-tuning v2); 'input': `length` soft tokens after [CLS] "
                "at the input embeddings only (shallow prompt tuning, the paper's PT baseline; init 'text' uses the "
                "text's token embeddings); 'none': no prompt (a linear probe, or fine-tuning with tune_encoder)."})
    tune_encoder: bool = field(default=False, metadata={
        "help": "Also train every encoder weight (with prompt_depth 'none': the fine-tuning baseline); the saved "
                "file then holds the whole encoder."})

    def __post_init__(self):
        super().__post_init__()
        c = type(self).__name__
        if isinstance(self.labels, str):
            self.labels = tuple(s.strip() for s in self.labels.split(","))
        self.labels = tuple(self.labels)
        check_field(isinstance(self.num_labels, int) and self.num_labels >= 2, c, "num_labels",
               f"must be an int >= 2, got {self.num_labels!r}")
        check_field(len(self.labels) == self.num_labels, c, "labels",
               f"names {len(self.labels)} classes {list(self.labels)} but num_labels is {self.num_labels}")
        check_field(len(set(self.labels)) == len(self.labels) and all(self.labels), c, "labels",
               f"must be distinct non-empty names, got {list(self.labels)}")
        check_field(0.0 <= self.head_dropout < 1.0, c, "head_dropout", f"must be in [0, 1), got {self.head_dropout!r}")
        check_field(self.kinds in (None, ("self",)), c, "kinds", "deep prompts live in the encoder's self-attention ('self')")
        check_field(self.prompt_depth in DEEP_PROMPT_DEPTHS, c, "prompt_depth", f"must be one of {DEEP_PROMPT_DEPTHS}, got {self.prompt_depth!r}")
        check_field(isinstance(self.tune_encoder, bool), c, "tune_encoder", f"must be true or false, got {self.tune_encoder!r}")
        check_field(self.reparam == "flat" or self.prompt_depth == "deep", c, "reparam",
               f"'mlp' reparametrizes deep prompts only; prompt_depth {self.prompt_depth!r} needs 'flat'")


# ---------------------------------------------------------------------------------------------
# Weight methods: the paper's baselines and their kin


@dataclass
class FinetuneConfig(MethodConfig):
    """Full fine-tuning: no options besides the training settings."""


@dataclass
class FtTopConfig(MethodConfig):
    """Fine-tune only the top k transformer blocks (k=2: the paper's FT-top2)."""

    layers: int = field(default=2, metadata={"help": "How many top transformer blocks train (of each stack for "
                                                     "encoder-decoder models); 2 is the paper's FT-top2."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(isinstance(self.layers, int) and not isinstance(self.layers, bool) and self.layers >= 1, c, "layers",
               f"must be an int >= 1, got {self.layers!r}")


def check_regex(cfg, c: str, name: str) -> None:
    """A module-name pattern field: unset, or a regex that compiles."""
    value = getattr(cfg, name)
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            check_field(False, c, name, f"is not a valid regex ({e})")


ADAPTER_ACTIVATIONS = ("relu", "gelu", "tanh")  # adapter.py maps each to its module


@dataclass
class AdapterConfig(MethodConfig):
    """Houlsby bottleneck adapters after attention and after the MLP (paper §5.2)."""

    size: int | None = field(default=None, metadata={"help": "Bottleneck width of every adapter. Give this or fraction."})
    fraction: float | None = field(
        default=None, metadata={"help": "Target trainable share of the base model's parameters (e.g. 0.001 = 0.1%, "
                                        "0.03 = 3%); the bottleneck width is the nearest that gives it (at least 1). "
                                        "Default when neither is given: 0.001."})
    activation: Literal["relu", "gelu", "tanh"] = field(default="relu", metadata={"help": "Bottleneck non-linearity."})
    init_std: float = field(default=0.01, metadata={"help": "Standard deviation of the down-projection's init "
                                                            "(the up-projection starts at zero)."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(self.size is None or self.fraction is None, c, "size",
               f"give size ({self.size}) or fraction ({self.fraction}), not both")
        if self.size is None and self.fraction is None:
            self.fraction = 0.001
        check_field(self.size is None or (isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 1),
               c, "size", f"must be an int >= 1, got {self.size!r}")
        check_field(self.fraction is None or 0 < self.fraction < 1, c, "fraction", f"must be in (0, 1), got {self.fraction!r}")
        check_field(self.activation in ADAPTER_ACTIVATIONS, c, "activation", f"must be one of {ADAPTER_ACTIVATIONS}, got {self.activation!r}")
        check_field(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std!r}")


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank adaptation of linear layers (Hu et al. 2021)."""

    rank: int = field(default=8, metadata={"help": "Rank r of each update B·A."})
    alpha: float = field(default=16.0, metadata={"help": "Scale numerator: the update is (alpha / rank)·B·A·x."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input while training."})
    target_modules: str | None = field(
        default=None, metadata={"help": "Regex searched in module names choosing the layers to adapt (nn.Linear or "
                                        "GPT-2 Conv1D), e.g. '\\.(q_proj|k_proj|v_proj|o_proj)$'. None: the "
                                        "architecture's default (query and value projections)."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, c, "rank",
               f"must be an int >= 1, got {self.rank!r}")
        check_field(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0, c, "alpha",
               f"must be a finite number > 0, got {self.alpha!r}")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, c, "dropout",
               f"must be in [0, 1), got {self.dropout!r}")
        check_regex(self, c, "target_modules")


@dataclass
class IA3Config(MethodConfig):
    """Rescaling vectors on keys, values and the FFN's inner activations ((IA)³, Liu et al. 2022)."""

    target_modules: str | None = field(
        default=None, metadata={"help": "Regex searched in module names: the key/value projections whose outputs are "
                                        "rescaled (nn.Linear or GPT-2 Conv1D). None: found in the architecture's "
                                        "attention modules."})
    feedforward_modules: str | None = field(
        default=None, metadata={"help": "Regex searched in module names: the FFN output projections whose inputs "
                                        "(the inner activations) are rescaled. None: the last linear layer of each "
                                        "MLP in the architecture table."})

    def __post_init__(self):
        c = type(self).__name__
        for name in ("target_modules", "feedforward_modules"):
            check_regex(self, c, name)


# ---------------------------------------------------------------------------------------------
# Images: visual prompts, CLIP context, prompt pools


VPT_DEPTHS = ("shallow", "deep", "prefix", "none")
TUNES = ("head", "full", "lora", "adapter")
POOLS = ("cls", "mean")


def check_labels(cfg, c: str) -> None:
    """An image config's class names: a tuple (a comma-separated string is split), one per label, distinct."""
    if isinstance(cfg.labels, str):
        cfg.labels = tuple(s.strip() for s in cfg.labels.split(","))
    cfg.labels = tuple(cfg.labels)
    check_field(isinstance(cfg.num_labels, int) and cfg.num_labels >= 2, c, "num_labels", f"must be an int >= 2, got {cfg.num_labels!r}")
    check_field(len(cfg.labels) == cfg.num_labels, c, "labels",
           f"names {len(cfg.labels)} classes but num_labels is {cfg.num_labels}")
    check_field(len(set(cfg.labels)) == len(cfg.labels) and all(cfg.labels), c, "labels", "must be distinct non-empty names")


@dataclass
class VPTConfig(MethodConfig):
    """Visual prompts (shallow, deep or key/value) + a linear head on a frozen image encoder."""

    length: int = field(default=10, metadata={"help": "Prompt tokens (VPT: per layer for deep)."})
    depth: Literal["shallow", "deep", "prefix", "none"] = field(default="shallow", metadata={
        "help": "'shallow': prompts after [CLS] at the input only; 'deep': fresh prompts at every layer; 'prefix': "
                "key/values at every layer (the engine's prefix); 'none': no prompt (linear probe, fine-tuning, LoRA)."})
    num_labels: int = field(default=10, metadata={"help": "Number of classes of the head."})
    labels: tuple[str, ...] = field(default=CLASSES, metadata={
        "help": "Class names in head order (default: CIFAR-10's ten)."})
    pool: Literal["cls", "mean"] = field(default="cls", metadata={
        "help": "What the head reads: the last layer's [CLS] token, or the mean of the patch tokens (prompts excluded)."})
    tune: Literal["head", "full", "lora", "adapter"] = field(default="head", metadata={
        "help": "What of the encoder trains besides prompts and head: 'head' nothing, 'full' every weight, 'lora' "
                "LoRA on the architecture's query/value projections, 'adapter' Houlsby bottlenecks after each "
                "attention and MLP sublayer (the table's adapter sites)."})
    rank: int = field(default=8, metadata={"help": "LoRA rank (tune='lora')."})
    alpha: float = field(default=8.0, metadata={"help": "LoRA scale numerator: alpha / rank (tune='lora')."})
    size: int | None = field(default=8, metadata={"help": "Adapter bottleneck width (tune='adapter')."})
    image_size: int | None = field(default=None, metadata={
        "help": "Images are resized to this many pixels square (a multiple of the patch size); default: the "
                "model's processor crop size (224 for DINOv2/ViT)."})
    prompt_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompts while training (VPT: 0.0-0.1)."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout on the pooled feature before the head (training only)."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(isinstance(self.length, int) and self.length >= 1, c, "length", f"must be an int >= 1, got {self.length!r}")
        check_field(self.depth in VPT_DEPTHS, c, "depth", f"must be one of {VPT_DEPTHS}, got {self.depth!r}")
        check_field(self.tune in TUNES, c, "tune", f"must be one of {TUNES}, got {self.tune!r}")
        check_field(self.pool in POOLS, c, "pool", f"must be one of {POOLS}, got {self.pool!r}")
        check_field(isinstance(self.rank, int) and self.rank >= 1, c, "rank", f"must be an int >= 1, got {self.rank!r}")
        check_field(self.alpha > 0 and math.isfinite(self.alpha), c, "alpha", f"must be > 0, got {self.alpha!r}")
        check_field(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 1), c, "image_size",
               f"must be an int >= 1 (or unset), got {self.image_size!r}")
        for name in ("prompt_dropout", "head_dropout"):
            check_field(0.0 <= getattr(self, name) < 1.0, c, name, f"must be in [0, 1), got {getattr(self, name)!r}")
        check_labels(self, c)


@dataclass
class VPTShallowConfig(VPTConfig):
    """VPT-Shallow: prompts after [CLS] at the first layer's input."""

    depth: Literal["shallow", "deep", "prefix", "none"] = field(default="shallow", metadata={"help": VPTConfig.__dataclass_fields__["depth"].metadata["help"]})


@dataclass
class VPTDeepConfig(VPTConfig):
    """VPT-Deep: fresh prompts at every layer."""

    depth: Literal["shallow", "deep", "prefix", "none"] = field(default="deep", metadata={"help": VPTConfig.__dataclass_fields__["depth"].metadata["help"]})


POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig(MethodConfig):
    """Learnable text context for CLIP (CoOp)."""

    length: int = field(default=16, metadata={"help": "Context vectors M (CoOp: 16; ignored when ctx_init is given: "
                                                      "its word count)."})
    ctx_init: str | None = field(default=None, metadata={
        "help": "Words whose token embeddings start the context, e.g. 'a photo of a' (then M = their tokens); "
                "None: random N(0, 0.02) as CoOp."})
    class_specific: bool = field(default=False, metadata={"help": "One context per class (CoOp's CSC) instead of one shared."})
    class_position: Literal["end", "middle", "front"] = field(default="end", metadata={
        "help": "Where the class name stands: after the context, in its middle, or before it."})
    num_labels: int = field(default=10, metadata={"help": "Number of classes."})
    labels: tuple[str, ...] = field(default=CLASSES, metadata={"help": "Class names, written into the prompts."})
    image_size: int | None = field(default=None, metadata={"help": "Images resized to this (default: the processor's)."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(isinstance(self.length, int) and self.length >= 1, c, "length", f"must be an int >= 1, got {self.length!r}")
        check_field(self.class_position in POSITIONS, c, "class_position", f"must be one of {POSITIONS}")
        check_field(self.ctx_init is None or bool(str(self.ctx_init).strip()), c, "ctx_init", "must be non-empty words or unset")
        check_labels(self, c)


@dataclass
class CoCoOpConfig(CoOpConfig):
    """CoOp + a Meta-Net that conditions the context on each image (CoCoOp)."""

    length: int = field(default=4, metadata={"help": "Context vectors M (CoCoOp: 4)."})


@dataclass
class DAPLConfig(CoOpConfig):
    """Domain-agnostic + domain-specific context per (class, domain) (DAPL)."""

    length: int = field(default=16, metadata={"help": "Domain-agnostic context vectors M1 (DAPL: 16)."})
    domain_length: int = field(default=16, metadata={"help": "Domain-specific context vectors M2 per domain (DAPL: 16)."})
    domains: tuple[str, ...] = field(default=("source", "target"), metadata={
        "help": "Domain names (targets are written 'domain/label'; 'domain/?' is unlabelled)."})
    threshold: float = field(default=0.5, metadata={
        "help": "Unlabelled images train on CLIP's zero-shot pseudo-label when its probability is at least this."})

    def __post_init__(self):
        super().__post_init__()
        c = type(self).__name__
        if isinstance(self.domains, str):
            self.domains = tuple(s.strip() for s in self.domains.split(","))
        self.domains = tuple(self.domains)
        check_field(len(self.domains) >= 1 and len(set(self.domains)) == len(self.domains), c, "domains", "distinct names")
        check_field(isinstance(self.domain_length, int) and self.domain_length >= 1, c, "domain_length", "must be >= 1")
        check_field(0.0 <= self.threshold <= 1.0, c, "threshold", f"must be in [0, 1], got {self.threshold!r}")


@dataclass
class L2PConfig(MethodConfig):
    """A prompt pool with learnable keys, queried by the frozen [CLS] (L2P)."""

    pool_size: int = field(default=10, metadata={"help": "Prompts in the pool, M (L2P: 10)."})
    top_n: int = field(default=5, metadata={"help": "Prompts chosen per image, N (L2P: 5)."})
    length: int = field(default=5, metadata={"help": "Tokens per prompt, L_p (L2P: 5)."})
    pull: float = field(default=0.1, metadata={"help": "lambda: weight of the key-query distance term (L2P: 0.1)."})
    train_mask: bool = field(default=True, metadata={
        "help": "Train on the current task's classes' logits only (the official code's class-incremental setting)."})
    num_labels: int = field(default=10, metadata={"help": "Number of classes of the head (all tasks)."})
    labels: tuple[str, ...] = field(default=CLASSES, metadata={"help": "Class names in head order (default: CIFAR-10)."})
    image_size: int | None = field(default=None, metadata={"help": "Images resized to this (default: the processor's)."})

    def __post_init__(self):
        c = type(self).__name__
        for name in ("pool_size", "top_n", "length"):
            check_field(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, c, name, "must be an int >= 1")
        check_field(self.top_n <= self.pool_size, c, "top_n", f"{self.top_n} > pool_size {self.pool_size}")
        check_field(self.pull >= 0, c, "pull", f"must be >= 0, got {self.pull!r}")
        check_labels(self, c)
