"""Batched generation over evaluation items (the settings, DecodeConfig, live in decode_config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .batching import SEPARATOR, prompt_batch
from .decode_config import DecodeConfig
from .engine import generate_with_prefix
from .attention import RowPrefixes
from .files import atomic_write_bytes
from .ensemble import generate_ensemble
from .models import NEWLINE_TOKENS
from .precision import decoding_dtype, model_in


def _stop_ids(tokenizer, stop_at_newline: bool) -> list[int]:
    ids = [tokenizer.eos_token_id]
    if stop_at_newline:
        ids += [i for t, i in tokenizer.get_vocab().items() if t in NEWLINE_TOKENS]
    return sorted(set(i for i in ids if i is not None))


@torch.no_grad()
def generate_texts(model, tokenizer, sources: list[str], prefix, cfg: DecodeConfig,
                   format_source: Callable[[str], str] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   on_output: Callable[[int, str], None] | None = None) -> list[str]:
    """One output string per source, generated in batches.

    `prefix`: None (the bare model), a soft artifact (prefix, infix, prompt, P-tuning: `MergedPrefix`),
    a list of soft artifacts (an ensemble: their next-token log-probabilities are averaged), or a
    weight artifact (fine-tuning, adapters, LoRA: applied to the model first).
    `on_output(i, text)` is called as each output is ready (so a caller can write it at once).
    `cfg.precision` "bf16" (or "auto" where bf16 measured faster): the model's weights are cast to bf16 for
    the call (activations follow: no autocast), the original float32 tensors put back after it; the
    artifact's tensors meet the model in its dtype.
    """
    with model_in(model, decoding_dtype(cfg.precision, device=model.device.type)):
        return _generate_texts(model, tokenizer, sources, prefix, cfg, format_source, progress, on_output)


def _generate_texts(model, tokenizer, sources, prefix, cfg, format_source, progress, on_output) -> list[str]:
    if prefix is not None and not isinstance(prefix, (list, tuple)) and not prefix.mixable:
        with prefix.apply(model, tokenizer):  # its weights in the model for the call, the base back after
            return _generate_texts(model, tokenizer, sources, prefix.row_conditioning, cfg, format_source, progress,
                                   on_output)
    ensemble = list(prefix) if isinstance(prefix, (list, tuple)) else None
    if ensemble is not None and len(ensemble) == 1:
        prefix, ensemble = ensemble[0], None
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    rows = RowPrefixes.per_row([prefix], device=model.device, dtype=model.dtype) if prefix is not None and ensemble is None else None
    stops = _stop_ids(tokenizer, cfg.stop_at_newline)
    # long sources first: similar lengths share a batch
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    texts = [format_source(s) if format_source else s for s in sources]
    by_index: dict[int, str] = {}
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        kwargs = dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                      length_penalty=cfg.length_penalty, do_sample=cfg.do_sample, eos_token_id=stops,
                      pad_token_id=tokenizer.pad_token_id)
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        if cfg.num_beams > 1:
            kwargs["early_stopping"] = True
        if ensemble is not None:
            new = generate_ensemble(model, tokenizer, [texts[i] for i in idx], ensemble, cfg, stops)
        else:
            template = prefix.template if prefix is not None else None
            ids, mask = prompt_batch(tokenizer, [texts[i] for i in idx], is_enc_dec, cfg.max_source_len,
                                     templates=[template] * len(idx))
            ids, mask = ids.to(model.device), mask.to(model.device)
            out = generate_with_prefix(model, rows, ids, mask, **kwargs)  # rows None: the model alone
            new = out if is_enc_dec else out[:, ids.shape[1]:]
        for i, seq in zip(idx, new):
            text = tokenizer.decode(seq[seq >= 0], skip_special_tokens=True)
            by_index[i] = clean_output(text, cfg.stop_at_newline)
            if on_output is not None:
                on_output(i, by_index[i])
        if progress:
            progress(min(start + cfg.batch_size, len(order)), len(order))
    return [by_index[i] for i in range(len(sources))]


def clean_output(text: str, stop_at_newline: bool = True) -> str:
    text = text.strip()
    if stop_at_newline and SEPARATOR in text:
        text = text.split(SEPARATOR, 1)[0].strip()
    return text


def write_predictions(path: str | Path, items, outputs: list[str]) -> None:
    """Per-example output file: one JSON object per line with source, output, references and the item's meta
    where it has one (WebNLG: category and seen, which the seen/unseen intervals are computed from)."""
    lines = [json.dumps({"source": it.source, "output": out, "references": list(it.references),
                         **({"meta": it.meta} if getattr(it, "meta", None) else {})}, ensure_ascii=False)
             for it, out in zip(items, outputs)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
