"""Prefix-tuning (Li & Liang 2021): trainable key/values at every attention layer, before the input.

Encoder-decoder models get three independent prefixes (encoder self-attention, decoder
self-attention, cross-attention). Trained flat or through P = MLP(P') (§4.3); the MLP is dropped
by `export()`, which returns the merged per-layer key/values.
"""

from __future__ import annotations

from ..config import PrefixConfig
from ..engine import RowPrefixes, activations_of_text
from ..models import model_name
from ..prefix import MergedPrefix, Prefix, check_compatible
from .base import Method


class PrefixModel(Method):
    """A frozen base model plus one trainable prefix: only `self.prefix` has trainable parameters."""

    name = "prefix"
    config_class = PrefixConfig
    summary = "key/value activations at every attention layer before the input (flat or P = MLP(P'))"
    # the learning rate is the dataset recipe's (the paper's per-task rates, §5.2); its prefix lengths:
    recipe_options = {"e2e": {"length": 5}, "webnlg": {"length": 5}, "dart": {"length": 10},
                      "xsum": {"length": 100, "mlp_hidden": 800}}
    # the paper's rates (8e-5 on E2E) are set for thousands of steps; in 80 a prefix at 8e-5 barely moves
    # (measured 2026-11-28: E2E n50, dev loss still falling at step 80, BLEU 0.29)
    short_run_learning_rate = 1e-3

    def __init__(self, model, config: PrefixConfig | None = None, tokenizer=None, prefix: MergedPrefix | None = None):
        if prefix is not None:  # continue from a saved prefix: flat, exactly its values
            check_compatible(prefix, model)
            config = config or self.config_class(length=prefix.length, reparam="flat")
        super().__init__(model, config, tokenizer)
        kinds = self.config.kinds or tuple(self.layout.shapes)
        unknown = set(kinds) - set(self.layout.shapes)
        if unknown:
            raise ValueError(f"{type(self.config).__name__}.kinds names {sorted(unknown)}, but {model_name(model)} has "
                             f"{sorted(self.layout.shapes)}")
        shapes = {k: self.layout.shapes[k] for k in kinds}
        self.prefix = Prefix(shapes, self.config, self.layout.hidden_size).to(model.device)
        if prefix is not None:
            if prefix.length != self.config.length:
                raise ValueError(f"prefix has length {prefix.length}, config says {self.config.length}")
            self.prefix.set_values({k: prefix.kv[k] for k in shapes})
        elif self.config.init == "text":
            if tokenizer is None:
                raise ValueError(f"{type(self.config).__name__}.init_text needs the tokenizer: "
                                 f"{type(self).__name__}(model, cfg, tokenizer=tok)")
            acts = activations_of_text(model, tokenizer, self.config.init_text, self.config.length)
            self.prefix.set_values({k: acts[k] for k in shapes})

    def conditioning(self) -> RowPrefixes:
        dtype = self.model.dtype
        return RowPrefixes.shared({k: v.to(dtype) for k, v in self.prefix().items()})

    def export(self) -> MergedPrefix:
        return self.prefix.merge(**self.base_meta())

    def merge(self) -> MergedPrefix:  # the name users of earlier versions know
        return self.export()

    def rows(self) -> RowPrefixes:  # the name users of earlier versions know
        return self.conditioning()
