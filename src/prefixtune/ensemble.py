"""Prompt ensembling: K soft artifacts decode together, next-token log-probabilities averaged.

All K rows of a source share one mixed batch (one forward per step for every source and every
artifact). A logits processor replaces each group's K rows of scores by their mean log-probability
(and, when sampling, by the one token sampled from that mean), so every row of a group picks the
same token and the K rows stay in lockstep. Greedy and sampling only: beam search would reorder
each row's beams independently, so the K rows of a group would no longer share a history.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .batching import prompt_ids
from .engine import generate_with_prefix
from .attention import RowPrefixes


def ensemble_decode_config(cfg, members: int):
    """The settings `members` artifacts decode with together: beam search becomes greedy (see above);
    sampling and a single artifact keep `cfg` as it is."""
    if members > 1 and cfg.num_beams > 1 and not cfg.do_sample:
        return dataclasses.replace(cfg, num_beams=1)
    return cfg


class GroupMeanLogProbs(LogitsProcessor):
    """Scores of rows (group, member) -> the group's mean log-probability, same for every member."""

    def __init__(self, members: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
        self.members, self.do_sample, self.temperature, self.top_p = members, do_sample, temperature, top_p
        self.generator = generator

    def __call__(self, input_ids, scores):
        rows, vocab = scores.shape
        logp = torch.log_softmax(scores.float(), dim=-1).view(rows // self.members, self.members, vocab)
        mean = logp.mean(dim=1)                                                  # (groups, vocab)
        if self.do_sample:
            probs = torch.softmax(mean / self.temperature, dim=-1)
            if self.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > self.top_p                 # keep the smallest set over top_p
                probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            chosen = torch.multinomial(probs, 1, generator=self.generator)      # (groups, 1)
            mean = torch.full_like(mean, float("-inf")).scatter(-1, chosen, 0.0)
        return mean.repeat_interleave(self.members, dim=0).to(scores.dtype)


@torch.no_grad()
def generate_ensemble(model, tokenizer, texts: list[str], artifacts: list, cfg, stops: list[int]) -> list[torch.Tensor]:
    """New token ids for each text, decoded by the ensemble of `artifacts` (soft artifacts only)."""
    if cfg.num_beams > 1:
        raise ValueError("an ensemble decodes greedily or by sampling (num_beams=1): beam search would reorder "
                         "each member's beams separately")
    if any(a is None or not a.mixable for a in artifacts):
        raise ValueError("an ensemble combines soft artifacts (prefix, infix, prompt, P-tuning), not weight methods")
    k = len(artifacts)
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    prompts = [prompt_ids(tokenizer, t, is_enc_dec, cfg.max_source_len, a.template) for t in texts for a in artifacts]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        cols = slice(0, len(p)) if is_enc_dec else slice(width - len(p), width)
        ids[r, cols], mask[r, cols] = torch.tensor(p), 1
    rows = RowPrefixes.per_row([a for _ in texts for a in artifacts], device=model.device, dtype=model.dtype)
    generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63) if cfg.do_sample else None
    processor = GroupMeanLogProbs(k, cfg.do_sample, cfg.temperature, cfg.top_p, generator)
    out = generate_with_prefix(model, rows, ids.to(model.device), mask.to(model.device), do_sample=False,
                               num_beams=1, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                               eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                               logits_processor=LogitsProcessorList([processor]))
    new = out if is_enc_dec else out[:, width:]
    return [new[i * k] for i in range(len(texts))]                           # members agree: take the first
