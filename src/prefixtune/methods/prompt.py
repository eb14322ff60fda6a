"""Prompt tuning (Lester et al. 2021; the paper's §7.2 "EMB-k"): trainable vectors at the input
embedding layer only, in front of the source (for T5: in front of the encoder input).

Initialized randomly, from embeddings of tokens sampled from the vocabulary, or from a text's
token embeddings (then a prompt made from text T is T written before the input).
"""

from __future__ import annotations


import torch
from torch import nn

from ..config import ConfigError
from ..attention import RowPrefixes
from ..prefix import MergedPrefix, check_compatible
from ..files import PrefixFileError
from .base import Method
from .configs import PromptConfig

def initial_embeddings(model, tokenizer, length: int, init: str, init_text: str | None, std: float) -> torch.Tensor:
    """(length, hidden) starting vectors in the input-embedding space (after any embedding scale)."""
    embed = model.get_input_embeddings()
    hidden = embed.embedding_dim
    if init == "random":
        return torch.randn(length, hidden) * std
    if init == "vocab":
        ids = torch.randint(0, min(5000, embed.num_embeddings), (length,))
    else:
        if tokenizer is None:
            raise ValueError("init_text needs the tokenizer: pass tokenizer=tok")
        text_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not text_ids:
            raise ValueError(f"init text {init_text!r} has no tokens")
        ids = torch.tensor((text_ids * (length // len(text_ids) + 1))[:length])
    with torch.no_grad():
        return embed(ids.to(model.device)).float().cpu()


class PromptModel(Method):
    name = "prompt"
    config_class = PromptConfig
    summary = "soft input embeddings in front of the source (embedding layer only)"
    # soft input embeddings need larger steps than key/values (Lester et al. use 0.3 with Adafactor)
    learning_rate = 3e-3
    # PEFT's PROMPT_TUNING: `prompt_embeddings` (num_virtual_tokens, hidden), soft input embeddings in front
    # of the input (template [["v", n], ["s"]]); P-tuning inherits it for artifacts of that template
    peft_type = "PROMPT_TUNING"

    def __init__(self, model, config: PromptConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg = self.config
        start = initial_embeddings(model, tokenizer, cfg.length, cfg.init, cfg.init_text, cfg.init_std)
        self.embeds = nn.Parameter(start.to(model.device))                    # (length, hidden)

    @property
    def template(self) -> list:
        return [["v", self.config.length], ["s"]]

    def soft_vectors(self) -> torch.Tensor:
        return self.embeds

    def conditioning(self) -> RowPrefixes:
        return RowPrefixes.shared({}, soft=self.soft_vectors().to(self.model.dtype))

    def export(self) -> MergedPrefix:
        meta = {**self.base_meta(), "template": self.template}
        return MergedPrefix(kv={}, meta=meta, embeds=self.soft_vectors().detach().float().cpu().clone())

    @classmethod
    def to_peft(cls, prompt: MergedPrefix, model=None) -> tuple[dict, dict]:
        n = prompt.embeds.shape[0]
        if prompt.kv or prompt.template != [["v", n], ["s"]]:
            raise ValueError(
                f"PEFT's prompt-tuning format holds soft embeddings in front of the input only; this "
                f"{prompt.meta.get('method', '?')!r} artifact has template {prompt.template} "
                f"{'and per-layer key/values' if prompt.kv else ''}. Save it with prefixtune's own format instead")
        if model is not None:
            check_compatible(prompt, model)
        return {"prompt_embeddings": prompt.embeds}, {
            "task_type": cls.peft_task_type(model), "num_virtual_tokens": n, "token_dim": prompt.embeds.shape[1],
            # PEFT fills these from the base model's config when loading
            "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None}

    @classmethod
    def from_peft(cls, config: dict, tensors: dict, source: str, model=None) -> MergedPrefix:
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise PrefixFileError(f"{source}: a PEFT prompt with num_transformer_submodules="
                                  f"{config['num_transformer_submodules']} also prompts the decoder; prefixtune's "
                                  "prompt method prompts the (encoder) input only")
        if "prompt_embeddings" not in tensors:
            raise PrefixFileError(f"{source}: no 'prompt_embeddings' tensor")
        rows = tensors["prompt_embeddings"]
        n = config.get("num_virtual_tokens")
        if rows.dim() != 2 or rows.shape[0] != n:
            raise PrefixFileError(f"{source}: prompt_embeddings has shape {tuple(rows.shape)}, config says "
                                  f"{n} virtual tokens")
        prompt = MergedPrefix(kv={}, embeds=rows.float(), meta={
            "method": cls.name, "template": [["v", n], ["s"]], "imported_from": "peft",
            "base_model": config.get("base_model_name_or_path")})
        if model is not None:
            check_compatible(prompt, model, source=source)
        return prompt


__all__ = ["PromptConfig", "PromptModel", "ConfigError"]
