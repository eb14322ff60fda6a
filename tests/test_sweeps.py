"""Experiment sweeps through Ray: rows, table, figure; reruns skip; killed runs resume; a real cluster address.

One local Ray instance serves the whole module (Ray start-up is the slow part).
"""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import SHARED, reversal_pairs, tiny, tiny_tokenizer

from prefixtune.experiments import catalogue, command, figures, tables
from prefixtune.experiments.executor import RunSpec, read_results, run_one, run_sweep
from prefixtune.experiments.stats import mean_std

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-assets")
    tiny("llama").save_pretrained(root / "tiny-llama")
    tiny_tokenizer("llama").save_pretrained(root / "tiny-llama")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in reversal_pairs(120)))
    return root / "tiny-llama", data


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,  # never join a running cluster
             runtime_env={"env_vars": {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    yield
    ray.shutdown()


def _tiny_experiment(assets, name="low-data"):
    model_dir, data = assets
    return catalogue.build(name, "tiny", model=str(model_dir), dataset="jsonl", path=str(data), methods=["prefix"])


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_experiment_end_to_end_then_rerun_skips(assets, local_ray, tmp_path):
    exp = _tiny_experiment(assets)
    assert [r.id for r in exp.runs] == ["prefix-n20-s0", "prefix-n40-s0"]  # 2 sizes x 1 seed
    told: list[str] = []
    result = command.run_experiment(exp, tmp_path, print_fn=told.append)
    # a finished selection run (trained, not evaluated) is reported by its dev loss, a comparison run by its scores
    assert re.search(r"\] prefix-n20-s0-lr[0-9.e-]+: best dev loss [0-9.]+ at step \d+ \(", "\n".join(told))
    assert re.search(r"\] zero-step-n20-s0: bleu [0-9.]+", "\n".join(told))
    choices = json.loads((tmp_path / "lr_choice.json").read_text())
    assert set(choices) == {"prefix-n20", "prefix-n40"}
    rows = read_results(tmp_path)
    lr = {g: c["chosen"] for g, c in choices.items()}
    want = [f"prefix-n20-s0-lr{lr['prefix-n20']:g}", f"prefix-n40-s0-lr{lr['prefix-n40']:g}", "zero-step-n20-s0",
            "zero-step-n40-s0"]
    assert [r["id"] for r in rows] == want
    for r, size in zip(rows, (20, 40)):
        assert r["train_size"] == size and r["seed"] == 0 and r["steps"] == 4 and r["n_eval"] == 4
        assert r["method"] == "prefix" and r["trainable_params"] > 0 and r["wall_seconds"] > 0
        assert set(r["scores"]) >= {"bleu", "chrf"} and r["versions"]["torch"] == torch.__version__
        assert r["lr"] == lr[r["group"]] and r["dev_curve"] and r["machine"]["cpus"] >= 1
        # what the row says was trained is what run.json and the log say
        run = json.loads((tmp_path / "runs" / r["id"] / "run.json").read_text())
        assert run["trainable_params"] == r["trainable_params"] and run["data"]["train_size"] == size
        assert run["method_config"]["length"] == 6 and run["train"]["batch_size"] == 10  # §6.3 low-data settings
        # seed 0 at the chosen rate IS the selection run at that rate: trained once, evaluated once
        assert (tmp_path / "runs" / r["id"] / "select.json").exists()
        # evaluation sources were never trained on
        from prefixtune.experiments.run import DataPlan, plan_data

        train_pairs, _, _ = plan_data(DataPlan(**exp.runs[(20, 40).index(size)].plan))
        preds = [json.loads(x) for x in (tmp_path / "runs" / r["id"] / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 4 and not {p["source"] for p in preds} & {e.source for e in train_pairs}
        zero = [json.loads(x) for x in (tmp_path / "runs" / f"zero-step-n{size}-s0" / "eval" /
                                        "predictions.jsonl").read_text().splitlines()]
        assert [p["source"] for p in zero] == [p["source"] for p in preds]  # the zero-step row: same sources
    # every grid point is recorded with its dev loss, and the choice is the lowest
    selection = read_results(tmp_path, "lr_selection.jsonl")
    for g, c in choices.items():
        points = {r["lr"]: r["best_dev_loss"] for r in selection if r["group"] == g}
        assert len(points) >= 3 and c["chosen"] == min(points, key=points.get)
        assert max(points) / min(points) >= 10 - 1e-9
    table = (tmp_path / "table.md").read_text()
    assert "tiny scale" in table and table == result["table"]
    for r in rows[:2]:  # one seed: the cell is the row's own value
        assert f"| prefix | {r['train_size']} | 1 | {r['lr']:g} |" in table and f"{r['scores']['bleu']:.4g}" in table
    assert "| zero-step |" in table and "Learning rates (chosen on the dev loss" in table
    assert _png(tmp_path / "low-data.png") and _png(tmp_path / "dev_curves.png")

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/*.json")}
    said = []
    again = command.run_experiment(exp, tmp_path, print_fn=said.append)
    assert "4 runs: 4 already done, 0 to run" in said
    assert again["rows"] == rows and {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # another seed later: its row joins the rows on record, and the table averages both seeds
    model_dir, data = assets
    more = catalogue.build("low-data", "tiny", model=str(model_dir), dataset="jsonl", path=str(data), methods=["prefix"],
                       seeds=[1], sizes=[20])
    result = command.run_experiment(more, tmp_path, print_fn=lambda s: None)
    assert f"prefix-n20-s1-lr{lr['prefix-n20']:g}" in [r["id"] for r in read_results(tmp_path)]

    # the same run id asked for with other settings is refused, naming the run (nothing is trained)
    import dataclasses

    rid = f"prefix-n20-s0-lr{lr['prefix-n20']:g}"
    spec = dataclasses.replace(exp.runs[0], id=rid, overrides={**exp.runs[0].overrides, "lr": lr["prefix-n20"],
                                                               "length": 2})
    with pytest.raises(ValueError, match=f"run {rid} .* finished with other settings"):
        run_sweep([spec], str(model_dir), tmp_path, print_fn=lambda s: None)


def test_killed_run_resumes_from_its_checkpoint(assets, local_ray, tmp_path):
    model_dir, data = assets
    spec = RunSpec(id="long", method="prefix", dataset="jsonl",
                   plan={"dataset": "jsonl", "path": str(data), "train_split": "all", "eval_split": "all",
                         "train_size": 80, "dev_sources": 10, "seed": 0},
                   overrides={"lr": 0.01, "epochs": 3, "batch_size": 4, "length": 3, "mlp_hidden": 16,
                              "checkpoint_every": 3},
                   decode={"num_beams": 1, "max_new_tokens": 4}, eval_limit=3, labels={"label": "prefix"})
    reference = run_one(spec, str(model_dir), tmp_path / "reference", threads=1)
    code = ("import json, sys; from prefixtune.experiments.executor import RunSpec, run_one; "
            "run_one(RunSpec(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], threads=1)")
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(spec)), str(model_dir), str(tmp_path / "sweep")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "sweep" / "runs" / "long" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and sum('"loss"' in line for line in log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = tmp_path / "sweep" / "runs" / "long"
    assert (run_dir / "checkpoint.safetensors").exists() and not (run_dir / "row.json").exists(), "not killed mid-run"
    rows = run_sweep([spec], str(model_dir), tmp_path / "sweep", cpus_per_run=1, print_fn=lambda s: None)
    assert rows[0]["resumed"] is True and "resuming from its checkpoint" in (run_dir / "stdout.log").read_text()
    assert rows[0]["steps"] == reference["steps"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "reference" / "runs" / "long" / "prefix.safetensors")
    b = load_file(run_dir / "prefix.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly the uninterrupted result
    assert rows[0]["scores"] == reference["scores"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_experiment_command_against_a_ray_start_head_cluster(assets, tmp_path):
    """The --ray-address path: a head node started on this machine, addressed as 127.0.0.1 (stopped by its process group)."""
    model_dir, data = assets
    port = _free_port()
    # `ray start` turns on token authentication (the token in ~/.ray); a driver then needs RAY_AUTH_MODE=token
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head_log = tmp_path / "head.log"
    # no --node-ip-address=127.0.0.1: Ray maps a loopback address to the node's own IP when connecting
    with open(head_log, "w") as log:
        head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in head_log.read_text() and head.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "Ray runtime started" in head_log.read_text(), head_log.read_text()[-2000:]
        cmd = [sys.executable, "-m", "prefixtune.cli", "experiment", "low-data", "--scale", "tiny", "--model", model_dir,
               "--dataset", "jsonl", "--path", data, "--methods", "prefix", "--out", tmp_path / "exp",
               "--ray-address", f"127.0.0.1:{port}"]
        r = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "ray: 1 CPUs" in r.stdout and "1 CPU(s) per run" in r.stdout
        rows = read_results(tmp_path / "exp")
        assert [x["id"].split("-lr")[0] for x in rows] == ["prefix-n20-s0", "prefix-n40-s0", "zero-step-n20-s0",
                                                          "zero-step-n40-s0"]
        assert _png(tmp_path / "exp" / "low-data.png") and "tiny scale" in (tmp_path / "exp" / "table.md").read_text()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own process group: raylet, GCS, workers
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_webnlg_split_keeps_unseen_categories_out_of_training():
    from prefixtune.data import load_dataset
    from prefixtune.experiments.run import DataPlan, plan_data

    data_dir = SHARED / "data"
    if not (data_dir / "webnlg2017").exists():
        pytest.skip("shared WebNLG 2017 not found") if not os.environ.get("CI") else pytest.fail("no shared WebNLG")
    exp = catalogue.build("extrapolation", "tiny", data_dir=str(data_dir), methods=["prefix"])
    plan = DataPlan(**exp.runs[0].plan)
    assert set(plan.exclude_categories) == set(catalogue.UNSEEN_WEBNLG)
    train_pairs, dev_pairs, items = plan_data(plan)
    seen = [c for c in ("Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
                        "SportsTeam", "University", "WrittenWork") if c not in catalogue.UNSEEN_WEBNLG]

    def pairs(split, categories):
        return {(e.source, e.target) for e in load_dataset("webnlg2017", split, data_dir=data_dir,
                                                           categories=categories).examples}

    # every training pair comes from an entry of a seen category (a few generic triple sets such as
    # "United_States : leaderName : Barack_Obama" recur in several categories, so compare pairs of entries)
    assert train_pairs and {(e.source, e.target) for e in train_pairs} <= pairs("train", seen)
    only_unseen = pairs("train", list(catalogue.UNSEEN_WEBNLG)) - pairs("train", seen)
    assert only_unseen and not {(e.source, e.target) for e in train_pairs} & only_unseen
    dev_unseen = {s for s, _ in pairs("dev", list(catalogue.UNSEEN_WEBNLG))}
    marked_unseen = {it.source for it in items if not it.meta["seen"]}
    assert marked_unseen and marked_unseen <= dev_unseen
    assert not {e.source for e in dev_pairs} & marked_unseen  # early stopping never sees them either
    # what an experiment scores: a few sources spread over the split, half of them unseen; the dev loss
    # comes from the same split, so none of the scored sources may give it (nor choose the learning rate)
    assert {e.source for e in dev_pairs} & {it.source for it in items if it.meta["seen"]}  # unpicked: they overlap
    train_again, dev_kept, picked = plan_data(plan, score_limit=10)
    assert sum(it.meta["seen"] for it in picked) == 5 and len(picked) == 10 and train_again == train_pairs
    assert not {e.source for e in dev_kept} & {it.source for it in picked}
    assert {(e.source, e.target) for e in dev_kept} == {(e.source, e.target) for e in dev_pairs
                                                       if e.source not in {it.source for it in picked}}


def test_table_means_and_sample_std_over_seeds():
    rows = [{"label": "prefix", "train_size": 50, "seed": s, "trainable_params": 7, "scores": {"bleu": b}, "lr": 1e-3,
             "stopped_early": s > 0, "best_dev_loss": 1.0, "train_seconds": 2.0} for s, b in enumerate([0.25, 0.5, 0.75])]
    m, sd = mean_std([0.25, 0.5, 0.75])
    assert m == pytest.approx(statistics.mean([0.25, 0.5, 0.75])) and sd == pytest.approx(statistics.stdev([0.25, 0.5, 0.75]))
    exp = catalogue.Experiment("low-data", "quick", "m", "e2e", [], ("label", "train_size"), x="train_size")
    assert "| prefix | 50 | 3 | 0.001 | 2/3 | 7 | 0.5 ± 0.25 |" in tables.table_markdown(exp, rows)


def test_unregistered_method_or_unknown_experiment_is_refused_by_name():
    with pytest.raises(catalogue.ExperimentError, match="no-such-method"):
        catalogue.build("low-data", "tiny", methods=["prefix", "no-such-method"])
    with pytest.raises(catalogue.ExperimentError, match="unknown experiment 'nope'"):
        catalogue.build("nope")
    with pytest.raises(catalogue.ExperimentError, match="compares classifiers ptuning-v2, prompt, finetune, probe; "
                                                    "unknown: ptuning-v3"):
        catalogue.build("ptuning-v2", "quick", methods=["ptuning-v2", "ptuning-v3"])


def test_seeds_and_sizes_replace_the_scale_and_are_checked():
    # quick scale: 3 seeds, sizes 50 and 200, the four methods; a subset can run now, more later
    assert [r.id for r in catalogue.build("low-data", "quick", sizes=[50], seeds=[0]).runs] == [
        "prefix-n50-s0", "finetune-n50-s0", "adapter-n50-s0", "lora-n50-s0"]
    assert len(catalogue.build("low-data", "quick").runs) == 4 * 2 * 3
    exp = catalogue.build("low-data", "quick", methods=["prefix"], seeds=[3], sizes=[50, 100])
    assert [r.id for r in exp.runs] == ["prefix-n50-s3", "prefix-n100-s3"]
    assert [r.group for r in exp.runs] == ["prefix-n50", "prefix-n100"]
    assert "sizes [50, 100], seeds [3]" in exp.notes[0] and "short-run rate" in exp.notes[0]
    assert all(r.overrides["lr"] == 1e-3 for r in exp.runs)  # the grid's centre at capped steps: not 8e-5
    ft = catalogue.build("low-data", "quick", methods=["finetune"], seeds=[0], sizes=[50]).runs
    assert ft[0].overrides["lr"] == 5e-5  # the recipe's fine-tuning rate centres its grid
    assert "length" not in ft[0].overrides and "init_text" not in ft[0].overrides  # options it does not have
    ad = catalogue.build("extrapolation", "quick", methods=["adapter", "lora"], seeds=[0]).runs
    assert ad[0].overrides["lr"] == 1e-3 and ad[1].overrides["lr"] == 2e-4
    assert {r.plan["seed"] for r in exp.runs} == {3} and {r.overrides["seed"] for r in exp.runs} == {3}
    assert all(r.overrides["patience"] == 3 and r.overrides["eval_every"] == 10 for r in exp.runs)
    assert "bf16" not in exp.runs[0].overrides
    assert catalogue.build("low-data", "quick", sizes=[50], seeds=[0], bf16=True).runs[0].overrides["bf16"] is True
    with pytest.raises(catalogue.ExperimentError, match="--sizes must be integers >= 1"):
        catalogue.build("low-data", "quick", sizes=[0])
    with pytest.raises(catalogue.ExperimentError, match="--seeds must be integers >= 0"):
        catalogue.build("low-data", "quick", seeds=[])


def test_method_table_experiment_covers_every_registered_generation_method():
    from prefixtune.methods import METHODS

    runs = catalogue.build("methods", "quick", seeds=[0]).runs
    assert [r.method for r in runs] == [n for n, cls in METHODS.items() if cls.generates]
    assert {r.plan["train_size"] for r in runs} == {catalogue.METHOD_TABLE_SIZE}
    for r in runs:  # soft methods get the table's length and init text; weight methods none of it
        fields = {f.name for f in __import__("dataclasses").fields(METHODS[r.method].config_class)}
        assert ("length" in r.overrides) == ("length" in fields)


def test_classifier_experiment_scores_many_held_out_questions():
    # accuracy on the 40 generation sources of quick scale would have a standard error of about 0.08
    runs = catalogue.build("ptuning-v2", "quick", seeds=[0]).runs
    assert [r.labels["label"] for r in runs] == ["ptuning-v2", "prompt", "finetune", "probe"]
    assert {r.method for r in runs} == {"ptuning-v2"}  # one classifier, its arms are options
    assert [(r.overrides.get("prompt_depth", "deep"), r.overrides.get("tune_encoder", False)) for r in runs] == [
        ("deep", False), ("input", False), ("none", True), ("none", False)]
    assert all(r.eval_limit == 1000 for r in runs) and {r.plan["train_split"] for r in runs} == {"all"}
    assert all(r.eval_limit is None for r in catalogue.build("ptuning-v2", "paper", seeds=[0]).runs)
    assert all(r.eval_limit == 200 for r in catalogue.build("low-data", "quick", seeds=[0]).runs)


def test_experiment_cli_rejects_bad_seed_lists_in_one_line(tmp_path):
    from test_cli_errors import _run

    r = _run("experiment", "low-data", "--out", tmp_path / "x", "--seeds", "0,one", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip() == "error: --seeds: ExperimentConfig.seeds: must be integers >= 0, got ['0', 'one']"
    r = _run("experiment", "init", "--out", tmp_path / "x", "--seeds", "1", "--sizes", "50", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert [line.split(": ")[0] for line in r.stdout.splitlines()[1:]] == [
        "init=random-n50-s1", "init=table-to-text:-n50-s1", "init=elephant-n50-s1"]


def test_plot_command_draws_a_run_loss_curves(assets, tmp_path):
    from prefixtune.plots import plot_run, read_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 3.0 / i}) + "\n" for i in range(1, 9))
                   + json.dumps({"step": 4, "dev_loss": 1.5}) + "\n" + json.dumps({"step": 8, "dev_loss": 1.2}) + "\n"
                   + json.dumps({"step": 8, "loss": 0.3}) + "\n")  # a resumed run relogs a step: last wins
    train, dev = read_log(tmp_path)
    assert train[-1] == (8, 0.3) and len(train) == 8 and dev == [(4, 1.5), (8, 1.2)]
    r = subprocess.run([sys.executable, "-m", "prefixtune.cli", "plot", str(tmp_path)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=SRC), timeout=120)
    assert r.returncode == 0, r.stderr
    assert _png(tmp_path / "loss.png")
    r = subprocess.run([sys.executable, "-m", "prefixtune.cli", "plot", str(tmp_path / "nothing")], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=120)
    assert r.returncode == 2 and "log.jsonl not found" in r.stderr


def test_extrapolation_table_and_bar_figure_from_rows(tmp_path):
    rows = [{"label": m, "seed": s, "trainable_params": 5, "scores": {"bleu": b}, "scores_seen": {"bleu": b + 0.1},
             "scores_unseen": {"bleu": b - 0.1}, "best_dev_loss": 1.0, "train_seconds": 1.0}
            for m, b in (("prefix", 0.5), ("finetune", 0.4)) for s in (0, 1)]
    exp = catalogue.Experiment("extrapolation", "quick", "m", "webnlg2017", [], ("label",))
    table = tables.table_markdown(exp, rows)
    assert "bleu seen" in table and "| prefix | 2 | – | – | 5 | 0.5 ± 0 | 0.6 ± 0 | 0.4 ± 0 |" in table
    assert _png(figures.draw_figure(exp, rows, tmp_path / "fig.png"))


def test_unreachable_ray_address_fails_fast_naming_it():
    from prefixtune.experiments.executor import _check_reachable

    port = _free_port()  # nobody listens there now
    started = time.time()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.time() - started < 10


def test_a_diverging_selection_run_is_a_result_not_a_failure(assets, tmp_path, monkeypatch):
    """A learning rate too high for the task is what a grid exists to find: its run records an infinite
    dev loss (select.json, 'diverged'), the choice rule skips it, and the partial grid renders. (AdamW
    keeps a tiny model finite at any rate, so the trainer's NaN stop is simulated.)"""
    import prefixtune.experiments.run as run_module
    from prefixtune.train import TrainingError

    def nan_at_step_3(*args, **kwargs):
        raise TrainingError("loss became nan at step 3 (epoch 1, batch 2); try a lower --lr")

    monkeypatch.setattr(run_module, "run_training", nan_at_step_3)
    import dataclasses

    model_dir, data = assets
    spec = RunSpec(id="prefix-n40-s0-lr1e+06", method="prefix", dataset="jsonl", group="prefix-n40",
                   plan={"dataset": "jsonl", "path": str(data), "train_split": "all", "eval_split": "all",
                         "train_size": 40, "dev_sources": 10, "seed": 0},
                   overrides={"lr": 1e6, "max_steps": 6, "epochs": 6, "batch_size": 4, "length": 3, "mlp_hidden": 16,
                              "max_grad_norm": 0.0, "eval_every": 2},
                   labels={"label": "prefix"}, evaluate=False)
    row = run_one(spec, str(model_dir), tmp_path, threads=1)
    assert row["best_dev_loss"] is None and "became" in row["diverged"], row
    assert (tmp_path / "runs" / spec.id / "select.json").exists() and not (tmp_path / "runs" / spec.id / "row.json").exists()
    with pytest.raises(TrainingError, match="became nan"):  # an evaluated (comparison) run that diverges does fail
        run_one(dataclasses.replace(spec, id="other", evaluate=True), str(model_dir), tmp_path, threads=1)
    choices = tables.partial_choices([row, {**row, "id": "x", "lr": 1e-3, "best_dev_loss": 2.0}])
    assert choices["prefix-n40"]["dev_loss"] == {"0.001": 2.0, "1e+06": float("inf")}
    assert "1e+06: diverged" in tables.selection_markdown(choices) and "grid not finished" in tables.selection_markdown(choices)
    from prefixtune.experiments.protocol import choose

    assert choose({float(k): v for k, v in choices["prefix-n40"]["dev_loss"].items()}) == (1e-3, "low")
