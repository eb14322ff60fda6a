"""`prefixtune experiment l2p`: split CIFAR-10, 5 tasks x 2 classes, class-incremental (task identity never
used at test): L2P against sequential and joint training of a head, and L2P without its logit mask.

Each arm's learning rate is chosen by the protocol (protocol.py) on the loss over all 10 classes of held-out
training-file images after the last task (seed 0), then every seed trains at that rate; each arm's final
test accuracy is compared with L2P's by a paired bootstrap interval over the same test images. Runs live in
OUT/runs/<arm>-lr<lr>-s<seed>/ (one trainer folder per task), resumable like every other experiment's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ... import models
from ...data import load_dataset
from ...files import atomic_write_bytes
from ...methods import build
from ...train import TrainConfig, train
from ...vision import evaluate_images
from ..executor import write_results
from ..protocol import grid_around
from ..stats import mean_std
from .common import (DEFAULT_MODEL, PROTOCOL, balanced_test, machine, paired_accuracy_difference, read_finished,
                     run_id, scale_with, select_lr, shared_data_dir)

L2P_TASKS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


@dataclass(frozen=True)
class L2PArm:
    method: str
    options: dict
    sequential: bool    # the tasks one after another; False: all tasks' data at once (an upper bound)
    lr: float = 1e-2    # the centre of its learning-rate grid (the rate every arm shared before the protocol)

    @property
    def grid(self) -> list[float]:
        return grid_around(self.lr, PROTOCOL)


L2P_ARMS = {
    "seq-head": L2PArm("vpt", {"depth": "none"}, True),     # sequential fine-tuning of a linear head: the lower bound
    "joint-head": L2PArm("vpt", {"depth": "none"}, False),  # the same head trained on all tasks at once
    "l2p": L2PArm("l2p", {}, True),                         # L2P with the paper's defaults (M 10, N 5, L_p 5, lambda 0.1)
    "joint-l2p": L2PArm("l2p", {"train_mask": False}, False),  # L2P's model trained on all tasks at once: the upper bound
    "l2p-nomask": L2PArm("l2p", {"train_mask": False}, True),  # L2P with cross-entropy over all classes while training
}
L2P_REFERENCE = "l2p"  # the arm every other arm's final test accuracy is compared with (paired)


@dataclass
class L2PScale:
    image_size: int = 56
    per_class: int = 50           # training images per class (of the 500 per class in the training file)
    val_per_class: int = 20       # held-out images per class from the training file: the learning-rate choice
    epochs: int = 10              # per task (joint: over all tasks' data); 3 epochs (~10 steps) left L2P at chance
    batch_size: int = 16
    test_per_class: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    bf16: bool = True


L2P_SCALES = {"quick": L2PScale(),
              "tiny": L2PScale(image_size=28, per_class=2, val_per_class=1, epochs=1, batch_size=4, test_per_class=2,
                               seeds=(0,))}


def continual_scores(acc: list[list[float]]) -> dict:
    """acc[t][j]: accuracy on task j's test images after training task t (j <= t). Average accuracy and
    forgetting after the last task (Chaudhry et al.: mean over earlier tasks of best-before minus final)."""
    last = acc[-1]
    forgetting = [max(acc[t][j] for t in range(j, len(acc) - 1)) - last[j] for j in range(len(acc) - 1)]
    return {"average_accuracy": sum(last) / len(last),
            "forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0}


def l2p_splits(data_dir, sc: L2PScale, seed: int = 0) -> dict:
    """Training and validation images sampled per class from the training file (disjoint, seeded), and the
    class-balanced test sample (fixed)."""
    data_dir = shared_data_dir(data_dir)
    pool = balanced_test(load_dataset("cifar10", "all", data_dir=data_dir).examples,
                         (sc.per_class + sc.val_per_class) * 10, seed=seed)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted({e.target for e in pool}):
        items = [e for e in pool if e.target == label]
        order = rng.permutation(len(items))
        train += [items[i] for i in sorted(order[:sc.per_class])]
        val += [items[i] for i in sorted(order[sc.per_class:])]
    test = balanced_test(load_dataset("cifar10", "test", data_dir=data_dir).examples, sc.test_per_class * 10)
    return {"train": train, "val": val, "test": test}


def run_l2p_arm(model, proc, arm: str, lr: float, seed: int, splits: dict, sc: L2PScale, out: Path,
                tasks=L2P_TASKS, print_fn=print) -> dict:
    """One arm at one learning rate and seed: the tasks in turn (or all at once), test accuracy per task after
    each, then the validation images' loss and accuracy over all classes (the learning-rate choice) and the
    whole test sample's per-image results. Resumable; a finished run (row.json) is read back."""
    run_dir = out / "runs" / run_id(arm, lr, seed)
    finished = read_finished(run_dir / "row.json", sc.bf16)
    if finished is not None:
        return finished
    spec = L2P_ARMS[arm]
    torch.manual_seed(seed)
    method = build(model, spec.method, proc, image_size=sc.image_size, **spec.options)
    labels = list(method.config.labels)
    task_of = {c: t for t, classes in enumerate(tasks) for c in classes}
    by_task = {k: [[e for e in splits[k] if task_of[labels.index(e.target)] == t] for t in range(len(tasks))]
               for k in ("train", "test")}
    cfg = TrainConfig(lr=lr, epochs=sc.epochs, batch_size=sc.batch_size, seed=seed, bf16=sc.bf16,
                      checkpoint_every=25, log_every=25, warmup_steps=0)
    started, acc = time.time(), []
    stages = [(t, by_task["train"][t], tasks[t]) for t in range(len(tasks))] if spec.sequential else \
        [(len(tasks) - 1, [e for part in by_task["train"] for e in part], None)]
    try:
        for t, items, classes in stages:
            if hasattr(method, "task_classes"):
                method.task_classes = list(classes) if classes is not None else None
            stage_dir = run_dir / (f"task{t}" if spec.sequential else "joint")
            train(method, proc, items, [], cfg, stage_dir, resume=(stage_dir / "checkpoint.safetensors").exists(),
                  print_fn=print_fn)
            seen = range(t + 1) if spec.sequential else range(len(tasks))
            acc.append([evaluate_images(method, by_task["test"][j], bf16=sc.bf16)["accuracy"] for j in seen])
            print_fn(f"{arm} lr {lr:g} seed {seed} after task {t}: " + " ".join(f"{a:.3f}" for a in acc[-1]))
        val = evaluate_images(method, splits["val"], bf16=sc.bf16)
        total = evaluate_images(method, splits["test"], bf16=sc.bf16)
    finally:
        method.detach()
    scores = continual_scores(acc) if spec.sequential else \
        {"average_accuracy": sum(acc[-1]) / len(acc[-1]), "forgetting": None}
    hits = "".join("1" if p == g else "0" for p, g in zip(total["predictions"], total["gold"]))  # per test image
    row = {"arm": arm, "lr": lr, "seed": seed, "bf16": sc.bf16, **scores, "accuracy_matrix": acc,
           "val_loss": val["loss"], "val_accuracy": val["accuracy"], "test_accuracy": total["accuracy"],
           "test_ci95": total["ci95"], "n_test": total["n"], "per_class": total["per_class"], "test_correct": hits,
           "trainable_params": method.num_trainable(), "image_size": sc.image_size, "per_class_train": sc.per_class,
           "epochs": sc.epochs, "seconds": round(time.time() - started, 1)}
    atomic_write_bytes(run_dir / "row.json", json.dumps(row, indent=2).encode())
    return json.loads((run_dir / "row.json").read_text())


def l2p_plan(scale: str = "quick", arms=None, seeds=None, bf16: bool | None = None) -> list[str]:
    """What `run_l2p_experiment` would run (--dry-run): the scale, then each arm's first grid."""
    sc = scale_with(L2P_SCALES[scale], seeds, bf16)
    lines = [f"scale {scale}: {len(L2P_TASKS)} tasks, {sc.per_class} training images per class, {sc.epochs} epochs "
             f"per task of batch {sc.batch_size}, {sc.image_size} px, seeds {list(sc.seeds)}, "
             f"{'bf16 autocast' if sc.bf16 else 'fp32'}, {sc.test_per_class} test images per class"]
    for name in arms or L2P_ARMS:
        arm = L2P_ARMS[name]
        lines.append(f"{name}: {arm.method} {arm.options}, {'sequential' if arm.sequential else 'joint'}; lr grid "
                     + ", ".join(f"{x:g}" for x in arm.grid) + f" (seed {sc.seeds[0]}), then seeds {list(sc.seeds[1:])}")
    return lines


def run_l2p_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, scale: str = "quick", arms=None,
                       seeds=None, bf16: bool | None = None, print_fn=print, model_and_processor=None) -> dict:
    """Each arm's learning rate chosen on the validation images' loss after the last task (seed 0, the
    protocol's grid), then every seed at that rate; rows in OUT/results.jsonl, OUT/table.md. `seeds`, `bf16`
    (autocast for the frozen encoder) replace the scale's."""
    sc = scale_with(L2P_SCALES[scale], seeds, bf16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, proc = model_and_processor or models.load_model(model_name)
    splits: dict[int, dict] = {}

    def split(seed: int) -> dict:  # each seed samples its own training (and validation) images
        if seed not in splits:
            splits[seed] = l2p_splits(data_dir, sc, seed)
        return splits[seed]

    rows, chosen = [], {}
    first = sc.seeds[0]
    for name in arms or L2P_ARMS:
        tried = select_lr(name, L2P_ARMS[name].lr,
                          lambda lr: run_l2p_arm(model, proc, name, lr, first, split(first), sc, out, print_fn=print_fn),
                          lambda r: r["val_loss"], print_fn)
        chosen[name] = tried[0]["chosen_lr"]
        rows += [dict(r, chosen=r["lr"] == chosen[name]) for r in tried]
        for seed in sc.seeds[1:]:
            row = run_l2p_arm(model, proc, name, chosen[name], seed, split(seed), sc, out, print_fn=print_fn)
            rows.append(dict(row, chosen=True))
        write_results(out, rows)
    table = l2p_table(rows, sc, model_name)
    atomic_write_bytes(out / "table.md", table.encode())
    return {"rows": rows, "table": table, "chosen": chosen}


def l2p_table(rows, sc: L2PScale, model_name: str, reference: str = L2P_REFERENCE) -> str:
    """OUT/table.md: what ran, where, and the table of `l2p_table_body`."""
    return "\n".join([
        f"# experiment l2p: {model_name}, split CIFAR-10 (5 tasks x 2 classes, class-incremental), "
        f"{sc.per_class} training images per class, {sc.epochs} epochs per task, {sc.image_size} px; "
        f"test: {sc.test_per_class} per class", "", f"{time.strftime('%Y-%m-%d')}, {machine()}", "",
        f"Learning rate per arm chosen on the loss of {sc.val_per_class} held-out training-file images per class "
        f"after the last task (seed 0); 'vs {reference}': the mean difference in final test accuracy over seeds "
        "with its paired bootstrap 95% interval (1,000 resamples of the test images), 'ahead'/'behind' only "
        "where it excludes 0.", "", l2p_table_body(rows, reference)])


def l2p_table_body(rows: list[dict], reference: str = L2P_REFERENCE) -> str:
    """One line per arm from the rows alone (the docs generate it from results.jsonl): its rate (with each grid
    point's validation loss where recorded), average accuracy and forgetting after the last task, the accuracy
    on each task's classes then (mean over seeds), test accuracy and the paired interval against `reference`."""
    lines = [f"| arm | lr (val loss at each grid point) | seeds | average accuracy after task 5 | forgetting | "
             f"accuracy per task after task 5 | test acc (all 10 classes) [95% CI] | vs {reference} [95% CI] | "
             "trainable params | s/run |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm and r.get("chosen", True)]  # rows from before the protocol: one rate
        if not rs:
            continue
        m, s = mean_std([r["average_accuracy"] for r in rs])
        f = [r["forgetting"] for r in rs if r["forgetting"] is not None]
        fs = f"{mean_std(f)[0]:.3f}" if f else "— (joint)"
        per_task = " ".join(f"{mean_std(list(task))[0]:.3f}" for task in zip(*(r["accuracy_matrix"][-1] for r in rs)))
        ci = "; ".join(f"{r['test_accuracy']:.3f} [{r['test_ci95'][0]:.3f}-{r['test_ci95'][1]:.3f}]" for r in rs)
        grid = [r for r in rows if r["arm"] == arm and r["seed"] == rs[0]["seed"] and "val_loss" in r]
        tried = ", ".join(f"{r['lr']:g}: {r['val_loss']:.4f}" for r in sorted(grid, key=lambda r: r["lr"]))
        edge = f", at the grid's {rs[0]['at_edge']} edge" if rs[0].get("at_edge") else ""
        diff = paired_accuracy_difference(rows, arm, reference)
        versus = "–" if diff is None else diff.cell(3)
        lines.append(f"| {arm} | {rs[0]['lr']:g}{f' ({tried}{edge})' if tried else ''} | {len(rs)} | "
                     f"{m:.3f}{f' ± {s:.3f}' if len(rs) > 1 else ''} | {fs} | {per_task} | {ci} | {versus} | "
                     f"{rs[0]['trainable_params']:,} | {mean_std([r['seconds'] for r in rs])[0]:.0f} |")
    return "\n".join(lines) + "\n"
