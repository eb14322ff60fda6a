"""The command-line side of the image methods (cli.py calls these): `evaluate` of an image classifier and
`classify --image` (`experiment probe|vpt|l2p` runs in experiments/vision/)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .experiments.run import artifact_base_model, load_run_artifact
from .files import atomic_write_bytes
from .methods import attach
from .vision import classify_images, evaluate_images, read_image


def evaluate_image_artifact(model, processor, artifact, items, out: Path, dataset: str, split: str) -> dict:
    """Accuracy (95% Wilson interval), per-class accuracy and the confusion matrix; metrics.json +
    predictions.jsonl in `out`."""
    method = attach(model, artifact, tokenizer=processor)
    started = time.time()
    try:
        scores = evaluate_images(method, items)
    finally:
        method.detach()
    labels = list(method.config.labels)
    pred = scores.pop("predictions")
    result = {"task": "image-accuracy", "dataset": dataset, "split": split, "n": len(items), "scores": scores,
              "seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())
    lines = [json.dumps({"index": i, "image": str(it.source), "label": it.references[0], "prediction": labels[p]})
             for i, (it, p) in enumerate(zip(items, pred))]
    atomic_write_bytes(out / "predictions.jsonl", ("\n".join(lines) + "\n").encode())
    lo, hi = scores["ci95"]
    typer.echo(f"{dataset} {split}: {len(items)} images, accuracy {scores['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), "
               f"{result['seconds']} s")
    for name, acc in scores["per_class"].items():
        typer.echo(f"  {name:<14} {'-' if acc is None else f'{acc:.4f}'}")
    typer.echo(f"\nwrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    return result


def classify_files(artifact_path: Path, images: list[Path], model_name: str | None = None, top: int = 3) -> list:
    """Load the artifact (and the base model it names), classify each image file, print the top labels."""
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(map(str, missing))}")
    pictures = []
    for p in images:
        try:
            pictures.append(read_image(p))
        except Exception as e:  # Pillow's UnidentifiedImageError and friends
            raise ValueError(f"{p}: not an image Pillow can read ({e})") from None
    if model_name is None and not artifact_base_model(artifact_path):
        raise ValueError(f"{artifact_path} does not name its base model; pass --model")
    loaded, base, proc = load_run_artifact(artifact_path, model_name)
    if not (isinstance(loaded.meta, dict) and loaded.meta.get("modality") in ("image", "image-text")):
        raise ValueError(f"{artifact_path} was made by {loaded.meta.get('method')!r}, not an image classifier")
    method = attach(base, loaded, tokenizer=proc)
    try:
        results = classify_images(method, pictures, top=top)
    finally:
        method.detach()
    for p, best in zip(images, results):
        typer.echo(f"{p}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in best))
    return results

