"""The main job as library calls: choose data, train a prefix, evaluate it, and the demo.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import PrefixConfig
from .decode import DecodeConfig, generate_texts, write_predictions
from .engine import PrefixModel
from .prefix import MergedPrefix, atomic_write_bytes, load_prefix
from .train import PAPER_DEFAULTS, TrainConfig, train

METRIC_TASK = {"e2e": "e2e", "webnlg": "webnlg", "dart": "dart", "xsum": "xsum", "jsonl": "generic"}


@dataclass
class DataPlan:
    """Which examples train, which give the dev loss, which are evaluated (never overlapping sources)."""

    dataset: str
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "dev"
    train_size: int | None = field(default=None, metadata={"help": "Low-data: sample this many pairs, grouped by source."})
    seed: int = 0
    dev_sources: int = field(default=30, metadata={"help": "Held-out sources used for the dev loss in low-data runs."})
    eval_size: int | None = field(default=None, metadata={"help": "Evaluate on at most this many sources."})
    path: str | None = field(default=None, metadata={"help": "File for the generic jsonl dataset."})


def plan_data(plan: DataPlan):
    """Returns (train_pairs, dev_pairs, eval_items)."""
    from .data import load_dataset, low_data_split

    opts = {"path": plan.path} if plan.path else {}
    train_ds = load_dataset(plan.dataset, plan.train_split, data_dir=plan.data_dir, download=True, **opts)
    if plan.train_split == plan.eval_split:
        if plan.train_size is None:
            raise ValueError(f"training and evaluating on the same split ({plan.train_split!r}) needs --train-size, so "
                             "that evaluation uses only sources that were not trained on")
        train_part, held_out = low_data_split(train_ds, plan.train_size, seed=plan.seed)
        items = held_out.eval_items()
        dev_items, eval_items = items[-plan.dev_sources:], items[:-plan.dev_sources]
        dev_set = {it.source for it in dev_items}
        dev_pairs = [e for e in held_out.examples if e.source in dev_set]
        train_pairs = train_part.examples
    else:
        train_pairs = train_ds.examples
        if plan.train_size is not None:
            train_pairs = low_data_split(train_ds, plan.train_size, seed=plan.seed)[0].examples
        eval_ds = load_dataset(plan.dataset, plan.eval_split, data_dir=plan.data_dir, download=True, **opts)
        dev_pairs = eval_ds.examples
        eval_items = eval_ds.eval_items()
    if plan.eval_size is not None:
        eval_items = eval_items[:plan.eval_size]
    return train_pairs, dev_pairs, eval_items


def paper_configs(dataset: str, **overrides) -> tuple[PrefixConfig, TrainConfig]:
    """The paper's per-dataset settings, with any non-None override applied."""
    d = dict(PAPER_DEFAULTS.get(dataset, {}))
    prefix_keys = {"prefix_length": "length", "mlp_hidden": "mlp_hidden", "reparam": "reparam",
                   "init_text": "init_text", "method": "method"}
    prefix_args, train_args = {}, {}
    for key, value in {**d, **{k: v for k, v in overrides.items() if v is not None}}.items():
        if key in prefix_keys:
            prefix_args[prefix_keys[key]] = value
        else:
            train_args[key] = value
    return PrefixConfig(**prefix_args), TrainConfig(**train_args)


def run_training(model_name: str, plan: DataPlan, prefix_cfg: PrefixConfig, train_cfg: TrainConfig, out: str | Path,
                 resume: bool = False, print_fn: Callable[[str], None] = print, model_and_tokenizer=None) -> dict:
    from .models import load_model

    out = Path(out)
    model, tok = model_and_tokenizer or load_model(model_name)
    torch.manual_seed(train_cfg.seed)
    train_pairs, dev_pairs, eval_items = plan_data(plan)
    print_fn(f"data: {len(train_pairs)} training pairs, {len(dev_pairs)} dev pairs, {len(eval_items)} evaluation sources")
    pm = PrefixModel(model, prefix_cfg, tokenizer=tok)
    run_info = {"model": model_name, "data": asdict(plan), "prefix": prefix_cfg.to_dict(), "train": asdict(train_cfg)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "run.json", json.dumps(run_info, indent=2).encode())
    result = train(pm, tok, train_pairs, dev_pairs, train_cfg, out, resume=resume, print_fn=print_fn,
                   extra_meta={"base_model": model_name, "dataset": plan.dataset})
    return {**result, "model": model, "tokenizer": tok, "eval_items": eval_items}


def evaluate(model, tokenizer, prefix: MergedPrefix | None, items, task: str, decode_cfg: DecodeConfig,
             out_dir: str | Path | None = None, format_source=None, progress=None, model_based: bool = False) -> dict:
    """Generate for every evaluation item and score with the task's official metrics.

    `model_based`: also BERTScore when its package and weights are available (else a note says why not).
    """
    from .metrics import score
    from .metrics.model_based import model_based_scores

    started = time.time()
    outputs = generate_texts(model, tokenizer, [it.source for it in items], prefix, decode_cfg,
                             format_source=format_source, progress=progress)
    seconds = time.time() - started
    refs = [list(it.references) for it in items]
    scores = score(task, outputs, refs)
    extra, notes = model_based_scores(outputs, refs) if model_based else ({}, [])
    result = {"task": task, "n": len(items), "scores": {**scores, **extra}, "notes": notes,
              "decode_seconds": round(seconds, 1), "decode": asdict(decode_cfg)}
    if task == "webnlg" and items and "seen" in (items[0].meta or {}):
        for name, want in (("seen", True), ("unseen", False)):
            idx = [i for i, it in enumerate(items) if it.meta.get("seen") == want]
            if idx:
                result[f"scores_{name}"] = score(task, [outputs[i] for i in idx], [list(items[i].references) for i in idx])
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_predictions(out_dir / "predictions.jsonl", items, outputs)
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(result, indent=2).encode())
    result["outputs"] = outputs
    return result


def load_run_prefix(path: str | Path, model_name: str | None = None):
    """Load a prefix file and the base model it names (or `model_name`)."""
    from .models import load_model

    meta_only = load_prefix(path)
    name = model_name or meta_only.meta.get("base_model")
    if not name:
        raise ValueError(f"{path} does not name its base model; pass --model")
    model, tok = load_model(name)
    return load_prefix(path, model), model, tok
