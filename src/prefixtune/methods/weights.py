"""Artifacts of weight methods (fine-tuning, FT-top-k, adapters, LoRA): only what they changed or
added, as named tensors in one safetensors file with the base model's fingerprint.

Unlike soft artifacts they cannot share a batch row by row with other artifacts: they change the
model itself, so they are applied to a model (`Method.from_artifact`) and refused by the server.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch

from .. import __version__
from ..config import ConfigError
from ..models import model_name
from ..prefix import decode_meta, read_safetensors, refuse_other_base

from ..files import PrefixFileError, atomic_write_bytes
from .base import Method

WEIGHTS_FORMAT = "prefixtune.weights/1"


@dataclass
class WeightArtifact:
    """tensors: name -> tensor, named by the method (e.g. 'model.layers.1.mlp.up_proj.weight',
    'lora.<module>.A'); meta: method, config, base_model, fingerprint."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    # The artifact protocol (shared with prefix.MergedPrefix): mixable, method, tensors, from_tensors,
    # save, check_base, apply, row_conditioning.
    mixable: ClassVar[bool] = False  # changes the model itself: one set of weights per batch

    @property
    def method(self) -> str:
        return self.meta.get("method", "?")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "WeightArtifact":
        return cls(dict(tensors), meta)

    def check_base(self, model, source: str = "weight artifact") -> None:
        refuse_other_base(self.meta, model, source)

    @contextmanager
    def apply(self, model, tokenizer=None):
        """Apply to `model` for the block (the method's weights or hooks in place), then give the base
        model back exactly; yields the method module."""
        from .registry import get_method  # at run time: every method is registered by then

        method = get_method(self.method).from_artifact(model, self, tokenizer=tokenizer).eval()
        try:
            yield method
        finally:
            method.detach()

    @property
    def row_conditioning(self) -> None:
        """Nothing enters per batch row: once applied, the weights are in the model."""
        return None

    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, path: str | Path, model=None) -> Path:
        for name, t in self.tensors.items():
            if not torch.isfinite(t).all():
                raise PrefixFileError(f"{path}: refusing to write NaN or inf values (tensor {name!r})")
        meta = dict(self.meta)
        if model is not None:
            meta.setdefault("base_model", model_name(model))
        meta.update(format=WEIGHTS_FORMAT, library_version=__version__,
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        str_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=str_meta))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model=None, check_fingerprint: bool = True) -> "WeightArtifact":
        tensors, raw = read_safetensors(path)
        meta = decode_meta(raw)
        if meta.get("format") != WEIGHTS_FORMAT:
            raise PrefixFileError(f"{path}: not a prefixtune weights file (format={meta.get('format')!r})")
        if not meta.get("method"):
            raise PrefixFileError(f"{path}: does not say which method made it")
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise PrefixFileError(f"{path}: tensor {name!r} holds NaN or inf values")
        artifact = cls(tensors, meta)
        if model is not None and check_fingerprint:
            artifact.check_base(model, str(path))
        return artifact


class WeightMethod(Method):
    """A method that changes or adds weights in the model itself (fine-tuning, FT-top-k, adapters, LoRA).

    Subclasses name their tensors in `trainable()`; those same names and tensors are the artifact,
    so export, checkpoints and `from_artifact` need nothing else. Weights a method overwrites in the
    base model are copied (to CPU) first, so `detach()` gives the original model back exactly.
    """

    kind = "weight"
    mixable = False
    servable = False  # one batch serves one set of weights: the server takes soft artifacts only

    def __init__(self, model, config=None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        self._hooks: list = []
        self._originals: dict[str, torch.Tensor] = {}  # base parameter name -> original values

    def _keep_originals(self, params: dict[str, torch.nn.Parameter]) -> None:
        for name, p in params.items():
            self._originals.setdefault(name, p.detach().to("cpu", copy=True))

    def _hook_output(self, module: torch.nn.Module, fn) -> None:
        """Register a forward hook (PyTorch's public extension point) that maps the module's output
        tensor through `fn(output, inputs)`; tuple outputs have their first element mapped."""

        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (fn(output[0], args), *output[1:])
            return fn(output, args)

        self._hooks.append(module.register_forward_hook(hook))

    def export(self) -> WeightArtifact:
        """Only what changed or was added (the trainable tensors), plus the base model's fingerprint."""
        tensors = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable().items()}
        return WeightArtifact(tensors, self.base_meta())

    @classmethod
    def from_artifact(cls, model, artifact: WeightArtifact, tokenizer=None) -> "WeightMethod":
        """Apply a saved artifact to `model` (frozen, for inference); `detach()` undoes it."""
        if artifact.method != cls.name:
            raise PrefixFileError(f"a {artifact.method!r} artifact cannot be applied as {cls.name!r}")
        artifact.check_base(model)
        try:
            config = cls.config_class.from_dict(artifact.meta.get("config") or {})
        except (ConfigError, TypeError) as e:
            raise PrefixFileError(f"{cls.name} artifact: its config cannot be used ({e})") from e
        return cls.built_frozen(model, config, tokenizer, lambda method: method.load_tensors(artifact.tensors))

    @classmethod
    def check_fits(cls, artifact: WeightArtifact, model, source: str | None = None) -> None:
        """Refuse `artifact` unless it fits `model`: its base fingerprint, and every tensor's name and shape
        (applied once, then removed). With `source`, a misfit is a PrefixFileError naming it."""
        try:
            cls.from_artifact(model, artifact).detach()
        except (ValueError, PrefixFileError) as e:
            if source is None:
                raise
            raise PrefixFileError(f"{source}: does not fit the model ({e})") from e

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            raise PrefixFileError(f"{self.name} artifact does not fit this model: missing {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''}")
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise PrefixFileError(f"{self.name} artifact: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                      f"the model needs {tuple(p.shape)}")
            p.copy_(tensors[name])

    @torch.no_grad()
    def detach(self) -> None:
        """Remove this method's hooks and restore the base model's original weights; the model is
        frozen again, exactly as before the method was built."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name, value in self._originals.items():
            self.model.get_parameter(name).copy_(value)
        self._originals.clear()
        self.model.requires_grad_(False)
