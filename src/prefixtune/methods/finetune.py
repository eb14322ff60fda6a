"""Fine-tuning (the paper's §5.2 baseline FT-full): every weight of the base model trains.

The artifact holds every parameter (tied weights once), so it is as large as the model; it is
applied to a model of the same base and `detach()` restores the original weights.
"""

from __future__ import annotations


from torch import nn

from .configs import FinetuneConfig
from .weights import WeightMethod


class FinetuneModel(WeightMethod):
    name = "finetune"
    config_class = FinetuneConfig
    summary = "every weight of the base model (the paper's FT-full baseline)"
    learning_rate = 5e-5  # the paper's fine-tuning rate

    def __init__(self, model, config: FinetuneConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        self._params = dict(model.named_parameters())  # tied weights appear once
        self._keep_originals(self._params)
        for p in self._params.values():
            p.requires_grad_(True)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The base model's parameters, by their names in the base model."""
        return dict(self._params)
