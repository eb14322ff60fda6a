"""Artifacts of weight methods (fine-tuning, FT-top-k, adapters, LoRA): only what they changed or
added, as named tensors in one safetensors file with the base model's fingerprint.

Unlike soft artifacts they cannot share a batch row by row with other artifacts: they change the
model itself, so they are applied to a model (`Method.from_artifact`) and refused by the server.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..prefix import PrefixFileError, atomic_write_bytes, decode_meta, read_safetensors

WEIGHTS_FORMAT = "prefixtune.weights/1"


@dataclass
class WeightArtifact:
    """tensors: name -> tensor, named by the method (e.g. 'model.layers.1.mlp.up_proj.weight',
    'lora.<module>.A'); meta: method, config, base_model, fingerprint."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.meta.get("method", "?")

    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, path: str | Path, model=None) -> Path:
        from safetensors.torch import save

        from .. import __version__
        from ..models import model_name

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
        atomic_write_bytes(path, save(tensors, metadata=str_meta))
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
        if model is not None and check_fingerprint and meta.get("fingerprint"):
            from ..models import fingerprint, model_name

            got = fingerprint(model)
            if got != meta["fingerprint"]:
                raise PrefixFileError(
                    f"{path}: made for base model {meta.get('base_model')!r} (fingerprint {meta['fingerprint']}), but "
                    f"the loaded model {model_name(model)!r} has fingerprint {got}; it only works on its own base model")
        return artifact
