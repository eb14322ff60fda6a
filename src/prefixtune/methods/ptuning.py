"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder
(a bidirectional LSTM + MLP, or an MLP) from trainable inputs, placed where a template says,
e.g. "[P]*3 {source} [P]*3" or with anchor words "[P]*2 Table: {source} [P] Text:".

The encoder only shapes training; `export()` runs it once and saves the resulting vectors, which
are served like a prompt-tuning artifact (with the template).
"""

from __future__ import annotations


import torch
from torch import nn

from .base import Method
from .configs import PTuningConfig, parse_template
from .prompt import PromptModel

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
