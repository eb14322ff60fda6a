"""The prefix engine against references computed another way, on tiny models of every architecture,
under both attention implementations a user may get (sdpa, the default, and eager)."""

from __future__ import annotations

import pytest
import torch

import prefixtune as pt
from prefixtune.engine import activations_of_text, forward_with_prefix
from prefixtune.attention import RowPrefixes
from prefixtune.kv_cache import ReservedLayer
from prefixtune.prefix import MergedPrefix

from conftest import tiny

DECODERS = ["llama", "gpt2"]
ENC_DECS = ["t5", "bart"]
IMPLS = ["sdpa", "eager"]


class ListTokenizer:
    """Stands in for a tokenizer: 'encodes' any text to fixed ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.ids}


def random_prefix(model, length: int, seed: int, scale: float = 1.0) -> MergedPrefix:
    g = torch.Generator().manual_seed(seed)
    layout = pt.layout_of(model)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g) * scale for k, (layers, heads, hd) in layout.shapes.items()}
    return MergedPrefix(kv=kv, meta={"method": "prefix"})


def left_pad(seqs: list[list[int]], pad: int = 0):
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def right_pad(seqs: list[list[int]], pad: int = 0):
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def nocache_greedy(model, prefix: MergedPrefix, ids: list[int], steps: int, eos: int | None) -> list[int]:
    """Reference: re-run the whole forward pass for every new token, no cache at all."""
    rows = RowPrefixes.per_row([prefix])
    seq = list(ids)
    out = []
    for _ in range(steps):
        x = torch.tensor([seq])
        logits = forward_with_prefix(model, rows, input_ids=x, use_cache=False).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


def nocache_greedy_seq2seq(model, prefix: MergedPrefix, src: list[int], steps: int) -> list[int]:
    rows = RowPrefixes.per_row([prefix])
    dec = [model.config.decoder_start_token_id]
    for _ in range(steps):
        logits = forward_with_prefix(model, rows, input_ids=torch.tensor([src]),
                                     decoder_input_ids=torch.tensor([dec]), use_cache=False).logits
        tok = int(logits[0, -1].argmax())
        dec.append(tok)
        if tok == model.config.eos_token_id:
            break
    return dec


def strip(tokens: list[int], pad: int) -> list[int]:
    while tokens and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("reparam", ["flat", "mlp"])
def test_prefix_from_text_equals_text_prepended(arch, impl, reparam):
    model = tiny(arch, impl)
    text_ids = [5, 17, 33, 8, 60]
    x = torch.tensor([[11, 12, 13, 40, 41, 42, 7]])
    reference = model(input_ids=torch.cat([torch.tensor([text_ids]), x], 1)).logits[:, len(text_ids):]
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=5, reparam=reparam, init_text="T"), tokenizer=ListTokenizer(text_ids))
    got = pm(input_ids=x).logits
    assert (got - reference).abs().max() <= 1e-4
    # and the prefix really matters: without it the logits differ
    assert (model(input_ids=x).logits - reference).abs().max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
def test_text_prefix_with_padding_and_batch(arch, impl):
    """Left-padded batch with a text prefix == each row with the text written before it."""
    model = tiny(arch, impl)
    text_ids = [5, 17, 33]
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3, reparam="flat", init_text="T"), tokenizer=ListTokenizer(text_ids))
    seqs = [[11, 12, 13, 40], [20, 21], [30, 31, 32, 33, 34]]
    ids, mask = left_pad(seqs)
    got = pm(input_ids=ids, attention_mask=mask).logits
    for row, s in enumerate(seqs):
        ref = model(input_ids=torch.tensor([text_ids + s])).logits[0, len(text_ids):]
        assert (got[row, -len(s):] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_equals_nocache_loop(arch, impl):
    model = tiny(arch, impl)
    prefix = random_prefix(model, 4, seed=1)
    pm = pt.PrefixModel(model, prefix=prefix)
    ids = [3, 14, 15, 92, 65]
    out = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    got = out[0, len(ids):].tolist()
    ref = nocache_greedy(model, prefix, ids, 10, eos=model.config.eos_token_id)
    assert strip(got, model.generation_config.pad_token_id) == ref
    base = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert base != got, "a prefix that changes nothing would make this test vacuous"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
def test_beam_search_left_padded_batch_equals_rows_alone(arch, impl):
    model = tiny(arch, impl)
    prefix = random_prefix(model, 3, seed=2)
    pm = pt.PrefixModel(model, prefix=prefix)
    seqs = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]]
    ids, mask = left_pad(seqs)
    kw = dict(max_new_tokens=6, num_beams=5, do_sample=False, early_stopping=True)
    batch = pm.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    for row, s in enumerate(seqs):
        alone = pm.generate(input_ids=torch.tensor([s]), **kw)[0, len(s):]
        pad = model.generation_config.pad_token_id
        assert strip(batch[row].tolist(), pad) == strip(alone.tolist(), pad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS + ENC_DECS)
def test_mixed_batch_equals_each_row_alone(arch, impl):
    """4 rows over 3 prefixes of different lengths: same logits and greedy tokens as each row alone."""
    model = tiny(arch, impl)
    prefixes = [random_prefix(model, n, seed=10 + n) for n in (2, 5, 3)]
    order = [prefixes[0], prefixes[1], prefixes[0], prefixes[2]]
    seqs = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46], [26, 43, 38]]
    pad = model.generation_config.pad_token_id
    # decoder-only batches are left-padded for generation; encoder inputs are right-padded (BART's
    # absolute positions make left padding inexact even without a prefix)
    ids, mask = right_pad(seqs, pad) if model.config.is_encoder_decoder else left_pad(seqs, pad)
    rows = RowPrefixes.per_row(order)
    gen = dict(max_new_tokens=6, do_sample=False)
    if model.config.is_encoder_decoder:
        dec = torch.tensor([[model.config.decoder_start_token_id, 5, 6]] * 4)
        logits = forward_with_prefix(model, rows, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        mixed = pt.generate_mixed(model, order, input_ids=ids, attention_mask=mask, **gen)
    else:
        logits = forward_with_prefix(model, rows, input_ids=ids, attention_mask=mask).logits
        mixed = pt.generate_mixed(model, order, input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    for row, (p, s) in enumerate(zip(order, seqs)):
        one = RowPrefixes.per_row([p])
        x = torch.tensor([s])
        if model.config.is_encoder_decoder:
            ref = forward_with_prefix(model, one, input_ids=x, decoder_input_ids=dec[:1]).logits[0]
            assert (logits[row] - ref).abs().max() <= 1e-4
            alone = pt.generate_mixed(model, [p], input_ids=x, **gen)[0]
        else:
            ref = forward_with_prefix(model, one, input_ids=x).logits[0]
            assert (logits[row, -len(s):] - ref).abs().max() <= 1e-4
            alone = pt.generate_mixed(model, [p], input_ids=x, **gen)[0, len(s):]
        assert strip(mixed[row].tolist(), pad) == strip(alone.tolist(), pad)
    # different prefixes do give different outputs (otherwise mixing would be untested)
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", DECODERS + ENC_DECS)
def test_sdpa_and_eager_agree(arch):
    prefix = random_prefix(tiny(arch), 4, seed=3)
    outs = []
    for impl in IMPLS:
        model = tiny(arch, impl)
        kw = {"decoder_input_ids": torch.tensor([[0, 4, 9]] * 2)} if model.config.is_encoder_decoder else {}
        ids, mask = left_pad([[3, 14, 15, 9], [7, 8]], model.generation_config.pad_token_id)
        outs.append(forward_with_prefix(model, RowPrefixes.per_row([prefix, prefix]), input_ids=ids,
                                        attention_mask=mask, **kw).logits)
    assert (outs[0] - outs[1]).abs().max() <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
def test_sampling_equals_manual_sampling_loop(arch, impl):
    """Sampling with a prefix draws from the prefix-conditioned distribution (same seed, same tokens)."""
    model = tiny(arch, impl)
    prefix = random_prefix(model, 3, seed=4)
    pm = pt.PrefixModel(model, prefix=prefix)
    ids = [3, 14, 15]
    torch.manual_seed(123)
    got = pm.generate(input_ids=torch.tensor([ids]), do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                      max_new_tokens=8)[0, len(ids):].tolist()
    torch.manual_seed(123)
    seq, ref = list(ids), []
    rows = RowPrefixes.per_row([prefix])
    for _ in range(8):
        logits = forward_with_prefix(model, rows, input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        tok = int(torch.multinomial(torch.softmax(logits / 0.7, -1), 1))
        ref.append(tok)
        seq.append(tok)
        if tok == model.config.eos_token_id:
            break
    assert strip(got, model.generation_config.pad_token_id) == ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ENC_DECS)
def test_seq2seq_greedy_equals_nocache_loop(arch, impl):
    model = tiny(arch, impl)
    prefix = random_prefix(model, 4, seed=5)
    src = [3, 14, 15, 92, 65, model.config.eos_token_id]
    got = pt.generate_mixed(model, [prefix], input_ids=torch.tensor([src]), max_new_tokens=8, do_sample=False)[0].tolist()
    ref = nocache_greedy_seq2seq(model, prefix, src, 8)
    assert strip(got, model.generation_config.pad_token_id) == ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ENC_DECS)
def test_seq2seq_beam_batch_equals_rows_alone(arch, impl):
    model = tiny(arch, impl)
    prefix = random_prefix(model, 3, seed=6)
    pad = model.generation_config.pad_token_id
    seqs = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]]
    ids, mask = right_pad(seqs, pad)  # encoder inputs are right-padded as usual
    kw = dict(max_new_tokens=6, num_beams=5, do_sample=False)
    batch = pt.generate_mixed(model, [prefix] * 3, input_ids=ids, attention_mask=mask, **kw)
    for row, s in enumerate(seqs):
        alone = pt.generate_mixed(model, [prefix], input_ids=torch.tensor([s]), **kw)[0]
        assert strip(batch[row].tolist(), pad) == strip(alone.tolist(), pad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ENC_DECS)
def test_encoder_and_cross_prefixes_act_where_they_should(arch, impl):
    model = tiny(arch, impl)
    x = torch.tensor([[3, 14, 15, 92, 65]])
    dec = torch.tensor([[model.config.decoder_start_token_id, 5, 6]])
    full = random_prefix(model, 4, seed=7)

    def only(kind):
        return MergedPrefix(kv={kind: full.kv[kind]}, meta={})

    encoder = model.get_encoder()
    base_enc = encoder(input_ids=x).last_hidden_state
    base_logits = model(input_ids=x, decoder_input_ids=dec).logits
    with pt.use_prefix(model, RowPrefixes.per_row([only("encoder")])):
        enc_with = encoder(input_ids=x).last_hidden_state
    assert (enc_with - base_enc).abs().max() > 1e-3
    with pt.use_prefix(model, RowPrefixes.per_row([only("cross")])):
        enc_cross = encoder(input_ids=x).last_hidden_state
        logits_cross = model(input_ids=x, decoder_input_ids=dec).logits
    assert torch.equal(enc_cross, base_enc)
    assert (logits_cross - base_logits).abs().max() > 1e-3
    with pt.use_prefix(model, RowPrefixes.per_row([only("decoder")])):
        assert torch.equal(encoder(input_ids=x).last_hidden_state, base_enc)
        assert (model(input_ids=x, decoder_input_ids=dec).logits - base_logits).abs().max() > 1e-3


def test_t5_text_prefix_on_decoder_equals_text_prepended():
    """T5's relative position bias: a decoder prefix made from text T acts like T written before the
    decoder input (with the same encoder output, which the captured activations saw)."""
    model = tiny("t5")
    text = [7, 8, 9]
    acts = activations_of_text(model, ListTokenizer(text), "T", 3)  # ran encoder and decoder on T
    prefix = MergedPrefix(kv={"decoder": acts["decoder"]}, meta={})
    dec = [0, 5, 6, 40]
    enc_out = model.get_encoder()(input_ids=torch.tensor([text])).last_hidden_state
    got = forward_with_prefix(model, RowPrefixes.per_row([prefix]), encoder_outputs=(enc_out,),
                              decoder_input_ids=torch.tensor([dec])).logits
    ref = model(encoder_outputs=(enc_out,), decoder_input_ids=torch.tensor([text + dec])).logits[:, len(text):]
    assert (got - ref).abs().max() <= 1e-4
    plain = model(encoder_outputs=(enc_out,), decoder_input_ids=torch.tensor([dec])).logits
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", DECODERS + ENC_DECS)
def test_one_optimizer_step_changes_only_the_prefix(arch):
    model = tiny(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=4))
    trainable = pt.trainable_state(pm)
    assert set(n for n, p in pm.named_parameters() if p.requires_grad) == set(trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = torch.tensor([[3, 14, 15, 92, 65]])
    kw = {"decoder_input_ids": torch.tensor([[0, 4, 9]]), "labels": torch.tensor([[4, 9, 10]])} \
        if model.config.is_encoder_decoder else {"labels": x}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    loss = pm(input_ids=x, **kw).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n
    assert all(not torch.equal(start[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("arch", DECODERS + ENC_DECS)
def test_gradients_match_finite_differences(arch):
    """The prefix's gradient flows through the attention wrapper correctly (checked numerically, float64)."""
    model = tiny(arch, "eager").double()
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=2, reparam="flat")).double()
    x = torch.tensor([[3, 14, 15]])
    kw = {"decoder_input_ids": torch.tensor([[0, 4]])} if model.config.is_encoder_decoder else {}

    def loss():  # HF's own loss upcasts to float32, too coarse for finite differences
        return torch.log_softmax(pm(input_ids=x, **kw).logits, -1)[..., 7].sum()

    param = next(iter(pt.trainable_state(pm).values()))
    (grad,) = torch.autograd.grad(loss(), param)
    idx = grad.abs().argmax()
    eps = 1e-3  # RMSNorm/T5 LayerNorm compute in float32 even in a float64 model: keep eps well above its noise
    with torch.no_grad():
        param.view(-1)[idx] += eps
        up = loss()
        param.view(-1)[idx] -= 2 * eps
        down = loss()
    numeric = (up - down).item() / (2 * eps)
    assert abs(numeric - grad.view(-1)[idx].item()) <= 2e-3 * max(1.0, abs(numeric))
    assert grad.abs().max() > 0


def test_prefix_sizes_follow_kv_heads():
    model = tiny("llama")
    layout = pt.layout_of(model)
    assert layout.shapes == {"self": (2, 2, 8)}  # 2 layers, 2 kv heads (GQA), head_dim 32/4
    t5 = pt.layout_of(tiny("t5"))
    assert set(t5.shapes) == {"encoder", "decoder", "cross"}


def test_unsupported_attention_implementation_is_refused():
    model = tiny("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="not supported"):
        pt.layout_of(model)


def test_switching_attention_implementation_reattaches():
    """A user who switches the implementation after attaching still gets the prefix (never silently dropped)."""
    model = tiny("llama")
    prefix = random_prefix(model, 2, seed=8)
    x = torch.tensor([[3, 4, 5]])
    with_prefix = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=x).logits
    model.set_attn_implementation("eager")
    again = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=x).logits
    assert model.config._attn_implementation == "prefixtune_eager"
    assert (again - with_prefix).abs().max() <= 1e-4
    assert (again - model(input_ids=x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", DECODERS)
def test_cached_step_without_mask_keeps_positions(arch):
    """A decode step given only the cache (no attention mask) still places the token after prefix + past."""
    model = tiny(arch)
    rows = RowPrefixes.per_row([random_prefix(model, 3, seed=9)])
    x = torch.tensor([[3, 14, 15, 92, 65]])
    full = forward_with_prefix(model, rows, input_ids=x).logits[:, -1]
    first = forward_with_prefix(model, rows, input_ids=x[:, :-1], use_cache=True)
    step = forward_with_prefix(model, rows, input_ids=x[:, -1:], cache=first.cache, use_cache=True).logits[:, -1]
    assert (step - full).abs().max() <= 1e-4


def _without_laid_out_cache(monkeypatch):
    """Force the attention functions' path (prefix concatenated per layer and step) for a reference."""
    import prefixtune.engine as engine

    monkeypatch.setattr(engine, "cached_prefix", lambda *a, **k: None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("kw", [dict(max_new_tokens=6, do_sample=False),
                                dict(max_new_tokens=6, num_beams=5, do_sample=False, early_stopping=True),
                                dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, top_k=0)],
                         ids=["greedy", "beam5", "sample-x2"])
def test_generation_from_a_cache_holding_the_prefix_equals_the_per_step_path(arch, impl, kw, monkeypatch):
    """Decoding starts from a cache that holds each row's prefix (no concatenation per layer and step):
    the same scores and tokens as the attention functions' path, for a left-padded batch mixing prefixes
    of three lengths, with beams and with several samples per row."""
    import prefixtune.attention as attention

    model = tiny(arch, impl)
    prefixes = [random_prefix(model, n, seed=10 + n) for n in (2, 5, 3)]
    rows = RowPrefixes.per_row([prefixes[0], prefixes[1], prefixes[2]])
    ids, mask = left_pad([[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]])
    out = dict(output_scores=True, return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id)
    laid = []
    real = attention.cached_prefix
    monkeypatch.setattr(pt.engine, "cached_prefix", lambda *a, **k: laid.append(real(*a, **k)) or laid[-1])
    torch.manual_seed(0)
    fast = pt.engine.generate_with_prefix(model, rows, ids, mask, **kw, **out)
    assert laid and laid[0] is not None, "the laid-out cache was not used"
    # room reserved for the prompt and the new tokens: the steps wrote in place, the buffers never regrew
    assert all(isinstance(layer, ReservedLayer) and layer.capacity == 5 + 5 + 6 for layer in laid[0][0].layers)
    _without_laid_out_cache(monkeypatch)
    torch.manual_seed(0)
    slow = pt.engine.generate_with_prefix(model, rows, ids, mask, **kw, **out)
    assert torch.equal(fast.sequences, slow.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(fast.scores, slow.scores)
               if torch.isfinite(a).any()) <= 1e-5


def test_the_cache_does_not_stand_in_where_it_would_be_inexact():
    """Infix rows, soft prompts, encoder-decoder models and autocast keep the per-step path."""
    from prefixtune.attention import cached_prefix

    model = tiny("llama")
    layout = pt.layout_of(model)
    p = random_prefix(model, 3, seed=1)
    assert cached_prefix(model, layout, RowPrefixes.per_row([p]), 2) is not None
    infix = MergedPrefix(kv=p.kv, meta={"method": "infix", "insert": "target"})
    assert infix.is_infix and cached_prefix(model, layout, RowPrefixes.per_row([infix]), 1) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cached_prefix(model, layout, RowPrefixes.per_row([p]), 1) is None
    t5 = tiny("t5")
    assert cached_prefix(t5, pt.layout_of(t5), RowPrefixes.per_row([random_prefix(t5, 3, seed=1)]), 1) is None


def test_a_prefix_that_reaches_no_attention_layer_is_an_error():
    """The silent failure of other libraries (a prefix that changes nothing) is refused loudly."""
    model = tiny("llama")
    rows = RowPrefixes.per_row([random_prefix(model, 3, seed=1)])
    with pytest.raises(RuntimeError, match="not applied to any attention layer"):
        forward_with_prefix(model, rows, input_ids=torch.tensor([[3, 4, 5]]), run=lambda **kwargs: None)
    forward_with_prefix(model, rows, input_ids=torch.tensor([[3, 4, 5]]))  # through the model: it reaches them
