"""The trainer measures what it keeps: the final state is always evaluated and competes for "best",
and dropout is off for the dev loss, the exported artifact and generation (on again for steps)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prefixtune as pt
from prefixtune.decode import DecodeConfig, generate_texts
from prefixtune.methods import attach, build
from prefixtune.train import TrainConfig, dev_loss, train

from conftest import reversal_pairs, tiny, tiny_tokenizer


def _dev_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "dev_loss" in r]


@pytest.mark.parametrize("eval_every,max_steps", [(4, 7), (3, 5), (5, 5)])
def test_final_state_is_evaluated_when_eval_every_does_not_divide_max_steps(eval_every, max_steps, tmp_path):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    data = reversal_pairs(40)
    torch.manual_seed(0)
    method = build(model, "prefix", tok, length=2)
    result = train(method, tok, data[:30], data[30:], TrainConfig(lr=3e-2, epochs=50, batch_size=4, max_steps=max_steps,
                                                                  eval_every=eval_every, log_every=100), tmp_path,
                   print_fn=lambda s: None)
    steps = [r["step"] for r in _dev_records(tmp_path)]
    want = sorted({*range(eval_every, max_steps + 1, eval_every), max_steps})
    assert steps == want, "every eval_every-th step and the last one, each once"
    assert result["steps"] == max_steps
    losses = {r["step"]: r["dev_loss"] for r in _dev_records(tmp_path)}
    assert result["best_dev_loss"] == min(losses.values())
    assert result["best_step"] == min(losses, key=losses.get)
    # the saved artifact is the state of the best step; at lr 3e-2 on this toy task the last step is best
    assert result["best_step"] == max_steps
    enc = [method.encode(tok, p.source, p.target, 64, 64) for p in data[30:]]
    from prefixtune.methods.prefix import PrefixModel  # the saved prefix, re-measured on a fresh module
    fresh = PrefixModel(model, pt.PrefixConfig(length=2))
    saved = pt.load_prefix(tmp_path / "prefix.safetensors", model)
    from prefixtune.engine import target_loss
    from prefixtune.attention import RowPrefixes
    batch = fresh.collate(enc, tok.pad_token_id)
    with torch.no_grad():
        again = target_loss(model, RowPrefixes.per_row([saved] * len(enc)), batch.input_ids, batch.attention_mask,
                            batch.labels).item()
    assert math.isclose(again, losses[max_steps], rel_tol=1e-4)


def _lora_run(tmp_path, max_steps=5):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    data = reversal_pairs(40)
    torch.manual_seed(0)
    method = build(model, "lora", tok, rank=4, dropout=0.5)
    result = train(method, tok, data[:30], data[30:], TrainConfig(lr=3e-2, epochs=50, batch_size=4, max_steps=max_steps,
                                                                  eval_every=2, log_every=100), tmp_path,
                   print_fn=lambda s: None)
    return model, tok, data, method, result


def test_lora_dropout_is_off_for_dev_loss_and_on_for_steps(tmp_path):
    model, tok, data, method, result = _lora_run(tmp_path)
    assert not method.training, "the trainer hands the method back in eval mode"
    enc = [method.encode(tok, p.source, p.target, 64, 64) for p in data[30:]]
    first, second = (dev_loss(method, enc, tok.pad_token_id, 4) for _ in range(2))
    assert first == second, "deterministic: dropout is off"
    logged = {r["step"]: r["dev_loss"] for r in _dev_records(tmp_path)}
    assert math.isclose(logged[5], first, rel_tol=1e-6), "the logged dev loss is the dropout-free one"
    method.train()
    torch.manual_seed(1)
    noisy = [dev_loss(method, enc, tok.pad_token_id, 4) for _ in range(2)]
    assert noisy[0] != noisy[1], "in train mode dropout 0.5 does change the loss (the test can fail)"
    method.detach()


def test_lora_artifact_generates_like_the_merged_model(tmp_path):
    model, tok, data, method, result = _lora_run(tmp_path)
    method.detach()
    cfg = DecodeConfig(num_beams=1, max_new_tokens=6, batch_size=4)
    sources = [p.source for p in data[30:36]]
    artifact = result["artifact"]
    got = [generate_texts(model, tok, sources, artifact, cfg) for _ in range(2)]
    assert got[0] == got[1]
    attached = attach(model, artifact)
    assert not attached.training
    with torch.no_grad():
        ids = tok(sources[:1], return_tensors="pt")
        hooked = model(**ids).logits
        attached.merge()  # the same update written into the weights: no dropout path exists any more
        merged_logits = model(**ids).logits
    assert torch.allclose(hooked, merged_logits, atol=1e-5)
    merged = generate_texts(model, tok, sources, None, cfg)
    attached.detach()
    assert got[0] == merged


def test_classifier_dev_loss_is_deterministic(tmp_path):
    from test_ptuning_v2 import contains_pairs, encoder_tokenizer, tiny_encoder

    model, tok = tiny_encoder("bert"), encoder_tokenizer("bert")
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=3, head_dropout=0.5)
    data = contains_pairs(28)
    train(method, tok, data[:16], data[16:], TrainConfig(lr=1e-2, epochs=5, batch_size=4, max_steps=5, eval_every=2,
                                                          log_every=100, max_source_len=64),
          tmp_path, print_fn=lambda s: None)
    enc = [method.encode(tok, d.source, d.target, 64) for d in data[16:]]
    losses = [dev_loss(method, enc, tok.pad_token_id, 4) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    logged = {r["step"]: r["dev_loss"] for r in _dev_records(tmp_path)}
    assert math.isclose(logged[5], losses[0], rel_tol=1e-6)
