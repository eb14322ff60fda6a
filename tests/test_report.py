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


def test_vision_blocks_are_generated_from_their_rows_and_drift_is_caught(tmp_path):
    """docs/vision.md's tables: the probe's from probe.json files, vpt's and l2p's from results.jsonl."""
    probe = tmp_path / "results" / "vision-probe"
    probe.mkdir(parents=True)
    pools = {p: {"val_accuracy": v, "test_accuracy": t, "ci95": [t - 0.02, t + 0.02]}
             for p, v, t in (("cls", 0.7, 0.654), ("mean", 0.67, 0.626))}
    (probe / "probe.json").write_text(json.dumps({"sizes": {"112": {**pools, "feature_seconds": 246.0,
                                                                    "images_per_s": 12.2}}}))
    vpt = tmp_path / "results" / "vision-vpt"
    vpt.mkdir()
    row = {"seed": 0, "val_accuracy": 0.5, "test_ci95": [0.4, 0.6], "trainable_params": 10, "file_bytes": 3 * 2 ** 20,
           "train_seconds": 2.0, "chosen": True}
    vpt_rows = [dict(row, arm="vpt-deep", lr=3e-3, best_dev_loss=1.2, test_accuracy=0.5, test_correct="10" * 50),
                dict(row, arm="lora", lr=1e-3, best_dev_loss=1.1, test_accuracy=0.75, test_correct="1110" * 25),
                dict(row, arm="lora", lr=1e-2, best_dev_loss=1.5, test_accuracy=0.1, chosen=False)]
    (vpt / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vpt_rows))
    l2p = tmp_path / "results" / "vision-l2p"
    l2p.mkdir()
    l2p_row = {"seed": 0, "forgetting": 0.25, "test_ci95": [0.2, 0.3], "trainable_params": 7, "seconds": 9.0,
               "accuracy_matrix": [[0.8], [0.4, 0.6]], "chosen": True}
    l2p_rows = [dict(l2p_row, arm="l2p", lr=1e-2, val_loss=2.0, average_accuracy=0.5, test_accuracy=0.5),
                dict(l2p_row, arm="seq-head", lr=3e-2, val_loss=2.5, average_accuracy=0.3, test_accuracy=0.3)]
    (l2p / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in l2p_rows))
    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "vision.md"
    doc.write_text("".join(f"<!-- generated: {b} -->\nstale\n<!-- /generated -->\n\n" for b in (
        "vision-probe results/vision-probe*/probe.json", "vision-vpt results/vision-vpt", "vision-l2p results/vision-l2p")))
    assert regenerate(tmp_path, redraw=False) == ["docs/vision.md"]
    text = doc.read_text()
    assert "stale" not in text
    assert "| 112 px | 0.654 (0.634-0.674) | 0.626 (0.606-0.646) | 0.700 / 0.670 | 246 s (12.2 img/s) |" in text
    assert "(../results/vision-probe/probe.json)" in text
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert "| 0.001 (0.001: 1.1000, 0.01: 1.5000) | 1 | 0.500 | 0.750 |" in lora and "3.0 MiB" in lora
    assert "+0.250 [" in lora and "ahead" in lora  # paired over the same 100 test images
    seq = next(line for line in text.splitlines() if line.startswith("| seq-head |"))
    assert "| 0.03 (0.03: 2.5000) | 1 | 0.300 | 0.250 | 0.400 0.600 |" in seq
    assert regenerate(tmp_path, check=True, redraw=False) == []
    doc.write_text(text.replace("0.750", "0.760"))  # a hand-edited number
    assert regenerate(tmp_path, check=True, redraw=False) == ["docs/vision.md"]
    with pytest.raises(ReportError, match="results.jsonl not found"):
        render("<!-- generated: vision-vpt results/none -->\n<!-- /generated -->", tmp_path)
    with pytest.raises(ReportError, match="no probe.json matches"):
        render("<!-- generated: vision-probe results/none/probe.json -->\n<!-- /generated -->", tmp_path)


def test_method_sizes_block_renders_every_entry_with_its_share_of_the_model(tmp_path):
    folder = tmp_path / "results" / "method-sizes"
    folder.mkdir(parents=True)
    entries = [{"model": "m", "base_params": 1000, "method": "prefix", "configuration": "length 1", "options": {},
                "trainable": 50, "artifact_values": 5, "file_bytes": 3 * 2 ** 20}]
    (folder / "sizes.json").write_text(json.dumps({"date": "2026-12-06", "versions": {"prefixtune": "0", "transformers": "5"},
                                                   "entries": entries}))
    text = render("<!-- generated: method-sizes results/method-sizes/sizes.json -->\n<!-- /generated -->", tmp_path,
                  "docs/methods.md")
    assert "| m (1,000) | `prefix`: length 1 | 50 (5%) | 5 (0.5%) | 3.0 MiB |" in text
    assert "(../results/method-sizes/sizes.json)" in text
    with pytest.raises(ReportError, match="cannot be read as JSON"):
        render("<!-- generated: method-sizes results/nope.json -->\n<!-- /generated -->", tmp_path)


def test_prefix_memory_block_has_one_line_per_mode_of_each_record(tmp_path):
    folder = tmp_path / "bench" / "results"
    folder.mkdir(parents=True)
    run = {"base_rss": 10 ** 9, "rss_growth": 500 * 10 ** 6, "peak_growth": 1700 * 10 ** 6, "cached_prefixes": 10,
           "cached_prefix_bytes": 480 * 2 ** 20}
    (folder / "prefix-memory-2026-12-06-2302.json").write_text(json.dumps({
        "date": "2026-12-06 23:02 UTC", "commit": "abc", "cpu": "cpu", "cores": 2, "prefixes": 12, "file_bytes": 46 * 10 ** 6,
        "runs": [dict(run, mode="sequential"), dict(run, mode="concurrent", rss_growth=600 * 10 ** 6)]}))
    text = render("<!-- generated: prefix-memory bench/results/prefix-memory-*.json -->\n<!-- /generated -->", tmp_path,
                  "docs/serving.md")
    assert "| 12 one after another | 10 (480 MiB) | +500 MB | 50.0 MB (1.09× the 46.0 MB file) | +1,700 MB |" in text
    assert "| 12 at once | 10 (480 MiB) | +600 MB | 60.0 MB (1.30× the 46.0 MB file) |" in text
    with pytest.raises(ReportError, match="no bench/prefix_memory.py record"):
        render("<!-- generated: prefix-memory bench/results/none-*.json -->\n<!-- /generated -->", tmp_path)


def test_a_classification_table_compares_accuracy_with_its_reference_arm(tmp_path):
    from prefixtune.experiments.report import load_experiment
    from prefixtune.experiments.tables import table_markdown

    folder = tmp_path / "results" / "ptuning-v2"
    rows = []
    for arm, right in (("ptuning-v2", 150), ("probe", 100)):
        rid = f"{arm}-n200-s0-lr0.01"
        ev = folder / "runs" / rid / "eval"
        ev.mkdir(parents=True)
        (ev / "predictions.jsonl").write_text("".join(
            json.dumps({"source": f"q{i}", "output": "True" if i < right else "False", "references": ["True"]}) + "\n"
            for i in range(200)))
        rows.append({"id": rid, "label": arm, "method": "ptuning-v2", "train_size": 200, "seed": 0, "lr": 1e-2,
                     "stopped_early": True, "trainable_params": 10, "scores": {"accuracy": right / 200},
                     "best_dev_loss": 0.6, "train_seconds": 3.0, "n_eval": 200})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "experiment.json").write_text(json.dumps({
        "name": "ptuning-v2", "scale": "quick", "model": "minilm-l6", "dataset": "boolq", "reference": "ptuning-v2",
        "group_by": ["label", "train_size"], "x": "train_size", "notes": []}))
    exp, rows, _ = load_experiment(folder)
    table = table_markdown(exp, rows, folder)
    assert "accuracy − ptuning-v2 [95% CI]" in table
    probe = next(line for line in table.splitlines() if line.startswith("| probe |"))
    assert "-0.2500 [" in probe and probe.rstrip(" |").split("|")[-3].strip().endswith("behind; higher in 0/1 seeds")


def test_replicas_block_has_one_line_per_round_with_the_scaling_ratio(tmp_path):
    folder = tmp_path / "bench" / "results"
    folder.mkdir(parents=True)
    one, two = {"rps": 5.0, "wrong": 0}, {"rps": 9.0, "wrong": 0}
    (folder / "replicas-2026-12-06-2330.json").write_text(json.dumps({
        "date": "2026-12-06 23:30 UTC", "commit": "abc", "cpu": "cpu", "cores": 2, "requests": 300, "clients": 20,
        "load_average": [1.0, 2.5], "rounds": [{"one": one, "two": two}, {"one": one, "two": dict(two, wrong=1)}],
        "sqlite": {"rps": 4.5, "wrong": 0}}))
    text = render("<!-- generated: replicas bench/results/replicas-*.json -->\n<!-- /generated -->", tmp_path,
                  "docs/serving.md")
    assert "| 1.0 → 2.5 | 1 | 5.0 | 9.0 | 1.80× | 4.5 | 0 |" in text and "| 2 | 5.0 | 9.0 | 1.80× | 4.5 | 1 |" in text
    with pytest.raises(ReportError, match="no bench/bench_replicas.py record"):
        render("<!-- generated: replicas bench/results/none-*.json -->\n<!-- /generated -->", tmp_path)


def test_an_extrapolation_table_gives_intervals_for_all_seen_and_unseen_sources(tmp_path):
    from prefixtune.experiments.report import load_experiment
    from prefixtune.experiments.tables import table_markdown

    folder = tmp_path / "results" / "extrapolation"
    ref = "the airport serves the city of aarhus in denmark"
    rows = []
    for arm in ("prefix", "finetune"):
        for seed in (0, 1):
            rid = f"{arm}-full-s{seed}"
            ev = folder / "runs" / rid / "eval"
            ev.mkdir(parents=True)
            lines = []
            for i in range(80):
                seen = i < 40
                # the prefix writes the reference on unseen categories only, fine-tuning on seen ones only
                right = seen if arm == "finetune" else not seen
                lines.append({"source": f"s{i}", "output": ref if right else "aarhus", "references": [ref],
                              "meta": {"category": "Airport" if seen else "Food", "seen": seen}})
            (ev / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            rows.append({"id": rid, "label": arm, "method": arm, "seed": seed, "lr": 1e-3, "stopped_early": True,
                         "trainable_params": 10, "scores": {"bleu": 0.5}, "scores_seen": {"bleu": 0.5},
                         "scores_unseen": {"bleu": 0.5}, "best_dev_loss": 1.0, "train_seconds": 3.0, "n_eval": 80})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "experiment.json").write_text(json.dumps({
        "name": "extrapolation", "scale": "quick", "model": "smollm2-135m", "dataset": "webnlg", "reference": "prefix",
        "group_by": ["label"], "x": None, "notes": []}))
    exp, rows, _ = load_experiment(folder)
    table = table_markdown(exp, rows, folder)
    head = table.splitlines()[0].split(" | ")
    cells = dict(zip(head, next(line for line in table.splitlines() if line.startswith("| finetune |")).split(" | ")))
    assert cells["BLEU seen − prefix [95% CI]"].endswith("ahead; higher in 2/2 seeds")
    assert cells["BLEU unseen − prefix [95% CI]"].endswith("behind; higher in 0/2 seeds")
    assert "BLEU − prefix [95% CI]" in cells  # all sources: each arm is right on half of them

    # predictions written before they carried the item's meta: the split intervals are left out, not guessed
    for path in folder.glob("runs/*/eval/predictions.jsonl"):
        path.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "meta"}) + "\n"
                                for x in path.read_text().splitlines()))
    table = table_markdown(exp, rows, folder)
    assert "BLEU − prefix [95% CI]" in table and "unseen − prefix" not in table


def test_predictions_carry_an_items_meta_where_it_has_one(tmp_path):
    from prefixtune.data.base import EvalItem
    from prefixtune.decode import write_predictions

    items = [EvalItem("a", ("x",), {"category": "Food", "seen": False}), EvalItem("b", ("y",))]
    write_predictions(tmp_path / "p.jsonl", items, ["out a", "out b"])
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == [{"source": "a", "output": "out a", "references": ["x"], "meta": {"category": "Food", "seen": False}},
                    {"source": "b", "output": "out b", "references": ["y"]}]
