"""--resume continues only the run it was: the same model (name and weights), the same data plan and the
same pairs. Anything else is refused with each difference named, before the model is loaded where the
data alone decides."""

from __future__ import annotations

import json

import pytest
import torch

from prefixtune.experiments.run import DataPlan, run_training
from prefixtune.recipes import configs_for
from prefixtune.train import TrainingError

from conftest import reversal_pairs, tiny, tiny_tokenizer


def _write(path, pairs):
    path.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs))
    return path


def _plan(path, size=40):
    return DataPlan("jsonl", path=str(path), train_split="all", eval_split="all", train_size=size, dev_sources=5)


def _train(out, plan, model=None, name="tiny-llama", resume=False):
    model = model if model is not None else tiny("llama")
    method_cfg, train_cfg = configs_for("jsonl", "prefix", length=2, mlp_hidden=8, max_steps=3, epochs=5,
                                        batch_size=4, checkpoint_every=1, lr=1e-2)
    return run_training(name, plan, method_cfg, train_cfg, out, resume=resume, print_fn=lambda s: None,
                        model_and_tokenizer=(model, tiny_tokenizer("llama")))


def test_resume_refuses_other_data_or_model_naming_each_difference(tmp_path, monkeypatch):
    data = _write(tmp_path / "a.jsonl", reversal_pairs(80))
    other = _write(tmp_path / "b.jsonl", reversal_pairs(80, seed=1))
    out = tmp_path / "run"
    first = _train(out, _plan(data))
    assert first["steps"] == 3 and (out / "checkpoint.safetensors").exists()
    run_json = (out / "run.json").read_text()

    # the case: another file and another size -> refused, nothing trained, run.json untouched
    with pytest.raises(TrainingError) as e:
        _train(out, _plan(other, size=30), resume=True)
    msg = str(e.value)
    assert f"path {str(data)!r} -> {str(other)!r}" in msg and "train_size 40 -> 30" in msg
    assert (out / "run.json").read_text() == run_json

    # the same path with edited content
    _write(data, reversal_pairs(80, seed=2))
    with pytest.raises(TrainingError, match="differ in content"):
        _train(out, _plan(data), resume=True)
    _write(data, reversal_pairs(80))

    # the data alone decides: refused before the model would load
    import prefixtune.models as models_module

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data check")

    monkeypatch.setattr(models_module, "load_model", no_load)
    with pytest.raises(TrainingError, match="seed 0 -> 1"):
        run_training("tiny-llama", DataPlan("jsonl", path=str(data), train_split="all", eval_split="all",
                                            train_size=40, dev_sources=5, seed=1),
                     *configs_for("jsonl", "prefix", length=2, mlp_hidden=8, max_steps=3, epochs=5, batch_size=4,
                                  checkpoint_every=1, lr=1e-2), out, resume=True, print_fn=lambda s: None)
    monkeypatch.undo()

    # another model name, and the same name with other weights
    with pytest.raises(TrainingError, match="model 'tiny-llama' -> 'other-model'"):
        _train(out, _plan(data), name="other-model", resume=True)
    changed = tiny("llama")
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(TrainingError, match="fingerprint"):
        _train(out, _plan(data), model=changed, resume=True)

    # the same run resumes (already finished: nothing more to train)
    again = _train(out, _plan(data), resume=True)
    assert again["steps"] == 3
