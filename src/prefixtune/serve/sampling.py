"""Per-row sampling settings, choosing the next token, and turning tokens into streamable text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this decode greedily, as in vLLM: logits divided by a temperature near 0 (5e-324
# is a valid JSON number) overflow to inf, and the softmax of inf is NaN; argmax is its limit anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 (or below GREEDY_BELOW) means greedy (argmax)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks that need a fixed length)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row's logits (V,) with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """Next token of every row of `logits` (rows, V): argmax for greedy rows, sampled for the others."""
    chosen = logits.argmax(-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            chosen[row] = sample_row(logits[row], p, generators[row])
    return chosen


def decode(tokenizer, ids: list[int]) -> str:
    """Token ids to text, the same way for streamed pieces and whole answers."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextTracker:
    """The text of one row's generated tokens: finds stop strings and says what is safe to stream.

    Decoding is incremental (as in vLLM): each step decodes only the tokens since the last stable
    point, so a long answer costs the same per step as a short one. A streamed piece is never
    taken back, so text that might still become (part of) a stop string, or an unfinished
    multi-byte character, is held back until it is certain.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prefix_offset = 0  # tokens before this are final in self.text
        self._read_offset = 0    # tokens before this have been decoded into self.text
        self._checked = 0        # stop strings ending before this offset were already looked for

    def update(self, ids: list[int], final: bool = False) -> bool:
        """Take the row's tokens so far; True when a stop string appeared (the text is cut before it).

        `final`: the row is done, so an unfinished character is kept as it decodes."""
        if self.stopped:
            return True
        # decode from a token before the new ones, so the tokenizer sees the same context as in a full decode
        before = decode(self.tokenizer, ids[self._prefix_offset:self._read_offset])
        after = decode(self.tokenizer, ids[self._prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        if self.stop:
            start = max(0, self._checked - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
            self._checked = len(self.text)
        return self.stopped

    def take(self, final: bool) -> str:
        """The text not yet streamed that is certain now (everything, when `final`)."""
        end = len(self.text) if final else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        piece = self.text[self.sent:end]
        self.sent = end
        return piece
