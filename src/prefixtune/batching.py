"""(source, target) pairs -> token ids -> padded batches, bucketed by length to cut padding.

Decoder-only models read `source + separator` and learn `target + eos`; the loss covers only the
target tokens (labels are -100 elsewhere). Encoder-decoder models read `source` in the encoder and
learn `target + eos` in the decoder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .engine import lay_out


IGNORE = -100
SEPARATOR = "\n"  # between source and target for decoder-only models; generation stops at a newline


@dataclass
class Encoded:
    input_ids: list[int]      # decoder-only: source + separator + target + eos; seq2seq: source
    labels: list[int]         # decoder-only: IGNORE over the prompt; seq2seq: target + eos


@dataclass
class Batch:
    input_ids: torch.Tensor           # (rows, seq)
    attention_mask: torch.Tensor      # (rows, seq)
    labels: torch.Tensor              # (rows, seq) or (rows, target_len) for seq2seq
    n_target_tokens: int

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.n_target_tokens)


def prompt_ids(tokenizer, source: str, is_encoder_decoder: bool, max_source_len: int,
               template: list | None = None) -> list[int]:
    """What the model reads before generating: the same at training and decoding time.

    `template` (soft-prompt methods) lays virtual tokens (negative ids) around the source ids,
    before the separator (decoder-only) or the encoder's end-of-sequence token.
    """
    if is_encoder_decoder:
        ids = tokenizer(source, truncation=True, max_length=max_source_len)["input_ids"]
        if not template:
            return ids
        eos = [ids[-1]] if ids and ids[-1] == tokenizer.eos_token_id else []
        return lay_out(template, ids[:len(ids) - len(eos)]) + eos
    ids = lay_out(template, tokenizer(source, add_special_tokens=False)["input_ids"][:max_source_len])
    if source.endswith(SEPARATOR):  # e.g. a chat template that already ends its prompt with a newline
        return ids
    return ids + tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]


def encode(tokenizer, source: str, target: str, is_encoder_decoder: bool,
           max_source_len: int = 512, max_target_len: int = 128, template: list | None = None) -> Encoded:
    prompt = prompt_ids(tokenizer, source, is_encoder_decoder, max_source_len, template)
    if is_encoder_decoder:
        target_ids = tokenizer(target, truncation=True, max_length=max_target_len)["input_ids"]  # ends with eos
        return Encoded(prompt, target_ids)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][:max_target_len] + [tokenizer.eos_token_id]
    return Encoded(prompt + target_ids, [IGNORE] * len(prompt) + target_ids)


def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                            bucket_factor: int = 50) -> list[list[int]]:
    """Deterministic batches for (seed, epoch): shuffle, sort within large chunks by length, shuffle batches.

    Similar lengths share a batch (less padding) while the order stays random across epochs.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items: list[Encoded], pad_id: int, is_encoder_decoder: bool) -> Batch:
    """Right-pad a list of encoded pairs into tensors (training never needs left padding)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    label_width = max(len(e.labels) for e in items) if is_encoder_decoder else width
    labels = torch.full((len(items), label_width), IGNORE, dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    n_target = int((labels != IGNORE).sum())
    return Batch(ids, mask, labels, n_target)


def prompt_batch(tokenizer, sources: list[str], is_encoder_decoder: bool, max_source_len: int = 512,
                 templates: list | None = None):
    """Prompts for generation: left-padded for decoder-only models, right-padded for encoders.

    `templates[i]`: row i's soft-prompt template (None: plain source)."""
    templates = templates or [None] * len(sources)
    prompts = [prompt_ids(tokenizer, s, is_encoder_decoder, max_source_len, t) for s, t in zip(sources, templates)]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if is_encoder_decoder:
            ids[row, :len(p)], mask[row, :len(p)] = torch.tensor(p), 1
        else:
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask
