"""The engine on the real shared models: SmolLM2-135M (LLaMA, GQA, GGUF) and T5-small."""

from __future__ import annotations

import pytest
import torch

import prefixtune as pt
from prefixtune.engine import RowPrefixes, forward_with_prefix

pytestmark = pytest.mark.real


def test_smollm2_text_prefix_equals_text_prepended(smollm2):
    model, tok = smollm2
    text = "table-to-text:"
    t_ids = tok(text, add_special_tokens=False)["input_ids"]
    x = tok(" name : The Eagle | Type : coffee shop", add_special_tokens=False, return_tensors="pt")["input_ids"]
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=len(t_ids), reparam="flat", init_text=text), tokenizer=tok)
    got = pm(input_ids=x).logits
    ref = model(input_ids=torch.cat([torch.tensor([t_ids]), x], 1)).logits[:, len(t_ids):]
    assert (got - ref).abs().max() <= 1e-4
    layers, heads, head_dim = pt.layout_of(model).shapes["self"]
    assert (layers, heads, head_dim) == (30, 3, 64)
    ten = pt.PrefixModel(model, pt.PrefixConfig(length=10, reparam="flat")).merge()
    assert ten.num_values() == 115_200  # 10 tokens x 30 layers x 2 x 3 kv heads x 64


def test_smollm2_greedy_generate_equals_nocache_loop_and_mixed_batch(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    a = pt.PrefixModel(model, pt.PrefixConfig(length=5, init_text="Translate to French:"), tokenizer=tok).merge()
    b = pt.PrefixModel(model, pt.PrefixConfig(length=3, init_text="Summary:"), tokenizer=tok).merge()
    prompts = ["The cat sat on", "name : Alimentum | area : city centre"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    mixed = pt.generate_mixed(model, [a, b], **enc, max_new_tokens=8, do_sample=False)[:, enc["input_ids"].shape[1]:]
    for row, (p, prefix) in enumerate(zip(prompts, [a, b])):
        ids = tok(p, return_tensors="pt")["input_ids"]
        seq = ids
        for _ in range(8):  # reference: full forward each step, no cache
            logits = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
        assert mixed[row].tolist() == seq[0, ids.shape[1]:].tolist()


def test_t5_small_prefixes_on_all_three_attention_kinds(t5_small, tmp_path):
    model, tok = t5_small
    assert set(pt.layout_of(model).shapes) == {"encoder", "decoder", "cross"}
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=5, init_text="summarize:"), tokenizer=tok)
    enc = tok(["translate English to German: The house is wonderful."], return_tensors="pt")
    labels = tok(["Das Haus ist wunderbar."], return_tensors="pt")["input_ids"]
    loss = pm(**enc, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in pt.trainable_state(pm).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    path = tmp_path / "t5.safetensors"
    pm.save(path)
    loaded = pt.load_prefix(path, model)
    out_a = pm.generate(**enc, max_new_tokens=12, num_beams=3)
    out_b = pt.generate_mixed(model, [loaded], **enc, max_new_tokens=12, num_beams=3)
    assert out_a.tolist() == out_b.tolist()


def test_smollm2_short_e2e_training_lowers_dev_loss(smollm2, tmp_path):
    from conftest import SHARED
    from prefixtune.batching import encode
    from prefixtune.data import load_dataset, low_data_split
    from prefixtune.train import TrainConfig, dev_loss, train

    model, tok = smollm2
    train_part, held_out = low_data_split(load_dataset("e2e", "dev", data_dir=SHARED / "data"), 40, seed=0)
    dev_pairs = held_out.examples[:20]
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=5, init_text="table-to-text:"), tokenizer=tok)
    dev_enc = [encode(tok, p.source, p.target, False) for p in dev_pairs]
    before = dev_loss(pm, dev_enc, tok.pad_token_id, 10)
    result = train(pm, tok, train_part.examples, dev_pairs, TrainConfig(lr=1e-3, epochs=1, batch_size=5, warmup_steps=2),
                   tmp_path, print_fn=lambda s: None)
    assert result["steps"] == 8
    assert result["best_dev_loss"] < before - 0.3, (before, result["best_dev_loss"])
