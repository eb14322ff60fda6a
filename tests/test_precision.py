"""Precision by measurement: the faster of fp32 / bf16 autocast wins, the answer is cached per machine, and an
explicit choice skips the timing. A fake timer makes the decision testable; one real timing checks the workload."""

from __future__ import annotations

import json

import pytest
import torch

from prefixtune import precision as P
from prefixtune.config import ConfigError


def fake_timer(fp32_s: float, bf16_s: float, calls: list):
    def timer(device, bf16, threads, reps, give_up_after=float("inf")):
        calls.append((bf16, threads))
        return bf16_s if bf16 else fp32_s / (threads or 1) ** 0.5  # more threads: faster
    return timer


@pytest.mark.parametrize("fp32_s,bf16_s,want", [(1.0, 0.4, True), (1.0, 2.0, False)])
def test_auto_picks_the_faster_and_says_why(tmp_path, monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(P, "available_cores", lambda: 4)
    calls: list = []
    p = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(fp32_s, bf16_s, calls))
    assert p.bf16 is want and p.threads == 4  # the most threads were fastest in fp32
    assert p.reason.startswith(p.name + ":") and "ms" in p.reason and "4 threads" in p.reason
    assert {t for _, t in calls} == {1, 2, 4} and any(bf16 for bf16, _ in calls)


def test_answer_is_cached_per_cpu_and_torch_version(tmp_path, monkeypatch):
    calls: list = []
    first = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(1.0, 0.5, calls))
    n = len(calls)
    again = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(1.0, 3.0, calls))
    assert len(calls) == n and again.bf16 == first.bf16 and "cached in" in again.reason
    stored = json.loads((tmp_path / P.CACHE_FILE).read_text())
    assert list(stored) == [P.machine_key("cpu")] and torch.__version__ in P.machine_key("cpu")
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # new torch: measure again, keep the old entry
    other = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(1.0, 3.0, calls))
    assert len(calls) > n and other.bf16 is False
    assert len(json.loads((tmp_path / P.CACHE_FILE).read_text())) == 2


def test_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / P.CACHE_FILE).write_text("{not json")
    calls: list = []
    p = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(1.0, 0.5, calls))
    assert calls and p.bf16 and P.machine_key("cpu") in json.loads((tmp_path / P.CACHE_FILE).read_text())


def test_explicit_choice_skips_measuring(tmp_path, monkeypatch):
    def no_timer(*a, **k):
        raise AssertionError("must not measure")
    assert P.choose("bf16", cache=tmp_path, timer=no_timer).bf16 is True
    monkeypatch.setenv(P.ENV_VAR, "FP32")
    p = P.choose(None, cache=tmp_path, timer=no_timer)
    assert p.bf16 is False and P.ENV_VAR in p.reason
    assert not (tmp_path / P.CACHE_FILE).exists()


def test_bad_option_names_itself(monkeypatch):
    with pytest.raises(ConfigError, match="'fp16'"):
        P.choose("fp16")
    monkeypatch.setenv(P.ENV_VAR, "half")
    with pytest.raises(ConfigError, match=r"\$PREFIXTUNE_PRECISION.*'half'"):
        P.choose()


def test_resolve_bf16_sets_threads_and_prints(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lines: list[str] = []
    before = torch.get_num_threads()
    try:
        assert P.resolve_bf16("fp32", print_fn=lines.append) is False
        assert torch.get_num_threads() == P.available_cores()
    finally:
        torch.set_num_threads(before)
    assert lines == ["precision fp32: chosen explicitly (argument)"]


def test_real_workload_times_both_precisions():
    fp32 = P.time_workload("cpu", False, 1, reps=1)
    bf16 = P.time_workload("cpu", True, 1, reps=1, give_up_after=0.0)  # one timed run, then stop
    assert 0 < fp32 < 30 and 0 < bf16 < 60


# ---------------------------------------------------------------------------------------------
# Frozen weights stored in bf16: the same numbers as autocast's per-forward casts


@pytest.mark.parametrize("arch,method,options", [("llama", "prefix", {"length": 3}), ("gpt2", "prefix", {"length": 3}),
                                                 ("t5", "prefix", {"length": 3}), ("llama", "lora", {"rank": 2}),
                                                 ("gpt2", "ft-top", {"layers": 1})])
def test_frozen_weights_stored_in_bf16_give_autocasts_loss_and_gradients_exactly(arch, method, options):
    from conftest import reversal_pairs, tiny, tiny_tokenizer

    import prefixtune as pt
    from prefixtune.precision import frozen_matmul_weights_in

    model, tok = tiny(arch), tiny_tokenizer(arch)
    before = {n: (p.data_ptr(), p.dtype, p.clone()) for n, p in model.named_parameters()}
    torch.manual_seed(0)
    m = pt.build(model, method, tok, **options)
    with torch.no_grad():  # away from init, so every trainable tensor gets a gradient
        for p in m.trainable().values():
            p.add_(torch.randn_like(p) * 0.1)
    params = list(m.trainable().values())
    batch = m.collate([m.encode(tok, d.source, d.target, 32, 16) for d in reversal_pairs(4)], tok.pad_token_id)

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.loss(batch)
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return loss.detach(), grads

    want = loss_and_grads()
    with frozen_matmul_weights_in(model, torch.bfloat16, keep=params):
        cast = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
        got = loss_and_grads()
    assert cast and all(p.dtype == torch.float32 for p in params)          # frozen weights cast, trained ones not
    assert not any("embed" in n or "wte" in n or "shared" in n for n in cast)  # embeddings (and tied heads) kept
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    m.detach()
    for n, p in model.named_parameters():  # the very same float32 storage is back
        ptr, dtype, value = before[n]
        assert p.data_ptr() == ptr and p.dtype == dtype and torch.equal(p, value), n


def test_training_in_bf16_stores_the_frozen_weights_in_bf16_and_restores_them(tmp_path):
    from conftest import reversal_pairs, tiny, tiny_tokenizer

    import prefixtune as pt
    from prefixtune.train import TrainConfig, train

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    seen = []
    m = pt.build(model, "prefix", tok, length=3)
    train(m, tok, reversal_pairs(12), reversal_pairs(4, seed=1),
          TrainConfig(lr=1e-2, epochs=1, batch_size=4, max_steps=2, bf16=True, log_every=100), tmp_path,
          print_fn=lambda s: None, progress=lambda r: seen.append(model.model.layers[0].self_attn.q_proj.weight.dtype))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("fp32_s,bf16_s,want", [(1.05, 1.0, False), (1.09, 1.0, False), (1.11, 1.0, True)])
def test_bf16_needs_a_margin_so_noise_cannot_flip_the_choice(tmp_path, monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(P, "available_cores", lambda: 1)
    p = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(fp32_s, bf16_s, []))
    assert p.bf16 is want
    if not want:
        assert "only" in p.reason and f"{P.BF16_MARGIN:.2f}x" in p.reason


# ---------------------------------------------------------------------------------------------
# Where the workload is too close to call, a training run times its own step


@pytest.mark.parametrize("fp32_s,bf16_s,settled", [(1.0, 0.4, True), (1.0, 2.5, True), (1.28, 1.0, False),
                                                    (0.98, 1.0, False), (1.0, 1.9, False)])
def test_the_workload_settles_only_clear_answers(tmp_path, monkeypatch, fp32_s, bf16_s, settled):
    monkeypatch.setattr(P, "available_cores", lambda: 1)
    p = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(fp32_s, bf16_s, []))
    assert p.settled is settled and ("times its own step" in p.reason) is not settled
    again = P.choose("auto", device="cpu", cache=tmp_path, timer=fake_timer(1.0, 1.0, []))  # cached, flag and all
    assert again.settled is settled and again.bf16 is p.bf16


def test_cache_entries_without_the_flag_are_judged_by_their_times(tmp_path):
    key = P.machine_key("cpu")
    entry = {"bf16": True, "threads": 1, "reason": "bf16: old", "times_s": {"fp32@1": 1.28, "bf16@1": 1.0}}
    (tmp_path / P.CACHE_FILE).write_text(json.dumps({key: entry}))
    assert P.choose("auto", device="cpu", cache=tmp_path).settled is False
    entry["times_s"] = {"fp32@1": 20.0, "bf16@1": 1.0}
    (tmp_path / P.CACHE_FILE).write_text(json.dumps({key: entry}))
    assert P.choose("auto", device="cpu", cache=tmp_path).settled is True


@pytest.mark.parametrize("fp32_s,bf16_s,want", [(1.34, 1.0, True), (1.05, 1.0, False), (1.0, 1.8, False)])
def test_choose_on_step_times_both_interleaved_and_caches_per_model(tmp_path, fp32_s, bf16_s, want):
    order: list[bool] = []

    def time_step(bf16: bool) -> float:
        order.append(bf16)
        return bf16_s if bf16 else fp32_s

    p = P.choose_on_step(time_step, "smollm2-135m", threads=2, device="cpu", cache=tmp_path, reps=3)
    assert p.bf16 is want and p.settled and p.threads == 2
    assert "training step of smollm2-135m" in p.reason and f"fp32 {fp32_s:.3f} s" in p.reason
    assert order == [False, True, False, True, True, False, False, True]  # warm-up, then alternating first
    # the next run of that model on this machine reads the answer; another model does not
    cached = P.choose("auto", device="cpu", cache=tmp_path, workload="smollm2-135m", timer=fake_timer(1.0, 9.0, []))
    assert cached.bf16 is want and cached.settled and "cached in" in cached.reason
    other = P.choose("auto", device="cpu", cache=tmp_path, workload="gpt2", timer=fake_timer(1.0, 9.0, []))
    assert other.bf16 is False and "step-shaped workload" in other.reason


def test_step_timer_leaves_no_gradient_and_no_trace_in_the_random_state():
    from conftest import reversal_pairs, tiny, tiny_tokenizer

    import prefixtune as pt
    from prefixtune.train import TrainConfig, step_timer

    model, tok = tiny("llama"), tiny_tokenizer("llama")
    m = pt.build(model, "lora", tok, rank=2, dropout=0.5)  # dropout: a step draws random numbers
    m.eval()
    time_step = step_timer(m, tok, reversal_pairs(8), TrainConfig(batch_size=4))
    state = torch.random.get_rng_state()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    assert 0 < time_step(False) < 60 and 0 < time_step(True) < 60
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in m.trainable().values()) and not m.training
    assert all(p.dtype == torch.float32 and torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_a_run_that_timed_its_step_trains_exactly_like_one_told_the_answer(tmp_path, monkeypatch):
    from conftest import reversal_pairs, tiny, tiny_tokenizer

    from prefixtune.experiments import run as run_module
    from prefixtune.experiments.run import DataPlan, run_training
    from prefixtune.recipes import configs_for

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = P.cache_dir()
    cache.mkdir(parents=True)
    unsettled = {"bf16": False, "threads": 1, "reason": "fp32: too close", "settled": False}
    (cache / P.CACHE_FILE).write_text(json.dumps({P.machine_key("cpu"): unsettled}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in reversal_pairs(40)))
    plan = DataPlan("jsonl", path=str(data), train_split="all", eval_split="all", train_size=24, dev_sources=4)
    method_cfg, train_cfg = configs_for("jsonl", "lora", rank=2, dropout=0.3, lr=1e-2, max_steps=3, batch_size=4,
                                        log_every=100)
    before = torch.get_num_threads()

    def run(out, precision):
        lines: list[str] = []
        result = run_training("tiny-llama", plan, method_cfg, train_cfg, tmp_path / out, precision=precision,
                              print_fn=lines.append, model_and_tokenizer=(tiny("llama"), tiny_tokenizer("llama")))
        return result, [line for line in lines if line.startswith("precision")]

    try:
        timed, said = run("auto", "auto")
        assert len(said) == 2 and "training step of tiny-llama" in said[1]
        chosen = timed["train_config"].bf16
        told, _ = run("told", "bf16" if chosen else "fp32")
        assert timed["steps"] == told["steps"] == 3
        a, b = timed["artifact"].tensors, told["artifact"].tensors
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        def no_timing(*args, **kwargs):
            raise AssertionError("the step's answer is cached: no second timing")
        monkeypatch.setattr(run_module, "choose_on_step", no_timing)
        again, said = run("again", "auto")
        assert again["train_config"].bf16 is chosen and "cached in" in said[0]
    finally:
        torch.set_num_threads(before)


def test_an_experiment_takes_the_step_answer_a_training_run_cached_for_its_model(tmp_path, monkeypatch):
    from prefixtune.experiments.command import _bf16

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    P.choose_on_step(lambda bf16: 1.0 if bf16 else 1.5, "smollm2-135m", threads=P.available_cores())
    unsettled = {"bf16": False, "threads": 1, "reason": "fp32: too close", "settled": False}
    path = P.cache_dir() / P.CACHE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), P.machine_key("cpu"): unsettled}))
    before = torch.get_num_threads()
    try:
        assert _bf16("auto", lambda s: None, workload="smollm2-135m") is True   # the model's own step said bf16
        assert _bf16("auto", lambda s: None, workload="gpt2") is False          # no step timed: the workload's answer
    finally:
        torch.set_num_threads(before)
