"""`train`'s and `evaluate`'s data options come from DataPlan (issue 18): each field a command exposes is an
option of its name with the field's help, evaluate's older `--split` still works, DataPlan's own checks are
the CLI's (one `error: --option: ...` line, exit 2, before any model load), and DataPlan imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import typer

from prefixtune.cli import app
from prefixtune.cli_options import flag
from prefixtune.config import ConfigError
from prefixtune.data_plan import DataPlan

from test_cli_errors import _run

# what each command leaves out of the plan: train's seed is TrainConfig's and it evaluates nothing; evaluate
# evaluates one split with no sample of its own to shape
EXPOSED = {"train": [f.name for f in dataclasses.fields(DataPlan) if f.name not in ("seed", "eval_size")],
           "evaluate": [f.name for f in dataclasses.fields(DataPlan)
                        if f.name not in ("train_split", "dev_sources", "exclude_categories")]}


class Reached(Exception):
    """Raised by a stand-in for the function a command calls: the command got that far."""


class ModelLoaded(BaseException):
    """Raised instead of loading a model."""


def _raise(exc: BaseException):
    def stand_in(*args, **kwargs):
        raise exc

    return stand_in


def _options(command: str) -> dict[str, object]:
    """option name -> its click parameter, for `prefixtune COMMAND`."""
    group = typer.main.get_command(app)
    ctx = group.make_context("prefixtune", [command, "--help"], resilient_parsing=True)
    _, cmd, _ = group.resolve_command(ctx, [command])
    return {name: p for p in cmd.params for name in p.opts + p.secondary_opts}


@pytest.mark.parametrize("command", list(EXPOSED))
def test_every_exposed_data_plan_field_is_an_option_with_its_help(command):
    params = _options(command)
    for f in dataclasses.fields(DataPlan):
        if f.name not in EXPOSED[command]:
            continue
        assert flag(f.name) in params, f"{command} lacks {flag(f.name)} (DataPlan.{f.name})"
        param = params[flag(f.name)]
        assert param.name == f.name  # one name per setting
        assert param.help.startswith(f.metadata["help"]), (command, f.name, param.help)  # generated, not hand-declared
        assert param.required == (f.default is dataclasses.MISSING)


def test_every_data_plan_field_has_help_and_a_command():
    for f in dataclasses.fields(DataPlan):
        assert f.metadata.get("help"), f"DataPlan.{f.name} has no help text"
        assert any(f.name in names for names in EXPOSED.values()), f"DataPlan.{f.name} is no command's option"


def test_split_is_evaluates_older_name_only():
    evaluate = _options("evaluate")
    assert evaluate["--split"] is evaluate["--eval-split"]
    assert "--split: its older name" in evaluate["--eval-split"].help
    assert "--split" not in _options("train")  # there it would read as the training split


def test_train_default_method_comes_from_the_registry():
    from prefixtune.methods.registry import DEFAULT_METHOD, METHODS

    assert _options("train")["--method"].default == DEFAULT_METHOD and DEFAULT_METHOD in METHODS


def _stand_in_for_evaluation(monkeypatch, seen):
    monkeypatch.setattr("prefixtune.runs.check_artifact_files", lambda paths: None)

    def items(plan):
        seen["plan"] = plan
        raise Reached

    monkeypatch.setattr("prefixtune.runs.evaluation_items", items)
    monkeypatch.setattr("prefixtune.models.load_model", _raise(ModelLoaded()))


@pytest.mark.parametrize("option", ["--eval-split", "--split"])
def test_evaluate_eval_split_and_its_older_name_reach_the_plan(monkeypatch, tmp_path, option):
    seen = {}
    _stand_in_for_evaluation(monkeypatch, seen)
    with pytest.raises(Reached):
        _run("evaluate", "--prefix", tmp_path / "p.safetensors", "--dataset", "jsonl", "--path", tmp_path / "d.jsonl",
             option, "all", "--train-size", "7", "--seed", "3", "--eval-size", "4", "--data-dir", tmp_path,
             "--out", tmp_path / "eval")
    assert seen["plan"] == DataPlan("jsonl", data_dir=str(tmp_path), train_split="all", eval_split="all",
                                    train_size=7, seed=3, eval_size=4, path=str(tmp_path / "d.jsonl"))


@pytest.mark.parametrize("option", ["--eval-split", "--split"])
def test_evaluate_a_bad_data_value_is_one_error_line_before_any_load(monkeypatch, tmp_path, option):
    seen = {}
    _stand_in_for_evaluation(monkeypatch, seen)
    r = _run("evaluate", "--prefix", tmp_path / "p.safetensors", "--dataset", "jsonl", option, "all",
             "--eval-size", "0", "--out", tmp_path / "eval")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == "error: --eval-size: DataPlan.eval_size: must be >= 1, got 0", lines
    assert "plan" not in seen and not (tmp_path / "eval").exists()


def _train_args(tmp_path, *extra):
    return ["train", "--model", "smollm2-135m", "--dataset", "webnlg", "--out", tmp_path / "run", "--no-bf16", *extra]


@pytest.mark.parametrize("command, bad, option, message", [
    ("train", ["--train-size", "0"], "--train-size", "DataPlan.train_size: must be >= 1, got 0"),
    ("train", ["--dev-sources", "0"], "--dev-sources", "DataPlan.dev_sources: must be >= 1, got 0"),
    ("train", ["--dataset", ""], "--dataset", "DataPlan.dataset: must name a dataset, got ''"),
    ("evaluate", ["--train-size", "0"], "--train-size", "DataPlan.train_size: must be >= 1, got 0"),
    ("evaluate", ["--split", "all", "--train-size", "-3"], "--train-size", "DataPlan.train_size: must be >= 1, got -3"),
])
def test_a_data_plan_check_is_one_error_line_naming_the_option(monkeypatch, tmp_path, command, bad, option, message):
    monkeypatch.setattr("prefixtune.models.load_model", _raise(ModelLoaded()))
    monkeypatch.setattr("prefixtune.experiments.run.run_training", _raise(Reached()))
    args = (_train_args(tmp_path, *bad) if command == "train" else
            ["evaluate", "--prefix", tmp_path / "p.safetensors", "--dataset", "jsonl", "--out", tmp_path / "e", *bad])
    r = _run(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"error: {option}: {message}", lines


def test_train_data_options_reach_the_plan(monkeypatch, tmp_path):
    seen = {}

    def run_training(model, plan, method_cfg, train_cfg, out, **kwargs):
        seen.update(plan=plan, method_cfg=method_cfg, train_cfg=train_cfg)
        raise Reached

    monkeypatch.setattr("prefixtune.experiments.run.run_training", run_training)
    with pytest.raises(Reached):
        _run(*_train_args(tmp_path, "--data-dir", tmp_path, "--train-split", "all", "--eval-split", "all",
                          "--train-size", "20", "--dev-sources", "5", "--seed", "7",
                          "--exclude-categories", "Astronaut, City,"))
    assert seen["plan"] == DataPlan("webnlg", data_dir=str(tmp_path), train_split="all", eval_split="all",
                                    train_size=20, seed=7, dev_sources=5, exclude_categories=("Astronaut", "City"))
    assert seen["train_cfg"].seed == 7  # one seed: the training's and the sample's
    assert type(seen["method_cfg"]).__name__ == "PrefixConfig"  # the default method
    with pytest.raises(Reached):  # nothing given: DataPlan's defaults
        _run(*_train_args(tmp_path))
    assert seen["plan"] == DataPlan("webnlg", seed=seen["train_cfg"].seed)


def test_data_plan_checks_itself():
    for bad, field in (({"dataset": " "}, "dataset"), ({"dataset": "e2e", "train_size": 0}, "train_size"),
                       ({"dataset": "e2e", "seed": -1}, "seed"), ({"dataset": "e2e", "dev_sources": 0}, "dev_sources"),
                       ({"dataset": "e2e", "eval_size": 0}, "eval_size")):
        with pytest.raises(ConfigError, match=rf"^DataPlan\.{field}: "):
            DataPlan(**bad)


def test_data_plan_is_one_class_and_imports_no_torch():
    import prefixtune.experiments
    import prefixtune.experiments.run

    assert prefixtune.experiments.DataPlan is prefixtune.experiments.run.DataPlan is DataPlan
    code = ("import sys\nfrom prefixtune.experiments import DataPlan\nfrom prefixtune.cli import app\nDataPlan('e2e')\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_list_option_is_the_same_run_when_resumed():
    """exclude_categories arrives as a tuple; the checkpoint records the run's identity as JSON (a list): the
    resume check compares the two, so the identity is the JSON view."""
    import json

    from prefixtune.experiments.run import run_identity

    identity = run_identity("m", DataPlan("webnlg", exclude_categories=("Astronaut", "City")), [], [])
    assert identity == json.loads(json.dumps(identity))
    assert identity["data"]["exclude_categories"] == ["Astronaut", "City"]
