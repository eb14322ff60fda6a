"""FT-top-k (the paper's §5.2 baseline FT-top2): only the top k transformer blocks train.

Which parameters belong to which block comes from the architecture table
(`architectures.ARCHITECTURES[...].blocks`); encoder-decoder models train the top k blocks of each stack.
Embeddings, final norms and the LM head stay frozen. The artifact holds only those blocks' weights.
"""

from __future__ import annotations


from torch import nn

from ..architectures import block_parameters
from .configs import FtTopConfig
from .weights import WeightMethod


class FtTopModel(WeightMethod):
    name = "ft-top"
    config_class = FtTopConfig
    summary = "the top k transformer blocks' weights (the paper's FT-top2 for k=2)"
    learning_rate = 5e-5  # as fine-tuning

    def __init__(self, model, config: FtTopConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        k = self.config.layers
        self._params: dict[str, nn.Parameter] = {}
        for stack, by_layer in block_parameters(model).items():
            if k > len(by_layer):
                raise ValueError(f"FtTopConfig.layers: is {k}, but the {stack} of {type(model).__name__} has only "
                                 f"{len(by_layer)} blocks")
            for layer in sorted(by_layer)[-k:]:
                self._params.update(by_layer[layer])
        self._keep_originals(self._params)
        for p in self._params.values():
            p.requires_grad_(True)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The top k blocks' parameters, by their names in the base model."""
        return dict(self._params)
