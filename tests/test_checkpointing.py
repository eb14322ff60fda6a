"""Gradient checkpointing with a prefix gives the same loss and gradients as without, and really recomputes
(each layer runs twice per step); Hugging Face's switch alone does not checkpoint a PrefixModel."""

from __future__ import annotations

import pytest
import torch

import prefixtune as pt
from prefixtune.batching import collate, encode
from prefixtune.gradient_checkpointing import enable_gradient_checkpointing

from conftest import reversal_pairs, tiny, tiny_tokenizer


def step(pm, batch, calls):
    pm.zero_grad(set_to_none=True)
    calls.clear()
    loss = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
              loss_on_targets=True)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in pm.prefix.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointing_gives_the_same_gradients(arch):
    model, tok = tiny(arch), tiny_tokenizer(arch)
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3, mlp_hidden=16)).train()
    batch = collate([encode(tok, p.source, p.target, False) for p in reversal_pairs(4)], tok.pad_token_id, False)
    layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    calls: list = []
    attention0 = next(m for m, slot in pt.layout_of(model).modules.items() if slot == ("self", 0))
    attention0.register_forward_hook(lambda *a: calls.append(1))  # the recomputation calls it again
    ref_loss, ref = step(pm, batch, calls)
    assert len(calls) == 1

    model.gradient_checkpointing_enable()  # HF's switch alone: the frozen LM is in eval mode, nothing changes
    assert step(pm, batch, calls)[0] == ref_loss and len(calls) == 1
    model.gradient_checkpointing_disable()

    enable_gradient_checkpointing(pm)
    pm.train()  # a later train() call (it keeps the frozen LM in eval mode) must not switch it off
    loss, got = step(pm, batch, calls)
    assert len(calls) == 2  # the layer ran again in backward: checkpointing is really on
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-6, rtol=1e-5), name
    in_training = [type(m).__name__ for m in model.modules() if m.training and all(m is not x for x in layers)]
    assert in_training == []  # dropout etc. stay in eval mode


def test_checkpointing_without_the_prefix_context_fails_loudly():
    """Why the helper exists: torch's recomputation runs after use_prefix has exited."""
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3, mlp_hidden=16))
    batch = collate([encode(tok, p.source, p.target, False) for p in reversal_pairs(4)], tok.pad_token_id, False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
              loss_on_targets=True)
    with pytest.raises(Exception, match="Recomputed values"):
        loss.backward()
