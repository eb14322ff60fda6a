"""P-tuning v2 (Liu et al. 2022, "Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks"): deep prompts for classification on a frozen encoder.

Deep prompts are per-layer key/values before the input of every self-attention layer (the same
`prefix.Prefix` and engine as prefix-tuning: flat or P = MLP(P'), random or text init); a trainable
linear head reads the first token's ([CLS] / <s>) last hidden state. Only the prompt and the head
train. A source "QUESTION [SEP] PASSAGE" is encoded as a sentence pair (the passage is cut first);
the target is one of `labels`.

The P-tuning v2 paper's baselines are the same classifier with the prompt elsewhere or the encoder
trained, so they are options here, not other methods: `prompt_depth='input'` puts soft tokens after
[CLS] at the input embeddings only (Lester et al.'s shallow prompt tuning), `prompt_depth='none'`
has no prompt (a linear probe), and `tune_encoder=True` also trains every encoder weight (with
'none': the fine-tuning baseline).

The artifact is a `WeightArtifact` (not a mixable soft artifact): the merged key/values
('prefix.self', as in prefix files) or the input prompt ('prompt.input'), the head ('head.weight',
'head.bias'), the encoder's weights when it was trained ('encoder.<name>'), and the labels. A
classifier answers with a label, not text, so it does not share generation batches.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..batching import IGNORE, Batch, Encoded
from ..config import ConfigError
from ..data.boolq import PAIR_SEPARATOR
from ..engine import activations_of_text, forward_with_prefix
from ..attention import RowPrefixes
from ..models import model_name
from ..prefix import Prefix
from ..files import PrefixFileError
from .base import Method
from .configs import PTuningV2Config
from .prompt import initial_embeddings
from .weights import WeightArtifact

class PTuningV2Model(Method):
    """A frozen encoder, deep prompts at every layer, and a linear head on the first token."""

    name = "ptuning-v2"
    config_class = PTuningV2Config
    kind = "classifier"
    mixable = False
    servable = False
    generates = False
    learning_rate = 1e-2  # the P-tuning v2 paper's range for frozen-encoder deep prompts (5e-3 to 1e-2)
    summary = ("deep prompts (key/values at every encoder layer) + a linear head on [CLS], for classification; "
               "input-only prompts, a linear probe and fine-tuning as options")

    def __init__(self, model, config: PTuningV2Config | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg, layout = self.config, self.layout
        if layout.is_encoder_decoder or set(layout.shapes) != {"self"} or \
                any(getattr(m, "is_causal", False) for m in layout.modules):
            raise ValueError(f"ptuning-v2 needs a bidirectional encoder (BERT, RoBERTa: load_model(..., "
                             f"task='encoder')); {model_name(model)} ({type(model).__name__}) is not one")
        if cfg.init == "text" and cfg.prompt_depth != "none" and tokenizer is None:
            raise ValueError("PTuningV2Config.init_text needs the tokenizer: PTuningV2Model(model, cfg, tokenizer=tok)")
        if cfg.prompt_depth == "deep":
            self.prefix = Prefix({"self": layout.shapes["self"]}, cfg, layout.hidden_size).to(model.device)
            if cfg.init == "text":
                self.prefix.set_values({"self": activations_of_text(model, tokenizer, cfg.init_text, cfg.length)["self"]})
        elif cfg.prompt_depth == "input":
            start = (torch.zeros(cfg.length, layout.hidden_size) if cfg.init == "zeros" else
                     initial_embeddings(model, tokenizer, cfg.length, cfg.init, cfg.init_text, cfg.init_std))
            self.embeds = nn.Parameter(start.to(model.device))                  # (length, hidden)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(layout.hidden_size, cfg.num_labels).to(model.device)
        with torch.no_grad():  # small logits at the start: the loss begins near log(num_labels)
            self.head.weight.normal_(0.0, 0.02)
            self.head.bias.zero_()
        # the encoder's weights, when they train: originals kept (on CPU) so detach() restores the base model
        self._encoder: dict[str, nn.Parameter] = dict(model.named_parameters()) if cfg.tune_encoder else {}
        self._originals = {n: p.detach().to("cpu", copy=True) for n, p in self._encoder.items()}
        for p in self._encoder.values():
            p.requires_grad_(True)

    # -- what trains ---------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """The prompt and head, plus the encoder's weights ('encoder.<name>') with tune_encoder."""
        return {**super().trainable(), **{f"encoder.{n}": p for n, p in self._encoder.items()}}

    @torch.no_grad()
    def detach(self) -> None:
        """Give the base model back as it was: original encoder weights, frozen (no-op without tune_encoder)."""
        for name, value in self._originals.items():
            self.model.get_parameter(name).copy_(value)
        self._originals.clear()
        self._encoder.clear()
        self.model.requires_grad_(False)

    # -- how it enters the model ------------------------------------------------------------------
    def conditioning(self) -> RowPrefixes | None:
        if self.config.prompt_depth == "deep":
            return RowPrefixes.shared({k: v.to(self.model.dtype) for k, v in self.prefix().items()})
        if self.config.prompt_depth == "input":  # virtual token k (id -(k+1)) takes embeds[k]
            return RowPrefixes.shared({}, soft=self.embeds.to(self.model.dtype))
        return None

    def max_input_len(self, tokenizer, max_source_len: int) -> int:
        """Tokens an input may have: the caller's limit, the tokenizer's, and (when real tokens' positions
        follow the prompt) the position table minus the prompt."""
        limit = max_source_len
        if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
            limit = min(limit, tokenizer.model_max_length)
        table = getattr(self.model.config, "max_position_embeddings", None)
        if self.config.prompt_depth == "input":  # the soft tokens take positions (and length) in the input
            limit = min(limit, (table or limit + self.config.length) - self.layout.position_offset) - self.config.length
        elif table and self.config.prompt_depth == "deep" and self.layout.arch.shift_positions:
            limit = min(limit, table - self.config.length - self.layout.position_offset)  # real tokens stand after it
        return limit

    # -- data -> loss -------------------------------------------------------------------------------
    def label_index(self, target: str | None) -> int:
        if target is None:
            return IGNORE
        label = target.strip()
        if label not in self.config.labels:
            raise ValueError(f"target {target!r} is not one of the classifier's labels {list(self.config.labels)} "
                             "(set PTuningV2Config.labels / --labels)")
        return self.config.labels.index(label)

    def encode(self, tokenizer, source: str, target: str | None, max_source_len: int = 512,
               max_target_len: int = 0) -> Encoded:
        """'first [SEP] second' -> the tokenizer's pair encoding (the longer part is cut first); else one text.

        labels: [index of target in `labels`] (IGNORE when target is None)."""
        first, sep, second = source.partition(PAIR_SEPARATOR)
        limit = self.max_input_len(tokenizer, max_source_len)
        ids = list(tokenizer(first, second if sep else None, truncation="longest_first", max_length=limit)["input_ids"])
        if self.config.prompt_depth == "input":  # [CLS] v1..vL text [SEP]: the head still reads [CLS]
            ids = ids[:1] + [-(k + 1) for k in range(self.config.length)] + ids[1:]
        return Encoded(ids, [self.label_index(target)])

    def collate(self, items: list[Encoded], pad_id: int) -> Batch:
        """Right-padded ids; labels (rows,) class indices; no target tokens (dev loss weighs rows)."""
        width = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, e in enumerate(items):
            ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, :len(e.input_ids)] = 1
        labels = torch.tensor([e.labels[0] for e in items], dtype=torch.long)
        return Batch(ids, mask, labels, 0)

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(rows, num_labels) from the first token's last hidden state."""
        hidden = forward_with_prefix(self.model, self.conditioning(), input_ids=input_ids, attention_mask=attention_mask,
                                     run=self.model.base_model).last_hidden_state
        return self.head(self.dropout(hidden[:, 0].float()))

    def loss(self, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(batch.input_ids, batch.attention_mask), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """(rows,) predicted class indices (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self.logits(batch.input_ids, batch.attention_mask).argmax(-1)
        finally:
            self.train(was_training)

    def forward(self, input_ids=None, attention_mask=None, labels=None, loss_on_targets: bool = False, **kwargs):
        if loss_on_targets:
            return self.loss(Batch(input_ids, attention_mask, labels, 0))
        return self.logits(input_ids, attention_mask)

    def generate(self, *args, **kwargs):
        raise TypeError("ptuning-v2 is a classifier: use predict() or prefixtune.classify.classify(), not generate()")

    # -- what is saved ------------------------------------------------------------------------------
    def export(self) -> WeightArtifact:
        tensors = {"head.weight": self.head.weight.detach().float().cpu().clone(),
                   "head.bias": self.head.bias.detach().float().cpu().clone()}
        if self.config.prompt_depth == "deep":
            tensors["prefix.self"] = self.prefix.merge().kv["self"]          # (layers, 2, heads, L, head_dim)
        elif self.config.prompt_depth == "input":
            tensors["prompt.input"] = self.embeds.detach().float().cpu().clone()  # (L, hidden)
        for name, p in self._encoder.items():
            tensors[f"encoder.{name}"] = p.detach().cpu().clone()
        layers, heads, head_dim = self.layout.shapes["self"]
        meta = {**self.base_meta(), "labels": list(self.config.labels), "length": self.config.length,
                "shapes": {"self": [layers, heads, head_dim]}}
        return WeightArtifact(tensors, meta)

    @classmethod
    def from_artifact(cls, model, artifact: WeightArtifact, tokenizer=None, source: str = "artifact",
                      check_fingerprint: bool = True) -> "PTuningV2Model":
        """The classifier a saved artifact describes, on `model` (its own base model, checked)."""
        meta, tensors = artifact.meta, artifact.tensors
        if meta.get("method") != cls.name:
            raise PrefixFileError(f"{source}: was made by method {meta.get('method')!r}, not {cls.name!r}")
        if check_fingerprint:
            artifact.check_base(model, source)
        try:
            saved = PTuningV2Config.from_dict(meta["config"])
        except (KeyError, TypeError, ConfigError) as e:
            raise PrefixFileError(f"{source}: its config cannot be read ({e})") from e
        # the merged values are loaded flat; the MLP (if any) was only a training device
        config = dataclasses.replace(saved, reparam="flat", init="random", init_text=None)
        return cls.built_frozen(model, config, tokenizer, lambda method: method.load_tensors_from(tensors, source))

    @torch.no_grad()
    def load_tensors_from(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        config, layout = self.config, self.layout
        layers, heads, head_dim = layout.shapes["self"]
        want = {"head.weight": tuple(self.head.weight.shape), "head.bias": tuple(self.head.bias.shape),
                **{f"encoder.{n}": tuple(p.shape) for n, p in self._encoder.items()}}
        if config.prompt_depth == "deep":
            want["prefix.self"] = (layers, 2, heads, config.length, head_dim)
        elif config.prompt_depth == "input":
            want["prompt.input"] = (config.length, layout.hidden_size)
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or extra:
            raise PrefixFileError(f"{source}: a ptuning-v2 artifact with prompt_depth {config.prompt_depth!r} and "
                                  f"tune_encoder {config.tune_encoder} holds {len(want)} tensors; missing "
                                  f"{missing[:5]}, unexpected {extra[:5]}")
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise PrefixFileError(f"{source}: {name!r} has shape {tuple(tensors[name].shape)}, but "
                                      f"{model_name(self.model)} with length {config.length} and {config.num_labels} "
                                      f"labels needs {shape}")
        if config.prompt_depth == "deep":
            self.prefix.set_values({"self": tensors["prefix.self"]})
        elif config.prompt_depth == "input":
            self.embeds.copy_(tensors["prompt.input"])
        self.head.weight.copy_(tensors["head.weight"])
        self.head.bias.copy_(tensors["head.bias"])
        for name, p in self._encoder.items():
            p.copy_(tensors[f"encoder.{name}"])

    @classmethod
    def load(cls, path, model, tokenizer=None) -> "PTuningV2Model":
        """Load a saved ptuning-v2 file onto `model` (refused unless made for it)."""
        return cls.from_artifact(model, WeightArtifact.load(path, model), tokenizer=tokenizer, source=str(path))


__all__ = ["PTuningV2Config", "PTuningV2Model", "PAIR_SEPARATOR"]
