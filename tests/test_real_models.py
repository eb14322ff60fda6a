"""The engine on the real shared models: SmolLM2-135M (LLaMA, GQA, GGUF) and T5-small."""

from __future__ import annotations

import pytest
import torch

import prefixtune as pt
from prefixtune.engine import forward_with_prefix
from prefixtune.attention import RowPrefixes

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


def test_gemma3_writes_sensible_text(gemma3):
    """The GGUF loads as Gemma 3 (sliding + global layers) and is a working LM: natural text is far
    more likely than the same words shuffled, and greedy continuation of a plain prompt is English."""
    model, tok = gemma3
    assert model.config.model_type == "gemma3_text"
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}

    def nll(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        return model(input_ids=ids, labels=ids).loss.item()

    natural = "The cat sat on the mat and looked out of the window at the rain."
    shuffled = "window mat the looked rain. cat at of sat on and out the The the"
    assert nll(natural) < nll(shuffled) - 2.0
    enc = tok("The capital of France is", return_tensors="pt")
    out = tok.decode(model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:])
    assert "France" in out or "Paris" in out, out


def test_gemma3_text_prefix_equals_text_prepended_across_the_window(gemma3):
    """Gemma 3's sliding layers (window 512 here): the input is long enough that late queries see only
    part of the prefix text, and the prefix must drop out of reach exactly as the text would."""
    model, tok = gemma3
    window = model.config.sliding_window
    text = "Summarize the following text:"
    t_ids = tok(text, add_special_tokens=False)["input_ids"]
    words = ("the river runs past old mills and quiet farms toward the sea " * 80).split()
    x = tok(" ".join(words), add_special_tokens=False, return_tensors="pt")["input_ids"][:, : window + 8 - len(t_ids) // 2]
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=len(t_ids), reparam="flat", init_text=text), tokenizer=tok)
    got = forward_with_prefix(model, pm.rows(), input_ids=x, run=model.base_model).last_hidden_state
    ref = model.base_model(input_ids=torch.cat([torch.tensor([t_ids]), x], 1)).last_hidden_state[:, len(t_ids):]
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * scale


def test_a_gguf_model_is_saved_once_and_loads_again_bit_identical(smollm2, tmp_path, monkeypatch):
    """The first float32 load of a GGUF model saves it as safetensors in the model cache; the next load reads
    that folder (no GGUF parsing) and gives the same weights, config, generation config and tokenizer."""
    import json

    from prefixtune import models

    monkeypatch.setenv("PREFIXTUNE_MODELS", str(tmp_path))
    target, extra = models._resolve("smollm2-135m")
    folder = models._dequantized_folder(target, extra["gguf_file"])
    assert str(folder).startswith(str(tmp_path)) and not folder.exists()
    gguf_model, gguf_tok = pt.load_model("smollm2-135m")                  # parses the GGUF, saves the folder
    assert (folder / "model.safetensors").exists() and "quantization_config" not in json.loads(
        (folder / "config.json").read_text())
    assert not list(tmp_path.joinpath("dequantized").glob(".*")), "a temporary folder was left behind"
    model, tok = pt.load_model("smollm2-135m")                            # reads the saved folder
    assert model.config._name_or_path == str(folder)
    a, b = gguf_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.lm_head.weight is model.model.embed_tokens.weight      # still tied
    assert models.fingerprint(model) == models.fingerprint(gguf_model)
    skip = {"_name_or_path", "quantization_config", "transformers_version", "dtype"}
    assert {k: v for k, v in model.config.to_dict().items() if k not in skip} == \
        {k: v for k, v in gguf_model.config.to_dict().items() if k not in skip}
    assert model.generation_config.to_dict() == gguf_model.generation_config.to_dict()
    for text in ("name : The Eagle | type : coffee shop", "ünïcödé, 123  spaces\n\ttabs"):
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "Describe the restaurant."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        gguf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (gguf_tok.pad_token, gguf_tok.eos_token, gguf_tok.bos_token)


def test_the_committed_method_sizes_are_what_the_methods_build_on_smollm2(smollm2, tmp_path):
    """docs/methods.md's size table is generated from results/method-sizes/sizes.json: each SmolLM2 entry is
    rebuilt here (fine-tuning's 513 MiB file aside: its counts are checked), so the table cannot drift from
    what the methods train and save."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("method_sizes", root / "scripts" / "method_sizes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recorded = json.loads((root / "results" / "method-sizes" / "sizes.json").read_text())["entries"]
    assert [(e["model"], e["method"], e["configuration"], e["options"]) for e in recorded] == \
        [tuple(e) for e in script.ENTRIES], "scripts/method_sizes.py changed: rerun it"
    model, tok = smollm2
    base = sum(p.numel() for p in model.parameters())
    for e in recorded:
        if e["model"] != "smollm2-135m":
            continue
        assert e["base_params"] == base
        if e["method"] == "finetune":
            assert e["trainable"] == e["artifact_values"] == base
            continue
        measured = script.measure(model, tok, e["method"], e["options"], tmp_path)
        assert measured == {k: e[k] for k in ("trainable", "artifact_values", "file_bytes")}, e
