"""The image experiments: linear probes of a frozen image encoder, `experiment vpt` and `experiment l2p`.

    prefixtune experiment probe --out runs/exp-probe      # logistic regression on frozen CLS / mean-patch features
    prefixtune experiment vpt --out runs/exp-vpt          # probe vs VPT-shallow vs VPT-deep vs full FT vs LoRA
    prefixtune experiment l2p --out runs/exp-l2p          # split CIFAR-10, 5 tasks x 2 classes, class-incremental

Every trained arm goes through the one trainer (`train.train`) with the method's own checkpoints and
artifacts in OUT/runs/<id>/; a finished run (row.json) is skipped when the command is run again, a
half-finished one resumes from its checkpoint. `experiment vpt` runs the text experiments' protocol
(protocol.py): each arm's learning rate is chosen on the dev loss of the 200 VTAB-1k validation images
(seed 0) from a 3-point log grid around the arm's rate, grown past a winning edge up to twice, then
every seed trains at the chosen rate. Test accuracy is on a fixed, class-balanced sample of the test
file: a 95% Wilson interval per run, mean ± std over seeds, and for each arm against VPT-deep a paired
bootstrap interval of the accuracy difference (the same test images, resampled; seeds paired).
`experiment l2p` runs the same protocol per arm, on the loss over all classes of held-out images from the
training file after the last task, and compares each arm's final test accuracy with L2P's the same way.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import models
from ..data import load_dataset
from ..files import atomic_write_bytes
from ..methods import build, get_method, load_artifact
from ..plots import save_png
from ..train import TrainConfig, train
from ..vision import evaluate_images, wilson_interval
from .catalogue import ExperimentError
from .protocol import Protocol, choose, extend_grid, grid_around
from .stats import mean_std, paired_bootstrap

DEFAULT_MODEL = "dinov2-small"


def _data_dir(data_dir):
    if data_dir:
        return data_dir
    here = Path(__file__).resolve().parents[4] / "shared" / "data"  # beside the repository (src/prefixtune/experiments/)
    return str(here) if (here / "cifar10").exists() else None


def balanced_test(examples, n: int, seed: int = 0):
    """A fixed class-balanced sample of n test examples (n / classes per class), seeded."""
    by_class: dict[str, list] = {}
    for e in examples:
        by_class.setdefault(e.target, []).append(e)
    per = n // len(by_class)
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        out += [items[i] for i in sorted(rng.permutation(len(items))[:per])]
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# Linear probes on cached frozen features


@torch.no_grad()
def encoder_features(model, processor, images, batch_size: int = 50, bf16: bool = False,
                     progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """{"cls": (N, hidden), "mean": (N, hidden)} last-layer features of a frozen image encoder."""
    cls, mean = [], []
    for start in range(0, len(images), batch_size):
        x = processor([im.pixels for im in images[start:start + batch_size]]).to(model.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model(pixel_values=x).last_hidden_state.float()
        cls.append(h[:, 0])
        mean.append(h[:, 1:].mean(1))
        if progress:
            progress(start + x.shape[0])
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int = 300) -> tuple:
    """Multinomial logistic regression on standardized features (full-batch L-BFGS, L2 penalty)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (mu, sd, w.detach(), b.detach())


def predict_logistic(params, x):
    mu, sd, w, b = params
    return (((x - mu) / sd) @ w + b).argmax(-1)


WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def probe_scores(feats: dict, labels: dict, classes: int) -> dict:
    """Per pool: the weight decay chosen on val, val and test accuracy (+ Wilson interval)."""
    out = {}
    for pool in ("cls", "mean"):
        best = None
        for wd in WEIGHT_DECAYS:
            params = fit_logistic(feats["train"][pool], labels["train"], classes, wd)
            val = (predict_logistic(params, feats["dev"][pool]) == labels["dev"]).float().mean().item()
            if best is None or val > best[1]:
                best = (wd, val, params)
        wd, val, params = best
        correct = int((predict_logistic(params, feats["test"][pool]) == labels["test"]).sum())
        n = len(labels["test"])
        out[pool] = {"weight_decay": wd, "val_accuracy": val, "test_accuracy": correct / n,
                     "ci95": list(wilson_interval(correct, n)), "n_test": n}
    return out


def run_probe_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, sizes=(224, 112), n_test: int = 2000,
                         seed: int = 0, bf16: bool = False, print_fn=print) -> dict:
    """Linear probes (CLS and mean-pooled patches) on frozen features at each image size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _data_dir(data_dir)
    splits = {"train": load_dataset("cifar10", "train", data_dir=data_dir, seed=seed).examples,
              "dev": load_dataset("cifar10", "dev", data_dir=data_dir, seed=seed).examples,
              "test": balanced_test(load_dataset("cifar10", "test", data_dir=data_dir).examples, n_test)}
    classes = sorted({e.target for e in splits["train"]} | {e.target for e in splits["test"]})
    labels = {k: torch.tensor([classes.index(e.target) for e in v]) for k, v in splits.items()}
    model, proc = models.load_model(model_name)
    results = {"model": model_name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "bf16": bf16,
               "n": {k: len(v) for k, v in splits.items()}, "sizes": {}}
    path = out / "probe.json"
    if path.exists():
        results = json.loads(path.read_text())
    for size in sizes:
        if str(size) in results["sizes"]:
            print_fn(f"{size} px: done before, kept")
            continue
        p = proc.resized(size)
        started = time.time()
        feats = {}
        for k, v in splits.items():
            feats[k] = encoder_features(model, p, [e.source for e in v], bf16=bf16)
            print_fn(f"{size} px: {k} features ({len(v)} images) after {time.time() - started:.0f} s")
        seconds = time.time() - started
        scores = probe_scores(feats, labels, len(classes))
        results["sizes"][str(size)] = {**scores, "feature_seconds": round(seconds, 1),
                                       "images_per_s": round(sum(len(v) for v in splits.values()) / seconds, 1)}
        print_fn(f"{size} px: " + ", ".join(f"{pool} {s['test_accuracy']:.3f}" for pool, s in scores.items()))
        atomic_write_bytes(path, json.dumps(results, indent=2).encode())
    lines = [f"# Linear probes: {model_name} on CIFAR-10 (VTAB-1k: 800 train, 200 val; {n_test} test images)", "",
             f"{results['date']}, {results['machine']}; logistic regression (L-BFGS) on frozen last-layer "
             f"features, L2 chosen on val from {list(WEIGHT_DECAYS)}", "",
             "| image size | pool | val acc | test acc (95% CI) | feature extraction |", "| --- | --- | --- | --- | --- |"]
    for size, s in results["sizes"].items():
        for pool in ("cls", "mean"):
            r = s[pool]
            lines.append(f"| {size} px | {pool} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} "
                         f"({r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}) | {s['feature_seconds']:.0f} s ({s['images_per_s']} img/s) |")
    atomic_write_bytes(out / "probe.md", ("\n".join(lines) + "\n").encode())
    return results


# ---------------------------------------------------------------------------------------------
# experiment vpt: probe vs VPT-shallow vs VPT-deep vs full fine-tuning vs LoRA, on the one trainer


PROTOCOL = Protocol()  # the text experiments' grid (3 points spanning 10x) and edge extensions
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


def _run_id(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{lr:g}-s{seed}"


def train_arm(model, proc, arm_name: str, arm: Arm, lr: float, seed: int, splits: dict, scale: VisionScale, out: Path,
              print_fn=print) -> dict:
    """Train one arm at one lr and seed through the one trainer; val and test accuracy. Resumable; a finished
    run (row.json) is read back, not redone."""
    run_dir = out / "runs" / _run_id(arm_name, lr, seed)
    done = run_dir / "row.json"
    if done.exists():
        return json.loads(done.read_text())
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
    row = {"arm": arm_name, "method": arm.method, "options": arm.options, "lr": lr, "seed": seed,
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
    run_dir = out / "runs" / _run_id(row["arm"], row["lr"], row["seed"])
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


def select_lr(name: str, centre: float, train_at: Callable[[float], dict], loss_of: Callable[[dict], float],
              print_fn=print) -> list[dict]:
    """The protocol's choice for one arm (seed 0): `train_at(lr)` (a row with "lr") at every point of the 3-point
    grid around `centre`, the grid grown past a winning edge (up to PROTOCOL.max_extensions times); the lowest
    `loss_of(row)` wins. Returns the grid's rows, each with `best_dev_loss`, `chosen_lr` and `at_edge`."""
    grid, extensions = grid_around(centre, PROTOCOL), 0
    while True:
        tried = [train_at(lr) for lr in grid]
        points = {r["lr"]: loss_of(r) for r in tried}
        best, edge = choose(points)
        if not edge or extensions == PROTOCOL.max_extensions:
            break
        grid, extensions = extend_grid(grid, centre, edge, PROTOCOL), extensions + 1
    print_fn(f"{name}: dev loss " + ", ".join(f"lr {lr:g}: {loss:.4f}" for lr, loss in sorted(points.items()))
             + f" -> lr {best:g}" + (f" (at the grid's {edge} edge)" if edge else ""))
    return [dict(r, best_dev_loss=points[r["lr"]], chosen_lr=best, at_edge=edge) for r in tried]


def select_arm_lr(model, proc, name: str, arm: Arm, splits: dict, sc: "VisionScale", out: Path,
                  print_fn=print) -> list[dict]:
    """`select_lr` for a VPT arm: its dev loss on the validation images (seed 0)."""
    seed = sc.seeds[0]
    return select_lr(name, arm.lr, lambda lr: train_arm(model, proc, name, arm, lr, seed, splits, sc, out, print_fn),
                     lambda r: dev_loss_of(r, out / "runs" / _run_id(name, r["lr"], seed)), print_fn)


def vision_splits(data_dir, n_test: int, seed: int = 0) -> dict:
    data_dir = _data_dir(data_dir)
    return {"train": load_dataset("cifar10", "train", data_dir=data_dir, seed=seed).examples,
            "dev": load_dataset("cifar10", "dev", data_dir=data_dir, seed=seed).examples,
            "test": balanced_test(load_dataset("cifar10", "test", data_dir=data_dir).examples, n_test)}


def run_vpt_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, scale: str = "quick", arms=None,
                       seeds=None, print_fn=print, model_and_processor=None) -> dict:
    """lr per arm chosen on val (seed 0), then every seed at that lr; rows in OUT/results.jsonl, table.md, vpt.png."""
    sc = VISION_SCALES[scale]
    if seeds is not None:
        sc = VisionScale(**{**asdict(sc), "seeds": tuple(seeds)})
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
        atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    table = vpt_table(rows, sc, model_name)
    atomic_write_bytes(out / "table.md", table.encode())
    figure = vpt_figure(rows, out / "vpt.png")
    return {"rows": rows, "table": table, "chosen": chosen, "figure": figure}


def paired_accuracy_difference(rows: list[dict], arm: str, reference: str):
    """Interval of mean over seeds of (arm's test accuracy - reference's), resampling the test images (the
    same images for both; seeds paired), or None where either lacks per-image results on a common seed."""
    def hits(a):
        return {r["seed"]: np.frombuffer(r["test_correct"].encode(), np.uint8) - ord("0")
                for r in rows if r["arm"] == a and r.get("chosen") and r.get("test_correct")}
    mine, theirs = hits(arm), hits(reference)
    seeds = sorted(set(mine) & set(theirs))
    if arm == reference or not seeds:
        return None
    return paired_bootstrap([(mine[s], theirs[s]) for s in seeds], lambda x: float(x.mean()))


def vpt_table(rows, sc: VisionScale, model_name: str, reference: str = VPT_REFERENCE) -> str:
    lines = [f"# experiment vpt: {model_name}, CIFAR-10 VTAB-1k (800 train / 200 val), {sc.image_size} px, "
             f"{sc.epochs} epochs, batch {sc.batch_size}, bf16={sc.bf16}; test: {sc.n_test} balanced test images", "",
             f"{time.strftime('%Y-%m-%d')}, {machine()}", "",
             f"Learning rate chosen on the validation images' dev loss (seed 0); 'vs {reference}': the mean test "
             "accuracy difference over seeds with its paired bootstrap 95% interval (1,000 resamples of the test "
             "images), 'ahead'/'behind' only where it excludes 0.", "",
             f"| arm | lr (dev loss at each grid point) | seeds | val acc | test acc mean ± std | per-seed test acc "
             f"[95% CI] | vs {reference} [95% CI] | trainable params | file | train s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for arm in arms:
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
        versus = "–" if diff is None else (f"{diff.estimate:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] "
                                            f"{diff.verdict()}")
        lines.append(f"| {arm} | {chosen[0]['lr']:g} ({tried}{edge}) | {len(chosen)} | {vm:.3f} | {m:.3f} ± {s:.3f} | "
                     f"{per} | {versus} | {chosen[0]['trainable_params']:,} | "
                     f"{chosen[0]['file_bytes'] / 1024:.0f} KiB | {mean_std([r['train_seconds'] for r in chosen])[0]:.0f} |")
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


# ---------------------------------------------------------------------------------------------
# experiment l2p: split CIFAR-10, 5 tasks x 2 classes, class-incremental (task identity unknown at test)

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
    data_dir = _data_dir(data_dir)
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
    run_dir = out / "runs" / _run_id(arm, lr, seed)
    if (run_dir / "row.json").exists():
        return json.loads((run_dir / "row.json").read_text())
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
    row = {"arm": arm, "lr": lr, "seed": seed, **scores, "accuracy_matrix": acc,
           "val_loss": val["loss"], "val_accuracy": val["accuracy"], "test_accuracy": total["accuracy"],
           "test_ci95": total["ci95"], "n_test": total["n"], "per_class": total["per_class"], "test_correct": hits,
           "trainable_params": method.num_trainable(), "image_size": sc.image_size, "per_class_train": sc.per_class,
           "epochs": sc.epochs, "seconds": round(time.time() - started, 1)}
    atomic_write_bytes(run_dir / "row.json", json.dumps(row, indent=2).encode())
    return json.loads((run_dir / "row.json").read_text())


def run_l2p_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, scale: str = "quick", arms=None,
                       seeds=None, print_fn=print, model_and_processor=None) -> dict:
    """Each arm's learning rate chosen on the validation images' loss after the last task (seed 0, the
    protocol's grid), then every seed at that rate; rows in OUT/results.jsonl, OUT/table.md."""
    sc = L2P_SCALES[scale]
    if seeds is not None:
        sc = L2PScale(**{**asdict(sc), "seeds": tuple(seeds)})
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
        atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    table = l2p_table(rows, sc, model_name)
    atomic_write_bytes(out / "table.md", table.encode())
    return {"rows": rows, "table": table, "chosen": chosen}


def l2p_table(rows, sc: L2PScale, model_name: str, reference: str = L2P_REFERENCE) -> str:
    lines = [f"# experiment l2p: {model_name}, split CIFAR-10 (5 tasks x 2 classes, class-incremental), "
             f"{sc.per_class} training images per class, {sc.epochs} epochs per task, {sc.image_size} px; "
             f"test: {sc.test_per_class} per class", "", f"{time.strftime('%Y-%m-%d')}, {machine()}", "",
             f"Learning rate per arm chosen on the loss of {sc.val_per_class} held-out training-file images per class "
             f"after the last task (seed 0); 'vs {reference}': the mean difference in final test accuracy over seeds "
             "with its paired bootstrap 95% interval (1,000 resamples of the test images), 'ahead'/'behind' only "
             "where it excludes 0.", "",
             f"| arm | lr (val loss at each grid point) | seeds | average accuracy after task 5 | forgetting | "
             f"test acc (all 10 classes) [95% CI] | vs {reference} [95% CI] | trainable params | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm and r.get("chosen", True)]
        if not rs:
            continue
        m, s = mean_std([r["average_accuracy"] for r in rs])
        f = [r["forgetting"] for r in rs if r["forgetting"] is not None]
        fs = f"{mean_std(f)[0]:.3f}" if f else "— (joint)"
        ci = "; ".join(f"{r['test_accuracy']:.3f} [{r['test_ci95'][0]:.3f}-{r['test_ci95'][1]:.3f}]" for r in rs)
        grid = [r for r in rows if r["arm"] == arm and r["seed"] == rs[0]["seed"] and "val_loss" in r]
        tried = ", ".join(f"{r['lr']:g}: {r['val_loss']:.4f}" for r in sorted(grid, key=lambda r: r["lr"]))
        edge = f", at the grid's {rs[0]['at_edge']} edge" if rs[0].get("at_edge") else ""
        diff = paired_accuracy_difference(rows, arm, reference)
        versus = "–" if diff is None else f"{diff.estimate:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {diff.verdict()}"
        lines.append(f"| {arm} | {rs[0]['lr']:g}{f' ({tried}{edge})' if tried else ''} | {len(rs)} | "
                     f"{m:.3f}{f' ± {s:.3f}' if len(rs) > 1 else ''} | {fs} | {ci} | {versus} | "
                     f"{rs[0]['trainable_params']:,} | {mean_std([r['seconds'] for r in rs])[0]:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# `prefixtune experiment probe|vpt|l2p`


def _run_probe(out, data_dir, model_name, print_fn=print, **_) -> dict:
    """run_probe_experiment with its table (probe.md); it has no arms, scales or seeds to choose."""
    result = run_probe_experiment(out, data_dir, model_name, print_fn=print_fn)
    return {**result, "table": (Path(out) / "probe.md").read_text()}


@dataclass(frozen=True)
class ImageExperiment:
    run: Callable[..., dict]       # (out, data_dir, model_name, scale=, arms=, seeds=, print_fn=) -> {"table": ...}
    arms: dict | None              # the arms --methods chooses among (None: none to choose)
    scales: dict | None
    writes: tuple[str, ...]        # the files it writes into its folder


IMAGE_EXPERIMENTS = {
    "probe": ImageExperiment(_run_probe, None, None, ("probe.json", "probe.md")),
    "vpt": ImageExperiment(run_vpt_experiment, VPT_ARMS, VISION_SCALES, ("results.jsonl", "table.md")),
    "l2p": ImageExperiment(run_l2p_experiment, L2P_ARMS, L2P_SCALES, ("results.jsonl", "table.md")),
}


def run_vision_experiment(name: str, out, model: str | None = None, data_dir: str | None = None,
                          scale: str = "quick", seeds=None, arms=None, print_fn=print) -> dict:
    """The image experiment `name` into folder `out`; prints its table."""
    if name not in IMAGE_EXPERIMENTS:
        raise ExperimentError(f"{name!r} is not an image experiment ({', '.join(IMAGE_EXPERIMENTS)})")
    spec = IMAGE_EXPERIMENTS[name]
    unknown = sorted(set(arms or ()) - set(spec.arms or ()))
    if unknown and spec.arms is not None:
        raise ExperimentError(f"experiment {name} has arms {', '.join(spec.arms)}; not {', '.join(unknown)}")
    if spec.scales is not None and scale not in spec.scales:
        raise ExperimentError(f"experiment {name} has scales {', '.join(spec.scales)}, not {scale!r}")
    result = spec.run(out, data_dir, model or DEFAULT_MODEL, scale=scale, arms=list(arms) if arms else None,
                      seeds=list(seeds) if seeds else None, print_fn=print_fn)
    print_fn(result["table"])
    print_fn("wrote " + ", ".join(str(Path(out) / f) for f in spec.writes))
    return result
