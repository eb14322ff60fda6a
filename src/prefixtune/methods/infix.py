"""Infix-tuning (paper §7.3): z = [x; INFIX; y], trainable activations at every layer between
source and target, also during generation.

The infix is seen only by the tokens after it: the last prompt token (which predicts the first
target token) and the target. Those tokens' positions continue after the infix; on rotary models
the infix keys are rotated to where text written there would stand, so an infix made from text T
equals T written before the prompt's last token (T seeing only itself). Decoder-only models only:
in an encoder-decoder model the decoder prefix already sits between source and target.
"""

from __future__ import annotations


from ..attention import RowPrefixes, describe
from ..prefix import MergedPrefix
from .configs import InfixConfig
from .prefix import PrefixModel


class InfixModel(PrefixModel):
    name = "infix"
    config_class = InfixConfig
    summary = "key/value activations at every layer between source and target ([x; INFIX; y])"
    recipe_options = {"e2e": {"length": 5}, "webnlg": {"length": 5}, "dart": {"length": 10}}
    peft_type = None  # PEFT's PREFIX_TUNING puts key/values before the input only

    def __init__(self, model, config: InfixConfig | None = None, tokenizer=None, prefix: MergedPrefix | None = None):
        layout = describe(model)
        if layout.is_encoder_decoder or not layout.arch.infix:
            raise ValueError(f"an infix needs a decoder-only model whose positions are rotary or absolute; "
                             f"{type(model).__name__} is not one (use method 'prefix': for encoder-decoder models "
                             "the decoder prefix already stands between source and target)")
        super().__init__(model, config, tokenizer, prefix)

    def conditioning(self) -> RowPrefixes:
        dtype = self.model.dtype
        return RowPrefixes.shared({k: v.to(dtype) for k, v in self.prefix().items()}, infix=True)

    def export(self) -> MergedPrefix:
        merged = super().export()
        merged.meta["insert"] = "target"
        return merged
