"""Decoding and serving in bf16 (issue 20): `DecodeConfig.precision` and `ServeConfig.precision` ("fp32",
"bf16", "auto") cast the frozen model's weights to bf16 once, so weights and activations run in bf16 with
no autocast; prefixes meet the model in its dtype, decoding keeps the path that starts from a cache
holding the prefix, weight artifacts apply to the bf16 model and everything is put back exactly after.

References are computed another way in bf16: a greedy loop with no KV cache (the whole forward again per
token, the prefix entering every attention call) on a separate bf16 copy of the model.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import prefixtune as pt
import prefixtune.attention as attention
from prefixtune.attention import RowPrefixes
from prefixtune.batching import prompt_ids
from prefixtune.config import ConfigError
from prefixtune.decode import clean_output, generate_texts
from prefixtune.decode_config import DecodeConfig
from prefixtune.engine import forward_with_prefix
from prefixtune.precision import cast_model, model_in

from test_cli_errors import _run  # the CLI's entry point in this process
from prefixtune.prefix import MergedPrefix
from prefixtune.serve import PrefixStore, ServeConfig, create_app
from prefixtune.serve.sampling import decode as decode_ids
from prefixtune.serve.testing import ServerThread, char_tokenizer

from conftest import one_torch_thread_impl, reversal_pairs, tiny, tiny_tokenizer

one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)

STEPS = 10
SOURCES = ["w5 w6 w7", "w8 w9 w10 w11 w12", "w40"]
# bf16 keeps 8 significant bits: the logits of these tiny models (|logit| < 0.65) moved from fp32's by at most
# 0.0030 (llama), 0.0024 (gpt2), 0.0062 (LoRA), 0.0024 (IA3), measured on a Xeon; about 3x the largest
LOGIT_TOL = 0.02
# two bf16 paths (cache holding the prefix vs the prefix added per layer and step): measured equal here
SAME_PRECISION_TOL = 0.01


def random_prefix(model, length: int, seed: int) -> MergedPrefix:
    g = torch.Generator().manual_seed(seed)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g)
          for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
    return MergedPrefix(kv=kv, meta={"method": "prefix"})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


@torch.no_grad()
def nocache_greedy(model, prefix: MergedPrefix | None, ids: list[int], steps: int, stops: set[int]):
    """Greedy tokens by a full forward pass per token (no cache), and each step's last-position logits."""
    rows = RowPrefixes.per_row([prefix], dtype=model.dtype) if prefix is not None else None
    seq, tokens, logits = list(ids), [], []
    for _ in range(steps):
        out = forward_with_prefix(model, rows, input_ids=torch.tensor([seq]), use_cache=False)
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
        seq.append(tokens[-1])
        if tokens[-1] in stops:
            break
    return tokens, torch.stack(logits)


@torch.no_grad()
def teacher_forced_logits(model, prefix, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits predicting each of `tokens` after `ids`, in one forward pass."""
    rows = RowPrefixes.per_row([prefix], dtype=model.dtype) if prefix is not None else None
    out = forward_with_prefix(model, rows, input_ids=torch.tensor([ids + tokens]), use_cache=False)
    return out.logits[0, len(ids) - 1:len(ids) - 1 + len(tokens)].float()


def bf16_copy(arch: str):
    return cast_model(tiny(arch), torch.bfloat16)


def texts_of(tok, token_lists) -> list[str]:
    return [clean_output(tok.decode(t, skip_special_tokens=True), stop_at_newline=False) for t in token_lists]


@pytest.fixture
def cache_spy(monkeypatch):
    """Each call of the cache lay-out: (the model's dtype then, whether a cache holding the prefix was used)."""
    calls = []
    real = attention.cached_prefix

    def spy(model, *args, **kwargs):
        laid = real(model, *args, **kwargs)
        calls.append((model.dtype, laid is not None))
        return laid

    monkeypatch.setattr(pt.engine, "cached_prefix", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# The setting


def test_precision_setting_is_checked_by_name():
    assert DecodeConfig().precision == "fp32" and ServeConfig().precision == "fp32"  # nothing changes unless asked
    for value in ("fp32", "bf16", "auto"):
        assert DecodeConfig(precision=value).precision == ServeConfig(precision=value).precision == value
    with pytest.raises(ConfigError, match=r"^DecodeConfig\.precision: must be one of fp32, bf16, auto, got 'fp16'"):
        DecodeConfig(precision="fp16")
    with pytest.raises(ConfigError, match=r"^ServeConfig\.precision: must be one of fp32, bf16, auto, got 'BF16'"):
        ServeConfig(precision="BF16")


def test_auto_uses_trainings_cached_measurement(tmp_path, monkeypatch):
    """"auto" asks precision.choose (the per-CPU cache training fills) and decodes in what it says."""
    import prefixtune.precision as precision

    monkeypatch.setattr(precision, "cache_dir", lambda: tmp_path)
    key = precision.machine_key("cpu")
    for bf16 in (True, False):
        (tmp_path / precision.CACHE_FILE).write_text(
            '{"%s": {"bf16": %s, "threads": 1, "reason": "test"}}' % (key, str(bf16).lower()))
        assert precision.decoding_dtype("auto", device="cpu") == (torch.bfloat16 if bf16 else None)
    assert precision.decoding_dtype("fp32") is None and precision.decoding_dtype("bf16") == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_decoding_of_a_prefix_equals_a_nocache_loop_in_bf16(arch, cache_spy):
    model, tok = tiny(arch), tiny_tokenizer(arch)
    before = snapshot(model)
    prefix = random_prefix(model, 4, seed=3)
    stops = {model.config.eos_token_id}
    cfg = DecodeConfig(num_beams=1, max_new_tokens=STEPS, stop_at_newline=False, batch_size=4, precision="bf16")
    got = generate_texts(model, tok, SOURCES, prefix, cfg)
    # the model decoded in bf16, from a cache holding the prefix (the fast path survives the cast)
    assert cache_spy and all(call == (torch.bfloat16, True) for call in cache_spy), cache_spy
    assert_restored(model, before)                                  # float32 again, the very same values

    ref_model = bf16_copy(arch)
    ids = [prompt_ids(tok, s, False, 512) for s in SOURCES]  # source + separator, as decoded
    ref = [nocache_greedy(ref_model, prefix, i, STEPS, stops) for i in ids]
    assert got == texts_of(tok, [t for t, _ in ref])
    # within bf16's rounding of the fp32 path, teacher-forced on the same tokens
    for i, (tokens, logits16) in zip(ids, ref):
        logits32 = teacher_forced_logits(model, prefix, i, tokens)
        assert (logits16 - logits32).abs().max().item() <= LOGIT_TOL
    if arch == "llama":  # bf16 is really another computation: here it picks other tokens than fp32
        fp32 = generate_texts(model, tok, SOURCES, prefix, DecodeConfig(**{**cfg.__dict__, "precision": "fp32"}))
        assert fp32 != got


def test_bf16_generate_keeps_the_prefix_cache_and_matches_per_step_scores(monkeypatch, cache_spy):
    """On a model cast to bf16, generate_mixed (prefixes of two lengths, left padding) starts from the cache
    holding the prefix and gives the tokens of the per-step attention path, scores within bf16 rounding."""
    model = bf16_copy("llama")
    prefixes = [random_prefix(model, 2, seed=1), random_prefix(model, 5, seed=2)]
    ids = torch.tensor([[0, 0, 7, 8], [9, 10, 11, 12]])
    mask = (ids != 0).long()
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    fast = pt.generate_mixed(model, prefixes, ids, mask, **kw)
    assert cache_spy == [(torch.bfloat16, True)]
    monkeypatch.setattr(pt.engine, "cached_prefix", lambda *a, **k: None)
    slow = pt.generate_mixed(model, prefixes, ids, mask, **kw)
    assert torch.equal(fast.sequences, slow.sequences)
    assert max((a.float() - b.float()).abs().max().item() for a, b in zip(fast.scores, slow.scores)) <= SAME_PRECISION_TOL


@pytest.mark.parametrize("method,fields", [("lora", {"rank": 2}), ("ia3", {})])
def test_weight_artifact_decodes_on_the_bf16_model_and_is_removed_exactly(method, fields):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    m = pt.build(model, method, **fields)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    artifact = m.export()
    m.detach()
    before = snapshot(model)
    applied_to, apply = [], artifact.apply

    @contextlib.contextmanager
    def spy(on, tokenizer=None):
        applied_to.append(on.dtype)
        with apply(on, tokenizer) as applied:
            yield applied

    artifact.apply = spy
    cfg = DecodeConfig(num_beams=1, max_new_tokens=STEPS, stop_at_newline=False, precision="bf16")
    got = generate_texts(model, tok, SOURCES, artifact, cfg)
    del artifact.apply
    assert applied_to == [torch.bfloat16]                           # applied to the model cast to bf16
    assert_restored(model, before)

    ids = [prompt_ids(tok, s, False, 512) for s in SOURCES]  # source + separator, as decoded
    stops = {model.config.eos_token_id}
    ref_model = bf16_copy("llama")
    bare16 = [nocache_greedy(ref_model, None, i, STEPS, stops) for i in ids]
    with artifact.apply(ref_model):
        ref = [nocache_greedy(ref_model, None, i, STEPS, stops) for i in ids]
        # the artifact's tensors meet bf16 activations; its logits stay within bf16 rounding of fp32's
        with artifact.apply(model):
            for i, (tokens, logits16) in zip(ids, ref):
                assert (logits16 - teacher_forced_logits(model, None, i, tokens)).abs().max().item() <= LOGIT_TOL
    assert got == texts_of(tok, [t for t, _ in ref])
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(ref, bare16))   # the artifact acted
    assert {p.dtype for p in ref_model.parameters()} == {torch.bfloat16}    # and left the bf16 model bf16
    assert_restored(model, before)


def test_model_in_restores_the_very_same_tensors():
    model = tiny("gpt2")                                           # a tied LM head: one parameter, cast once
    storage = {n: p.data.data_ptr() for n, p in model.named_parameters()}
    with model_in(model, torch.bfloat16):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.dtype == torch.bfloat16
        assert model.lm_head.weight is model.transformer.wte.weight
    assert {n: p.data.data_ptr() for n, p in model.named_parameters()} == storage
    with model_in(model, None):
        assert model.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-precision")
    model = tiny("llama")
    model.save_pretrained(root / "tiny-llama")
    tiny_tokenizer("llama").save_pretrained(root / "tiny-llama")
    pt.save_prefix(random_prefix(model, 3, seed=4), root / "p.safetensors", model=model)
    (root / "pairs.jsonl").write_text("".join(f'{{"source": "{p.source}", "target": "{p.target}"}}\n'
                                              for p in reversal_pairs(10)))
    return root


@pytest.mark.parametrize("command", ["generate", "evaluate", "serve"])
def test_precision_option_exists(command):
    r = _run(command, "--help")
    assert r.returncode == 0 and "--precision" in r.stdout, r.stdout


@pytest.mark.parametrize("command", ["generate", "evaluate", "serve"])
def test_a_bad_precision_is_one_error_line_before_any_model_load(command, cli_assets, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(pt.models, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    root = cli_assets
    args = {"generate": ["generate", "--model", root / "tiny-llama", "--input", "w5"],
            "evaluate": ["evaluate", "--prefix", root / "p.safetensors", "--model", root / "tiny-llama",
                         "--dataset", "jsonl", "--path", root / "pairs.jsonl", "--split", "all", "--out", tmp_path / "o"],
            "serve": ["serve", "--model", root / "tiny-llama", "--store", tmp_path / "s.db"]}[command]
    r = _run(*args, "--precision", "fp16")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --precision: ") and "fp16" in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr and not loads and not list(tmp_path.iterdir())


def test_generate_precision_bf16_decodes_in_bf16(cli_assets, monkeypatch):
    import prefixtune.decode as decode

    seen = []
    real = decode.model_in

    @contextlib.contextmanager
    def spy(model, dtype):
        with real(model, dtype):
            seen.append(model.dtype)
            yield model

    monkeypatch.setattr(decode, "model_in", spy)
    root = cli_assets
    r = _run("generate", "--prefix", root / "p.safetensors", "--model", root / "tiny-llama", "--input", SOURCES[0],
             "--input", SOURCES[1], "--num-beams", 1, "--max-new-tokens", STEPS, "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    assert seen == [torch.bfloat16]
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    want = generate_texts(model, tok, SOURCES[:2], pt.load_prefix(root / "p.safetensors"),
                          DecodeConfig(num_beams=1, max_new_tokens=STEPS, precision="bf16"))
    assert r.stdout.splitlines() == want


# ---------------------------------------------------------------------------------------------
# The server


def test_server_in_bf16_serves_what_bf16_generate_gives(tmp_path):
    model, tok = tiny("llama"), char_tokenizer()
    prefix = random_prefix(model, 3, seed=5)
    path = pt.save_prefix(prefix, tmp_path / "p.safetensors", model=model)
    store = PrefixStore(tmp_path / "store.db", model=model)
    key = store.add_key("alice")
    store.add("p", "alice", path)
    app = create_app(model, tok, store, ServeConfig(precision="bf16", torch_threads=1), model_id="tiny")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # cast once, in place: the server owns it
    ref_model = bf16_copy("llama")
    prompts = ["hello", "The quick brown fox", "xy"]
    want = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        out = pt.generate_mixed(ref_model, [prefix], input_ids=torch.tensor([ids]), max_new_tokens=12,
                                do_sample=False)[0, len(ids):].tolist()
        eos = ref_model.generation_config.eos_token_id
        want.append(decode_ids(tok, out[:out.index(eos)] if eos in out else out))
    import httpx

    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                   headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/health").json()["precision"] == "bf16"
        r = c.post("/v1/completions", json={"model": "p", "prompt": prompts, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [ch["text"] for ch in r.json()["choices"]] == want
    loaded = app.state.prefixtune.prefixes.get(store.get("p", "alice"))
    assert loaded.prefix.kv["self"].dtype == torch.bfloat16          # prefixes are kept in the model's dtype


@pytest.mark.parametrize("measured,recorded", [(None, "fp32"), (torch.bfloat16, "bf16")])
def test_evaluation_records_the_precision_auto_resolved_to(measured, recorded, tmp_path, monkeypatch):
    """metrics.json says which number format the outputs were made in, not "auto"."""
    import json

    import prefixtune.experiments.run as run
    from prefixtune.data import EvalItem

    from conftest import tiny, tiny_tokenizer

    monkeypatch.setattr(run, "decoding_dtype", lambda option, device=None: measured)
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    items = [EvalItem(source="w5 w6", references=("w6 w5",))]
    run.evaluate(model, tok, None, items, "generic", DecodeConfig(num_beams=1, max_new_tokens=3, precision="auto"),
                 tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["decode"]["precision"] == recorded
