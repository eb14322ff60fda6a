"""`prefixtune experiment probe`: what a frozen image encoder is worth before anything trains.

Logistic regression (full-batch L-BFGS, L2 chosen on the validation images) on the encoder's last-layer
[CLS] and mean-of-patches features, at each image size; the features are computed once per size. Results
go to OUT/probe.json (sizes already there are kept, so sizes can be added run by run) and OUT/probe.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ... import models
from ...data import load_dataset
from ...files import atomic_write_bytes
from ...vision import wilson_interval
from ..catalogue import ExperimentError
from .common import DEFAULT_MODEL, balanced_test, machine, shared_data_dir

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


PROBE_SIZES = (224, 112)


def probe_plan(scale: str = "quick", arms=None, seeds=None, bf16: bool | None = None) -> list[str]:
    """What `run_probe_experiment` would run (--dry-run); it has no arms, scales or seeds."""
    return [f"linear probes ([CLS] and mean of patches) at {', '.join(f'{s} px' for s in PROBE_SIZES)}, "
            f"{'bf16 autocast' if bf16 else 'fp32'} features, L2 chosen on val from {list(WEIGHT_DECAYS)}, "
            "2000 test images"]


def run_probe_experiment(out, data_dir=None, model_name: str = DEFAULT_MODEL, sizes=PROBE_SIZES, n_test: int = 2000,
                         seed: int = 0, bf16: bool = False, print_fn=print) -> dict:
    """Linear probes (CLS and mean-pooled patches) on frozen features at each image size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = shared_data_dir(data_dir)
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
        if results.get("bf16", bf16) != bf16:  # sizes done in the other precision are not mixed in
            raise ExperimentError(f"{path}: recorded with bf16={results['bf16']}, this run asks bf16={bf16}; "
                                  f"give the same --precision or another --out")
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
    header = [f"# Linear probes: {model_name} on CIFAR-10 (VTAB-1k: 800 train, 200 val; {n_test} test images)", "",
              f"{results['date']}, {results['machine']}; logistic regression (L-BFGS) on frozen last-layer "
              f"features, L2 chosen on val from {list(WEIGHT_DECAYS)}", ""]
    atomic_write_bytes(out / "probe.md", ("\n".join(header) + "\n" + probe_table([results])).encode())
    return results



def probe_table(results: list[dict]) -> str:
    """One line per image size of the probe.json files `results` (largest first): each pool's test accuracy with
    its 95% Wilson interval and val accuracy, and the time the features took."""
    sizes = sorted(((int(size), s) for r in results for size, s in r["sizes"].items()), key=lambda x: -x[0])
    lines = ["| image size | [CLS]: test acc (95% CI) | mean of patches: test acc (95% CI) | val acc ([CLS] / mean) "
             "| feature extraction |", "| --- | --- | --- | --- | --- |"]
    for size, s in sizes:
        test = [f"{s[p]['test_accuracy']:.3f} ({s[p]['ci95'][0]:.3f}-{s[p]['ci95'][1]:.3f})" for p in ("cls", "mean")]
        lines.append(f"| {size} px | {test[0]} | {test[1]} | {s['cls']['val_accuracy']:.3f} / "
                     f"{s['mean']['val_accuracy']:.3f} | {s['feature_seconds']:.0f} s ({s['images_per_s']} img/s) |")
    return "\n".join(lines) + "\n"
