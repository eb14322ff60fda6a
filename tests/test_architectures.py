"""Every row of `architectures.ARCHITECTURES` x every attention implementation transformers offers for it,
on tiny seeded random configs, checked against references computed without prefixtune's machinery:

  * a prefix made from text T == T written before the input (decoder-only models; the decoder side of
    encoder-decoders; for bidirectional encoders, T written before the input with T's tokens masked
    from the input, which is what a prefix is);
  * greedy `generate()` with a prefix == a loop that re-runs the whole forward per token, no cache;
  * a padded batch of 3 rows with 3 prefixes of different lengths == each row alone.

Sliding windows are small (4) and the inputs longer, so the window is exercised; rows refused by
the attach-time probe are checked to be refused with a reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import prefixtune as pt
from prefixtune.engine import activations_of_text, forward_with_prefix
from prefixtune.attention import RowPrefixes
from prefixtune.architectures import ARCHITECTURES
from prefixtune.prefix import MergedPrefix

from conftest import VOCAB
from test_engine import ListTokenizer, left_pad, random_prefix, right_pad, strip

_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA = dict(_IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_GPT2 = dict(_IDS, n_embd=32, n_layer=2, n_head=4, n_positions=128)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
           decoder_start_token_id=0)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
             forced_eos_token_id=None)
_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128, pad_token_id=0)
WINDOW = 4  # sliding windows shorter than prefix + input, so that they matter

# model_type -> (config class, model class, config kwargs): the tiny model of each table row
TINY = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _LLAMA),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(_LLAMA, sliding_window=WINDOW)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(_LLAMA, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(_LLAMA, use_sliding_window=True, sliding_window=WINDOW,
                                                        layer_types=["sliding_attention", "full_attention"])),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_LLAMA, head_dim=8)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(_LLAMA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(_LLAMA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, _LLAMA),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, _LLAMA),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, _LLAMA),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, _LLAMA),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(_LLAMA, head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(_LLAMA, head_dim=8, sliding_window=WINDOW)),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                    dict(_LLAMA, num_hidden_layers=3, head_dim=8, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, dict(_LLAMA, partial_rotary_factor=0.5)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(_LLAMA, sliding_window=WINDOW)),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, _LLAMA),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, _LLAMA),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(_LLAMA, sliding_window=WINDOW)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, _GPT2),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(_GPT2, rotary_dim=4)),
    "gpt_bigcode": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, dict(_GPT2, multi_query=True)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                 dict(_IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      rotary_pct=0.5)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(_IDS, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                 max_position_embeddings=128)),
    "t5": (tf.T5Config, tf.T5ForConditionalGeneration, _T5),
    "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration, _T5),
    "bart": (tf.BartConfig, tf.BartForConditionalGeneration, _BART),
    "mbart": (tf.MBartConfig, tf.MBartForConditionalGeneration, _BART),
    "pegasus": (tf.PegasusConfig, tf.PegasusForConditionalGeneration, _BART),
    "marian": (tf.MarianConfig, tf.MarianMTModel, _BART),
    "bert": (tf.BertConfig, tf.BertModel, _BERT),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, dict(_BERT, pad_token_id=1)),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM, dict(_IDS, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4)),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(_IDS, hidden_size=32, n_layer=2, n_head=4)),
    "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2Model, _BERT),
    # image rows: their exactness tests take images (tests/test_vision.py, tests/test_vision_clip.py)
    "vit": (tf.ViTConfig, tf.ViTModel, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=28, patch_size=7)),
    "dinov2": (tf.Dinov2Config, tf.Dinov2Model, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, image_size=28, patch_size=7)),
    "clip": (tf.CLIPConfig, tf.CLIPModel, dict(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7), projection_dim=16)),
}

ACCEPTED = sorted(t for t, a in ARCHITECTURES.items() if a.refused is None and a.modality == "text")
REFUSED = sorted(t for t, a in ARCHITECTURES.items() if a.refused is not None)
MATRIX = [pytest.param(t, impl, id=f"{t}-{impl}") for t in ACCEPTED for impl in ARCHITECTURES[t].impls]
GENERATIVE = [p for p in MATRIX if not ARCHITECTURES[p.values[0]].encoder_only]


def make(model_type: str, impl: str = "sdpa", **overrides):
    config_class, model_class, kwargs = TINY[model_type]
    torch.manual_seed(0)
    config = config_class(**dict(kwargs, **overrides))
    model = model_class(config)
    model.set_attn_implementation(impl)
    if model.can_generate():
        model.generation_config.pad_token_id = config.pad_token_id
    return model.eval().requires_grad_(False)


def kind_of(model):
    if model.config.is_encoder_decoder:
        return "decoder"
    return "self"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# the table itself


def test_table_covers_the_families_people_tune():
    assert len(ACCEPTED) >= 24
    assert set(TINY) == set(ARCHITECTURES), "every table row needs a tiny config here (and nothing else)"
    assert {"falcon", "bloom"} <= set(REFUSED)


@pytest.mark.parametrize("model_type", ACCEPTED)
def test_listed_implementations_are_the_ones_transformers_offers(model_type):
    """`Arch.impls` is the truth: transformers refuses the others (Gemma2: eager only, for soft-capping)."""
    for impl in {"sdpa", "eager"} - set(ARCHITECTURES[model_type].impls):
        with pytest.raises(ValueError, match="does not support"):
            make(model_type, "eager").set_attn_implementation(impl)


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_at_attach_with_a_reason(model_type):
    """The probe finds attention that never reaches AttentionInterface, instead of a KeyError later."""
    model = make(model_type, "eager")
    x = torch.tensor([[5, 6, 7]])
    before = model(input_ids=x)[0]
    with pytest.raises(ValueError, match=rf"{model_type!r} cannot take a prefix: .*AttentionInterface.*What works"):
        pt.PrefixModel(model, pt.PrefixConfig(length=3))
    assert not model.config._attn_implementation.startswith("prefixtune_")
    assert torch.equal(model(input_ids=x)[0], before)  # the model is left as it was


def test_unknown_model_type_is_refused_with_the_supported_list():
    model = make("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"no architecture entry for model_type='mystery'. Supported: .*'gpt2'"):
        pt.PrefixModel(model)


def test_probe_checks_the_table_shapes(monkeypatch):
    """A wrong kv_shape in a table row is caught at attach time, naming the row to fix."""
    import dataclasses

    wrong = dataclasses.replace(ARCHITECTURES["llama"], kv_shape=lambda c, kind: (4, 8))  # GQA has 2 kv heads
    monkeypatch.setitem(ARCHITECTURES, "llama", wrong)
    with pytest.raises(ValueError, match=r"keys have 2 heads of size 8, the architecture table says 4 of 8"):
        pt.layout_of(make("llama"))


# --------------------------------------------------------------------------------------------
# the matrix


def prefix_mask(n: int, m: int) -> torch.Tensor:
    """4-D additive mask over [T (n tokens); input (m)]: bidirectional, except that T's tokens do not
    see the input, which is what a prefix made from T is (its keys/values never read the input)."""
    allowed = torch.ones(n + m, n + m, dtype=torch.bool)
    allowed[:n, n:] = False
    return torch.zeros(1, 1, n + m, n + m).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("model_type,impl", MATRIX)
def test_prefix_from_text_equals_text_prepended(model_type, impl):
    model = make(model_type, impl)
    text = [5, 17, 33, 8, 60]
    x = [11, 12, 13, 40, 41, 42, 7]
    T = torch.tensor([text])
    acts = activations_of_text(model, ListTokenizer(text), "T", len(text))
    if model.config.is_encoder_decoder:
        # encoder side: bidirectional, so T prepended with T's tokens masked from the input
        encoder = model.get_encoder()
        ref_enc = encoder(input_ids=torch.tensor([text + x]), attention_mask=prefix_mask(len(text), len(x)))
        with pt.use_prefix(model, RowPrefixes.per_row([MergedPrefix(kv={"encoder": acts["encoder"]}, meta={})])):
            got_enc = encoder(input_ids=torch.tensor([x])).last_hidden_state
        assert (got_enc - ref_enc.last_hidden_state[:, len(text):]).abs().max() <= 1e-4
        # decoder side: the prefix was captured with the decoder cross-attending to the encoder's reading of T
        enc = encoder(input_ids=T).last_hidden_state
        prefix = MergedPrefix(kv={"decoder": acts["decoder"]}, meta={})
        dec = [model.config.decoder_start_token_id] + x
        ref = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([text + dec])).logits[:, len(text):]
        got = forward_with_prefix(model, RowPrefixes.per_row([prefix]), encoder_outputs=(enc,),
                                  decoder_input_ids=torch.tensor([dec])).logits
        plain = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([dec])).logits
    elif ARCHITECTURES[model_type].encoder_only:
        # bidirectional: T written before x, T's tokens masked from x (a prefix does not read the input)
        mask = prefix_mask(len(text), len(x))
        ref = model(input_ids=torch.tensor([text + x]), attention_mask=mask).last_hidden_state[:, len(text):]
        prefix = MergedPrefix(kv=acts, meta={})
        got = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=torch.tensor([x])).last_hidden_state
        plain = model(input_ids=torch.tensor([x])).last_hidden_state
    else:
        ref = model(input_ids=torch.tensor([text + x])).logits[:, len(text):]
        pm = pt.PrefixModel(model, pt.PrefixConfig(length=len(text), reparam="flat", init_text="T"),
                            tokenizer=ListTokenizer(text))
        got = pm(input_ids=torch.tensor([x])).logits
        plain = model(input_ids=torch.tensor([x])).logits
    assert (got - ref).abs().max() <= 1e-4
    assert (plain - ref).abs().max() > 1e-3, "a prefix that changes nothing would make this test vacuous"


@pytest.mark.parametrize("model_type", [t for t in ACCEPTED if "sliding_window" in TINY[t][2]])
def test_sliding_window_is_exercised(model_type):
    """The text test above would pass with always-visible prefix slots if the window never mattered."""
    impl = ARCHITECTURES[model_type].impls[0]
    ids = torch.tensor([[5, 17, 33, 8, 60, 11, 12, 13, 40]])
    windowed = make(model_type, impl)(input_ids=ids).logits
    unwindowed = make(model_type, impl, sliding_window=100)(input_ids=ids).logits
    assert (windowed - unwindowed).abs().max() > 1e-3


def nocache_loop(model, prefix: MergedPrefix, ids: list[int], steps: int):
    """Reference greedy decoding: the whole forward pass again for every token, no cache.
    Returns the tokens and each step's last-position logits."""
    rows = RowPrefixes.per_row([prefix])
    seq2seq = model.config.is_encoder_decoder
    seq = [model.config.decoder_start_token_id] if seq2seq else list(ids)
    tokens, logits = [], []
    for _ in range(steps):
        if seq2seq:
            out = forward_with_prefix(model, rows, input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([seq]),
                                      use_cache=False)
        else:
            out = forward_with_prefix(model, rows, input_ids=torch.tensor([seq]), use_cache=False)
        logits.append(out.logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
        seq.append(tokens[-1])
        if tokens[-1] == model.config.eos_token_id:
            break
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("model_type,impl", GENERATIVE)
def test_greedy_generate_equals_nocache_loop(model_type, impl):
    """Same tokens and same per-step logits (tiny random models often repeat one token whatever the
    prefix, so the logits are what shows that generate() kept the prefix at every step)."""
    model = make(model_type, impl)
    prefix = random_prefix(model, 4, seed=1)
    ids = [3, 14, 15, 92, 65] + ([model.config.eos_token_id] if model.config.is_encoder_decoder else [])
    out = pt.generate_mixed(model, [prefix], input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    tokens, logits = nocache_loop(model, prefix, ids, 8)
    new = out.sequences[0, 1 if model.config.is_encoder_decoder else len(ids):].tolist()
    assert new == tokens
    got = torch.stack(out.logits)[: len(tokens), 0]
    assert (got - logits).abs().max() <= 1e-4
    base = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, do_sample=False, output_logits=True,
                          return_dict_in_generate=True).logits[0][0]
    assert (base - logits[0]).abs().max() > 1e-3, "a prefix that changes nothing would make this test vacuous"


@pytest.mark.parametrize("model_type,impl", MATRIX)
def test_padded_batch_of_three_prefixes_equals_rows_alone(model_type, impl):
    """Decoder-only and encoder rows left-padded (their positions come from the mask); encoder-decoder
    inputs right-padded, because BART-family encoders count positions from the first column, so left
    padding is inexact there even without a prefix."""
    model = make(model_type, impl)
    prefixes = [random_prefix(model, n, seed=10 + n) for n in (2, 5, 3)]
    seqs = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]]
    seq2seq = model.config.is_encoder_decoder
    pad = model.config.pad_token_id
    ids, mask = right_pad(seqs, pad) if seq2seq else left_pad(seqs, pad)
    rows = RowPrefixes.per_row(prefixes)
    kw = {"decoder_input_ids": torch.tensor([[model.config.decoder_start_token_id, 5, 6, 7, 8]] * 3)} if seq2seq else {}
    out = forward_with_prefix(model, rows, input_ids=ids, attention_mask=mask, **kw)
    batch = out.logits if hasattr(out, "logits") else out.last_hidden_state
    for row, (p, s) in enumerate(zip(prefixes, seqs)):
        one = RowPrefixes.per_row([p])
        kw1 = {k: v[:1] for k, v in kw.items()}
        out1 = forward_with_prefix(model, one, input_ids=torch.tensor([s]), **kw1)
        alone = (out1.logits if hasattr(out1, "logits") else out1.last_hidden_state)[0]
        got = batch[row] if seq2seq else batch[row, -len(s):]
        assert (got - alone).abs().max() <= 1e-4, f"row {row}"
    assert (batch[0] - batch[1]).abs().max() > 1e-3
    if ARCHITECTURES[model_type].encoder_only:
        return
    gen = dict(max_new_tokens=6, do_sample=False)
    mixed = pt.generate_mixed(model, prefixes, input_ids=ids, attention_mask=mask, **gen)
    for row, (p, s) in enumerate(zip(prefixes, seqs)):
        alone = pt.generate_mixed(model, [p], input_ids=torch.tensor([s]), **gen)[0]
        got = mixed[row] if seq2seq else mixed[row, ids.shape[1]:]
        alone = alone if seq2seq else alone[len(s):]
        assert strip(got.tolist(), pad) == strip(alone.tolist(), pad), f"row {row}"


def test_readme_table_is_generated_from_the_table():
    """README.md's supported-architecture table == scripts/arch_table.py's rendering of ARCHITECTURES."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "arch_table.py"
    spec = importlib.util.spec_from_file_location("arch_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.current() == script.render(), "README.md is out of date: run python scripts/arch_table.py --write"
