"""Forward passes, the training loss and generation with per-row conditioning (prefixes, infixes,
soft prompts) on a frozen Hugging Face model. How the key/values enter attention is attention.py.

  * In training and in forward passes the HF cache only ever holds real tokens: the prefix enters
    each attention call (attention.py). `generate()` on a model where a cache can carry the prefix
    exactly (`attention.cached_prefix`: plain self-attention prefixes on most decoder-only models)
    starts from a cache that holds it, so decoding steps run the stock attention with no per-step
    concatenation; elsewhere the attention functions add it per layer and step. Either way,
    `generate()`, beam search and left padding work as usual. For decoder-only models, real tokens'
    `position_ids` start after each row's prefix, so a prefix made from text T acts exactly like T
    written before the input.
  * Soft input embeddings take the input positions of virtual tokens (ids -1, -2, ...) placed by a
    template (`lay_out`).
"""

from __future__ import annotations

import torch

from .attention import (PrefixLayout, RowPrefixes, cached_prefix, describe, layout_of, repeat_rows,
                        reserved_plain_cache, use_prefix)
from .prefix import MergedPrefix, check_compatible


def _position_ids(layout: PrefixLayout, rows: RowPrefixes | None, shape, attention_mask, cache=None,
                  insert_at: torch.Tensor | None = None):
    """Decoder-only models: real tokens' positions, counted over unpadded tokens, after each row's prefix.

    An infix row shifts only the tokens at or after its insertion point (they stand after the infix).
    Returns None where the model's own default is already right (encoder-decoder models, or no
    prefix and no mask).
    """
    has_prefix = rows is not None and "self" in rows.kv
    if layout.is_encoder_decoder or not layout.arch.shift_positions or shape is None:
        return None
    if attention_mask is None and not has_prefix:
        return None
    batch, seq = shape[:2]
    device = attention_mask.device if attention_mask is not None else None
    if attention_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        pos = torch.arange(past, past + seq, device=device).expand(batch, seq)
    else:
        # the mask may cover cached tokens too (a decode step): keep the positions of the new ones
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    if has_prefix:
        length = rows.lengths("self", batch).to(pos.device)[:, None]         # (batch, 1)
        if rows.infix is not None:
            infix = repeat_rows(rows.infix, batch).to(pos.device)[:, None]
            after = pos >= repeat_rows(insert_at, batch).to(pos.device)[:, None]
            length = torch.where(infix & ~after, torch.zeros_like(length), length)
        pos = pos + length
    return pos + layout.position_offset


def _soft_embeds(model, rows: RowPrefixes | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Input embeddings with each virtual token (id -(k+1)) replaced by its row's soft vector k."""
    virtual = input_ids < 0
    if not bool(virtual.any()):
        return None
    if rows is None or rows.soft is None:
        raise ValueError("input ids hold virtual tokens (negative ids) but no soft prompt is active for them")
    embeds = model.get_input_embeddings()(input_ids.clamp(min=0))                # (batch, seq, hidden)
    soft = repeat_rows(rows.soft, input_ids.shape[0]).to(embeds.dtype)          # (batch, virtual, hidden)
    row, col = virtual.nonzero(as_tuple=True)
    slot = -input_ids[row, col] - 1
    if int(slot.max()) >= soft.shape[1]:
        raise ValueError(f"virtual token {int(slot.max())} has no soft vector (the soft prompt has {soft.shape[1]})")
    return embeds.index_put((row, col), soft[row, slot])


def _check_infix(rows: RowPrefixes | None, insert_at) -> None:
    if rows is not None and rows.infix is not None and insert_at is None:
        raise ValueError("an infix needs insert_at: each row's token index where the infix stands")


def forward_with_prefix(model, rows: RowPrefixes | None, input_ids=None, attention_mask=None, run=None,
                        insert_at: torch.Tensor | None = None, **kwargs):
    """`model(...)` with per-row conditioning (prefix, infix, soft prompt) or one shared one.

    `run`: call this module instead of `model` (e.g. `model.base_model` for hidden states only).
    `insert_at`: (rows,) token index where an infix row's infix stands (infix rows only).
    Input ids may hold virtual tokens (-1, -2, ...) that take the row's soft prompt vectors.
    """
    _check_infix(rows, insert_at)
    with use_prefix(model, rows) as state:
        state.insert_at = insert_at
        shape = input_ids.shape if input_ids is not None else getattr(kwargs.get("inputs_embeds"), "shape", None)
        pos = _position_ids(state.layout, rows, shape, attention_mask, kwargs.get("cache"), insert_at)
        if pos is not None and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = pos
        embeds = _soft_embeds(model, rows, input_ids) if input_ids is not None else None
        if embeds is not None:
            return (run or model)(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return (run or model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def infix_points(labels: torch.Tensor) -> torch.Tensor:
    """Decoder-only training rows: the infix stands before the last prompt token (the one that
    predicts the first target token), as text written between source and separator would."""
    has_target = labels != -100
    return (has_target.int().argmax(-1) - 1).clamp(min=0)                     # (rows,)


LOSS_CHUNK = 64  # target positions per LM-head + cross-entropy chunk in target_loss


def target_loss(model, rows: RowPrefixes | None, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean cross-entropy over target tokens only (labels != -100).

    Decoder-only models: the LM head runs only at positions that predict a target token: the head
    over a 49k vocabulary at every source and padding position would be most of the work.
    """
    if layout_of(model).is_encoder_decoder:
        return forward_with_prefix(model, rows, input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, use_cache=False).loss
    insert_at = infix_points(labels) if rows is not None and rows.infix is not None else None
    hidden = forward_with_prefix(model, rows, input_ids=input_ids, attention_mask=attention_mask,
                                 run=model.base_model, use_cache=False, insert_at=insert_at).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100                                                      # position t predicts token t+1
    h, t = hidden[:, :-1][keep], targets[keep]                                  # (n_targets, d), (n_targets,)
    head = model.get_output_embeddings()
    if len(t) <= LOSS_CHUNK:
        return torch.nn.functional.cross_entropy(head(h).float(), t)
    # The head and cross-entropy LOSS_CHUNK targets at a time: the same loss, logits that stay in cache
    # (64 x 49k floats for SmolLM2 instead of all targets' at once); measured faster on CPU
    # (bench_levers.py, "unchunked-ce" vs "base") and it bounds the logits' memory.
    total = sum(torch.nn.functional.cross_entropy(head(h[i:i + LOSS_CHUNK]).float(), t[i:i + LOSS_CHUNK],
                                                  reduction="sum") for i in range(0, len(t), LOSS_CHUNK))
    return total / len(t)


@torch.no_grad()
def generate_with_prefix(model, rows: RowPrefixes | None, input_ids, attention_mask=None, **kwargs):
    """`model.generate(...)` (greedy, sampling, beams) with per-row conditioning or a shared one.

    Decoder-only models return the prompt ids followed by the new tokens, as `generate()` does,
    also when the prompt holds virtual tokens (their negative ids are returned as given).
    An infix row's infix stands before its last prompt token.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    layout = layout_of(model)
    # cache room for the prompt and the new tokens, at most RESERVE_AHEAD of them up front
    reserve = input_ids.shape[1] + min(RESERVE_AHEAD, _new_tokens(model, kwargs, input_ids.shape[1]))
    if rows is None and not _cache_given_or_unusual(kwargs):
        # no prefix: the model's own decoding, from a cache whose steps write in place (kv_cache.py)
        cache = reserved_plain_cache(model, layout, reserve)
        with use_prefix(model, None):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  **({"cache": cache} if cache is not None else {}), **kwargs)
    insert_at = None
    if rows is not None and rows.infix is not None:
        if layout.is_encoder_decoder:
            raise ValueError("an infix stands between source and target of a decoder-only model; for an "
                             "encoder-decoder model, train a prefix (it reaches the decoder too) instead")
        insert_at = (attention_mask.long().sum(-1) - 1).clamp(min=0)
    laid = None if _cache_given_or_unusual(kwargs) else \
        cached_prefix(model, layout, rows, input_ids.shape[0] * _rows_per_input(model, kwargs), reserve=reserve)
    if laid is not None:
        cache, valid = laid                                                      # valid: (1|batch, P)
        pos = _position_ids(layout, rows, input_ids.shape, attention_mask)
        if pos is not None:
            kwargs["position_ids"] = pos
        # the mask covers the cached slots too: HF then feeds only the input ids, after the cache
        mask = torch.cat([repeat_rows(valid, input_ids.shape[0]).to(attention_mask.dtype), attention_mask], dim=1)
        with use_prefix(model, None):  # stock attention: the prefix is in the cache
            return model.generate(input_ids=input_ids, attention_mask=mask, cache=cache, **kwargs)
    with use_prefix(model, rows) as state:
        state.insert_at = insert_at
        pos = _position_ids(layout, rows, input_ids.shape, attention_mask, insert_at=insert_at)
        if pos is not None:
            kwargs["position_ids"] = pos
        embeds = _soft_embeds(model, rows, input_ids)
        if embeds is None:
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return out if layout.is_encoder_decoder else torch.cat([input_ids, out], dim=1)


# generate() options under which HF does not start from a given cache the plain way
_OWN_CACHE_OPTIONS = ("cache", "past_key_values", "assistant_model", "prompt_lookup_num_tokens", "prefill_chunk_size",
                      "custom_generate", "cache_implementation")


def _cache_given_or_unusual(kwargs) -> bool:
    return any(kwargs.get(k) is not None for k in _OWN_CACHE_OPTIONS) or kwargs.get("use_cache") is False


# New tokens a decoding cache has room for from the start (kv_cache.ReservedLayer). A generation that stops
# early (EOS) should not hold memory for a large max_new_tokens it never used; a longer one grows by doubling.
RESERVE_AHEAD = 128


def _new_tokens(model, kwargs, prompt_width: int) -> int:
    """How many tokens `generate` may add (room reserved in the cache; a longer run grows it)."""
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens") or config.max_new_tokens
    return int(new) if new else max(1, int(kwargs.get("max_length") or config.max_length or 0) - prompt_width)


def _rows_per_input(model, kwargs) -> int:
    """How many rows `generate` makes of each input row: its beams, or its returned samples."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams") or config.num_beams or 1
    return beams if beams > 1 else (kwargs.get("num_return_sequences") or config.num_return_sequences or 1)


def lay_out(template: list | None, source_ids: list[int]) -> list[int]:
    """A row's ids under a soft-prompt template: [["v", n] | ["t", ids] | ["s"], ...] -> ids where
    the k-th virtual token is written -(k+1) and ["s"] stands for the source ids."""
    if not template:
        return list(source_ids)
    out, k = [], 0
    for seg in template:
        if seg[0] == "v":
            out += [-(k + i + 1) for i in range(seg[1])]
            k += seg[1]
        elif seg[0] == "t":
            out += list(seg[1])
        else:
            out += list(source_ids)
    return out


def _relay(prefixes, input_ids, attention_mask, pad_id: int, is_encoder_decoder: bool):
    """Put each soft-prompt row's virtual tokens where its template says, then re-pad the batch
    (left for decoder-only models, right for encoders). Each row's unpadded ids are its source."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = [lay_out(p.template if p is not None else None, ids[m.bool()].tolist())
            for p, ids, m in zip(prefixes, input_ids, attention_mask)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        cols = slice(0, len(row)) if is_encoder_decoder else slice(width - len(row), width)
        ids[r, cols] = torch.tensor(row, dtype=ids.dtype)
        mask[r, cols] = 1
    return ids, mask


def generate_mixed(model, prefixes: list[MergedPrefix | None], input_ids, attention_mask=None, **kwargs):
    """Generate for a batch whose row i uses prefixes[i]: any mix of prefix, infix and soft-prompt
    artifacts (and None) shares one batch. Soft-prompt rows get their virtual tokens laid out by
    their template around the row's ids; decoder-only models return the re-laid prompt + new tokens."""
    if len(prefixes) != input_ids.shape[0]:
        raise ValueError(f"got {len(prefixes)} prefixes for a batch of {input_ids.shape[0]} rows")
    for i, p in enumerate(prefixes):
        if p is not None:
            check_compatible(p, model, source=f"prefixes[{i}]")
    if any(p is not None and p.embeds is not None for p in prefixes):
        pad = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
        input_ids, attention_mask = _relay(prefixes, input_ids, attention_mask, 0 if pad is None else pad,
                                           describe(model).is_encoder_decoder)
    rows = RowPrefixes.per_row(prefixes, device=input_ids.device, dtype=model.dtype)
    return generate_with_prefix(model, rows, input_ids, attention_mask, **kwargs)


@torch.no_grad()
def activations_of_text(model, tokenizer, text: str, length: int) -> dict[str, torch.Tensor]:
    """Per-layer keys/values of the frozen LM on `text` cycled/cut to `length` tokens (paper §7.4).

    Returns kind -> (layers, 2, kv_heads, length, head_dim).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    x = torch.tensor([ids], device=model.device)
    captured: dict = {}
    layout = layout_of(model)
    with use_prefix(model, None, capture=captured):
        if layout.is_encoder_decoder:
            model(input_ids=x, decoder_input_ids=x, use_cache=False)
        else:
            model(input_ids=x, use_cache=False)
    out = {}
    for kind, (layers, heads, head_dim) in layout.shapes.items():
        # each captured tensor: (1, kv_heads, length, head_dim)
        keys = torch.stack([captured[(kind, i)][0][0] for i in range(layers)])
        values = torch.stack([captured[(kind, i)][1][0] for i in range(layers)])
        out[kind] = torch.stack([keys, values], dim=1).float()              # (layers, 2, heads, length, head_dim)
    return out
