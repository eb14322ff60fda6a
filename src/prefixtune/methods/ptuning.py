"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder
(a bidirectional LSTM + MLP, or an MLP) from trainable inputs, placed where a template says,
e.g. "[P]*3 {source} [P]*3" or with anchor words "[P]*2 Table: {source} [P] Text:".

The encoder only shapes training; `export()` runs it once and saves the resulting vectors, which
are served like a prompt-tuning artifact (with the template).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import MethodConfig, check_field
from .base import Method
from .prompt import PromptModel

_TOKEN = re.compile(r"\[P\](?:\*(\d+))?|\{source\}")


def parse_template(template: str) -> list[tuple[str, object]]:
    """"[P]*3 {source} [P]*3" -> [("v", 3), ("s", None), ("v", 3)]; other text -> ("t", "text")."""
    parts, pos, seen_source = [], 0, False
    for m in _TOKEN.finditer(template):
        text = template[pos:m.start()].strip()
        if text:
            parts.append(("t", text))
        if m.group(0) == "{source}":
            if seen_source:
                raise ValueError(f"template {template!r} names {{source}} twice")
            parts.append(("s", None)); seen_source = True
        else:
            parts.append(("v", int(m.group(1) or 1)))
        pos = m.end()
    if template[pos:].strip():
        parts.append(("t", template[pos:].strip()))
    if not seen_source:
        raise ValueError(f"template {template!r} has no {{source}}")
    if not any(kind == "v" for kind, _ in parts):
        raise ValueError(f"template {template!r} has no virtual token [P]")
    return parts


@dataclass
class PTuningConfig(MethodConfig):
    """P-tuning's prompt encoder and template (Liu et al. 2021)."""

    template: str = field(default="[P]*3 {source} [P]*3",
                          metadata={"help": "Where virtual tokens go: '[P]' or '[P]*n' for n virtual tokens, "
                                    "'{source}' for the input, any other words are fixed anchor tokens."})
    encoder: Literal["lstm", "mlp"] = field(default="lstm", metadata={
        "help": "Prompt encoder: 'lstm' (bidirectional 2-layer LSTM + MLP, as in the paper) or 'mlp'."})
    encoder_hidden: int | None = field(default=None, metadata={
        "help": "Hidden width of the prompt encoder (None: the model's hidden size)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the encoder's random input vectors."})

    def __post_init__(self):
        c = type(self).__name__
        check_field(self.encoder in ("lstm", "mlp"), c, "encoder", f"must be 'lstm' or 'mlp', got {self.encoder!r}")
        check_field(self.encoder_hidden is None or self.encoder_hidden >= 1, c, "encoder_hidden", "must be >= 1")
        check_field(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std!r}")
        try:
            parse_template(self.template)
        except ValueError as e:
            check_field(False, c, "template", str(e))

    @property
    def length(self) -> int:
        return sum(n for kind, n in parse_template(self.template) if kind == "v")


class PromptEncoder(nn.Module):
    """(virtual, hidden) trainable inputs -> LSTM/MLP -> (virtual, hidden) soft vectors."""

    def __init__(self, n: int, hidden: int, width: int, kind: str, std: float):
        super().__init__()
        self.inputs = nn.Parameter(torch.randn(n, hidden) * std)
        self.lstm = nn.LSTM(hidden, width // 2, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        self.mlp = nn.Sequential(nn.Linear(width if kind == "lstm" else hidden, width), nn.ReLU(), nn.Linear(width, hidden))

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)                         # (virtual, width)
        return self.mlp(x)


class PTuningModel(PromptModel):
    name = "ptuning"
    config_class = PTuningConfig
    summary = "virtual tokens from a prompt encoder (LSTM/MLP), placed by a template with anchor words"
    learning_rate = 3e-3  # as prompt tuning: soft input embeddings

    def __init__(self, model, config: PTuningConfig | None = None, tokenizer=None):
        Method.__init__(self, model, config, tokenizer)
        cfg = self.config
        parts = parse_template(cfg.template)
        anchors = [t for kind, t in parts if kind == "t"]
        if anchors and tokenizer is None:
            raise ValueError("a P-tuning template with anchor words needs the tokenizer: pass tokenizer=tok")
        # anchors are stored as token ids, so a saved artifact needs no tokenizer to be laid out
        self._template = []
        for kind, value in parts:
            if kind == "v":
                self._template.append(["v", value])
            elif kind == "s":
                self._template.append(["s"])
            else:
                self._template.append(["t", tokenizer(value, add_special_tokens=False)["input_ids"]])
        hidden = model.get_input_embeddings().embedding_dim
        width = cfg.encoder_hidden or hidden
        if cfg.encoder == "lstm" and width % 2:
            width += 1  # two LSTM directions of width/2
        self.encoder = PromptEncoder(cfg.length, hidden, width, cfg.encoder, cfg.init_std).to(model.device)

    @property
    def template(self) -> list:
        return self._template

    def soft_vectors(self) -> torch.Tensor:
        return self.encoder()
