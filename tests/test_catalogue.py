"""The experiment catalogue: every experiment is its spec built by the one builder, which branches on no
experiment's or method's name; a new experiment is a new spec."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from prefixtune.experiments import catalogue, vision
from prefixtune.experiments.catalogue import CATALOGUE, Arm, Axis, ExperimentSpec, Per, Sizes, build, build_runs
from prefixtune.methods import METHODS

SCALES = ("tiny", "quick", "paper")


def _runs(exp) -> list[dict]:
    return [dataclasses.asdict(r) for r in exp.runs]


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_experiment_is_its_spec_through_the_one_builder(name, monkeypatch):
    """The same spec under another name builds the same runs: nothing in the builder depends on the name."""
    monkeypatch.setitem(CATALOGUE, "renamed", CATALOGUE[name])
    for scale in SCALES:
        exp, copy = build(name, scale), build("renamed", scale)
        assert _runs(copy) == _runs(exp) and copy.notes == exp.notes
        assert (copy.group_by, copy.x, copy.model, copy.dataset) == (exp.group_by, exp.x, exp.model, exp.dataset)
        assert _runs(build_runs(name, CATALOGUE[name], scale)) == _runs(exp)


def test_the_builder_names_no_experiment_and_no_method():
    """No string in the builder's code is an experiment's or a method's name (the specs are data)."""
    names = set(CATALOGUE) | set(catalogue.VISION_EXPERIMENTS) | set(METHODS)
    names -= {"init"}  # also an option name (init="text"), which the builder does use
    tree = ast.parse(inspect.getsource(catalogue))
    found = [(node.name, c.value) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
             for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
    assert not found
    assert all(isinstance(v, ExperimentSpec) for v in CATALOGUE.values())


def test_a_new_spec_builds_runs_without_touching_code(monkeypatch):
    spec = ExperimentSpec(
        "soft prompts of several lengths at each low-data size", "e2e", "smollm2-135m", ("prompt", "prefix"),
        sizes=Sizes.SCALE, options={"batch_size": 4}, prompt_options={"init_text": "hello"},
        axis=Axis("length", Per((2,), scale={"quick": (2, 8)}, arm={"prompt": (3,)})),
        label=Per("{arm}@{length}", arm={"prefix": "P{length}"}), group_by=("label", "train_size"), x="train_size",
        notes=("evaluated on {eval_limit} sources",))
    monkeypatch.setitem(CATALOGUE, "new-one", spec)
    exp = build("new-one", "tiny")
    assert [r.id for r in exp.runs] == ["prompt@3-n20-s0", "prompt@3-n40-s0", "P2-n20-s0", "P2-n40-s0"]
    assert [r.labels for r in exp.runs][:1] == [{"label": "prompt@3", "length": 3}]
    assert all(r.overrides["batch_size"] == 4 and r.overrides["init_text"] == "hello" and r.overrides["init"] == "text"
               for r in exp.runs)
    assert [r.overrides["length"] for r in exp.runs] == [3, 3, 2, 2]
    assert exp.notes[1] == "evaluated on 4 sources" and exp.x == "train_size"
    quick = build("new-one", "quick", seeds=[0])
    assert [r.id for r in quick.runs if r.method == "prefix"] == ["P2-n50-s0", "P2-n200-s0", "P8-n50-s0", "P8-n200-s0"]
    assert "length" not in build("new-one", "tiny", methods=["lora"]).runs[0].overrides  # an option it lacks

    # named arms: one method under several option sets; --methods chooses among the arms
    arms = {"wide": Arm("lora", {"rank": 16}), "narrow": Arm("lora", {"rank": 2, "lr": 1e-4})}
    monkeypatch.setitem(CATALOGUE, "ranks", ExperimentSpec("lora ranks", "e2e", "m", tuple(arms), arms=arms,
                                                           arms_are="ranks", sizes=(30,)))
    runs = build("ranks", "tiny").runs
    assert [(r.id, r.method, r.overrides["rank"]) for r in runs] == [("wide-n30-s0", "lora", 16),
                                                                     ("narrow-n30-s0", "lora", 2)]
    assert runs[1].overrides["lr"] == 1e-4  # an arm's own rate is the centre of its grid
    with pytest.raises(catalogue.ExperimentError, match="compares ranks wide, narrow; unknown: medium"):
        build("ranks", "tiny", methods=["medium"])


def test_learning_rates_are_the_methods_own(monkeypatch):
    """The centre of a method's grid is read from its class: a changed rate changes the runs, no code does."""
    lora = METHODS["lora"]
    monkeypatch.setattr(lora, "short_run_learning_rate", 7e-4)
    assert build("low-data", "quick", methods=["lora"], sizes=[50], seeds=[0]).runs[0].overrides["lr"] == 7e-4
    monkeypatch.setattr(lora, "learning_rate", 3e-4)
    assert build("low-data", "paper", methods=["lora"], sizes=[50], seeds=[0]).runs[0].overrides["lr"] == 3e-4


def test_the_image_experiments_are_the_catalogues_image_experiments():
    assert tuple(vision.IMAGE_EXPERIMENTS) == catalogue.VISION_EXPERIMENTS
    assert set(catalogue.EXPERIMENTS) == set(CATALOGUE) | set(vision.IMAGE_EXPERIMENTS)


def test_a_folder_keeps_the_sizes_and_seeds_of_its_earlier_commands(tmp_path):
    """`--sizes 50` now and `--sizes 200` later into one folder: experiment.json (and the table's note) name
    both, not only the last command's; another experiment's record is not merged in."""
    import json

    from prefixtune.experiments.report import save_experiment_meta

    save_experiment_meta(build("low-data", "quick", sizes=[50], seeds=[0, 1]), tmp_path)
    save_experiment_meta(build("low-data", "quick", sizes=[200], seeds=[2]), tmp_path)
    meta = json.loads((tmp_path / "experiment.json").read_text())
    assert meta["sizes"] == [50, 200] and meta["seeds"] == [0, 1, 2]
    assert meta["notes"][0].startswith("scale quick: sizes [50, 200], seeds [0, 1, 2],")
    save_experiment_meta(build("init", "quick", sizes=[100]), tmp_path)  # another experiment: its own record
    assert json.loads((tmp_path / "experiment.json").read_text())["sizes"] == [100]


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_experiments_reference_is_one_of_its_rows(name):
    """The interval column compares each row with the reference row: a reference no run is labelled with
    leaves that column empty (ptuning-v2, prefix-length, embedding-only, infix and init once had it so)."""
    for scale in SCALES:
        exp = build(name, scale)
        labels = {r.labels["label"] for r in exp.runs}
        assert exp.reference in labels, (scale, exp.reference, sorted(labels))
