"""The method family on one engine: prompt tuning, infix, P-tuning, ensembles, mixed batches.

Every check compares against a reference computed another way: the model run on the concatenated
tokens (with a hand-made attention mask for the infix), a step-by-step forward loop without cache,
each row run alone, and log-probabilities averaged row by row.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prefixtune as pt
from prefixtune.engine import activations_of_text, forward_with_prefix, lay_out
from prefixtune.attention import RowPrefixes

from conftest import reversal_pairs, tiny, tiny_tokenizer

ATTN = ["sdpa", "eager"]
TEXT = "w7 w8 w9"


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def logits(model, rows, ids, mask=None, insert_at=None):
    ids = torch.tensor([ids]) if isinstance(ids, list) else ids
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return forward_with_prefix(model, rows, input_ids=ids, attention_mask=mask, insert_at=insert_at,
                                   use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# prompt tuning


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_from_text_equals_text_before_input(arch, attn):
    model, tok = tiny(arch, attn), tiny_tokenizer(arch)
    method = pt.PromptModel(model, pt.PromptConfig(length=3, init_text=TEXT), tokenizer=tok)
    x = ids_of(tok, "w20 w21 w22 w23")
    ours = logits(model, method.conditioning(), lay_out(method.template, x))
    ref = logits(model, None, ids_of(tok, TEXT) + x)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("attn", ATTN)
def test_t5_prompt_goes_in_front_of_the_encoder_input(attn):
    model, tok = tiny("t5", attn), tiny_tokenizer("t5")
    method = pt.PromptModel(model, pt.PromptConfig(length=3, init_text=TEXT), tokenizer=tok)
    from prefixtune.batching import prompt_ids

    src = prompt_ids(tok, "w20 w21", True, 64, method.template)
    assert src[:3] == [-1, -2, -3]
    dec = torch.tensor([[0, 30, 31]])
    with torch.no_grad():
        ours = forward_with_prefix(model, method.conditioning(), input_ids=torch.tensor([src]),
                                   attention_mask=torch.ones(1, len(src), dtype=torch.long), decoder_input_ids=dec).logits
        ref = model(input_ids=torch.tensor([tok(TEXT + " w20 w21")["input_ids"]]), decoder_input_ids=dec).logits
    assert (ours - ref).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# infix


def _infix_reference(model, arch, x, t, rest):
    """[x; T; rest] where T sees only itself: rotary models place T at len(x).., absolute ones at 0..L-1
    (where the infix's activations were made)."""
    s, L, n = len(x), len(t), len(x) + len(t) + len(rest)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    allowed[s:s + L, :s] = False                                                 # T does not see the source
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pos = torch.arange(n)
    if arch == "gpt2":
        pos[s:s + L] = torch.arange(L)
    with torch.no_grad():
        return model(input_ids=torch.tensor([x + t + rest]), attention_mask=mask, position_ids=pos[None]).logits


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_infix_from_text_equals_text_between_source_and_target(arch, attn):
    model, tok = tiny(arch, attn), tiny_tokenizer(arch)
    method = pt.InfixModel(model, pt.InfixConfig(length=3, init_text=TEXT), tokenizer=tok)
    x, sep, y = ids_of(tok, "w20 w21 w22 w23"), ids_of(tok, "\n"), ids_of(tok, "w30 w31")
    ours = logits(model, method.conditioning(), x + sep + y, insert_at=torch.tensor([len(x)]))
    ref = _infix_reference(model, arch, x, ids_of(tok, TEXT), sep + y)
    s, L = len(x), 3
    assert (ours[:, :s] - ref[:, :s]).abs().max() < 1e-4                       # the source does not see the infix
    assert (ours[:, s:] - ref[:, s + L:]).abs().max() < 1e-4                   # the separator and target do
    assert (ours[:, s:] - logits(model, None, x + sep + y)[:, s:]).abs().max() > 1e-3  # and it matters


def test_infix_is_refused_on_encoder_decoder_models():
    with pytest.raises(ValueError, match="decoder-only"):
        pt.InfixModel(tiny("t5"), pt.InfixConfig(length=2))


def test_a_config_says_its_method_by_its_class_and_reads_files_that_named_it_inside():
    from prefixtune.methods import METHODS, method_of

    for name, cls in METHODS.items():
        assert method_of(cls.config_class()) is cls
    # prefixtune 0.2 wrote the method's name into the config too: such files still load
    assert pt.InfixConfig.from_dict({"length": 3, "method": "infix"}) == pt.InfixConfig(length=3)
    with pytest.raises(pt.config.ConfigError, match="unknown field"):
        pt.PrefixConfig.from_dict({"length": 3, "colour": "red"})


def test_the_registry_names_configs_without_torch_and_each_entry_is_its_class():
    # a fresh interpreter: the registry and every config class, and nothing of torch
    code = ("import sys\nfrom prefixtune.methods import METHODS, config_classes\n"
            "assert list(config_classes()) == list(METHODS) and 'lora' in METHODS\n"
            "assert 'torch' not in sys.modules, 'the registry imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from prefixtune.methods import config_class, config_classes, get_method

    for name, cfg in config_classes().items():  # the table's config class is the module class's own
        cls = get_method(name)
        assert (cls.name, cls.config_class) == (name, cfg) and config_class(name.upper()) is cfg
    with pytest.raises(ValueError, match="unknown method 'nope'; methods: prefix, infix"):
        config_class("nope")


def test_a_registry_entry_that_disagrees_with_its_class_is_refused(monkeypatch):
    from prefixtune.methods import registry

    monkeypatch.setitem(registry._TABLE, "lora", registry.Registered(pt.PrefixConfig, "lora:LoRAModel"))
    with pytest.raises(TypeError, match="registry entry 'lora' -> lora:LoRAModel is 'lora' with LoRAConfig, not PrefixConfig"):
        registry.get_method("lora")


def test_a_third_party_method_registers_with_its_class_in_hand(monkeypatch):
    from prefixtune.methods import METHODS, config_class, registry

    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))  # undone after the test

    @registry.register
    class EchoModel(pt.PrefixModel):
        name = "echo"

    assert METHODS["echo"] is EchoModel and config_class("echo") is pt.PrefixConfig and list(METHODS)[-1] == "echo"


def test_the_adapter_config_offers_exactly_the_activations_the_module_builds():
    from prefixtune.methods.adapter import ACTIVATIONS
    from prefixtune.methods.configs import ADAPTER_ACTIVATIONS

    assert tuple(ACTIVATIONS) == ADAPTER_ACTIVATIONS


# ---------------------------------------------------------------------------------------------
# generation == a no-cache loop


def _no_cache_greedy(model, rows, ids, steps, insert_at=None):
    ids = list(ids)
    for _ in range(steps):
        out = logits(model, rows, ids, insert_at=insert_at)
        ids.append(int(out[0, -1].argmax()))
    return ids


def _methods(model, tok):
    return {
        "prompt": pt.PromptModel(model, pt.PromptConfig(length=3, init="random", init_std=0.5), tokenizer=tok),
        "infix": pt.InfixModel(model, pt.InfixConfig(length=3, init_std=0.5, reparam="flat"), tokenizer=tok),
        "ptuning": pt.PTuningModel(model, pt.PTuningConfig(template="[P]*2 {source} w40 [P]", encoder="mlp",
                                                           init_std=1.0), tokenizer=tok),
    }


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_no_cache_loop(arch, attn):
    model, tok = tiny(arch, attn), tiny_tokenizer(arch)
    for name, method in _methods(model, tok).items():
        artifact = method.export()
        prompt = lay_out(artifact.template, ids_of(tok, "w20 w21 w22") + ids_of(tok, "\n")) \
            if artifact.embeds is not None else ids_of(tok, "w20 w21 w22 w23")
        insert_at = torch.tensor([len(prompt) - 1]) if artifact.is_infix else None
        rows = RowPrefixes.per_row([artifact])
        want = _no_cache_greedy(model, rows, prompt, 6, insert_at)
        ids = torch.tensor([prompt])
        got = pt.generate_with_prefix(model, rows, ids, torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      min_new_tokens=6, eos_token_id=None, pad_token_id=0)
        assert got[0].tolist() == want, name


# ---------------------------------------------------------------------------------------------
# mixed batches


@pytest.mark.parametrize("attn", ATTN)
def test_mixed_batch_of_prefix_prompt_ptuning_infix_and_none_equals_each_row_alone(attn):
    model, tok = tiny("llama", attn), tiny_tokenizer("llama")
    arts = [pt.PrefixModel(model, pt.PrefixConfig(length=2, init_std=0.5, reparam="flat")).export()]
    arts += [m.export() for m in _methods(model, tok).values()] + [None]
    sources = [ids_of(tok, s) for s in ("w10 w11", "w12 w13 w14 w15", "w16", "w17 w18 w19", "w20 w21 w22")]
    width = max(map(len, sources))
    ids = torch.zeros(len(sources), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sources):
        ids[r, width - len(s):], mask[r, width - len(s):] = torch.tensor(s), 1
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    mixed = pt.generate_mixed(model, arts, ids, mask, **kw)
    for r, (art, s) in enumerate(zip(arts, sources)):
        alone = pt.generate_mixed(model, [art], torch.tensor([s]), **kw)
        assert mixed[r, -5:].tolist() == alone[0, -5:].tolist(), f"row {r} ({art.meta['method'] if art else None})"


@pytest.mark.parametrize("attn", ATTN)
def test_beam_search_with_a_soft_prompt_on_a_padded_batch_equals_rows_alone(attn):
    model, tok = tiny("llama", attn), tiny_tokenizer("llama")
    art = _methods(model, tok)["ptuning"].export()
    sources = [ids_of(tok, "w10 w11 w12 w13"), ids_of(tok, "w14")]
    kw = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([sources[0], [0, 0, 0] + sources[1]])
    mask = (torch.arange(4)[None] >= torch.tensor([[0], [3]])).long()
    both = pt.generate_mixed(model, [art, art], ids, mask, **kw)
    for r, s in enumerate(sources):
        alone = pt.generate_mixed(model, [art], torch.tensor([s]), **kw)
        assert both[r, -4:].tolist() == alone[0, -4:].tolist()


# ---------------------------------------------------------------------------------------------
# ensembles


def test_ensemble_of_one_equals_that_prompt_and_of_k_equals_row_by_row_average():
    from prefixtune.decode import DecodeConfig, generate_texts
    from prefixtune.batching import prompt_ids

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    arts = [pt.PromptModel(model, pt.PromptConfig(length=2, init="random", init_std=0.8), tokenizer=tok).export()
            for _ in range(3)]
    cfg = DecodeConfig(num_beams=1, max_new_tokens=5, min_new_tokens=5, stop_at_newline=False)
    sources = ["w20 w21", "w22 w23 w24"]
    assert generate_texts(model, tok, sources, [arts[0]], cfg) == generate_texts(model, tok, sources, arts[0], cfg)
    got = generate_texts(model, tok, sources, arts, cfg)
    for src, text in zip(sources, got):
        seqs = [prompt_ids(tok, src, False, 64, a.template) for a in arts]
        for _ in range(5):  # average the members' log-probabilities, one row at a time
            mean = sum(torch.log_softmax(logits(model, RowPrefixes.per_row([a]), s)[0, -1], -1)
                       for a, s in zip(arts, seqs)) / len(arts)
            mean[tok.eos_token_id] = float("-inf")  # min_new_tokens: no end yet
            token = int(mean.argmax())
            seqs = [s + [token] for s in seqs]
        assert text == tok.decode(seqs[0][-5:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------
# training, counts, files


def _param_count_formula(name, method, model):
    h = model.get_input_embeddings().embedding_dim
    if name == "prompt":
        return method.config.length * h
    if name == "ptuning":  # inputs + MLP(hidden -> hidden -> hidden) for the 'mlp' encoder
        n = method.config.length
        return n * h + (h * h + h) + (h * h + h)
    if name == "infix":  # flat: length x (layers * 2 * kv_heads * head_dim)
        layers, heads, hd = method.layout.shapes["self"]
        return method.config.length * layers * 2 * heads * hd


@pytest.mark.parametrize("name", ["prompt", "infix", "ptuning"])
def test_each_method_trains_only_its_own_parameters(tmp_path, name):
    from prefixtune.train import TrainConfig, train

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    method = _methods(model, tok)[name]
    assert method.num_trainable() == _param_count_formula(name, method, model)
    base_before = {n: p.clone() for n, p in model.named_parameters()}
    own_before = {n: p.detach().clone() for n, p in method.trainable().items()}
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=3, checkpoint_every=100, log_every=100)
    result = train(method, tok, reversal_pairs(12), reversal_pairs(4, seed=1), cfg, tmp_path, print_fn=lambda s: None)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(p, own_before[n]) for n, p in method.trainable().items())
    loaded = pt.load_artifact(result["artifact_path"], model)
    assert loaded.meta["method"] == name and loaded.template == result["artifact"].template
    a, b = result["artifact"], loaded
    assert all(torch.equal(a.kv[k], b.kv[k]) for k in a.kv)
    assert (a.embeds is None) == (b.embeds is None) and (a.embeds is None or torch.equal(a.embeds, b.embeds))


def test_resume_with_other_settings_is_refused_naming_each_difference(tmp_path):
    from prefixtune.train import TrainConfig, TrainingError, train

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=2, checkpoint_every=1, log_every=100)
    train(pt.PromptModel(model, pt.PromptConfig(length=2), tok), tok, reversal_pairs(12), [], cfg, tmp_path,
          print_fn=lambda s: None)
    other = TrainConfig(lr=5e-3, epochs=1, batch_size=4, max_steps=4, checkpoint_every=1, log_every=100)
    with pytest.raises(TrainingError, match=r"lr 0\.01 -> 0\.005.*max_steps 2 -> 4"):
        train(pt.PromptModel(model, pt.PromptConfig(length=2), tok), tok, reversal_pairs(12), [], other, tmp_path,
              resume=True, print_fn=lambda s: None)
    with pytest.raises(TrainingError, match=r"length 2 -> 3"):
        train(pt.PromptModel(model, pt.PromptConfig(length=3), tok), tok, reversal_pairs(12), [], cfg, tmp_path,
              resume=True, print_fn=lambda s: None)


def test_non_finite_hyperparameters_are_refused():
    from prefixtune.config import ConfigError
    from prefixtune.train import TrainConfig

    for bad in (dict(lr=float("inf")), dict(lr=float("nan")), dict(weight_decay=float("nan")), dict(max_grad_norm=-1.0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_artifacts_of_every_soft_method_round_trip_and_refuse_the_wrong_model(tmp_path):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    for name, method in _methods(model, tok).items():
        path = tmp_path / f"{name}.safetensors"
        method.save(path)
        back = pt.load_artifact(path, model)
        assert back.meta["method"] == name and back.length == method.export().length
        with pytest.raises(pt.PrefixFileError):
            pt.load_artifact(path, tiny("gpt2"))
