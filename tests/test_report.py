"""Every results table in the docs is generated from committed data, and a doc that drifts from its
data fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixtune.experiments.report import ReportError, regenerate, render

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def test_the_docs_are_what_the_committed_data_generates():
    assert regenerate(ROOT, check=True) == [], "run `prefixtune report` and commit the docs it rewrites"


def test_every_experiment_folder_holds_what_its_table_is_made_of():
    for meta in (ROOT / "results").glob("*/experiment.json"):
        folder = meta.parent
        rows = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()] \
            if (folder / "results.jsonl").exists() else []
        for r in rows:  # each row's predictions and metrics are committed beside it
            eval_dir = folder / "runs" / r["id"] / "eval"
            assert (eval_dir / "predictions.jsonl").exists() and (eval_dir / "metrics.json").exists(), r["id"]
            assert len((eval_dir / "predictions.jsonl").read_text().splitlines()) == r["n_eval"]
            assert r["model"] and r["versions"]["torch"] and r["machine"]["cpu"]


def _fake_experiment(root: Path) -> Path:
    folder = root / "results" / "low-data"
    refs = [["the eagle is a pub", "eagle is a pub in the city"], ["alimentum is cheap", "a cheap place alimentum"]]
    outputs = {"prefix": ["the eagle is a pub", "alimentum is cheap"], "lora": ["eagle pub", "cheap"]}
    rows = []
    for method, outs in outputs.items():
        rid = f"{method}-n50-s0-lr0.001"
        ev = folder / "runs" / rid / "eval"
        ev.mkdir(parents=True)
        (ev / "predictions.jsonl").write_text("".join(
            json.dumps({"source": f"mr{i}", "output": o, "references": r}) + "\n" for i, (o, r) in enumerate(zip(outs, refs))))
        (ev / "metrics.json").write_text("{}")
        rows.append({"id": rid, "label": method, "method": method, "train_size": 50, "seed": 0, "lr": 1e-3,
                     "stopped_early": True, "trainable_params": 10, "scores": {"bleu": 0.5 if method == "prefix" else 0.1},
                     "best_dev_loss": 1.5, "train_seconds": 3.0, "n_eval": 2})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "experiment.json").write_text(json.dumps({"name": "low-data", "scale": "quick", "model": "m",
                                                        "dataset": "e2e", "group_by": ["label", "train_size"],
                                                        "x": "train_size", "notes": []}))
    return folder


def test_blocks_are_rewritten_from_data_and_drift_is_caught(tmp_path):
    _fake_experiment(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "results.md"
    doc.write_text("# Results\n\n<!-- generated: experiment results/low-data -->\nstale\n<!-- /generated -->\n\nprose\n")
    assert regenerate(tmp_path, check=True, redraw=False) == ["docs/results.md"]
    assert doc.read_text().endswith("stale\n<!-- /generated -->\n\nprose\n"), "check writes nothing"
    assert regenerate(tmp_path, redraw=False) == ["docs/results.md"]
    text = doc.read_text()
    assert "| prefix | 50 | 1 | 0.001 | 1/1 | 10 | 0.5 |" in text and "| lora | 50 | 1 |" in text
    assert "BLEU − prefix [95% CI]" in text and text.endswith("<!-- /generated -->\n\nprose\n")
    assert regenerate(tmp_path, check=True, redraw=False) == []
    doc.write_text(text.replace("| 0.5 |", "| 0.6 |"))  # a hand-edited number
    assert regenerate(tmp_path, check=True, redraw=False) == ["docs/results.md"]

    with pytest.raises(ReportError, match="unknown generated block kind 'nope'"):
        render("<!-- generated: nope x -->\n<!-- /generated -->", tmp_path)
    with pytest.raises(ReportError, match="experiment.json not found"):
        render("<!-- generated: experiment results/missing -->\n<!-- /generated -->", tmp_path)


def test_bench_ratios_block_has_one_column_per_full_record(tmp_path):
    bench = tmp_path / "bench" / "results"
    bench.mkdir(parents=True)
    for i, (value, quick) in enumerate([(1.2, False), (1.4, False), (9.9, True)]):
        (bench / f"2026-01-0{i + 1}.json").write_text(json.dumps({
            "date": f"2026-01-0{i + 1}", "cpu": "X", "cores": 2, "precision": "fp32: measured", "quick": quick,
            "ratios": [{"name": "train ratio", "value": value, "goal": ">= 1.5", "met": value >= 1.5, "note": "median"}]}))
    out = render("<!-- generated: bench-ratios bench/results/*.json -->\n<!-- /generated -->", tmp_path)
    assert "| train ratio | >= 1.5 | 1.2 ✗ (median) | 1.4 ✗ (median) |" in out and "9.9" not in out


def test_report_command_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "prefixtune.cli", "report", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)

    r = run("--root", tmp_path, "--check")
    assert r.returncode == 2 and r.stderr.strip() == f"error: --root {tmp_path}: no docs/ folder there"
    _fake_experiment(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "methods.md").write_text("<!-- generated: experiment results/low-data -->\nx\n<!-- /generated -->\n")
    r = run("--root", tmp_path, "--check")
    assert r.returncode == 1 and "out of date: docs/methods.md" in r.stderr
    r = run("--root", tmp_path)
    assert r.returncode == 0 and "regenerated: docs/methods.md" in r.stdout
    assert (tmp_path / "results" / "low-data" / "table.md").exists()  # the folder's own table and figure redrawn
    assert run("--root", tmp_path, "--check").returncode == 0
