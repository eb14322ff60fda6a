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
