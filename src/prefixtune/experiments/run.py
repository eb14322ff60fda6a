"""One run as library calls: choose its data, train a method, evaluate the artifact; the checks that
make a resumed run the same run (model, data plan, data content).

The `train` and `evaluate` commands are thin layers over these functions; the executor (executor.py)
runs every run of an experiment through them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .. import models
from ..classify import evaluate_classifier
from ..data import load_dataset, low_data_split
from ..data_plan import DataPlan  # torch-free: the CLI builds its data options from it
from ..decode import DecodeConfig, generate_texts, write_predictions
from ..files import atomic_write_bytes
from ..methods import attach, load_artifact, method_of
from ..metrics import score, scorer_ready
from ..metrics.model_based import model_based_scores
from ..precision import choose_on_step, decoding_dtype, resolve
from ..prefix import read_metadata
from ..recipes import canonical
from ..train import ResumeMismatch, TrainConfig, TrainingError, check_resumable, step_timer, train


def pick_scored(items: list, limit: int | None) -> list:
    """At most `limit` items, spread over the whole list; with seen/unseen marks, half of each."""
    if limit is None or len(items) <= limit:
        return items

    def spread(xs, k):
        return [xs[int(i * len(xs) / k)] for i in range(k)] if k < len(xs) else xs

    marks = [(it.meta or {}).get("seen") for it in items]
    if None in marks:
        return spread(items, limit)
    seen = [it for it in items if it.meta["seen"]]
    unseen = [it for it in items if not it.meta["seen"]]
    k_unseen = min(len(unseen), limit // 2)
    return spread(seen, limit - k_unseen) + spread(unseen, k_unseen)


def plan_data(plan: DataPlan, score_limit: int | None = None):
    """Returns (train_pairs, dev_pairs, eval_items).

    `score_limit` (experiments): the evaluation items are the `pick_scored` few that will be scored, and
    the dev loss never uses their sources: when the dev loss and the scores come from one split (WebNLG's
    dev in `extrapolation`), a scored source's references must not choose the learning rate or the best
    step. (Same-split low-data plans hold their dev sources out already; this removes nothing there.)"""
    opts = {"path": plan.path} if plan.path else {}
    train_opts = dict(opts)
    if plan.exclude_categories:
        if canonical(plan.dataset) != "webnlg":
            raise ValueError(f"exclude_categories needs a dataset with categories (webnlg), not {plan.dataset!r}")
        train_opts["exclude_categories"] = list(plan.exclude_categories)
    train_ds = load_dataset(plan.dataset, plan.train_split, data_dir=plan.data_dir, download=True, **train_opts)
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
    if plan.exclude_categories:
        # "seen" now means: a category trained on (dev pairs of held-out categories stay out of the dev loss too)
        held = set(plan.exclude_categories)
        eval_items = [dataclasses.replace(it, meta={**(it.meta or {}), "seen": (it.meta or {}).get("category") not in held})
                      for it in eval_items]
        unseen_sources = {it.source for it in eval_items if not it.meta["seen"]}
        dev_pairs = [e for e in dev_pairs if e.source not in unseen_sources]
    if plan.eval_size is not None:
        eval_items = eval_items[:plan.eval_size]
    if score_limit is not None:
        eval_items = pick_scored(eval_items, score_limit)
        scored = {it.source for it in eval_items}
        dev_pairs = [e for e in dev_pairs if e.source not in scored]
    return train_pairs, dev_pairs, eval_items


def check_output_folder(out: str | Path, resume: bool = False) -> Path:
    """Refuse an output location that cannot be used, before anything expensive runs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {out}: cannot write in {parent}")
    if (out / "checkpoint.safetensors").exists() and not resume:
        raise TrainingError(f"{out / 'checkpoint.safetensors'} exists: pass --resume to continue that run, or "
                            "choose a new --out folder")
    return out


def run_identity(model_name: str, plan: DataPlan, train_pairs, dev_pairs) -> dict:
    """What defines a run besides its method and training settings: the model, the data plan (paths,
    split, sizes, seed) and a hash of the exact pairs it trains and measures the dev loss on, so that
    another file at the same path, or the same file edited, is caught."""
    digest = hashlib.sha256()
    for part, pairs in (("train", train_pairs), ("dev", dev_pairs)):
        digest.update(part.encode())
        for p in pairs:
            digest.update(_content_bytes(p.source) + b"\t" + _content_bytes(p.target) + b"\n")
    data = json.loads(json.dumps(asdict(plan)))  # as the checkpoint records it (a tuple reads back as a list)
    if data.get("path"):
        data["path"] = str(Path(data["path"]).resolve())
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    return {"model": model_name, "data": data, "data_sha256": digest.hexdigest(),
            "train_pairs": len(train_pairs), "dev_pairs": len(dev_pairs)}


def _content_bytes(value) -> bytes:
    """Bytes that change when the example does: text, or an image's mode, size and pixels."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return value
    if hasattr(value, "tobytes"):  # PIL images, numpy arrays
        shape = getattr(value, "size", None) if hasattr(value, "mode") else getattr(value, "shape", None)
        return f"{type(value).__name__}:{getattr(value, 'mode', '')}:{shape}:".encode() + value.tobytes()
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True).encode()


def check_same_run(checkpoint: Path, identity: dict) -> None:
    """Refuse to resume a checkpoint made with another model or other data, naming each difference.
    Checkpoints written before runs recorded their identity are not checked (nothing to compare)."""
    try:
        extra = read_metadata(checkpoint).get("extra") or {}
        saved = (json.loads(extra) if isinstance(extra, str) else extra).get("run")
    except (ValueError, OSError) as e:
        raise TrainingError(f"{checkpoint}: cannot read its settings ({e})") from None
    if not saved:
        return
    diffs = []
    for key in ("model", "fingerprint", "train_pairs", "dev_pairs"):
        if key in saved and key in identity and saved[key] != identity[key]:
            diffs.append(f"{key} {saved[key]!r} -> {identity[key]!r}")
    for key in sorted(set(saved.get("data", {})) | set(identity["data"])):
        a, b = saved.get("data", {}).get(key), identity["data"].get(key)
        if a != b and key != "data_dir":  # the same data read from another folder is the same run
            diffs.append(f"{key} {a!r} -> {b!r}")
    if saved.get("data_sha256") != identity["data_sha256"] and not any(d.split()[0] in ("path", "train_pairs") for d in diffs):
        diffs.append("the training or dev pairs differ in content (same settings, other data)")
    if diffs:
        raise ResumeMismatch(f"{checkpoint}: this run was trained on other data or another model; resuming would "
                            f"mix them: {'; '.join(diffs)}. Resume with the same data and model or start a new "
                            "output folder")


def run_training(model_name: str, plan: DataPlan, method_cfg, train_cfg: TrainConfig, out: str | Path,
                 resume: bool = False, print_fn: Callable[[str], None] = print, model_and_tokenizer=None,
                 progress=None, precision: str | None = None, score_limit: int | None = None) -> dict:
    """Load data, then the model; train the method `method_cfg` configures on it. Data and the output folder are checked
    before the model is loaded, and run.json is written only for a run that goes ahead. `precision` ("auto",
    "fp32", "bf16"; None: `train_cfg.bf16` as it is) decides `train_cfg.bf16` once the data is checked: "auto"
    may measure this machine for seconds, which a mistake in the data should not wait for. `score_limit`:
    as for `plan_data` (the returned "eval_items" are then the ones to score).

    The returned "model" is the base model again: a weight method (finetune, ft-top, adapter, LoRA) is
    detached after training (its hooks removed, the original weights put back), so that applying the
    returned "artifact" to it, as evaluation does, gives the trained model exactly once."""
    method_cls = method_of(method_cfg)
    out = check_output_folder(out, resume)
    train_pairs, dev_pairs, eval_items = plan_data(plan, score_limit)
    print_fn(f"data: {len(train_pairs)} training pairs, {len(dev_pairs)} dev pairs, {len(eval_items)} evaluation sources")
    if not train_pairs:
        raise TrainingError("no training examples")
    try:  # the output folder exists before a minute is spent loading the model
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"--out {out}: cannot create it ({e.strerror})") from None
    identity = run_identity(model_name, plan, train_pairs, dev_pairs)
    if resume and (out / "checkpoint.safetensors").exists():  # data and model name: decided before the load
        check_same_run(out / "checkpoint.safetensors", identity)
    chosen = None if precision is None else resolve(precision, print_fn=print_fn, workload=model_name)
    model, tok = model_and_tokenizer or models.load_model(model_name)  # looked up on the module: tests patch it there
    identity["fingerprint"] = models.fingerprint(model)
    torch.manual_seed(train_cfg.seed)
    method = method_cls(model, method_cfg, tokenizer=tok)
    try:
        if chosen is not None and not chosen.settled:  # the workload could not call it: time this run's own step
            chosen = choose_on_step(step_timer(method, tok, train_pairs, train_cfg), model_name, chosen.threads,
                                    device=model.device.type)
            print_fn(f"precision {chosen.reason}")
        if chosen is not None:
            train_cfg = dataclasses.replace(train_cfg, bf16=chosen.bf16)
        if resume and (out / "checkpoint.safetensors").exists():
            check_same_run(out / "checkpoint.safetensors", identity)  # now the base model's weights too
            check_resumable(out / "checkpoint.safetensors", method, train_cfg)
        run_info = {"model": model_name, "method": method.name, "data": asdict(plan),
                    "method_config": method_cfg.to_dict(), "train": asdict(train_cfg),
                    "trainable_params": method.num_trainable()}
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and (out / "run.json").exists()):
            atomic_write_bytes(out / "run.json", json.dumps(run_info, indent=2).encode())
        print_fn(f"method {method.name}: {method.num_trainable():,} trainable parameters "
                 f"({100 * method.num_trainable() / sum(p.numel() for p in model.parameters()):.3f}% of the model)")
        result = train(method, tok, train_pairs, dev_pairs, train_cfg, out, resume=resume, print_fn=print_fn,
                       extra_meta={"base_model": model_name, "dataset": plan.dataset, "run": identity},
                       progress=progress)
    finally:  # also when a check refuses or training fails: weight methods changed the model or hooked it
        method.detach()  # give the base back
    return {**result, "model": model, "tokenizer": tok, "eval_items": eval_items, "method": method,
            "train_config": train_cfg}


def evaluate(model, tokenizer, prefix, items, task: str, decode_cfg: DecodeConfig,
             out_dir: str | Path | None = None, format_source=None, progress=None, model_based: bool = False) -> dict:
    """Generate for every evaluation item and score with the task's official metrics.

    `prefix`: any artifact (soft or weight), a list of soft artifacts (ensemble), or None.
    Predictions are appended to out_dir/predictions.partial.jsonl as they are made (a crash keeps
    them), then written whole to predictions.jsonl with metrics.json.
    `model_based`: also BERTScore when its package and weights are available (else a note says why not).
    """
    if task == "accuracy":  # a classifier (ptuning-v2): labels, not generated text
        return _evaluate_classifier(model, tokenizer, prefix, items, out_dir)
    if decode_cfg.precision == "auto":  # metrics.json records the precision the outputs were made in
        bf16 = decoding_dtype("auto", device=model.device.type) is not None
        decode_cfg = dataclasses.replace(decode_cfg, precision="bf16" if bf16 else "fp32")
    partial = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is a file, not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = open(out_dir / "predictions.partial.jsonl", "w", encoding="utf-8")

    def on_output(i: int, text: str) -> None:
        if partial is not None:
            it = items[i]
            partial.write(json.dumps({"index": i, "source": it.source, "output": text,
                                      "references": list(it.references)}, ensure_ascii=False) + "\n")
            partial.flush()

    started = time.time()
    with scorer_ready(task):  # METEOR's JVM loads its tables while the outputs are generated
        try:
            outputs = generate_texts(model, tokenizer, [it.source for it in items], prefix, decode_cfg,
                                     format_source=format_source, progress=progress, on_output=on_output)
        finally:
            if partial is not None:
                partial.close()
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
                    result[f"scores_{name}"] = score(task, [outputs[i] for i in idx],
                                                     [list(items[i].references) for i in idx])
    if out_dir is not None:
        write_predictions(out_dir / "predictions.jsonl", items, outputs)
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(result, indent=2).encode())
        (out_dir / "predictions.partial.jsonl").unlink(missing_ok=True)
    result["outputs"] = outputs
    return result


def _evaluate_classifier(model, tokenizer, artifact, items, out_dir) -> dict:
    method = attach(model, artifact, tokenizer=tokenizer)
    started = time.time()
    scores = evaluate_classifier(method, tokenizer, items)
    outputs = [method.config.labels[i] for i in scores.pop("predictions")]
    # what always answering the most frequent label of these questions would score: the bar to clear
    scores["majority"] = max(Counter(it.references[0].strip() for it in items).values()) / len(items)
    result = {"task": "accuracy", "n": len(items), "scores": scores, "notes": [],
              "decode_seconds": round(time.time() - started, 1), "decode": {}}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_predictions(out_dir / "predictions.jsonl", items, outputs)
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(result, indent=2).encode())
    result["outputs"] = outputs
    return result


def artifact_base_model(path: str | Path) -> str | None:
    """The base model an artifact file names (header only; the file is checked fully when loaded)."""
    return read_metadata(path).get("base_model")


def load_run_artifact(paths, model_name: str | None = None):
    """Load artifact file(s) and the base model they name (or `model_name`). Several files: an ensemble,
    all for the same base model. Returns (artifact or list, model, tokenizer)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    names = {artifact_base_model(p) for p in paths}
    if model_name is None:
        if None in names:
            raise ValueError(f"{paths[0]} does not name its base model; pass --model")
        if len(names) > 1:
            raise ValueError(f"the files name different base models {sorted(names)}; an ensemble needs one")
        model_name = names.pop()
    model, tok = models.load_model(model_name)  # looked up on the module: tests patch it there
    loaded = [load_artifact(p, model) for p in paths]
    return (loaded[0] if len(loaded) == 1 else loaded), model, tok

