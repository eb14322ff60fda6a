"""The one table of per-architecture facts, and the lookups that read it.

Everything prefixtune needs to know about an architecture lives in `ARCHITECTURES`: where its
attention modules are (one regex per attention kind, with the layer number as group 1), and how
many key/value heads of which size they have. Supporting a new model family is one row here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch


def _t5_relative_bias(module, relative: torch.Tensor) -> torch.Tensor:
    """T5's learned relative position bias for (..., q, k) relative positions -> (..., q, k, heads)."""
    buckets = module._relative_position_bucket(
        relative, bidirectional=not module.is_decoder, num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance)
    return module.relative_attention_bias(buckets)


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
    # T5-style relative position bias: (attention module, relative positions) -> bias values, if any.
    relative_bias: Callable | None = None
    hidden_size: Callable[[object], int] = field(default=lambda c: c.hidden_size)
    # Attribute of the base model holding its rotary embedding (absent attribute: no rotary positions).
    rotary: str | None = "rotary_emb"
    # Whether an infix ([x; INFIX; y], decoder-only) is exact here: needs full rotary positions from
    # the base model's `rotary` module (shifted by one extra rotation) or absolute ones fed through
    # position_ids. False for partial/per-layer/in-module rotary and for encoders.
    infix: bool = True
    # Weight methods. Transformer blocks: stack -> regex over parameter names, group 1 the layer
    # number (FT-top-k trains the top k blocks of each stack).
    blocks: dict[str, str] = field(default_factory=dict)
    # Modules whose output is an attention sublayer's output (self and cross attention) and an MLP
    # sublayer's output, before the residual add: where Houlsby adapters go. Group 1: layer number.
    attention_output: str | None = None
    mlp_output: str | None = None
    # Modules LoRA adapts by default (regex searched in module names; PEFT's defaults).
    lora_targets: str | None = None
    # What the model's first position id is when it computes them itself (RoBERTa: padding_idx + 1).
    position_offset: Callable[[object], int] = field(default=lambda c: 0)
    # attention kind -> regex of an absolute position embedding that the model fills from its own
    # counter (no `position_ids` input; BART/mBART/Pegasus/Marian). prefixtune shifts its output by
    # the prefix length with a forward hook; `position_offset` is the row of position 0 in its weight.
    position_modules: dict[str, str] = field(default_factory=dict)
    # Bidirectional encoder (BERT-like, for P-tuning v2): no generation, positions as for decoders.
    encoder_only: bool = False
    # Attention implementations transformers offers for this family (Gemma2's soft-capping is eager-only).
    impls: tuple[str, ...] = ("sdpa", "eager")
    # Why attaching is refused, when the attach-time probe is known to refuse this family; the probe
    # (engine.layout_of) is what refuses, this text only documents it (README table, tests).
    refused: str | None = None
    # What else a user should know (README table); facts the engine needs never live here.
    notes: str = ""
    # What the model reads: "text", "image" (ViT-style encoders: pixel_values), or "image-text" (CLIP).
    modality: str = "text"
    # Image encoders: the module whose output is the token sequence [CLS, patches] (+ positions) that the
    # first layer reads: where VPT inserts its prompts (vision.py, methods/vpt.py). Layers come from `blocks`.
    image_embeddings: str | None = None


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
        blocks={"encoder": r"^model\.encoder\.layers\.(\d+)\.", "decoder": r"^model\.decoder\.layers\.(\d+)\."},
        attention_output=r"^model\.(?:en|de)coder\.layers\.(\d+)\.(?:self_attn|encoder_attn)\.out_proj$",
        mlp_output=r"^model\.(?:en|de)coder\.layers\.(\d+)\.fc2$",
        lora_targets=r"\.(?:self_attn|encoder_attn)\.(q_proj|v_proj)$",
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


# Where LLaMA-shaped blocks keep what the weight methods need (FT-top blocks, adapter sites, LoRA targets).
_LLAMA_WEIGHTS = dict(
    blocks={"decoder": r"^model\.layers\.(\d+)\."},
    attention_output=r"^model\.layers\.(\d+)\.self_attn\.o_proj$",
    mlp_output=r"^model\.layers\.(\d+)\.mlp$",
    lora_targets=r"\.(q_proj|v_proj)$",
)


def _llama(notes: str = "", **kw) -> Arch:
    """LLaMA-shaped decoders: `model.layers.N.self_attn`, rotary positions through `position_ids`."""
    return Arch(attention={"self": r"^model\.layers\.(\d+)\.self_attn$"}, kv_shape=_llama_kv, notes=notes,
                **{**_LLAMA_WEIGHTS, **kw})


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
    "smollm3": _llama("no rotary on every 4th layer (NoPE)", infix=False),
    "cohere": _llama("Command R"),
    "granite": _llama(),
    "stablelm": _llama("partial rotary", infix=False),
    "gemma": _llama("multi-query in the 2B size"),
    "gemma2": _llama(f"sliding + global layers ({_WINDOW}); attention soft-capping: transformers offers eager only",
                     impls=("eager",), infix=False),
    "gemma3_text": _llama(f"sliding + global layers ({_WINDOW}); real model: Gemma 3 270M", infix=False),
    "phi": _llama("partial rotary", infix=False),
    "phi3": _llama(_WINDOW),
    "olmo": _llama(),
    "olmo2": _llama("query/key norms"),
    "starcoder2": _llama(_WINDOW),
    "gpt2": Arch(attention={"self": r"^transformer\.h\.(\d+)\.attn$"}, kv_shape=_gpt2_kv,
                 hidden_size=lambda c: c.n_embd, notes="learned absolute positions",
                 blocks={"decoder": r"^transformer\.h\.(\d+)\."},
                 attention_output=r"^transformer\.h\.(\d+)\.attn\.c_proj$",
                 mlp_output=r"^transformer\.h\.(\d+)\.mlp$",
                 lora_targets=r"\.attn\.c_attn$"),
    "gptj": Arch(attention={"self": r"^transformer\.h\.(\d+)\.attn$"}, kv_shape=_gpt2_kv,
                 hidden_size=lambda c: c.n_embd, notes="partial rotary", infix=False),
    "gpt_bigcode": Arch(  # multi-query: one key/value head shared by all query heads
        attention={"self": r"^transformer\.h\.(\d+)\.attn$"},
        kv_shape=lambda c, kind: (1 if c.multi_query else c.n_head, c.n_embd // c.n_head),
        hidden_size=lambda c: c.n_embd, notes="multi-query attention (one key/value head); learned positions"),
    "gpt_neox": Arch(attention={"self": r"^gpt_neox\.layers\.(\d+)\.attention$"}, kv_shape=_llama_kv,
                     notes="partial rotary (Pythia)", infix=False),
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
        relative_bias=_t5_relative_bias,
        hidden_size=lambda c: c.d_model,
        blocks={"encoder": r"^encoder\.block\.(\d+)\.", "decoder": r"^decoder\.block\.(\d+)\."},
        attention_output=r"^(?:en|de)coder\.block\.(\d+)\.layer\.\d+\.(?:SelfAttention|EncDecAttention)\.o$",
        mlp_output=r"^(?:en|de)coder\.block\.(\d+)\.layer\.\d+\.DenseReluDense$",
        lora_targets=r"\.(?:SelfAttention|EncDecAttention)\.(q|v)$",
        notes="real model: T5-small (flan-t5-small shape)",
    ),
    "bart": _bart_like(offset=2, notes="learned absolute positions"),
    "mbart": _bart_like(offset=2, notes="learned absolute positions"),
    "pegasus": _bart_like(offset=0, notes="sinusoidal absolute positions"),
    "marian": _bart_like(offset=0, notes="sinusoidal absolute positions"),
    # encoders for P-tuning v2 (base model or any task head: the optional prefix is the base-model attribute)
    "bert": Arch(attention={"self": r"^(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self$"}, kv_shape=_llama_kv,
                 encoder_only=True, infix=False, notes="P-tuning v2 (base model or a task head)"),
    "roberta": Arch(attention={"self": r"^(?:roberta\.)?encoder\.layer\.(\d+)\.attention\.self$"},
                    kv_shape=_llama_kv, position_offset=lambda c: c.pad_token_id + 1, encoder_only=True, infix=False,
                    notes="P-tuning v2; positions count from padding_idx + 1"),
    # image encoders (VPT, L2P: methods/vpt.py, methods/l2p.py); kind 'self' is bidirectional, no positions to move
    "vit": Arch(attention={"self": r"^(?:vit\.)?layers\.(\d+)\.attention$"}, kv_shape=_llama_kv,
                shift_positions=False, rotary=None, infix=False, encoder_only=True, modality="image",
                image_embeddings=r"^(?:vit\.)?embeddings$", blocks={"encoder": r"^(?:vit\.)?layers\.(\d+)\."},
                attention_output=r"^(?:vit\.)?layers\.(\d+)\.attention\.o_proj$",
                mlp_output=r"^(?:vit\.)?layers\.(\d+)\.mlp$", lora_targets=r"\.attention\.(q_proj|v_proj)$",
                notes="image encoder (pixel_values): VPT shallow/deep, key/value prompts, L2P"),
    "dinov2": Arch(attention={"self": r"^(?:dinov2\.)?encoder\.layer\.(\d+)\.attention$"}, kv_shape=_llama_kv,
                   shift_positions=False, rotary=None, infix=False, encoder_only=True, modality="image",
                   image_embeddings=r"^(?:dinov2\.)?embeddings$",
                   blocks={"encoder": r"^(?:dinov2\.)?encoder\.layer\.(\d+)\."},
                   attention_output=r"^(?:dinov2\.)?encoder\.layer\.(\d+)\.attention\.o_proj$",
                   mlp_output=r"^(?:dinov2\.)?encoder\.layer\.(\d+)\.mlp$",
                   lora_targets=r"\.attention\.(q_proj|v_proj)$",
                   notes="image encoder (pixel_values): VPT shallow/deep, key/value prompts, L2P; real model: "
                         "DINOv2 ViT-S/14 (`dinov2-small`)"),
    # CLIP: CoOp/CoCoOp/DAPL (methods/coop.py) put context vectors at the text tower's token embeddings; the
    # engine maps the vision tower's self-attention (key/value prompts on images), not the causal text tower
    "clip": Arch(attention={"vision": r"^vision_model\.encoder\.layers\.(\d+)\.self_attn$"},
                 kv_shape=lambda c, kind: (c.vision_config.num_attention_heads,
                                           c.vision_config.hidden_size // c.vision_config.num_attention_heads),
                 hidden_size=lambda c: c.vision_config.hidden_size, shift_positions=False, rotary=None, infix=False,
                 encoder_only=True, modality="image-text", image_embeddings=r"^vision_model\.embeddings$",
                 blocks={"vision": r"^vision_model\.encoder\.layers\.(\d+)\."},
                 notes="CoOp, CoCoOp, DAPL (learned context at the text tower's token embeddings); no CLIP weights "
                       "offline, tested on tiny random configs"),
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
            f"prefixtune/architectures.py:ARCHITECTURES (the attach-time probe checks it)."
        )
    return ARCHITECTURES[model_type]


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


def _table_entry(model, name: str):
    value = getattr(arch_of(model), name)
    if not value:
        raise ValueError(f"the architecture table has no {name!r} for model_type={model.config.model_type!r}; "
                         f"add it to that row of prefixtune/architectures.py:ARCHITECTURES")
    return value


def block_parameters(model) -> dict[str, dict[int, dict[str, torch.nn.Parameter]]]:
    """stack -> layer -> {parameter name: parameter} of each transformer block (from the table)."""
    patterns = {stack: re.compile(p) for stack, p in _table_entry(model, "blocks").items()}
    out: dict[str, dict[int, dict[str, torch.nn.Parameter]]] = {stack: {} for stack in patterns}
    for name, p in model.named_parameters():
        for stack, pattern in patterns.items():
            m = pattern.match(name)
            if m:
                out[stack].setdefault(int(m.group(1)), {})[name] = p
    for stack, by_layer in out.items():
        if not by_layer:
            raise ValueError(f"no parameters of {stack!r} blocks matched {patterns[stack].pattern!r} in "
                             f"{type(model).__name__}")
    return out


def modules_matching(model, pattern: str, search: bool = False) -> dict[str, torch.nn.Module]:
    """name -> module for the modules whose name matches `pattern` (`search`: anywhere in the name)."""
    rx = re.compile(pattern)
    match = rx.search if search else rx.match
    return {name: m for name, m in model.named_modules() if name and match(name)}


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
