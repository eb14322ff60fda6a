"""`make bench` must not rot: the whole suite runs end to end in --quick mode (tiny random model, a few steps)
and writes one results file with every part, the machine facts and a ratio row per goal. Its GPU paths
(`--device`, synchronized timers, what run_all.py runs on CUDA) are checked on the CPU."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED, missing

ROOT = Path(__file__).resolve().parents[1]


def e2e_data() -> Path:
    data = Path(os.environ.get("PREFIXTUNE_DATA") or SHARED / "data")
    if not (data / "e2e").exists():
        missing(f"E2E data not found at {data}")
    return data


@pytest.mark.real
def test_bench_suite_runs_quick(tmp_path):
    data = e2e_data()
    out = tmp_path / "quick.json"
    env = dict(os.environ, PREFIXTUNE_DATA=str(data), PYTHONPATH=str(ROOT / "src"), XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)  # ~2 min idle; shared machines are slower
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["parts"]) == {
        "bench_train", "bench_memory", "bench_scaling", "bench_levers", "bench_profile", "bench_decode", "bench_serve_scale",
        "bench_serve"}
    assert result["cpu"] and result["versions"]["torch"] and result["versions"]["peft"] == "0.21.2"
    assert len(result["load_average_start"]) == 3 and len(result["load_average_end"]) == 3
    names = [r["name"] for r in result["ratios"]]
    for goal in ("PEFT+Trainer group_by_length", "FLOP utilisation", "peak RSS", "prefix / plain model time, greedy",
                 "beam-5", "mixed 8 prefixes", "16 distinct", "mixed batch / PEFT", "checkpointing", "unchunked-ce",
                 "compiled", "A/A", "prefix in the cache", "matmul + attention-kernel share", "bf16 / fp32 time"):
        assert any(goal in n for n in names), (goal, names)
    assert all(r["value"] > 0 for r in result["ratios"])
    train = result["parts"]["bench_train"]["systems"]
    # every system trained on the same pairs: prefixtune, floor and full-ft on the very same batches
    tokens = {name: s["best_run"]["target_tokens"] for name, s in train.items()}
    assert tokens["prefixtune"] == tokens["floor"] == tokens["full-ft"] > 0
    assert "ratios" in proc.stdout and "wrote" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The GPU paths (issue 20): `make bench` on CUDA runs bench_train and bench_decode there; what that needs
# is checked here on the CPU.


def bench_module(name: str, monkeypatch):
    """bench/NAME.py imported as the scripts import each other (bench/ on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module(name)


@pytest.mark.real
@pytest.mark.parametrize("script", ["bench_train.py", "bench_decode.py"])
def test_script_runs_quick_on_the_device_asked_for(script, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, PREFIXTUNE_DATA=str(e2e_data()), PYTHONPATH=str(ROOT / "src"), XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--device", "cpu", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # ~5 s idle
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cpu\n" in proc.stdout
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu" and "gpu" not in result["machine"] and result["ratios"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(monkeypatch):
    """A SystemExit with a message: Python prints that line alone (exit status 1), no traceback."""
    common = bench_module("common", monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test: resolve_device sets it
    args = common.parser(__doc__, cuda=True).parse_args(["--quick", "--device", "cuda"])
    with pytest.raises(SystemExit) as e:
        common.setup(args)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith("--device cuda: CUDA is not available here ("), e.value.code


def test_device_option_rejects_other_values(monkeypatch):
    common = bench_module("common", monkeypatch)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps"):
        with pytest.raises(SystemExit, match=r"^--device: expected auto, cpu, cuda or cuda:N, got "):
            common.resolve_device(bad)
    assert common.parser(__doc__, cuda=True).parse_args([]).device == "auto"
    assert common.parser(__doc__).parse_args([]).device == "cpu"  # a CPU-only script: no --device
    with pytest.raises(SystemExit):
        common.parser(__doc__).parse_args(["--device", "cuda"])


def test_device_cpu_hides_the_gpus(monkeypatch):
    """HF Trainer and prefixtune's trainer take a visible GPU by themselves: a CPU run leaves them none."""
    common = bench_module("common", monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert common.resolve_device("cpu") == "cpu" and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_device_cuda_n_pins_that_gpu(monkeypatch):
    """cuda:1 leaves only the second visible GPU visible (so every library's cuda:0 is it)."""
    common = bench_module("common", monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert common.resolve_device("cuda:1") == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert common.resolve_device("auto") == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_timers_synchronize_a_cuda_device(monkeypatch):
    """CUDA kernels run asynchronously: every clock read on a GPU waits for them (else it times launches)."""
    common = bench_module("common", monkeypatch)
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    common.timed(events.append, "work", device="cuda:0")
    with common.Stopwatch("cuda:0"):
        events.append("work")
    assert events == [("sync", "cuda:0"), "work", ("sync", "cuda:0")] * 2
    events.clear()
    common.timed(events.append, "work")
    with common.Stopwatch():
        events.append("work")
    assert events == ["work", "work"]  # the CPU: nothing to wait for


def fake_suite(monkeypatch, tmp_path, *argv):
    """run_all.main() with each script's process replaced by one that writes an empty result: the command lines."""
    run_all = bench_module("run_all", monkeypatch)
    commands = []

    def run(cmd, **kw):
        commands.append(cmd)
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"ratios": []}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_all.subprocess, "run", run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test: resolve_device sets it
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--out", str(tmp_path / "r.json"), *argv])
    run_all.main()
    return {Path(c[1]).name: c for c in commands}, json.loads((tmp_path / "r.json").read_text())


def test_run_all_passes_the_device_to_the_scripts(monkeypatch, tmp_path):
    commands, result = fake_suite(monkeypatch, tmp_path, "--device", "cpu", "--only", "bench_train.py",
                                  "bench_decode.py", "bench_scaling.py")
    assert set(commands) == {"bench_train.py", "bench_decode.py", "bench_scaling.py"}
    for script in ("bench_train.py", "bench_decode.py"):
        assert commands[script][commands[script].index("--device") + 1] == "cpu"
    assert "--device" not in commands["bench_scaling.py"]  # CPU-only: it has no --device option
    assert result["device"] == "cpu" and "gpu" not in result and result["skipped"] == {}


def test_run_all_on_a_gpu_runs_train_and_decode_there(monkeypatch, tmp_path):
    """On CUDA (faked: this needs no GPU) the GPU's scripts get --device cuda; the CPU-only ones are skipped,
    each with its reason; the record and its file name carry the GPU's model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    commands, result = fake_suite(monkeypatch, tmp_path, "--device", "cuda")
    run_all = bench_module("run_all", monkeypatch)
    assert set(commands) == {"bench_train.py", "bench_decode.py"}
    assert all(c[c.index("--device") + 1] == "cuda" for c in commands.values())
    assert result["device"] == "cuda" and result["gpu"] == "NVIDIA H100 80GB HBM3"
    assert result["precision"].startswith("bf16: ")
    assert set(result["skipped"]) == {s.removesuffix(".py") for s in run_all.CPU_ONLY} and all(result["skipped"].values())
    assert set(run_all.CPU_ONLY) | set(commands) == set(run_all.SCRIPTS)
    on_cpu = {"date": "2027-01-02 03:04 UTC", "cpu": "AMD EPYC 7B13"}
    assert run_all.results_path({**on_cpu, "gpu": result["gpu"]}).name == "2027-01-02-0304-NVIDIA-H100-80GB-HBM3.json"
    assert run_all.results_path(on_cpu).name == "2027-01-02-0304-AMD-EPYC-7B13.json"
