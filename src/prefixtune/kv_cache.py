"""A KV cache layer with room reserved for the tokens to come: a decoding step writes in place.

transformers' `DynamicLayer` grows by `torch.cat`, so every decoding step copies every layer's whole
cache; with a prefix laid into the cache (`attention.cached_prefix`) that copy is P slots longer.
Profiled on SmolLM2-135M, 8 E2E prompts, beam 5, 32 new tokens, 1 thread: `aten::cat` was 6.2% of
the plain model's run and the prefix added 9% to it. `ReservedLayer` keeps its keys/values as views of
a buffer with room for the prompt and the new tokens (`engine.RESERVE_AHEAD` of them at most up front,
so an early EOS does not leave a large max_new_tokens reserved; grown by doubling when a run needs
more): a step writes its token's keys/values into the buffer and attention reads the view. Attention
sees the same values, so outputs are identical (tested against the stock layer: tokens and scores).

`generate_with_prefix` decodes from it; the serving batcher converts each new batch's cache
(`reserve_layers`) and sets its contents with `assign` when rows join or leave.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` ((rows, kv_heads, length, head_dim)) are views of buffers
    of `capacity` slots along the sequence."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.length = 0
        self._keys: torch.Tensor | None = None     # (rows, kv_heads, capacity, head_dim)
        self._values: torch.Tensor | None = None   # (rows, kv_heads, capacity, v_head_dim)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys = self._buffer(key_states, self.capacity)
        self._values = self._buffer(value_states, self.capacity)
        self.length = 0
        self._expose()

    @staticmethod
    def _buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
        rows, heads, _, dim = like.shape
        return like.new_empty(rows, heads, capacity, dim)

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def _reallocate(self, capacity: int) -> None:
        """Move the cached slots into fresh buffers of `capacity` slots."""
        self.assign(self.keys, self.values, capacity - self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or (not self.length and self._keys.shape[0] != key_states.shape[0]):
            self.lazy_initialization(key_states, value_states)  # first call, or rows changed while empty
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._reallocate(2 * end)  # doubling: amortized one copy per slot, as a growing array
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Hold exactly `keys`/`values` ((rows, kv_heads, length, head_dim)), with room for `room` more slots."""
        super().lazy_initialization(keys, values)  # device, is_initialized
        self.capacity = keys.shape[-2] + max(1, room)
        self._keys, self._values = self._buffer(keys, self.capacity), self._buffer(values, self.capacity)
        self.length = keys.shape[-2]
        self._keys[:, :, :self.length] = keys
        self._values[:, :, :self.length] = values
        self._expose()

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s slots; only the filled slots are copied (into new buffers)."""
        if not self.length:
            return
        beam_idx = beam_idx.to(self._keys.device)
        keys, values = self._buffer(self._keys, self.capacity), self._buffer(self._values, self.capacity)
        torch.index_select(self.keys, 0, beam_idx, out=keys[:, :, :self.length])
        torch.index_select(self.values, 0, beam_idx, out=values[:, :, :self.length])
        self._keys, self._values = keys, values
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of slots to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._keys, self._values = self._keys[indices, ...], self._values[indices, ...]
            self._expose()

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        super().reset()

    def offload(self):
        raise NotImplementedError("ReservedLayer keeps its buffers on one device (no offloading)")


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `ReservedLayer`s of `capacity` slots.
    The caller has checked that the stock cache for `config` is one plain `DynamicLayer` per layer."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def reserve_layers(cache: DynamicCache, room: int) -> DynamicCache:
    """`cache` with each layer a `ReservedLayer` holding what it held, with room for `room` more slots."""
    reserved = []
    for layer in cache.layers:
        if not isinstance(layer, ReservedLayer):
            new = ReservedLayer(room)
            new.assign(layer.keys, layer.values, room)
            layer = new
        reserved.append(layer)
    cache.layers = reserved
    return cache
