"""Every command's settings come from its config dataclass (issue 18): each field is an option of its name,
a value given on the command line reaches the config, old names still work, the dataclass's own checks
are the CLI's, and `--help` does not import torch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import typer

from prefixtune.cli import app
from prefixtune.cli_options import ALIASES, flag
from prefixtune.decode_config import DecodeConfig
from prefixtune.experiments.config import ExperimentConfig
from prefixtune.serve.config import ServeConfig

from test_cli_errors import _run


class Reached(Exception):
    """Raised by a stand-in for the function a command calls: the command got that far."""


def _option_names(command: str) -> set[str]:
    group = typer.main.get_command(app)
    ctx = group.make_context("prefixtune", [command, "--help"], resilient_parsing=True)
    _, cmd, _ = group.resolve_command(ctx, [command])
    return {name for p in cmd.params for name in p.opts + p.secondary_opts}


def _settable(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False]


def _other_values(cls, **fixed) -> dict:
    """A valid value other than the default for every settable field of `cls`."""
    values = {}
    for f in _settable(cls):
        if isinstance(f.default, bool):
            values[f.name] = not f.default
        elif isinstance(f.default, float):
            values[f.name] = f.default / 2
        elif isinstance(f.default, int):
            values[f.name] = f.default + 1
        elif f.default is None:  # torch_threads
            values[f.name] = 3
    values.update(fixed)
    cls(**values)  # valid
    return values


def _argv(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append(flag(name) if value else f"--no-{name.replace('_', '-')}")
        else:
            out += [flag(name), str(value)]
    return out


@pytest.mark.parametrize("command, cls", [("serve", ServeConfig), ("generate", DecodeConfig),
                                          ("evaluate", DecodeConfig), ("experiment", ExperimentConfig)])
def test_every_config_field_is_an_option_of_its_name(command, cls):
    names = _option_names(command)
    missing = [flag(f.name) for f in _settable(cls) if flag(f.name) not in names]
    assert not missing, f"{command} lacks options for {cls.__name__} fields: {missing}"


def test_serve_options_reach_the_config(monkeypatch, tmp_path):
    seen = {}

    def run_server(model, store, host, port, config, files_dir):
        seen.update(model=model, port=port, config=config)
        raise Reached

    monkeypatch.setattr("prefixtune.serve.app.run_server", run_server)
    values = _other_values(ServeConfig)
    with pytest.raises(Reached):
        _run("serve", "--model", "smollm2-135m", "--store", tmp_path / "s.db", "--port", "0", *_argv(values))
    assert seen["config"] == ServeConfig(**values) and seen["port"] == 0


def test_serve_old_option_names_still_work(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("prefixtune.serve.app.run_server", lambda *a, config, **k: seen.update(config=config))
    r = _run("serve", "--model", "smollm2-135m", "--store", tmp_path / "s.db", "--threads", "2",
             "--request-timeout", "9", "--max-prefix-cache-bytes", "1000", "--store-poll", "3", "--store-sweep", "4")
    assert r.returncode == 0, r.stderr
    assert seen["config"] == ServeConfig(torch_threads=2, request_timeout_s=9, prefix_cache_bytes=1000,
                                         store_poll_s=3, store_sweep_s=4)
    assert set(ALIASES["torch_threads"]) <= _option_names("serve")


def test_a_config_check_is_one_error_line_naming_the_option(tmp_path):
    r = _run("serve", "--model", "smollm2-135m", "--store", tmp_path / "s.db", "--max-queue", "0")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --max-queue: ServeConfig.max_queue: must be >= 1"), lines
    r = _run("generate", "--model", "smollm2-135m", "--input", "x", "--min-new-tokens", "9", "--max-new-tokens", "3")
    assert r.returncode == 2 and "--min-new-tokens" in r.stderr, r.stderr


def _stand_in_for_decoding(monkeypatch, seen):
    monkeypatch.setattr("prefixtune.runs.check_artifact_files", lambda paths: None)
    monkeypatch.setattr("prefixtune.runs.load_for_decoding", lambda paths, model: (None, "base", "tok"))

    def decode(*args, **kwargs):
        seen["cfg"] = next(a for a in args if isinstance(a, DecodeConfig))
        raise Reached

    return decode


def test_generate_options_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr("prefixtune.decode.generate_texts", _stand_in_for_decoding(monkeypatch, seen))
    values = _other_values(DecodeConfig)
    with pytest.raises(Reached):
        _run("generate", "--model", "smollm2-135m", "--input", "x", *_argv(values))
    assert seen["cfg"] == DecodeConfig(**values)


def test_evaluate_options_reach_the_config_over_the_recipe(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("prefixtune.experiments.evaluate", _stand_in_for_decoding(monkeypatch, seen))
    monkeypatch.setattr("prefixtune.runs.evaluation_items", lambda *a, **k: [])
    values = _other_values(DecodeConfig)
    args = ["evaluate", "--prefix", tmp_path / "p.safetensors", "--dataset", "xsum", "--out", tmp_path / "eval"]
    with pytest.raises(Reached):
        _run(*args, *_argv(values))
    assert seen["cfg"] == DecodeConfig(**values)
    with pytest.raises(Reached):  # nothing given: the recipe's settings (XSum: beam 6, length penalty 0.8)
        _run(*args)
    assert (seen["cfg"].num_beams, seen["cfg"].length_penalty) == (6, 0.8)
    with pytest.raises(Reached):  # an ensemble decodes greedily
        _run(*args, "--prefix", tmp_path / "q.safetensors")
    assert seen["cfg"].num_beams == 1


def test_ensemble_decode_config():
    from prefixtune.ensemble import ensemble_decode_config

    beam = DecodeConfig(num_beams=5)
    assert ensemble_decode_config(beam, 1) is beam
    assert ensemble_decode_config(beam, 2) == dataclasses.replace(beam, num_beams=1)
    sampling = DecodeConfig(num_beams=5, do_sample=True)
    assert ensemble_decode_config(sampling, 3) is sampling


def test_evaluation_sample_reads_the_run_json_beside_the_artifact(tmp_path):
    from prefixtune.runs import RunFileError, evaluation_sample

    artifact = tmp_path / "prefix.safetensors"
    assert evaluation_sample(artifact, "e2e", "train") == (None, 0)  # no run.json
    (tmp_path / "run.json").write_text(json.dumps({"data": {"dataset": "e2e", "train_split": "train",
                                                            "train_size": 50, "seed": 3}}))
    assert evaluation_sample(artifact, "e2e", "train") == (50, 3)  # the trained sample is left out
    assert evaluation_sample(artifact, "e2e", "train", train_size=10, seed=1) == (10, 1)  # given values win
    assert evaluation_sample(artifact, "e2e", "dev") == (None, 0)  # another split: nothing trained on it
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunFileError, match="not a JSON object"):
        evaluation_sample(artifact, "e2e", "train")


def test_evaluation_plan_leaves_out_the_runs_dev_sources_too(tmp_path):
    """A low-data run chose its checkpoint on `dev_sources` held-out sources: evaluating it on that split leaves
    them out as well (the plan's default, 30, would put 30 of a 60-source dev set among the evaluated)."""
    from prefixtune.data_plan import DataPlan
    from prefixtune.runs import evaluation_plan

    artifact = tmp_path / "prefix.safetensors"
    (tmp_path / "run.json").write_text(json.dumps({"data": {"dataset": "e2e", "train_split": "dev", "train_size": 200,
                                                            "seed": 2, "dev_sources": 60}}))
    plan = evaluation_plan(artifact, DataPlan("e2e", eval_split="dev"))
    assert (plan.train_split, plan.train_size, plan.seed, plan.dev_sources) == ("dev", 200, 2, 60)
    assert evaluation_plan(artifact, DataPlan("e2e", eval_split="dev", dev_sources=5), given={"dev_sources"}).dev_sources == 5
    assert evaluation_plan(artifact, DataPlan("e2e", eval_split="test")).dev_sources == 30  # not the split it trained on


def test_count_progress_off_a_terminal_is_silent():
    from prefixtune.progress import count_progress

    with count_progress("runs") as update:
        assert update is None  # pytest's stderr is not a terminal


def test_progress_bars_on_a_terminal_draw_and_print_log_lines_above_them(monkeypatch, capsys):
    from prefixtune import progress as P

    monkeypatch.setattr(P, "on_terminal", lambda: True)
    with P.training_progress() as step:
        step({"total": 10, "step": 3, "loss": 1.5, "tokens_per_s": 100.0})
        P.progress_print("a log line")
    with P.decoding_progress(4) as done:
        done(4, 4)
    with P.count_progress("runs") as update:
        update(1, 2)
    assert P._BAR is None  # log lines print plainly again
    err = capsys.readouterr()
    assert "3/10" in err.err and "loss 1.5000" in err.err and "4/4" in err.err and "runs" in err.err
    assert "a log line" in err.out + err.err


@pytest.mark.parametrize("command", ["", "train", "serve", "generate", "evaluate", "experiment"])
def test_help_does_not_import_torch(command):
    code = ("import contextlib, io, sys\n"
            "from prefixtune.cli import main\n"
            f"sys.argv = ['prefixtune', *{[command] if command else []!r}, '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main()\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_experiment_options_reach_the_command_and_bad_values_are_one_error_line(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("prefixtune.experiments.command.experiment", lambda name, out, **kw: seen.update(kw, name=name))
    r = _run("experiment", "low-data", "--out", tmp_path / "x", "--seeds", "0,2", "--sizes", "50", "--methods",
             "prefix, lora", "--scale", "tiny", "--precision", "bf16", "--cpus-per-run", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert seen["name"] == "low-data" and seen["seeds"] == [0, 2] and seen["sizes"] == [50]
    assert seen["methods"] == ["prefix", "lora"] and seen["scale"] == "tiny" and seen["precision"] == "bf16"
    assert seen["cpus_per_run"] == 1 and seen["dry_run"] is True
    for bad, option in ((["--seeds", "a,1"], "--seeds"), (["--precision", "fp16"], "--precision"),
                        (["--cpus-per-run", "0"], "--cpus-per-run"), (["--sizes", "0"], "--sizes")):
        r = _run("experiment", "low-data", "--out", tmp_path / "y", *bad)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {option}:"), r.stderr


@pytest.mark.parametrize("method_args, present, absent", [
    (["--method", "lora"], ["--rank", "--alpha", "--lr", "--dataset"], ["--mlp-hidden", "--layers", "--template"]),
    (["--method=FT-TOP"], ["--layers", "--lr"], ["--rank", "--mlp-hidden"]),
    ([], ["--rank", "--layers", "--mlp-hidden", "--template", "--lr"], []),  # no method named: every option
    (["--method", "nope"], ["--rank", "--mlp-hidden"], []),  # an unknown one: every option (train itself refuses it)
])
def test_train_help_for_one_method_lists_its_options_and_trainings_only(method_args, present, absent):
    r = subprocess.run([sys.executable, "-m", "prefixtune.cli", "train", *method_args, "--help"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    listed = set(re.findall(r"^│ [ *]+(--[a-z0-9-]+)", r.stdout, flags=re.M))
    assert set(present) <= listed and not set(absent) & listed, (sorted(listed), present, absent)
