"""L2P, Learning to Prompt for continual learning (Wang et al. 2022), on a frozen ViT-style encoder.

A pool of M prompts P_1..P_M (each `length` tokens) with learnable keys k_1..k_M. Each image's query
q(x) is the frozen encoder's last-layer [CLS] without prompts (computed once per image and cached);
the N prompts whose keys have the highest cosine similarity to q(x) are concatenated and inserted
after [CLS] (VPT-shallow's hook, one set per row); the head classifies the mean of the prompt tokens'
last-layer outputs. Loss = cross-entropy + lambda * sum over the chosen keys of (1 - cos(q(x), k)),
which pulls the chosen keys towards the queries that chose them. Only the pool, the keys and the head
train. Paper defaults (their CIFAR-100 / 5-datasets settings): M = 10, N = 5, length 5, lambda 0.1;
during training the logits of classes outside the current task are masked (`train_mask`, as the
official code does for class-incremental runs); task identity is never used at test time.

The experiment sets `task_classes` (the current task's label indices) before training each task.
"""

from __future__ import annotations


import torch
from torch import nn

from ..batching import Batch
from .configs import L2PConfig
from .vpt import ImageClassifier, PromptedEncoder, FeatureCache


class L2PModel(ImageClassifier):
    name = "l2p"
    config_class = L2PConfig
    summary = ("L2P (continual learning): a prompt pool with learnable keys, top-N prompts by cosine to the frozen "
               "[CLS], head on the mean prompt output; loss CE + lambda x key distance")

    def __init__(self, model, config: L2PConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg, hidden = self.config, self.layout.hidden_size
        self._setup_images(tokenizer, cfg.image_size)
        self.encoder = PromptedEncoder(model, self.layout)
        # the official code's 'uniform' init for prompts and keys
        self.prompts = nn.Parameter(torch.empty(cfg.pool_size, cfg.length, hidden, device=model.device).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(cfg.pool_size, hidden, device=model.device).uniform_(-1, 1))
        self.head = nn.Linear(hidden, cfg.num_labels).to(model.device)
        self._queries = FeatureCache()
        self.task_classes: list[int] | None = None
        self._last_distance: torch.Tensor | None = None

    def query(self, pixels: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) frozen last-layer [CLS] without prompts (cached per image)."""
        return self._queries.get(pixels, lambda x: self.encoder.run(x, None).last_hidden_state[:, 0].float())

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (rows, N) of the nearest keys by cosine, their cosine similarities (rows, N))."""
        sim = nn.functional.normalize(query, dim=-1) @ nn.functional.normalize(self.keys, dim=-1).T   # (rows, M)
        top = sim.topk(self.config.top_n, dim=-1)
        return top.indices, top.values

    def image_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.model.dtype)
        idx, sim = self.select(self.query(pixels))
        self._last_distance = (1.0 - sim).sum(-1)                             # (rows,)
        rows = pixels.shape[0]
        prompts = self.prompts[idx].reshape(rows, -1, self.prompts.shape[-1])   # (rows, N * L_p, hidden)
        h = self.encoder.run(pixels, prompts.unsqueeze(0)).last_hidden_state
        return self.head(h[:, 1:1 + prompts.shape[1]].float().mean(1))

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.image_logits(batch.input_ids)
        if self.config.train_mask and self.task_classes is not None:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[list(self.task_classes)] = True
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        ce = nn.functional.cross_entropy(logits, batch.labels)
        return ce + self.config.pull * self._last_distance.mean()

    def detach(self) -> None:
        self.encoder.remove()


__all__ = ["L2PConfig", "L2PModel"]
