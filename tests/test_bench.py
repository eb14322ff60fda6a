"""`make bench` must not rot: the whole suite runs end to end in --quick mode (tiny random model, a few steps)
and writes one results file with every part, the machine facts and a ratio row per goal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED, missing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_bench_suite_runs_quick(tmp_path):
    data = Path(os.environ.get("PREFIXTUNE_DATA") or SHARED / "data")
    if not (data / "e2e").exists():
        missing(f"E2E data not found at {data}")
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
