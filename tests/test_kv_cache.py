"""kv_cache.ReservedLayer against transformers' DynamicLayer: the same keys/values after every operation
generate() performs (prefill, steps, beam reorders, crops, batch repeats and selections), through
buffer growth, and the same tokens and scores from a model."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from prefixtune.kv_cache import ReservedLayer, reserved_cache

from conftest import tiny


def _kv(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 3, generator=g)


@pytest.mark.parametrize("capacity", [1, 4, 64], ids=["grows-at-once", "grows-later", "room-to-spare"])
def test_reserved_layer_holds_what_a_dynamic_layer_holds(capacity):
    stock, reserved = DynamicLayer(), ReservedLayer(capacity)

    def same(where):
        assert reserved.get_seq_length() == stock.get_seq_length(), where
        assert torch.equal(reserved.keys, stock.keys) and torch.equal(reserved.values, stock.values), where

    for layer in (stock, reserved):
        out = layer.update(*_kv(6, 5, seed=0))
    assert torch.equal(out[0], stock.keys)
    same("prefill")
    for step in range(7):
        for layer in (stock, reserved):
            out = layer.update(*_kv(6, 1, seed=step + 1))
        assert torch.equal(out[0], stock.keys) and torch.equal(out[1], stock.values)
        same(f"step {step}")
        beam_idx = torch.tensor([1, 1, 0, 5, 3, 3])
        stock.reorder_cache(beam_idx)
        reserved.reorder_cache(beam_idx)
        same(f"reorder after step {step}")
    for layer in (stock, reserved):
        layer.crop(-2)
    same("crop")
    for layer in (stock, reserved):
        layer.batch_repeat_interleave(2)
    same("repeat")
    for layer in (stock, reserved):
        layer.batch_select_indices(torch.tensor([0, 3, 11]))
    same("select")
    for layer in (stock, reserved):
        layer.update(*_kv(3, 2, seed=99))
    same("step after the batch changed")
    with pytest.raises(ValueError, match="negative"):
        reserved.crop(3)


def test_an_empty_reserved_layer_takes_any_row_count():
    layer = ReservedLayer(8)
    layer.update(*_kv(4, 0, seed=1))              # initialized with 4 rows, nothing cached
    keys, _ = layer.update(*_kv(2, 3, seed=2))    # then 2 rows arrive
    assert keys.shape == (2, 2, 3, 4) and torch.equal(keys, _kv(2, 3, seed=2)[0])


def test_a_reserved_cache_generates_what_the_stock_cache_generates():
    """Beam search on a tiny Llama from a reserved cache too small for the run (it grows) and from the
    stock DynamicCache: the same tokens and scores."""
    model = tiny("llama")
    ids = torch.tensor([[3, 14, 15, 92, 65], [0, 0, 35, 89, 7]])
    mask = (ids != 0).long()
    kw = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    stock = model.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), **kw)
    cache = reserved_cache(model.config, capacity=6)
    mine = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
    assert all(isinstance(layer, ReservedLayer) and layer.capacity > 6 for layer in cache.layers)
    assert torch.equal(mine.sequences, stock.sequences)
    assert all(torch.equal(a, b) for a, b in zip(mine.scores, stock.scores))  # bit for bit, -inf where masked


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("beams", [1, 4], ids=["greedy", "beam4"])
def test_decoding_without_a_prefix_uses_a_reserved_cache_and_matches_stock_generate(arch, impl, beams, monkeypatch):
    """generate_with_prefix(rows=None), the path of zero-shot and weight-method evaluation: the stock model's
    tokens and scores, decoded from ReservedLayers."""
    import prefixtune.engine as engine

    model = tiny(arch, impl)
    ids = torch.tensor([[3, 14, 15, 92, 65], [1, 1, 35, 89, 7]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    kw = dict(max_new_tokens=7, num_beams=beams, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=1)
    made = []
    real = engine.reserved_plain_cache
    monkeypatch.setattr(engine, "reserved_plain_cache", lambda *a: made.append(real(*a)) or made[-1])
    mine = engine.generate_with_prefix(model, None, ids, mask, **kw)
    assert made and all(isinstance(layer, ReservedLayer) and layer.capacity == 5 + 7 for layer in made[0].layers)
    stock = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(mine.sequences, stock.sequences)
    assert all(torch.equal(a, b) for a, b in zip(mine.scores, stock.scores))


def test_room_reserved_up_front_is_bounded_and_a_longer_generation_grows_it(monkeypatch):
    """A large max_new_tokens reserves RESERVE_AHEAD new tokens' room, not all of it; a run longer than
    the room grows the buffers and still decodes what stock generate decodes."""
    import prefixtune.engine as engine

    monkeypatch.setattr(engine, "RESERVE_AHEAD", 3)
    model = tiny("llama")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    made = []
    real = engine.reserved_plain_cache
    monkeypatch.setattr(engine, "reserved_plain_cache", lambda *a: made.append(real(*a)) or made[-1])
    kw = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    mine = engine.generate_with_prefix(model, None, ids, None, **kw)
    assert all(layer.capacity > 5 + 3 for layer in made[0].layers)  # started at 8 slots, grew
    assert torch.equal(mine, model.generate(input_ids=ids, **kw))
