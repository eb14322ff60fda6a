"""Classification with a trained classifier method (ptuning-v2): predict labels, score accuracy.

    method = pt.methods.get_method("ptuning-v2").load("runs/boolq/ptuning-v2.safetensors", model)
    evaluate_classifier(method, tok, load_dataset("boolq", "test"))   # {"accuracy": 0.68, ...}

Items are `Example`s (source, target) or `EvalItem`s (source, references: the first is the label).
"""

from __future__ import annotations

from collections import Counter

import torch

from .batching import IGNORE


def _label_of(item) -> str:
    target = getattr(item, "target", None)
    if target is None:
        refs = getattr(item, "references", None)
        if not refs:
            raise ValueError(f"item {item!r} has neither a target nor references")
        target = refs[0]
    return target


@torch.no_grad()
def predict_indices(method, tokenizer, sources: list[str], batch_size: int = 32, max_source_len: int = 512) -> list[int]:
    """Predicted class index of each source, in order (batched; length-sorted to cut padding)."""
    encoded = [method.encode(tokenizer, s, None, max_source_len) for s in sources]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = [0] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = method.collate([encoded[i] for i in rows], pad).to(method.model.device)
        for i, p in zip(rows, method.predict(batch).tolist()):
            out[i] = p
    return out


def classify(method, tokenizer, sources: list[str], batch_size: int = 32, max_source_len: int = 512) -> list[str]:
    """The predicted label name of each source."""
    labels = method.config.labels
    return [labels[i] for i in predict_indices(method, tokenizer, sources, batch_size, max_source_len)]


def evaluate_classifier(method, tokenizer, items, batch_size: int = 32, max_source_len: int = 512) -> dict:
    """{"accuracy", "correct", "n", "predictions"} of `method` on `items` (labels must be among the method's
    labels; "predictions": the predicted class index of each item, in order)."""
    items = list(items)
    if not items:
        raise ValueError("evaluate_classifier: no items to evaluate")
    gold = [method.label_index(_label_of(it)) for it in items]
    if IGNORE in gold:
        raise ValueError("evaluate_classifier: every item needs a label")
    pred = predict_indices(method, tokenizer, [it.source for it in items], batch_size, max_source_len)
    correct = sum(int(p == g) for p, g in zip(pred, gold))
    return {"accuracy": correct / len(items), "correct": correct, "n": len(items), "predictions": pred}


def majority_baseline(train_items, eval_items) -> dict:
    """Accuracy on `eval_items` of always answering the most frequent label of `train_items`."""
    counts = Counter(_label_of(it) for it in train_items)
    if not counts:
        raise ValueError("majority_baseline: no training items")
    label = counts.most_common(1)[0][0]
    eval_items = list(eval_items)
    correct = sum(_label_of(it).strip() == label for it in eval_items)
    return {"accuracy": correct / max(1, len(eval_items)), "label": label, "correct": correct, "n": len(eval_items)}
