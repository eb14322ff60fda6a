"""Prefix-tuning (Li & Liang 2021): trainable key/values at every attention layer, before the input.

Encoder-decoder models get three independent prefixes (encoder self-attention, decoder
self-attention, cross-attention). Trained flat or through P = MLP(P') (§4.3); the MLP is dropped
by `export()`, which returns the merged per-layer key/values.
"""

from __future__ import annotations

import torch

from ..config import PrefixConfig
from ..engine import activations_of_text
from ..attention import RowPrefixes
from ..models import model_name
from ..prefix import MergedPrefix, Prefix, check_compatible
from ..files import PrefixFileError
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
    # PEFT's PREFIX_TUNING: one tensor `prompt_embeddings` (num_virtual_tokens, num_layers * 2 * token_dim),
    # token_dim = kv_heads * head_dim, each row viewed as (layers, 2, kv_heads, head_dim); a single
    # prefix set, so decoder-only ('self') prefixes only
    peft_type = "PREFIX_TUNING"

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

    @classmethod
    def to_peft(cls, prefix: MergedPrefix, model=None) -> tuple[dict, dict]:
        if set(prefix.kv) != {"self"}:
            raise ValueError(
                f"PEFT's prefix-tuning format holds one prefix set (decoder self-attention), but this prefix has "
                f"{sorted(prefix.kv)} parts (encoder/decoder/cross-attention prefixes of an encoder-decoder model). "
                "Save it with prefixtune's own format instead (save_prefix).")
        kv = prefix.kv["self"]                                   # (layers, 2, heads, length, head_dim)
        layers, _, heads, length, head_dim = kv.shape
        # (layers, 2, heads, length, head_dim) -> (length, layers*2*heads*head_dim)
        rows = kv.permute(3, 0, 1, 2, 4).reshape(length, -1)
        if model is not None:
            check_compatible(prefix, model)
        return {"prompt_embeddings": rows}, {
            "task_type": "CAUSAL_LM", "num_virtual_tokens": length, "token_dim": heads * head_dim,
            "num_attention_heads": heads, "num_layers": layers, "encoder_hidden_size": heads * head_dim,
            "num_transformer_submodules": 1, "prefix_projection": False, "init_weights": None}

    @classmethod
    def from_peft(cls, config: dict, tensors: dict, source: str, model=None) -> MergedPrefix:
        if config.get("num_transformer_submodules", 1) != 1:
            raise PrefixFileError(f"{source}: encoder-decoder PEFT prefixes (num_transformer_submodules=2) are not "
                                  "supported")
        key = next((k for k in tensors if k.endswith("prompt_embeddings")), None)
        if key is None:
            raise PrefixFileError(f"{source}: no 'prompt_embeddings' tensor; a PEFT adapter saved with "
                                  "prefix_projection must be saved in inference mode (merged) first")
        rows = tensors[key]
        length, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
        head_dim = config["token_dim"] // heads
        if tuple(rows.shape) != (length, layers * 2 * heads * head_dim):
            raise PrefixFileError(f"{source}: prompt_embeddings has shape {tuple(rows.shape)}, config implies "
                                  f"{(length, layers * 2 * heads * head_dim)}")
        # (length, layers*2*heads*head_dim) -> (layers, 2, heads, length, head_dim)
        kv = rows.float().view(length, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
        prefix = MergedPrefix(kv={"self": kv}, meta={"method": cls.name, "imported_from": "peft",
                                                     "base_model": config.get("base_model_name_or_path")})
        if model is not None:
            check_compatible(prefix, model, source=source)
        return prefix

    @staticmethod
    def to_peft_model(prefix: MergedPrefix, model):
        """A PEFT PeftModel carrying `prefix` (tests and benchmarks compare with PEFT through it)."""
        # peft: optional dependency (the `peft` extra), only for this comparison helper
        from peft import PrefixTuningConfig, get_peft_model

        layers, _, heads, length, head_dim = prefix.kv["self"].shape
        peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
        rows = prefix.kv["self"].permute(3, 0, 1, 2, 4).reshape(length, -1)  # as in to_peft
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)
        return peft_model
