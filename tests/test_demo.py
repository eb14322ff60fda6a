"""`make demo` end to end on a tiny random model and the shared E2E data: it trains, evaluates both
systems, and records where its time went (the per-CPU figures of the README come from these records)."""

from __future__ import annotations

import json

import pytest

import prefixtune.models
from prefixtune.demo import run_demo
from prefixtune.serve.testing import char_tokenizer

from conftest import SHARED, missing, tiny

DATA = SHARED / "data"


def test_demo_trains_evaluates_and_records_its_phases(tmp_path, monkeypatch):
    if not (DATA / "e2e").exists():
        missing(f"shared E2E data not found at {DATA}")
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the zero-shot row's instruction
    monkeypatch.setattr(prefixtune.models, "load_model", lambda name: (tiny("llama"), tok))
    lines: list[str] = []
    summary = run_demo(out=tmp_path / "demo", data_dir=str(DATA), steps=3, train_size=20, eval_size=3,
                       precision="fp32", print_fn=lines.append, record_dir=tmp_path / "records")

    assert summary["steps"] == 3 and summary["eval_mrs"] == 3
    assert summary["batch_size"] == 5 and summary["lr"] == 3e-3 and summary["bf16"] is False  # the budget recorded
    phases = summary["phase_seconds"]
    assert list(phases) == ["load_model", "train", "zero_shot_eval", "prefix_eval"]  # train: precision too
    assert all(v >= 0 for v in phases.values())
    # the phases cover the run: what is left is the summary itself
    assert sum(phases.values()) == pytest.approx(summary["total_seconds"], abs=1.0)
    on_disk = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert on_disk["phase_seconds"] == phases
    records = list((tmp_path / "records").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["prefix_tuned"] == summary["prefix_tuned"]
    assert any(line.startswith("total time:") for line in "\n".join(lines).splitlines())


def test_a_demo_folder_from_other_settings_is_kept_and_the_run_goes_beside_it(tmp_path, monkeypatch):
    if not (DATA / "e2e").exists():
        missing(f"shared E2E data not found at {DATA}")
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(prefixtune.models, "load_model", lambda name: (tiny("llama"), tok))

    def demo(steps, lines):
        return run_demo(out=tmp_path / "demo", data_dir=str(DATA), steps=steps, train_size=20, eval_size=2,
                        precision="fp32", print_fn=lines.append)

    first = demo(2, [])
    checkpoint = (tmp_path / "demo" / "checkpoint.safetensors").read_bytes()
    again: list[str] = []
    assert demo(2, again)["resumed"] is True                 # the same settings: the finished run is resumed
    other: list[str] = []
    moved = demo(3, other)                                    # other settings (an older version's, other options)
    assert moved["steps"] == 3 and moved["resumed"] is False and first["steps"] == 2
    assert any("holds a demo run made with other settings" in line and "demo-2" in line for line in other)
    assert (tmp_path / "demo-2" / "demo.json").exists()
    assert (tmp_path / "demo" / "checkpoint.safetensors").read_bytes() == checkpoint  # the earlier run untouched


def test_the_demo_checks_its_data_before_it_loads_the_model(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from prefixtune.data.fetch import DownloadError

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    loaded = []
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(prefixtune.models, "load_model", lambda name: loaded.append(name))
    with pytest.raises(DownloadError, match="e2e split 'dev' not found; looked for: .*nowhere"):
        run_demo(out=tmp_path / "demo", data_dir=str(tmp_path / "nowhere"), steps=1, precision="fp32",
                 print_fn=lambda line: None)
    assert loaded == []  # the ~20 s model load never started
