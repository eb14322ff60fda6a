"""The paper's weight baselines (finetune, ft-top, adapter, LoRA) on the method protocol: what trains,
parameter counts against formulas written from the model configs, unchanged logits at init, LoRA
merge, save -> load -> attach, wrong-base refusal, exact resume after kill -9, and PEFT interop
(LoRA and prompt tuning) against PEFT's own forward."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import prefixtune as pt
from prefixtune.train import TrainConfig, train

from conftest import reversal_pairs, tiny, tiny_tokenizer

X = torch.tensor([[3, 14, 15, 92, 7]])
WEIGHT_METHODS = ["finetune", "ft-top", "adapter", "lora"]


@torch.no_grad()
def logits(model, **kw):
    # no_grad: with gradients on, some kernels (T5 under sdpa) round differently in the last bit
    if model.config.is_encoder_decoder:
        kw.setdefault("decoder_input_ids", torch.tensor([[0, 5, 6]]))
    return model(input_ids=X, **kw).logits


@torch.no_grad()
def randomize(method, seed: int = 1, std: float = 0.3) -> None:
    """Move every trainable tensor away from its init (B and up-projections start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in method.trainable().values():
        p.add_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------
# Parameter counts: formulas from the configs, not from the modules


def _llama_block(c) -> int:
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    attn = d * d + 2 * d * c.num_key_value_heads * hd + d * d          # q, k, v, o (no biases)
    return attn + 3 * d * c.intermediate_size + 2 * d                    # gate, up, down; two RMSNorms


def _gpt2_block(c) -> int:
    d = c.n_embd
    return (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)


def test_parameter_counts_match_formulas():
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    cl, cg = llama.config, gpt2.config
    # finetune: embeddings + blocks + final norm (+ untied LM head for llama; GPT-2's is tied)
    assert pt.build(llama, "finetune").num_trainable() == (
        2 * cl.vocab_size * cl.hidden_size + cl.num_hidden_layers * _llama_block(cl) + cl.hidden_size)
    assert pt.build(gpt2, "finetune").num_trainable() == (
        cg.vocab_size * cg.n_embd + cg.n_positions * cg.n_embd + cg.n_layer * _gpt2_block(cg) + 2 * cg.n_embd)
    for k in (1, 2):
        assert pt.build(tiny("llama"), "ft-top", layers=k).num_trainable() == k * _llama_block(cl)
        assert pt.build(tiny("gpt2"), "ft-top", layers=k).num_trainable() == k * _gpt2_block(cg)
    # adapter: 2 sites per decoder-only block; encoder-decoder: 2 per encoder block, 3 per decoder block
    for arch, sites in (("llama", 2 * 2), ("gpt2", 2 * 2), ("t5", 2 * 2 + 3 * 2), ("bart", 2 * 2 + 3 * 2)):
        d, m = 32, 5
        assert pt.build(tiny(arch), "adapter", size=m).num_trainable() == sites * (d * m + m + m * d + d), arch
    # lora on q and v: r * (in + out) each
    r, d, kv = 4, cl.hidden_size, cl.num_key_value_heads * (cl.hidden_size // cl.num_attention_heads)
    assert pt.build(tiny("llama"), "lora", rank=r).num_trainable() == cl.num_hidden_layers * r * ((d + d) + (d + kv))
    assert pt.build(tiny("gpt2"), "lora", rank=r).num_trainable() == cg.n_layer * r * (cg.n_embd + 3 * cg.n_embd)
    # t5: q and v of encoder self-attention, decoder self- and cross-attention (inner dim heads*d_kv)
    ct = tiny("t5").config
    inner = ct.num_heads * ct.d_kv
    assert pt.build(tiny("t5"), "lora", rank=r).num_trainable() == (2 + 2 * 2) * 2 * r * (ct.d_model + inner)


def test_adapter_size_from_fraction():
    from prefixtune.config import ConfigError

    model = tiny("llama")
    base = sum(p.numel() for p in model.parameters())
    for fraction in (0.03, 0.1, 0.2):
        method = pt.build(model, "adapter", fraction=fraction)
        got = method.num_trainable() / base
        per_width = 4 * (2 * 32 + 1) / base  # one more bottleneck unit adds this share
        assert abs(got - fraction) <= per_width / 2 + 1e-12, (fraction, got, method.size)
        method.detach()
    assert pt.build(model, "adapter", fraction=1e-6).size == 1  # at least one unit
    with pytest.raises(ConfigError, match="not both"):
        pt.build(model, "adapter", size=4, fraction=0.01)


def test_configs_refuse_bad_values_by_name():
    from prefixtune.config import ConfigError

    for method, fields, where in (("lora", {"rank": 0}, "LoRAConfig.rank"), ("lora", {"alpha": -1.0}, "LoRAConfig.alpha"),
                                  ("lora", {"target_modules": "("}, "LoRAConfig.target_modules"),
                                  ("adapter", {"fraction": 2.0}, "AdapterConfig.fraction"),
                                  ("ft-top", {"layers": 0}, "FtTopConfig.layers")):
        with pytest.raises(ConfigError, match=where):
            pt.get_method(method).config_class(**fields)
    with pytest.raises(ValueError, match="only 2 blocks"):
        pt.build(tiny("llama"), "ft-top", layers=3)
    with pytest.raises(ValueError, match="matches 'model.layers.0.self_attn', a LlamaAttention"):
        pt.build(tiny("llama"), "lora", target_modules=r"self_attn$")
    with pytest.raises(ValueError, match="matches no module"):
        pt.build(tiny("llama"), "lora", target_modules=r"nothing_here")


# ---------------------------------------------------------------------------------------------
# At init the model is unchanged; LoRA merge; detach restores the model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_init_leaves_logits_unchanged_and_detach_removes_hooks(arch, method):
    model = tiny(arch)
    pt.layout_of(model)
    before = logits(model)
    m = pt.build(model, method, **({"size": 3} if method == "adapter" else {"rank": 2}))
    assert torch.equal(logits(model), before)
    randomize(m)
    assert (logits(model) - before).abs().max() > 1e-3  # the hooks are live
    m.detach()
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and GPT-2's Conv1D
def test_merged_lora_equals_unmerged_forward(arch):
    model = tiny(arch)
    base = logits(model)
    lora = pt.build(model, "lora", rank=3, alpha=5.0, target_modules=r"(q_proj|v_proj|o_proj|c_attn|c_proj)$")
    randomize(lora)
    unmerged = logits(model)
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    lora.merge()
    assert not lora._hooks
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights_before[n])}
    assert changed == {f"{name}.weight" for name in lora.targets}
    merged = logits(model)
    assert (merged - unmerged).abs().max() <= 1e-5 and (merged - base).abs().max() > 1e-3
    lora.detach()
    assert torch.equal(logits(model), base)


# ---------------------------------------------------------------------------------------------
# Training: only the method's own parameters change


@pytest.mark.parametrize("method,arch", [("finetune", "llama"), ("ft-top", "llama"), ("ft-top", "t5"),
                                         ("adapter", "llama"), ("lora", "gpt2"), ("lora", "bart")])
def test_training_changes_only_its_own_parameters(method, arch, tmp_path):
    model, tok = tiny(arch), tiny_tokenizer(arch)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    fields = {"ft-top": {"layers": 1}, "adapter": {"size": 4}, "lora": {"rank": 2}}.get(method, {})
    m = pt.build(model, method, **fields)
    own = {n: p.clone() for n, p in m.trainable().items()}
    result = train(m, tok, reversal_pairs(24), reversal_pairs(6, seed=1),
                   TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=4, log_every=100), tmp_path,
                   print_fn=lambda s: None)
    assert result["trainable_params"] == sum(p.numel() for p in own.values())
    changed_own = {n for n, p in m.trainable().items() if not torch.equal(p, own[n])}
    after = model.state_dict()
    changed_base = {n for n in before if not torch.equal(after[n], before[n])}
    if method in ("adapter", "lora"):
        assert changed_own == set(own)          # every adapter / A and B tensor trained
        assert not changed_base                 # the base model is bit-identical
    else:
        assert changed_base and changed_base <= set(own)  # only the method's own (base) tensors changed
        if method == "ft-top":                  # the top block of each stack, nothing else
            tops = ("encoder.block.1.", "decoder.block.1.") if arch == "t5" else ("model.layers.1.",)
            assert all(n.startswith(tops) for n in own)
            assert all(any(n.startswith(t) for n in changed_base) for t in tops)
    # the saved artifact holds exactly the method's tensors
    saved = pt.load_artifact(result["artifact_path"], tiny(arch))
    assert saved.method == method and set(saved.tensors) == set(own)
    m.detach()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # detach restores the model


# ---------------------------------------------------------------------------------------------
# Files: save -> load -> attach, wrong base refused


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_save_load_attach_gives_identical_logits(method, tmp_path):
    model = tiny("gpt2")
    base = logits(model)
    m = pt.build(model, method, **({"size": 3} if method == "adapter" else {}))
    randomize(m, std=0.05)
    ours = logits(model)
    path = tmp_path / f"{method}.safetensors"
    m.save(path)
    m.detach()
    other = tiny("gpt2")                                          # a fresh copy of the same base model
    artifact = pt.load_artifact(path, other)
    assert isinstance(artifact, pt.WeightArtifact) and artifact.meta["fingerprint"] == pt.models.fingerprint(other)
    attached = pt.attach(other, artifact)
    assert torch.equal(logits(other), ours)
    attached.detach()
    assert torch.equal(logits(other), base)
    # only what changed or was added is stored
    names = set(artifact.tensors)
    if method == "lora":
        assert names == {f"lora.transformer.h.{i}.attn.c_attn.{p}" for i in range(2) for p in "AB"}
    elif method == "ft-top":
        assert names == {n for n, _ in other.named_parameters() if n.startswith("transformer.h.")}
    elif method == "adapter":
        assert all(n.startswith("adapter.transformer.h.") for n in names) and len(names) == 4 * 4


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_an_artifact_that_does_not_fit_leaves_the_model_as_it_was(tmp_path, method):
    model = tiny("llama")
    m = pt.build(model, method)
    randomize(m)
    m.save(tmp_path / "a.safetensors")
    m.detach()
    artifact = pt.load_artifact(tmp_path / "a.safetensors", model)
    name = sorted(artifact.tensors)[-1]
    artifact.tensors[name] = torch.cat([artifact.tensors[name]] * 2)  # the right base, one tensor of the wrong shape

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    modules, hooked, base = [n for n, _ in model.named_modules()], hooks(), logits(model)
    with pytest.raises(pt.PrefixFileError, match="shape"):
        pt.attach(model, artifact)
    # the half-applied method is taken off again: no module of it is left, the outputs are the base's
    assert [n for n, _ in model.named_modules()] == modules and hooks() == hooked
    assert torch.equal(logits(model), base)


def test_wrong_base_model_is_refused(tmp_path):
    model = tiny("llama")
    m = pt.build(model, "lora", rank=2)
    randomize(m)
    path = tmp_path / "lora.safetensors"
    m.save(path)
    m.detach()
    other = tiny("llama")
    with torch.no_grad():
        other.model.embed_tokens.weight[0, 0] += 1.0              # another base model (different weights)
    with pytest.raises(pt.PrefixFileError, match="fingerprint"):
        pt.load_artifact(path, other)
    artifact = pt.load_artifact(path)                             # read without a model, then attach: refused too
    with pytest.raises(pt.PrefixFileError, match="fingerprint"):
        pt.attach(other, artifact)
    with pytest.raises(pt.PrefixFileError, match="fingerprint"):
        pt.attach(tiny("gpt2"), artifact)
    # a model that already carries changed weights is not the base either
    ft = pt.build(model, "finetune")
    randomize(ft)
    with pytest.raises(pt.PrefixFileError, match="fingerprint"):
        pt.attach(model, artifact)
    ft.detach()
    pt.attach(model, artifact).detach()


def test_generate_texts_applies_and_removes_a_weight_artifact():
    from prefixtune.decode import DecodeConfig, generate_texts

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    lora = pt.build(model, "lora", rank=2)
    randomize(lora, std=1.0)
    cfg = DecodeConfig(num_beams=1, max_new_tokens=4, batch_size=2)
    sources = ["w5 w6 w7", "w8 w9"]
    applied = generate_texts(model, tok, sources, None, cfg)       # reference: hooks on, bare decoding
    artifact = lora.export()
    lora.detach()
    bare = generate_texts(model, tok, sources, None, cfg)
    assert generate_texts(model, tok, sources, artifact, cfg) == applied != bare
    assert generate_texts(model, tok, sources, None, cfg) == bare  # removed afterwards


# ---------------------------------------------------------------------------------------------
# kill -9 + resume gives the identical artifact

def _run(method: str, out: Path, kill_at: int | None = None, resume: bool = False) -> list[str]:
    torch.manual_seed(0)
    m = pt.build(tiny("llama"), method, **{"lora": dict(rank=2, dropout=0.1), "adapter": dict(size=4)}[method])

    def progress(record):
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash would

    printed: list[str] = []
    train(m, tiny_tokenizer("llama"), reversal_pairs(48), reversal_pairs(8, seed=1),
          TrainConfig(lr=1e-2, epochs=2, batch_size=4, checkpoint_every=3, log_every=100), out, resume=resume,
          progress=progress, print_fn=printed.append)
    return printed


@pytest.mark.parametrize("method", ["lora", "adapter"])  # LoRA with dropout: the RNG state resumes too
def test_kill_9_and_resume_gives_the_same_artifact(method, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in parent and child (forked: no interpreter start-up)
    try:
        _run(method, tmp_path / "full")                             # uninterrupted reference
        pid = os.fork()
        if pid == 0:                                                # child: killed with SIGKILL at step 17
            try:
                _run(method, tmp_path / "killed", kill_at=17)
            finally:
                os._exit(1)                                         # never reached when killed
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        assert not (tmp_path / "killed" / f"{method}.safetensors").exists()
        printed = _run(method, tmp_path / "killed", resume=True)
    finally:
        torch.set_num_threads(threads)
    assert any("resumed from" in line and "at step 15" in line for line in printed), printed  # last checkpoint
    a = pt.load_artifact(tmp_path / "full" / f"{method}.safetensors").tensors
    b = pt.load_artifact(tmp_path / "killed" / f"{method}.safetensors").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 18)) + list(range(16, 25))      # steps 16-17 were lost with the kill, redone


# ---------------------------------------------------------------------------------------------
# PEFT interop: LoRA and prompt tuning


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_export_gives_equal_logits_in_peft(arch, tmp_path):
    from peft import PeftModel

    model = tiny(arch)
    lora = pt.build(model, "lora", rank=3, alpha=6.0)
    randomize(lora)
    ours = logits(model)
    artifact = lora.export()
    lora.detach()
    pt.export_peft(artifact, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6.0
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(tiny(arch), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(input_ids=X).logits
    assert (ours - theirs).abs().max() <= 1e-5 and (ours - logits(model)).abs().max() > 1e-3


def test_lora_import_from_peft_gives_equal_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj",
                                                                                               "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")              # written by PEFT itself
    with torch.no_grad():
        theirs = peft_model(input_ids=X).logits
    model = tiny("llama")
    artifact = pt.import_peft(tmp_path / "adapter", model)
    assert artifact.method == "lora" and len(artifact.tensors) == 2 * 3 * 2
    attached = pt.attach(model, artifact)
    assert (logits(model) - theirs).abs().max() <= 1e-5
    attached.detach()
    pt.save_artifact(artifact, tmp_path / "lora.safetensors")     # and it is an ordinary prefixtune file
    assert set(pt.load_artifact(tmp_path / "lora.safetensors", model).tensors) == set(artifact.tensors)
    with pytest.raises(pt.PrefixFileError, match="does not fit"):
        pt.import_peft(tmp_path / "adapter", tiny("gpt2"))


def test_peft_refusals_name_the_reason(tmp_path):
    ft = pt.build(tiny("llama"), "ft-top", layers=1)
    with pytest.raises(ValueError, match="no adapter format for prefixtune's 'ft-top'.*export to PEFT: .*lora"):
        pt.export_peft(ft.export(), tmp_path / "a")
    ft.detach()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                                     "use_dora": True}))
    from safetensors.torch import save_file
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(pt.PrefixFileError, match="use_dora"):
        pt.import_peft(tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(pt.PrefixFileError, match="peft_type is 'LOHA'; prefixtune imports PREFIX_TUNING, .*LORA"):
        pt.import_peft(tmp_path / "b")


def _prompt_logits(model, prompt):
    from prefixtune.engine import forward_with_prefix, lay_out
    from prefixtune.attention import RowPrefixes

    ids = torch.tensor([lay_out(prompt.template, X[0].tolist())])
    with torch.no_grad():
        return forward_with_prefix(model, RowPrefixes.per_row([prompt]), input_ids=ids).logits[:, prompt.length:]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_export_gives_equal_logits_in_peft(arch, tmp_path):
    from peft import PeftModel

    model = tiny(arch)
    prompt = pt.build(model, "prompt", length=3, init="random", init_std=0.5).export()
    ours = _prompt_logits(model, prompt)
    pt.export_peft(prompt, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3
    peft_model = PeftModel.from_pretrained(tiny(arch), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(input_ids=X).logits[:, 3:]            # PEFT returns the virtual positions too
    assert (ours - theirs).abs().max() <= 1e-4 and (ours - logits(model)).abs().max() > 1e-3


def test_prompt_import_from_peft_gives_equal_logits(tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(tiny("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")              # written by PEFT itself
    with torch.no_grad():
        theirs = peft_model(input_ids=X).logits[:, 4:]
    model = tiny("llama")
    prompt = pt.import_peft(tmp_path / "adapter", model)
    assert prompt.embeds.shape == (4, 32) and prompt.template == [["v", 4], ["s"]]
    assert (_prompt_logits(model, prompt) - theirs).abs().max() <= 1e-4
    # through prefixtune's own file and generate path too
    pt.save_prefix(prompt, tmp_path / "p.safetensors", model=model)
    assert torch.equal(pt.load_prefix(tmp_path / "p.safetensors", model).embeds, prompt.embeds)


def test_prompt_export_refuses_templates_peft_cannot_hold(tmp_path):
    from prefixtune.prefix import MergedPrefix

    shaped = MergedPrefix(kv={}, embeds=torch.zeros(4, 32), meta={"method": "ptuning",
                                                                  "template": [["v", 2], ["s"], ["v", 2]]})
    with pytest.raises(ValueError, match="in front of the input only"):
        pt.export_peft(shaped, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# run_training hands back the base model: evaluation applies the artifact exactly once

@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_run_training_returns_the_base_model_so_the_artifact_applies_once(method, tmp_path):
    """The sweep and the demo train, then evaluate `run["artifact"]` on `run["model"]`.
    A model still carrying the trained weights or hooks made that fail (finetune, ft-top: the
    fingerprint changed) or apply adapters and LoRA twice. Reference: the artifact on a fresh base."""
    from prefixtune.decode import DecodeConfig, generate_texts
    from prefixtune.experiments.run import DataPlan, run_training
    from prefixtune.models import fingerprint
    from prefixtune.recipes import configs_for

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in reversal_pairs(40)))
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    base = fingerprint(model)
    method_cfg, train_cfg = configs_for("jsonl", method, lr=1e-2, max_steps=3, batch_size=4, eval_every=100,
                                        checkpoint_every=100, log_every=100)
    torch.manual_seed(0)
    run = run_training("tiny-llama", DataPlan("jsonl", path=str(data), train_split="all", eval_split="all",
                                              train_size=24, dev_sources=4), method_cfg, train_cfg, tmp_path / "out",
                       print_fn=lambda s: None, model_and_tokenizer=(model, tok))
    assert run["model"] is model and fingerprint(model) == base
    cfg = DecodeConfig(num_beams=1, max_new_tokens=4, batch_size=2)
    sources = ["w5 w6 w7", "w8 w9 w10"]
    fresh = tiny("llama")
    assert generate_texts(model, tok, sources, None, cfg) == generate_texts(fresh, tok, sources, None, cfg)
    with torch.no_grad():
        pt.attach(model, run["artifact"])  # weight methods change or hook the model itself
        pt.attach(fresh, run["artifact"])
        trained, reference = logits(model), logits(fresh)
        assert torch.equal(trained, reference) and not torch.equal(reference, logits(tiny("llama")))
