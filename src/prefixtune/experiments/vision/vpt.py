"""`prefixtune experiment vpt`: linear probe vs VPT-shallow vs VPT-deep vs full fine-tuning vs LoRA (and
adapters) on CIFAR-10 VTAB-1k, every arm through the one trainer.

It runs the text experiments' protocol (protocol.py): each arm's learning rate is chosen on the dev loss of
the 200 VTAB-1k validation images (seed 0) from a 3-point log grid around the arm's rate, grown past a
winning edge up to twice; then every seed trains at the chosen rate. Test accuracy is on a fixed,
class-balanced sample of the test file: a 95% Wilson interval per run, mean ± std over seeds, and for each
arm against VPT-deep a paired bootstrap interval of the accuracy difference (the same test images,
resampled; seeds paired). Runs live in OUT/runs/<arm>-lr<lr>-s<seed>/: a finished one (row.json) is read
back, a half-finished one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import models
from ...data import load_dataset
from ...files import atomic_write_bytes
from ...methods import build, get_method, load_artifact
from ...plots import save_png
from ...train import TrainConfig, train
from ...vision import evaluate_images
from ..executor import write_results
from ..protocol import grid_around
from ..stats import mean_std
from ..tables import file_size
from .common import (DEFAULT_MODEL, PROTOCOL, balanced_test, machine, paired_accuracy_difference, read_finished,
                     run_id, scale_with, select_lr, shared_data_dir)

VPT_REFERENCE = "vpt-deep"  # the arm every other arm's test accuracy is compared with (paired)


@dataclass(frozen=True)
class Arm:
    method: str
    options: dict
    lr: float  # the centre of its learning-rate grid (chosen on the 200 validation images' dev loss, seed 0)

    @property
    def grid(self) -> list[float]:
        return grid_around(self.lr, PROTOCOL)


# Centres: the geometric middle of the 2-point grids the first runs used, so their points are grid points
VPT_ARMS = {
    "probe": Arm("vpt", {"depth": "none"}, 10 ** -2.5),                       # head only, cached features
    "vpt-shallow": Arm("vpt-shallow", {"length": 10}, 3e-3 * 10 ** 0.5),
    "vpt-deep": Arm("vpt-deep", {"length": 10}, 3e-3 * 10 ** 0.5),
    "finetune": Arm("vpt", {"depth": "none", "tune": "full"}, 10 ** -4.5),
    "lora": Arm("vpt", {"depth": "none", "tune": "lora", "rank": 8}, 10 ** -2.5),
    "adapter": Arm("vpt", {"depth": "none", "tune": "adapter", "size": 8}, 10 ** -2.5),
}
# run by default (adapter: --methods ...,adapter; left out of the measured quick run for CPU time)
DEFAULT_VPT_ARMS = ("probe", "vpt-shallow", "vpt-deep", "finetune", "lora")


@dataclass
class VisionScale:
    image_size: int = 56          # measured on a shared 2-core EPYC: 112 px trained at ~3 images/s (docs/vision.md)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 3
    batch_size: int = 32
    n_test: int = 2000
    bf16: bool = True


VISION_SCALES = {"quick": VisionScale(), "quick-112": VisionScale(image_size=112), "tiny": VisionScale(image_size=28, seeds=(0, 1), epochs=1, batch_size=4, n_test=20)}




def train_arm(model, proc, arm_name: str, arm: Arm, lr: float, seed: int, splits: dict, scale: VisionScale, out: Path,
              print_fn=print) -> dict:
    """Train one arm at one lr and seed through the one trainer; val and test accuracy. Resumable; a finished
    run (row.json) is read back, not redone."""
    run_dir = out / "runs" / run_id(arm_name, lr, seed)
    done = run_dir / "row.json"
    finished = read_finished(done, scale.bf16)
    if finished is not None:
        return finished
    torch.manual_seed(seed)
    method = build(model, arm.method, proc, image_size=scale.image_size, **arm.options)
    cfg = TrainConfig(lr=lr, epochs=scale.epochs, batch_size=scale.batch_size, seed=seed, bf16=scale.bf16,
                      checkpoint_every=25, log_every=25, warmup_steps=5)
    started = time.time()
    try:
        res = train(method, proc, splits["train"], splits["dev"], cfg, run_dir,
                    resume=(run_dir / "checkpoint.safetensors").exists(), print_fn=print_fn)
        # evaluate the best-dev-loss artifact, as `prefixtune evaluate` would
        best = res["artifact"]
        method.load_named(best.tensors, str(run_dir))
        val = evaluate_images(method, splits["dev"], bf16=scale.bf16)
    finally:
        method.detach()
    artifact = Path(res["artifact_path"])
    row = {"arm": arm_name, "method": arm.method, "options": arm.options, "lr": lr, "seed": seed, "bf16": scale.bf16,
           "image_size": scale.image_size, "epochs": scale.epochs, "steps": res["steps"],
           "trainable_params": res["trainable_params"], "file_bytes": artifact.stat().st_size,
           "best_dev_loss": res["best_dev_loss"], "val_accuracy": val["accuracy"],
           "train_seconds": round(res["train_seconds"], 1),
           "seconds": round(time.time() - started, 1), "artifact": str(artifact)}
    atomic_write_bytes(done, json.dumps(row, indent=2).encode())
    return json.loads(done.read_text())


def test_arm(model, proc, row: dict, splits: dict, scale: VisionScale, out: Path) -> dict:
    """Test accuracy of a run's saved artifact (only runs at the chosen learning rate are tested)."""
    if "test_accuracy" in row:
        return row
    run_dir = out / "runs" / run_id(row["arm"], row["lr"], row["seed"])
    path = run_dir / Path(row["artifact"]).name
    method = get_method(row["method"]).from_artifact(model, load_artifact(path, model), tokenizer=proc)
    started = time.time()
    try:
        test = evaluate_images(method, splits["test"], bf16=scale.bf16)
    finally:
        method.detach()
    hits = "".join("1" if p == g else "0" for p, g in zip(test["predictions"], test["gold"]))  # per test image
    row = {**row, "test_accuracy": test["accuracy"], "test_ci95": test["ci95"], "test_per_class": test["per_class"],
           "n_test": test["n"], "test_correct": hits, "test_seconds": round(time.time() - started, 1)}
    atomic_write_bytes(run_dir / "row.json", json.dumps(row, indent=2).encode())
    return json.loads((run_dir / "row.json").read_text())


def dev_loss_of(row: dict, run_dir: Path) -> float:
    """A run's best dev loss: its row's, or (rows written before it was recorded) its log's lowest."""
    if row.get("best_dev_loss") is not None:
        return float(row["best_dev_loss"])
    log = run_dir / "log.jsonl"
    losses = [r["dev_loss"] for r in map(json.loads, log.read_text().splitlines()) if "dev_loss" in r] \
        if log.exists() else []
    return min(losses) if losses else float("inf")




def select_arm_lr(model, proc, name: str, arm: Arm, splits: dict, sc: "VisionScale", out: Path,
                  print_fn=print) -> list[dict]:
    """`select_lr` for a VPT arm: its dev loss on the validation images (seed 0)."""
    seed = sc.seeds[0]
    return select_lr(name, arm.lr, lambda lr: train_arm(model, proc, name, arm, lr, seed, splits, sc, out, print_fn),
                     lambda r: dev_loss_of(r, out / "runs" / run_id(name, r["lr"], seed)), print_fn)


def vision_splits(data_dir, n_test: int, seed: int = 0) -> dict:
    data_dir = shared_data_dir(data_dir)
    return {"train": load_dataset("cifar10", "train", data_dir=data_dir, seed=seed).examples,
            "dev": load_dataset("cifar10", "dev", data_dir=data_dir, seed=seed).examples,
            "test": balanced_test(load_dataset("cifar10", "test", data_dir=data_dir).examples, n_test)}


def vpt_plan(scale: str = "quick", arms=None, seeds=None, bf16: bool | None = None) -> list[str]:
    """What `run_vpt_experiment` would run (--dry-run): the scale, then each arm's first grid."""
    sc = scale_with(VISION_SCALES[scale], seeds, bf16)
    lines = [f"scale {scale}: {sc.image_size} px, {sc.epochs} epochs of batch {sc.batch_size}, seeds "
             f"{list(sc.seeds)}, {'bf16 autocast' if sc.bf16 else 'fp32'}, {sc.n_test} test images"]
    for name in arms or DEFAULT_VPT_ARMS:
        arm = VPT_ARMS[name]
        lines.append(f"{name}: {arm.method} {arm.options}; lr grid " + ", ".join(f"{x:g}" for x in arm.grid)
                     + f" (seed {sc.seeds[0]}, grown past a winning edge), then seeds {list(sc.seeds[1:])}")
    return lines


def run_vpt_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, scale: str = "quick", arms=None,
                       seeds=None, bf16: bool | None = None, print_fn=print, model_and_processor=None) -> dict:
    """lr per arm chosen on val (seed 0), then every seed at that lr; rows in OUT/results.jsonl, table.md, vpt.png.
    `seeds`, `bf16` (autocast for the frozen encoder) replace the scale's."""
    sc = scale_with(VISION_SCALES[scale], seeds, bf16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = vision_splits(data_dir, sc.n_test)    # the VTAB-1k split is fixed (seed 0); seeds vary training
    model, proc = model_and_processor or models.load_model(model_name)
    chosen = {}
    rows = []
    for name in arms or DEFAULT_VPT_ARMS:
        arm = VPT_ARMS[name]
        tried = select_arm_lr(model, proc, name, arm, splits, sc, out, print_fn)
        chosen[name] = tried[0]["chosen_lr"]
        best = next(r for r in tried if r["lr"] == chosen[name])
        rows += [dict(test_arm(model, proc, r, splits, sc, out), chosen=True) if r is best else dict(r, chosen=False)
                 for r in tried]
        for seed in sc.seeds[1:]:
            row = train_arm(model, proc, name, arm, best["lr"], seed, splits, sc, out, print_fn)
            rows.append(dict(test_arm(model, proc, row, splits, sc, out), chosen=True))
            print_fn(f"{name} seed {seed}: test {rows[-1]['test_accuracy']:.3f}")
        write_results(out, rows)
    table = vpt_table(rows, sc, model_name)
    atomic_write_bytes(out / "table.md", table.encode())
    figure = vpt_figure(rows, out / "vpt.png")
    return {"rows": rows, "table": table, "chosen": chosen, "figure": figure}



def vpt_table(rows, sc: VisionScale, model_name: str, reference: str = VPT_REFERENCE) -> str:
    """OUT/table.md: what ran, where, and the table of `vpt_table_body`."""
    return "\n".join([
        f"# experiment vpt: {model_name}, CIFAR-10 VTAB-1k (800 train / 200 val), {sc.image_size} px, "
        f"{sc.epochs} epochs, batch {sc.batch_size}, bf16={sc.bf16}; test: {sc.n_test} balanced test images", "",
        f"{time.strftime('%Y-%m-%d')}, {machine()}", "",
        f"Learning rate chosen on the validation images' dev loss (seed 0); 'vs {reference}': the mean test "
        "accuracy difference over seeds with its paired bootstrap 95% interval (1,000 resamples of the test "
        "images), 'ahead'/'behind' only where it excludes 0.", "", vpt_table_body(rows, reference)])


def vpt_table_body(rows: list[dict], reference: str = VPT_REFERENCE) -> str:
    """One line per arm from the rows alone (the docs generate it from results.jsonl): its chosen rate with every
    grid point's dev loss (rows from before the protocol: val accuracy), test accuracy over seeds, and the
    paired interval against `reference` where the rows hold per-image results."""
    lines = [f"| arm | lr (each grid point's dev loss, or val acc before the protocol) | seeds | val acc | test acc mean ± std | per-seed test acc "
             f"[95% CI] | vs {reference} [95% CI] | trainable params | file | train s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        chosen = [r for r in rows if r["arm"] == arm and r["chosen"]]
        if not chosen:
            continue
        m, s = mean_std([r["test_accuracy"] for r in chosen])
        vm, _ = mean_std([r["val_accuracy"] for r in chosen])
        per = "; ".join(f"{r['test_accuracy']:.3f} [{r['test_ci95'][0]:.3f}-{r['test_ci95'][1]:.3f}]" for r in chosen)
        grid = [r for r in rows if r["arm"] == arm and r["seed"] == chosen[0]["seed"]]
        tried = ", ".join(f"{r['lr']:g}: " + (f"{r['best_dev_loss']:.4f}" if r.get("best_dev_loss") is not None
                                                else f"val acc {r['val_accuracy']:.3f}") for r in grid)
        edge = f", at the grid's {chosen[0]['at_edge']} edge" if chosen[0].get("at_edge") else ""
        diff = paired_accuracy_difference(rows, arm, reference)
        versus = "–" if diff is None else diff.cell(3)
        lines.append(f"| {arm} | {chosen[0]['lr']:g} ({tried}{edge}) | {len(chosen)} | {vm:.3f} | {m:.3f}"
                     f"{f' ± {s:.3f}' if len(chosen) > 1 else ''} | "
                     f"{per} | {versus} | {chosen[0]['trainable_params']:,} | {file_size(chosen[0]['file_bytes'])} | "
                     f"{mean_std([r['train_seconds'] for r in chosen])[0]:.0f} |")
    return "\n".join(lines) + "\n"


def vpt_figure(rows, path: Path):
    try:
        # matplotlib: optional here (no figure without it), and only when a figure is drawn
        import matplotlib

        matplotlib.use("Agg")
        # matplotlib.pyplot: after choosing the Agg backend above
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if any(r["arm"] == a and r["chosen"] for r in rows)]
    stats = [mean_std([r["test_accuracy"] for r in rows if r["arm"] == a and r["chosen"]]) for a in arms]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(arms, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4c72b0")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("DINOv2-S, CIFAR-10 VTAB-1k")
    for i, (m, _) in enumerate(stats):
        ax.text(i, m + 0.02, f"{m:.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
