"""The command line with image classifiers: `train --dataset cifar10`, `evaluate` (accuracy, per-class),
`classify --image`, on a tiny random DINOv2 saved as a model folder and a tiny CIFAR-shaped data folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.data.cifar10 import CLASSES


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-cli")
    torch.manual_seed(0)
    model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, image_size=28, patch_size=7))
    model.save_pretrained(root / "model")  # safetensors
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 28, "width": 28}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    data = root / "data" / "cifar10"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train_500_per_class.npz", 1000), ("test_500_per_class.npz", 30)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        images[..., 0] = (labels * 25)[:, None, None]            # the class is readable from the red channel
        np.savez(data / name, images=images, labels=labels, classes=np.array(CLASSES))
    return root


def test_train_evaluate_and_classify_an_image_classifier(folders, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--model", str(folders / "model"), "--dataset", "cifar10", "--data-dir",
                            str(folders / "data"), "--method", "vpt-deep", "--length", "2", "--out", str(out),
                            "--max-steps", "3", "--batch-size", "16", "--epochs", "1", "--lr", "0.01",
                            "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    artifact = out / "vpt-deep.safetensors"
    assert artifact.exists() and (out / "checkpoint.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["data"]["dataset"] == "cifar10"

    r = runner.invoke(app, ["evaluate", "--artifact", str(artifact), "--dataset", "cifar10", "--split", "test",
                            "--data-dir", str(folders / "data"), "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 30 and set(metrics["scores"]["per_class"]) == set(CLASSES)
    assert 0 <= metrics["scores"]["accuracy"] <= 1 and "accuracy" in r.output
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 30

    from PIL import Image

    png = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(png)
    r = runner.invoke(app, ["classify", "--artifact", str(artifact), "--image", str(png), "--top", "2"])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    tail = line.split(f"{png}: ")[1]
    assert tail.count(",") == 1 and tail.split()[0] in CLASSES

    r = runner.invoke(app, ["classify", "--artifact", str(artifact), "--image", str(tmp_path / "none.png")])
    assert r.exit_code == 2 and "no such image file" in r.output


def test_experiment_dispatches_image_experiments_and_refuses_unknown_arms(tmp_path):
    r = CliRunner().invoke(app, ["experiment", "vpt", "--out", str(tmp_path / "x"), "--methods", "probe,nonsense"])
    assert r.exit_code == 2 and "experiment vpt has arms" in r.output and "nonsense" in r.output
    r = CliRunner().invoke(app, ["experiment", "l2p", "--out", str(tmp_path / "y"), "--scale", "huge"])
    assert r.exit_code == 2 and "scales" in r.output


def test_image_experiments_dry_run_their_plan_and_refuse_text_only_options(tmp_path, monkeypatch):
    """--dry-run prints the plan without loading a model or running an arm; --precision reaches the scale;
    options only the text experiments have are refused by name instead of being ignored."""
    from prefixtune import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    out = tmp_path / "x"
    r = CliRunner().invoke(app, ["experiment", "vpt", "--out", str(out), "--methods", "probe,vpt-deep", "--dry-run",
                                 "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    assert "bf16 autocast" in r.output and "vpt-deep: vpt-deep" in r.output and "lr grid" in r.output
    assert "lora" not in r.output and not (out / "results.jsonl").exists()
    r = CliRunner().invoke(app, ["experiment", "l2p", "--out", str(out), "--dry-run"])
    assert r.exit_code == 0 and "fp32" in r.output and "seq-head" in r.output and "l2p-nomask" in r.output
    r = CliRunner().invoke(app, ["experiment", "probe", "--out", str(out), "--dry-run"])
    assert r.exit_code == 0 and "224 px" in r.output
    for flag, value in (("--sizes", "50"), ("--ray-address", "127.0.0.1:6379"), ("--cpus-per-run", "1")):
        r = CliRunner().invoke(app, ["experiment", "vpt", "--out", str(out), flag, value])
        assert r.exit_code == 2 and r.output.startswith("error: ") and flag in r.output, r.output


def test_an_image_run_recorded_in_the_other_precision_is_refused_not_mixed(tmp_path):
    from prefixtune.experiments.catalogue import ExperimentError
    from prefixtune.experiments.vision.common import read_finished

    row = tmp_path / "probe-lr0.01-s0" / "row.json"
    assert read_finished(row, bf16=False) is None  # not run yet
    row.parent.mkdir()
    row.write_text(json.dumps({"arm": "probe", "lr": 0.01, "seed": 0}))  # before precision was recorded: bf16
    assert read_finished(row, bf16=True)["arm"] == "probe"
    with pytest.raises(ExperimentError, match="recorded in bf16, this run asks for fp32"):
        read_finished(row, bf16=False)
    row.write_text(json.dumps({"arm": "probe", "lr": 0.01, "seed": 0, "bf16": False}))
    assert read_finished(row, bf16=False)["bf16"] is False
    with pytest.raises(ExperimentError, match="--precision fp32"):
        read_finished(row, bf16=True)
