"""What a trained artifact's files say about it, for decoding and evaluating it later: the base model the
artifact names, the run.json `train` wrote beside it (dataset, splits, low-data sample), and whether
several artifacts can decode together as an ensemble."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path

from . import models  # models.load_model looked up at call time: tests stand in for the (slow) load
from .data import load_dataset
from .data_plan import DataPlan
from .experiments.run import load_run_artifact, plan_data
from .prefix import check_artifact_file, read_metadata


class RunFileError(ValueError):
    """A run's file (run.json, an artifact) cannot be used as asked; the message names the file and why."""


def read_run_json(path: str | Path) -> dict:
    """The run.json at `path`, refused with a message naming it if it is not the JSON object `train` wrote."""
    path = Path(path)
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path}: not UTF-8 text (byte {e.start}); it should be the run.json prefixtune wrote") from None
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); it should be the run.json "
                           "prefixtune wrote") from None
    except OSError as e:
        raise RunFileError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(run, dict):
        raise RunFileError(f"{path}: not a JSON object; it should be the run.json prefixtune wrote")
    return run


def trained_data(artifact: str | Path) -> dict:
    """The data section of the run.json beside `artifact` ({} when the artifact has no run folder)."""
    run_json = Path(artifact).parent / "run.json"
    data = read_run_json(run_json).get("data") if run_json.exists() else None
    return data if isinstance(data, dict) else {}


def evaluation_sample(artifact: str | Path, dataset: str, split: str, train_size: int | None = None,
                      seed: int | None = None) -> tuple[int | None, int]:
    """(train_size, seed) of the low-data sample an evaluation on `split` leaves out. Given values win; else,
    when the run beside `artifact` trained on this dataset's `split`, its run.json's sample, so that the
    sources it trained on are not evaluated."""
    trained = trained_data(artifact)
    same_split = trained.get("dataset") == dataset and trained.get("train_split") == split
    if train_size is None and same_split:
        train_size = trained.get("train_size")
    if seed is None:
        seed = trained.get("seed", 0) if same_split else 0
    return train_size, seed


def evaluation_plan(artifact: str | Path, plan: DataPlan, given: Collection[str] = ()) -> DataPlan:
    """`plan` as an evaluation of `artifact` on `plan.eval_split`: train_size and seed not in `given` (the
    settings the user gave) are the low-data sample the run beside `artifact` trained on this split
    (`evaluation_sample`), so that its trained sources are left out, and so are the sources its dev loss
    was measured on (run.json's dev_sources)."""
    train_size, seed = evaluation_sample(artifact, plan.dataset, plan.eval_split,
                                         plan.train_size if "train_size" in given else None,
                                         plan.seed if "seed" in given else None)
    trained = trained_data(artifact)
    dev_sources = plan.dev_sources
    if "dev_sources" not in given and (trained.get("dataset"), trained.get("train_split")) == (plan.dataset, plan.eval_split):
        dev_sources = trained.get("dev_sources") or dev_sources  # its dev-loss sources chose the checkpoint: not evaluated
    return dataclasses.replace(plan, train_split=plan.eval_split, train_size=train_size, seed=seed,
                               dev_sources=dev_sources)


def evaluation_items(plan: DataPlan) -> list:
    """The items `plan` evaluates (an `evaluation_plan`): `plan.eval_split`'s sources, less a low-data
    sample, at most `plan.eval_size` of them."""
    if plan.train_size:
        return plan_data(plan)[2]
    items = load_dataset(plan.dataset, plan.eval_split, data_dir=plan.data_dir,
                         **({"path": plan.path} if plan.path else {})).eval_items()
    return items[:plan.eval_size] if plan.eval_size else items


def check_artifact_files(paths) -> None:
    """What the artifact files alone decide (damage, truncation, shapes vs metadata, NaN, one base model for
    an ensemble), checked before any model is loaded."""
    prints = {str(p): check_artifact_file(p).get("fingerprint") for p in paths}
    if len({str(f) for f in prints.values() if f is not None}) > 1:
        raise RunFileError("the files were made for different base models (fingerprints "
                           + ", ".join(f"{p}: {f}" for p, f in prints.items()) + "); an ensemble needs one base model")


def base_model_of(paths, model: str | None = None) -> str:
    """The base model to decode artifact `paths` with: `model` if given, else the one the files name."""
    if model is not None:
        return model
    if not paths:
        raise RunFileError("give --prefix or --model")
    for p in paths:
        if not read_metadata(p).get("base_model"):
            raise RunFileError(f"{p} does not name its base model; pass --model")
    return read_metadata(paths[0])["base_model"]


def load_for_decoding(paths, model: str | None = None):
    """(artifact, base model, tokenizer) for decoding: the artifact file(s) on their base model (several
    files: a list, an ensemble), or the bare `model` (artifact None) when no file is given. The model's name
    is checked before its (slow) load."""
    name = base_model_of(paths, model)
    models.check_model_name(name)
    if not paths:
        base, tok = models.load_model(name)
        return None, base, tok
    return load_run_artifact(paths, model)


def image_classifier(artifact) -> bool:
    """Whether `artifact` (as `load_for_decoding` returns it) classifies images rather than generating text."""
    return not isinstance(artifact, list) and (getattr(artifact, "meta", None) or {}).get("modality") in ("image", "image-text")
