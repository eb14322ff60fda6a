"""The one extension point every method implements.

A method is an `nn.Module` around a frozen base model that declares its own trainable parameters
and knows how it enters the model. The trainer, checkpoints, dev loss, best-artifact tracking, the
CLI, `evaluate`, `generate` and the server know only this protocol:

    config_class   the method's config dataclass (validates itself; its fields are the CLI options)
    trainable()    THE definition of what trains and what a checkpoint holds
    conditioning() how it enters the model at run time, per batch row (soft methods: key/values at
                   every layer at an insertion point, and/or soft embeddings at virtual-token slots);
                   None for weight methods, whose changed or added weights are in the model itself
    template       where virtual tokens stand around a source (soft-embedding methods), else None
    encode/collate/loss   data -> batch -> scalar loss (defaults: generation with target-token loss)
    export()       the artifact that is saved and served: a `MergedPrefix` (soft methods, mixable
                   per row) or a `WeightArtifact` (weight methods)

Adding a method is one new file with a subclass, its config dataclass in `configs.py`, and one line in
the table of `registry.py`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..batching import Batch, Encoded, collate, encode
from ..engine import forward_with_prefix, generate_with_prefix, target_loss
from ..attention import RowPrefixes, layout_of
from ..models import fingerprint, freeze, model_name


class Method(nn.Module):
    """A parameter-efficient method on a frozen base model (see the module docstring).

    The class attributes below are everything the rest of prefixtune asks about a method (recipes,
    experiments, the CLI, the server, the conformance tests): no module outside `methods/` names one.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # "soft" (conditioning per batch row: key/values, soft embeddings), "weight" (changes or adds weights
    # in the model itself) or "classifier" (brings its own head; trained and scored on labels)
    kind: ClassVar[str] = "soft"
    # Soft methods' artifacts share batches row by row with other soft artifacts; weight methods' cannot.
    mixable: ClassVar[bool] = True
    # The multi-tenant server serves its artifacts (today: exactly the mixable ones).
    servable: ClassVar[bool] = True
    # One line for `prefixtune methods` and docs/methods.md.
    summary: ClassVar[str] = ""
    # Trains text generation (an LM head is needed); False for classifiers, which bring their own head.
    generates: ClassVar[bool] = True
    # What the base model reads: "text" or "image".
    modality: ClassVar[str] = "text"
    # Default learning rate on every dataset; None: the dataset recipe's rate (the paper's per-dataset
    # prefix-tuning rates).
    learning_rate: ClassVar[float | None] = None
    # Learning rate the experiments centre their grid on when a run is capped at a few hundred steps
    # (None: the default above); long-run rates barely move some methods in so few steps.
    short_run_learning_rate: ClassVar[float | None] = None
    # Per-dataset defaults of this method's options (canonical dataset name -> config fields), e.g. the
    # paper's prefix length per task.
    recipe_options: ClassVar[dict[str, dict]] = {}
    # The PEFT adapter format (`peft_type`) its artifacts convert to and from, if any: see
    # `to_peft` / `from_peft` below and peft_io.py.
    peft_type: ClassVar[str | None] = None

    def __init__(self, model, config=None, tokenizer=None):
        super().__init__()
        self.model = freeze(model)
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"method {self.name!r} takes a {self.config_class.__name__}, got {type(self.config).__name__}")
        self.layout = layout_of(model)  # refuses architectures it cannot condition, with the reason
        if self.generates and model.get_output_embeddings() is None:
            raise ValueError(f"method {self.name!r} trains text generation, but {model_name(model)} "
                             f"({type(model).__name__}) has no LM head (an encoder such as BERT); for classification "
                             "on an encoder use ptuning-v2 (its prompt_depth and tune_encoder options give shallow "
                             "prompts, a linear probe and fine-tuning)")
        self.base_fingerprint = fingerprint(model)  # before training: weight methods change the weights

    # -- what trains ---------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """THE definition of what trains and what a checkpoint holds (default: this module's own
        parameters outside the frozen base model)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("model.")}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    # -- how it enters the model -------------------------------------------------------------------
    def conditioning(self) -> RowPrefixes | None:
        return None

    @property
    def template(self) -> list | None:
        return None

    # -- data -> loss ------------------------------------------------------------------------------
    def encode(self, tokenizer, source: str, target: str, max_source_len: int, max_target_len: int) -> Encoded:
        return encode(tokenizer, source, target, self.layout.is_encoder_decoder, max_source_len, max_target_len,
                      template=self.template)

    def collate(self, items: list[Encoded], pad_id: int) -> Batch:
        return collate(items, pad_id, self.layout.is_encoder_decoder)

    def loss(self, batch: Batch) -> torch.Tensor:
        return target_loss(self.model, self.conditioning(), batch.input_ids, batch.attention_mask, batch.labels)

    def train(self, mode: bool = True):
        super().train(mode)
        # the base model stays in eval mode (no dropout), also for methods that train its weights:
        # deterministic, so a resumed run is bit-identical to an uninterrupted one
        self.model.eval()
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, loss_on_targets: bool = False, **kwargs):
        """HF-style output; with `loss_on_targets=True` just the training loss (the trainer's path)."""
        if loss_on_targets:
            return self.loss(Batch(input_ids, attention_mask, labels, 0))
        return forward_with_prefix(self.model, self.conditioning(), input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        return generate_with_prefix(self.model, self.conditioning(), input_ids, attention_mask, **kwargs)

    # -- what is saved and served ------------------------------------------------------------------
    def export(self):
        raise NotImplementedError

    @classmethod
    def built_frozen(cls, model, config, tokenizer, load_values) -> "Method":
        """The method built on `model`, its saved values put in by `load_values(method)`, then frozen (a loaded
        artifact serves; it does not train). If loading fails, the base model is given back before the error."""
        method = cls(model, config, tokenizer=tokenizer)
        try:
            load_values(method)
        except BaseException:
            method.detach()
            raise
        method.requires_grad_(False)
        return method

    def detach(self) -> None:
        """Give the base model back exactly as before the method was built. Soft methods change nothing
        in it (they enter per batch row through the engine); weight methods override this."""

    def base_meta(self) -> dict:
        return {"method": self.name, "config": self.config.to_dict(), "base_model": model_name(self.model),
                "fingerprint": self.base_fingerprint}

    def save(self, path) -> None:
        self.export().save(path, model=self.model)

    # -- PEFT interop (methods with a `peft_type`) ---------------------------------------------------
    @staticmethod
    def peft_task_type(model) -> str:
        """PEFT's task_type for `model` (CAUSAL_LM when no model is at hand)."""
        return "SEQ_2_SEQ_LM" if model is not None and model.config.is_encoder_decoder else "CAUSAL_LM"

    @classmethod
    def to_peft(cls, artifact, model=None) -> tuple[dict[str, torch.Tensor], dict]:
        """(adapter tensors, adapter_config.json fields) of PEFT's format for one of this method's artifacts."""
        raise ValueError(f"PEFT has no adapter format for prefixtune's {cls.name!r} artifacts; save it with "
                         "prefixtune's own format instead")

    @classmethod
    def from_peft(cls, config: dict, tensors: dict[str, torch.Tensor], source: str, model=None):
        """This method's artifact from a PEFT adapter (config, tensors) read from `source`."""
        raise ValueError(f"prefixtune's {cls.name!r} reads no PEFT adapter format")
