"""How key/values enter a frozen Hugging Face model's attention: the one place that touches transformers.

Mechanism (public extension points only):
  * Two attention functions are registered with transformers' `AttentionInterface`,
    `prefixtune_sdpa` and `prefixtune_eager`. Each wraps the stock function: it prepends the active
    prefix's keys/values to the layer's keys/values and extends the attention mask (and T5's
    relative position bias) with the prefix columns, then calls the stock function.
  * `layout_of(model)` switches the model to the matching implementation once and records which
    module is which (kind, layer). Without an active prefix the wrapped functions are the stock
    ones, so the model behaves exactly as before.
  * The prefix for the current call is set in a context variable (`use_prefix`). It holds one
    prefix per batch row (`RowPrefixes`), so rows with different prefixes (and lengths) share one
    forward pass. `reenter_active()` carries it into a later recomputation (gradient checkpointing).

Forward passes, the loss and generation on top of this live in engine.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from .kv_cache import reserved_cache
from .architectures import ARCHITECTURES, Arch, arch_of, attention_modules, position_modules
from .models import model_name
if TYPE_CHECKING:  # per_row reads .kv, .embeds and .is_infix only: no runtime import of the artifact module
    from .prefix import MergedPrefix

SUPPORTED = ("sdpa", "eager")

# ---------------------------------------------------------------------------------------------
# What is active during one forward pass


@dataclass
class RowPrefixes:
    """What conditions each row of one batch: per-layer key/values and/or soft input embeddings.

    kv[kind]:    (layers, 2, rows, kv_heads, max_len, head_dim), rows left-padded to a common length
    valid[kind]: (rows, max_len) bool, True where the row has a real slot
    soft:        (rows, max_virtual, hidden) or None: row r's virtual token k (written as input id -(k+1))
                 is embedded as soft[r, k] (prompt tuning, P-tuning)
    infix:       (rows,) bool or None: True where the row's 'self' key/values are an infix, visible only
                 from the row's insertion point on (`insert_at`, given per call), instead of a prefix
    rows == 1 means one conditioning shared by every row of the batch (and its beams).
    """

    kv: dict[str, torch.Tensor]
    valid: dict[str, torch.Tensor]
    soft: torch.Tensor | None = None
    infix: torch.Tensor | None = None

    @classmethod
    def shared(cls, kv: dict[str, torch.Tensor], soft: torch.Tensor | None = None, infix: bool = False) -> "RowPrefixes":
        """One conditioning for every row (e.g. the trainable one during training).

        kv[kind]: (layers, 2, kv_heads, length, head_dim); soft: (virtual, hidden).
        """
        device = next(iter(kv.values())).device if kv else (soft.device if soft is not None else None)
        return cls(kv={k: v.unsqueeze(2) for k, v in kv.items()},
                   valid={k: torch.ones(1, v.shape[3], dtype=torch.bool, device=v.device) for k, v in kv.items()},
                   soft=None if soft is None else soft.unsqueeze(0),
                   infix=torch.tensor([infix], device=device) if infix else None)

    @classmethod
    def per_row(cls, prefixes: list[MergedPrefix | None], device=None, dtype=None) -> "RowPrefixes":
        """Row i uses prefixes[i] (None: nothing for that row). Any mix of prefix, infix and soft prompts."""
        kinds = sorted({k for p in prefixes if p is not None for k in p.kv})
        kv, valid = {}, {}
        for kind in kinds:
            ref = next(p.kv[kind] for p in prefixes if p is not None and kind in p.kv)
            layers, _, heads, _, head_dim = ref.shape
            max_len = max(p.kv[kind].shape[3] for p in prefixes if p is not None and kind in p.kv)
            t = torch.zeros(layers, 2, len(prefixes), heads, max_len, head_dim, dtype=dtype or ref.dtype, device=device)
            m = torch.zeros(len(prefixes), max_len, dtype=torch.bool, device=device)
            for row, p in enumerate(prefixes):
                if p is None or kind not in p.kv:
                    continue
                n = p.kv[kind].shape[3]
                t[:, :, row, :, max_len - n:] = p.kv[kind].to(device=t.device, dtype=t.dtype)  # left-padded
                m[row, max_len - n:] = True
            kv[kind], valid[kind] = t, m
        soft = None
        with_embeds = [p for p in prefixes if p is not None and p.embeds is not None]
        if with_embeds:
            width, hidden = max(p.embeds.shape[0] for p in with_embeds), with_embeds[0].embeds.shape[1]
            soft = torch.zeros(len(prefixes), width, hidden, dtype=dtype or with_embeds[0].embeds.dtype, device=device)
            for row, p in enumerate(prefixes):
                if p is not None and p.embeds is not None:
                    soft[row, :p.embeds.shape[0]] = p.embeds.to(device=soft.device, dtype=soft.dtype)
        infix = None
        if any(p is not None and p.is_infix for p in prefixes):
            infix = torch.tensor([p is not None and p.is_infix for p in prefixes], device=device)
        return cls(kv=kv, valid=valid, soft=soft, infix=infix)

    def lengths(self, kind: str, rows: int) -> torch.Tensor:
        """(rows,) prefix lengths, repeated like `layer` when beam search multiplied the rows."""
        n = self.valid[kind].sum(-1)
        return n.repeat_interleave(rows // n.shape[0]) if n.shape[0] != rows else n

    def layer(self, kind: str, layer: int, rows: int):
        """(keys, values, valid) for one layer, repeated to `rows` (beam search multiplies rows)."""
        k, v, m = self.kv[kind][layer, 0], self.kv[kind][layer, 1], self.valid[kind]
        return (*(repeat_rows(x, rows) for x in (k, v, m)),)


def repeat_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row tensors to `rows` rows: one shared row is expanded, beams repeat each row in place."""
    n = x.shape[0]
    if n == rows:
        return x
    if rows % n:
        raise ValueError(f"batch of {rows} rows cannot use conditioning for {n} rows")
    return x.repeat_interleave(rows // n, dim=0)


@dataclass
class _Active:
    layout: "PrefixLayout"
    rows: RowPrefixes | None
    capture: dict | None = None  # (kind, layer) -> (keys, values) when recording activations
    insert_at: torch.Tensor | None = None  # (rows,) where each infix row's infix sits (token index)
    reached: bool = False  # a prefix reached an attention layer (a bool, not a count: torch.compile guards on it)
    # Work shared by the layers of one forward (masks, bias columns) and by the steps of one
    # generate call (prefixes repeated for beams), so it is done once, not once per layer and step.
    memo: dict = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("prefixtune_active", default=None)


# ---------------------------------------------------------------------------------------------
# The attention functions


def _stock_function(base: str, module: nn.Module):
    if base == "sdpa":
        return sdpa_attention_forward
    # "eager" is each model file's own `eager_attention_forward` (T5 adds its position bias there).
    return sys.modules[type(module).__module__].eager_attention_forward


def _real_mask(mask, module, kwargs, q_len: int, k_len: int, float_dtype, want_float: bool):
    """The mask over the real keys as (batch|1, 1|heads, q_len, k_len); built when HF passed None."""
    if mask is not None:
        return mask[..., :k_len]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal and q_len > 1:
        # HF passes None only for a square causal mask or a single query: rebuild it bottom-right aligned
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        allowed = torch.arange(k_len)[None, :] <= q_pos
    else:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    allowed = allowed.view(1, 1, q_len, k_len)
    if want_float:
        return torch.zeros((), dtype=float_dtype).masked_fill(~allowed, torch.finfo(float_dtype).min)
    return allowed


def _prefix_mask_and_bias(layout, kind, module, kwargs, base, attention_mask, bias, valid, query, k_len):
    """The attention mask (and T5 position bias) over [prefix; real keys] for one attention kind."""
    rows, q_len, p_len = query.shape[0], query.shape[2], valid.shape[-1]
    float_mask = attention_mask is not None and attention_mask.dtype.is_floating_point
    want_float = float_mask or (attention_mask is None and base == "eager")
    real = _real_mask(attention_mask, module, kwargs, q_len, k_len, query.dtype, want_float)
    real = real.to(query.device).expand(rows, real.shape[1], q_len, k_len)
    allowed = real if real.dtype == torch.bool else real > torch.finfo(real.dtype).min / 2
    # valid: (rows, P), or (rows, q_len, P) when visibility depends on the query (infix rows)
    cols = valid.to(query.device).view(rows, 1, -1, p_len).expand(rows, real.shape[1], q_len, p_len)
    window = kwargs.get("sliding_window")
    if window is not None:
        # Prefix slots obey the window as the text they stand for would: slot i stands p_len - i
        # tokens before the row's first real token, and a query that is real token number k sees
        # back window - 1 tokens. k = (real keys it sees) - 1; that count saturates at the window,
        # where no slot is in reach anyway. (Left-padded slots put each row's prefix right before it.)
        k = allowed.sum(-1, keepdim=True) - 1                                   # (rows, 1|heads, q_len, 1)
        distance = k + torch.arange(p_len, 0, -1, device=query.device)          # (rows, 1|heads, q_len, P)
        cols = cols & (distance < window)
    if want_float:
        cols = torch.zeros((), dtype=real.dtype, device=query.device).masked_fill(~cols, torch.finfo(real.dtype).min)
    mask = torch.cat([cols, real], dim=-1)                                      # (rows, 1|heads, q_len, P + k_len)
    if bias is None:
        return mask, None
    left_pads = allowed[:, 0, -1, :].int().argmax(-1)                           # first key the last query sees
    p_bias = layout.prefix_bias(kind, q_len, k_len, p_len, left_pads, bias)
    return mask, torch.cat([p_bias, bias.expand(rows, -1, -1, -1)], dim=-1)


def _infix_visibility(active: _Active, valid: torch.Tensor, rows: int, q_len: int) -> torch.Tensor:
    """(rows, q_len, P): an infix row's slots are seen only by queries at or after its insertion point.

    Queries are located by their position ids (recorded by the hook `use_prefix` installs): a token
    at index i >= insert_at has position i + L, so "after the infix" is position >= insert_at + L.
    """
    positions = active.memo.get("position_ids")
    if positions is None or active.insert_at is None:
        raise RuntimeError("an infix needs position ids and insertion points; call forward_with_prefix / "
                           "generate_with_prefix (with insert_at) rather than the model directly")
    positions = repeat_rows(positions, rows)
    insert_at = repeat_rows(active.insert_at, rows).to(positions.device)
    infix = repeat_rows(active.rows.infix, rows).to(positions.device)
    length = valid.sum(-1)                                                      # (rows,)
    after = positions[:, -q_len:] >= (insert_at + length)[:, None]              # (rows, q_len)
    seen = torch.where(infix[:, None], after, torch.ones_like(after))
    return valid[:, None, :] & seen[:, :, None].to(valid.device)


def _rotate_infix_keys(active: _Active, module, p_key: torch.Tensor, rows: int) -> torch.Tensor:
    """Rotary models: move an infix's keys from positions 0.. to insert_at.. (where text would stand).

    Rotations compose (R(a)R(b) = R(a+b)), so keys made at positions 0..L-1 become keys at
    insert_at..insert_at+L-1 by one extra rotation of insert_at.
    """
    rotary = active.layout.rotary
    if rotary is None:  # absolute (learned) positions: activations carry their positions already
        return p_key
    insert_at = repeat_rows(active.insert_at, rows).to(p_key.device)
    infix = repeat_rows(active.rows.infix, rows).to(p_key.device)
    shift = insert_at[:, None].expand(rows, p_key.shape[2])                     # (rows, P)
    cos, sin = rotary(p_key, shift)                                             # (rows, P, head_dim)
    apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
    rotated = apply(p_key, p_key, cos.to(p_key.dtype), sin.to(p_key.dtype))[1]
    return torch.where(infix[:, None, None, None], rotated, p_key)


def _prefixed_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = _stock_function(base, module)
        active = _ACTIVE.get()
        slot = active.layout.modules.get(module) if active is not None else None
        if slot is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        kind, layer = slot
        if active.capture is not None:
            active.capture[(kind, layer)] = (key.detach(), value.detach())
        if active.rows is None or kind not in active.rows.kv:
            return stock(module, query, key, value, attention_mask, **kwargs)
        active.reached = True
        rows, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        kv_key = ("kv", kind, layer, rows, key.dtype)
        infix = active.rows.infix is not None and kind == "self"
        if kv_key not in active.memo:
            p_key, p_value, valid = active.rows.layer(kind, layer, rows)       # (rows, kv_heads, P, head_dim), (rows, P)
            if infix:
                p_key = _rotate_infix_keys(active, module, p_key, rows)
            active.memo[kv_key] = (p_key.to(key.dtype), p_value.to(value.dtype), valid)
        p_key, p_value, valid = active.memo[kv_key]
        bias = kwargs.get("position_bias")
        mask_key = ("mask", kind, rows, q_len, k_len, kwargs.get("sliding_window"))
        hit = active.memo.get(mask_key)
        positions = active.memo.get("position_ids") if infix else None      # infix masks depend on them
        if hit is None or hit[0] is not attention_mask or hit[1] is not bias or hit[4] is not positions:
            if infix:
                valid = _infix_visibility(active, valid, rows, q_len)          # (rows, q_len, P)
            mask, new_bias = _prefix_mask_and_bias(active.layout, kind, module, kwargs, base, attention_mask, bias,
                                                   valid, query, k_len)
            hit = active.memo[mask_key] = (attention_mask, bias, mask, new_bias, positions)
        mask = hit[2]
        if bias is not None:
            kwargs["position_bias"] = hit[3]
        kwargs["is_causal"] = False  # the mask is explicit
        key = torch.cat([p_key, key], dim=2)
        value = torch.cat([p_value, value], dim=2)
        return stock(module, query, key, value, mask, **kwargs)

    attention.__name__ = f"prefixtune_{base}"
    return attention


# torch.compile skips these functions (they run eagerly between the compiled parts of a layer): tracing them
# breaks the graph at the context variable anyway, and their per-forward memo made dynamo recompile.
# Measured on a tiny Llama, 3 batch shapes x 3 steps with each layer compiled: 8.6 s of compiling, not 34.8 s.
for _base, _mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(f"prefixtune_{_base}", torch.compiler.disable(_prefixed_attention(_base)))
    ALL_MASK_ATTENTION_FUNCTIONS.register(f"prefixtune_{_base}", _mask_fn)


def cached_prefix(model, layout: "PrefixLayout", rows: RowPrefixes | None, batch_rows: int, reserve: int = 0):
    """Decoding: the rows' prefix key/values laid out once in a fresh DynamicCache ((batch_rows, kv_heads, P,
    head_dim) per layer, beams repeated) with the (batch, P) validity of its slots, or None where the cache
    cannot stand in exactly for prefixtune's attention functions (then they concatenate per layer and step).
    `reserve` > 0: the layers are `kv_cache.ReservedLayer`s with room for that many tokens after the prefix
    (the prompt and the new tokens), so decoding steps write in place instead of copying the cache.

    The cache stands in only where a prefix is nothing but key/values ahead of the text: self-attention only,
    no infix or soft prompt, a decoder-only model without relative position bias, self-counting position
    embeddings or sliding windows (whose reach our functions count from each row's first real token), and
    no autocast (the slots must already be in the keys' dtype).
    """
    if (rows is None or set(rows.kv) != {"self"} or rows.infix is not None or rows.soft is not None
            or layout.bias_modules or layout.position_modules
            or not layout.arch.shift_positions or torch.is_autocast_enabled(model.device.type)
            or not _plain_full_attention_cache(model, layout)):
        return None
    config = model.config
    cache = reserved_cache(config, rows.valid["self"].shape[1] + reserve) if reserve > 0 else DynamicCache(config=config)
    for layer in range(len(cache.layers)):
        keys, values, _ = rows.layer("self", layer, batch_rows)             # (batch_rows, kv_heads, P, head_dim)
        cache.update(keys.to(model.dtype), values.to(model.dtype), layer)
    return cache, rows.valid["self"]


def reserved_plain_cache(model, layout: "PrefixLayout", reserve: int):
    """Decoding without a prefix: a cache of `kv_cache.ReservedLayer`s with room for `reserve` tokens where the
    model's stock cache is one plain DynamicLayer per layer (decoder-only, full attention), else None (HF's own)."""
    return reserved_cache(model.config, reserve) if _plain_full_attention_cache(model, layout) else None


def _plain_full_attention_cache(model, layout: "PrefixLayout") -> bool:
    """A decoder-only model whose stock decoding cache is one plain DynamicLayer per attention layer: no sliding
    windows (whose reach our functions count from each row's first real token), recurrent or offloaded layers."""
    config = model.config
    if layout.is_encoder_decoder or "self" not in layout.shapes or getattr(config, "sliding_window", None) is not None \
            or any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return False
    cache = DynamicCache(config=config)
    return len(cache.layers) == layout.shapes["self"][0] and all(type(layer) is DynamicLayer for layer in cache.layers)


# ---------------------------------------------------------------------------------------------
# Which module is which


@dataclass(eq=False)
class PrefixLayout:
    """Where a model's attention modules are, and their prefix shapes."""

    arch: Arch
    modules: dict[nn.Module, tuple[str, int]]
    shapes: dict[str, tuple[int, int, int]]       # kind -> (layers, kv_heads, head_dim)
    hidden_size: int
    is_encoder_decoder: bool
    bias_modules: dict[str, nn.Module] = field(default_factory=dict)
    rotary: nn.Module | None = None               # the model's rotary embedding (None: no rotary positions)
    embeddings: nn.Module | None = None           # the input embedding (soft prompts live in its output space)
    position_offset: int = 0                                     # first position id (RoBERTa: padding_idx + 1)
    position_modules: dict[nn.Module, str] = field(default_factory=dict)   # BART-family embeddings -> kind
    hooks: list = field(default_factory=list)                    # forward hooks registered at attach
    attached: bool = False                                       # probed and switched to prefixtune attention

    def prefix_bias(self, kind: str, q_len: int, k_len: int, p_len: int, left_pads: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        """Position-bias columns for the prefix, as if its tokens stood right before each row's input.

        Returns (rows, heads, q_len, p_len); `left_pads` (rows,) counts each row's left padding.
        """
        source = self.bias_modules.get(kind)
        rows = left_pads.shape[0]
        if source is None:  # cross-attention, or no relative bias: the prefix gets none either
            return bias.new_zeros(rows, bias.shape[1], q_len, p_len)
        q_pos = torch.arange(k_len - q_len, k_len, device=bias.device)[None, :] - left_pads[:, None].to(bias.device)
        p_pos = torch.arange(-p_len, 0, device=bias.device)                     # left-padded prefix slots
        relative = p_pos[None, None, :] - q_pos[:, :, None]                      # (rows, q_len, p_len)
        values = self.arch.relative_bias(source, relative)                      # (rows, q_len, p_len, heads)
        return values.permute(0, 3, 1, 2).to(bias.dtype)


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, PrefixLayout]" = weakref.WeakKeyDictionary()


def _shift_learned_positions(module, args, kwargs, output):
    """Forward hook on a self-counting absolute position embedding (BART family): with a prefix
    active, real tokens' positions start after the row's prefix, as for text written before them."""
    active = _ACTIVE.get()
    kind = active.layout.position_modules.get(module) if active is not None else None
    if kind is None or active.rows is None or kind not in active.rows.kv:
        return None
    first = args[0] if args else next(iter(kwargs.values()))    # input ids / embeds slice, or their shape
    batch, seq = (first.shape[0], first.shape[1]) if torch.is_tensor(first) else (first[0], first[1])
    pos = kwargs.get("position_ids")
    if pos is None:  # the model's own counter: cache length onwards
        start = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
        pos = torch.arange(start, start + seq, device=output.device)
    shift = active.rows.lengths(kind, batch).to(output.device)
    ids = pos.to(output.device).reshape(-1, seq) + shift[:, None] + active.layout.position_offset
    return nn.functional.embedding(ids, module.weight).to(output.dtype)           # (batch, seq, hidden)


def _probe_inputs(model, layout: PrefixLayout) -> dict:
    """One token for text models; one blank image (config.image_size) for image encoders (ViT, DINOv2),
    both for image-text models (CLIP), whose forward needs both."""
    params = inspect.signature(model.forward).parameters
    x = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    inputs = {"input_ids": x} if "input_ids" in params else {}
    if "pixel_values" in params:
        vision = getattr(model.config, "vision_config", model.config)
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        inputs["pixel_values"] = torch.zeros(1, vision.num_channels, size, size, dtype=model.dtype, device=model.device)
    if layout.is_encoder_decoder:
        inputs["decoder_input_ids"] = x
    return inputs


def _probe(model, layout: PrefixLayout) -> None:
    """One-token forward: every mapped attention module must reach prefixtune's attention function
    with keys of the shape the table says, or a prefix would be silently ignored (Falcon, BLOOM)."""
    captured: dict = {}
    token = _ACTIVE.set(_Active(layout=layout, rows=None, capture=captured))
    try:
        with torch.no_grad():
            model(**_probe_inputs(model, layout))
    finally:
        _ACTIVE.reset(token)
    names = {m: n for n, m in model.named_modules()}
    missed = [names[m] for m, slot in layout.modules.items() if slot not in captured]
    model_type = model.config.model_type
    if missed:
        ok = sorted(t for t, a in ARCHITECTURES.items() if a.refused is None)
        raise ValueError(
            f"{model_type!r} cannot take a prefix: its attention modules ({', '.join(missed[:3])}"
            f"{', ...' if len(missed) > 3 else ''}) never called transformers' AttentionInterface in a one-token "
            f"probe forward (transformers {transformers.__version__}), and that interface is the only way "
            f"prefixtune reaches attention; a prefix would be silently ignored. What works: a transformers version "
            f"whose {model_type} attention goes through AttentionInterface, or one of {ok}.")
    for (kind, layer), (key, _) in captured.items():
        _, heads, head_dim = layout.shapes[kind]
        if (key.shape[1], key.shape[3]) != (heads, head_dim):
            raise ValueError(f"{model_type!r} {kind} layer {layer}: keys have {key.shape[1]} heads of size "
                             f"{key.shape[3]}, the architecture table says {heads} of {head_dim} "
                             f"(prefixtune/architectures.py:ARCHITECTURES[{model_type!r}].kv_shape)")


def _input_embeddings(model):
    try:
        return model.get_input_embeddings()
    except NotImplementedError:  # CLIPModel: two towers, no one input embedding (soft prompts need none there)
        return None


def describe(model) -> PrefixLayout:
    """Describe `model`'s attention modules and prefix shapes. A pure query: changes nothing."""
    impl = model.config._attn_implementation
    base = impl.removeprefix("prefixtune_")
    if base not in SUPPORTED:
        raise ValueError(f"attention implementation {impl!r} is not supported by prefixtune; use one of "
                         f"{SUPPORTED} (load the model with attn_implementation='sdpa' or 'eager')")
    layout = _LAYOUTS.get(model)
    if layout is not None:
        return layout
    arch = arch_of(model)
    found = attention_modules(model)
    modules = {m: (kind, i) for kind, ms in found.items() for i, m in enumerate(ms)}
    shapes = {kind: (len(ms), *arch.kv_shape(model.config, kind)) for kind, ms in found.items()}
    bias_modules = {}
    if arch.relative_bias:
        for kind, ms in found.items():
            if getattr(ms[0], "has_relative_attention_bias", False):
                bias_modules[kind] = ms[0]
    rotary = getattr(model.base_model, arch.rotary, None) if arch.rotary else None
    layout = PrefixLayout(arch=arch, modules=modules, shapes=shapes, hidden_size=arch.hidden_size(model.config),
                          is_encoder_decoder=bool(getattr(model.config, "is_encoder_decoder", False)),
                          bias_modules=bias_modules, rotary=rotary, embeddings=_input_embeddings(model),
                          position_offset=arch.position_offset(model.config), position_modules=position_modules(model))
    _LAYOUTS[model] = layout
    return layout


def layout_of(model) -> PrefixLayout:
    """Attach: switch `model` to prefixtune's attention functions (once), then describe it.

    Without an active conditioning the wrapped functions call the stock ones, so the model
    computes exactly what it did before.
    """
    layout = describe(model)
    impl = model.config._attn_implementation
    if impl.startswith("prefixtune_") and layout.attached:
        return layout
    base = impl.removeprefix("prefixtune_")
    if impl != f"prefixtune_{base}":
        model.set_attn_implementation(f"prefixtune_{base}")
    try:
        _probe(model, layout)
    except Exception:
        with contextlib.suppress(Exception):  # leave the model as it was
            model.set_attn_implementation(base)
        raise
    if not layout.hooks:
        layout.hooks = [m.register_forward_hook(_shift_learned_positions, with_kwargs=True)
                        for m in layout.position_modules]
    layout.attached = True
    return layout


@contextlib.contextmanager
def use_prefix(model, rows: RowPrefixes | None, capture: dict | None = None):
    """Within this block, every forward of `model` attends to `rows` (one prefix per batch row)."""
    layout = layout_of(model)
    if rows is not None:
        for kind in rows.kv:
            if kind not in layout.shapes:
                raise ValueError(f"prefix has a {kind!r} part but {model_name(model)} has kinds {sorted(layout.shapes)}")
    state = _Active(layout=layout, rows=rows, capture=capture)
    hook = None
    if rows is not None and rows.infix is not None:
        # an infix is seen only from its insertion point on: record each forward's position ids
        def record_positions(_module, _args, kwargs):
            state.memo["position_ids"] = kwargs.get("position_ids")

        hook = model.base_model.register_forward_pre_hook(record_positions, with_kwargs=True)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
        if hook is not None:
            hook.remove()
    if rows is not None and rows.kv and not state.reached:
        # Guard against the silent failure mode of other libraries: a prefix that never reached attention.
        raise RuntimeError("the prefix was not applied to any attention layer; was the attention implementation "
                           f"changed after prefixtune attached? (now {model.config._attn_implementation!r})")


def reenter_active():
    """A context manager that makes the conditioning active now active again when entered: torch's
    non-reentrant checkpoint recomputes a layer after `use_prefix` has exited (gradient_checkpointing.py)."""
    state = _ACTIVE.get()

    @contextlib.contextmanager
    def active():
        token = _ACTIVE.set(state)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    return active()
