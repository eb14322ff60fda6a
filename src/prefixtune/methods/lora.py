"""LoRA (Hu et al. 2021): a low-rank update `scale * B(A(x))` added to chosen linear layers' outputs.

`B` starts at zero, so the model is unchanged at initialization; scale = alpha / rank (PEFT's
convention). Works on `nn.Linear` and GPT-2's `transformers.pytorch_utils.Conv1D` (weight stored
(in, out)). Enters through PyTorch forward hooks; `merge()` folds the update into the weights
(and removes the hooks) for hook-free inference. Default targets per architecture come from
the table (`architectures.ARCHITECTURES[...].lora_targets`: the query and value projections).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import arch_of, modules_matching
from ..models import fingerprint
from ..files import PrefixFileError
from .configs import LoRAConfig
from .weights import WeightArtifact, WeightMethod

# PEFT's name of one LoRA tensor: base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf  # Conv1D stores its weight (in, out)
    return None


def has_conv1d(model, names) -> bool:
    """Whether any of the named modules is a GPT-2 Conv1D (weight stored (in, out): PEFT's fan_in_fan_out)."""
    names = set(names)
    return any(linear_shape(m) is not None and not isinstance(m, nn.Linear)
               for name, m in model.named_modules() if name in names)


def lora_targets(model, pattern: str | None) -> dict[str, nn.Module]:
    """Module name -> linear module LoRA adapts: `pattern` searched in names (None: the table's default)."""
    pattern = pattern or arch_of(model).lora_targets
    if not pattern:
        raise ValueError(f"the architecture table has no default LoRA targets for "
                         f"model_type={model.config.model_type!r}; give LoRAConfig.target_modules")
    found = modules_matching(model, pattern, search=True)
    if not found:
        raise ValueError(f"LoRAConfig.target_modules: {pattern!r} matches no module of {type(model).__name__}")
    for name, module in found.items():
        if linear_shape(module) is None:
            raise ValueError(f"LoRAConfig.target_modules: {pattern!r} matches {name!r}, a {type(module).__name__}; "
                             "LoRA adapts nn.Linear and Conv1D layers only (anchor the regex, e.g. with '$')")
    return found


class LoRALayer(nn.Module):
    """A (rank, in) and B (out, rank): the update scale * B(A(dropout(x))), in float32."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: the model is unchanged at init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and PEFT initialize lora_A
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x.to(self.A.dtype)) @ self.A.T @ self.B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, (out, in)."""
        return (self.B @ self.A) * self.scale


class LoRAModel(WeightMethod):
    name = "lora"
    config_class = LoRAConfig
    summary = "low-rank updates scale·B·A added to chosen linear layers (forward hooks; mergeable)"
    learning_rate = 2e-4  # Hu et al. (2021) on E2E
    # PEFT's LORA: update (lora_alpha / r) * B @ A, as here ('lora.<module>.A' / '.B')
    peft_type = "LORA"

    def __init__(self, model, config: LoRAConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg = self.config
        self.targets = dict(sorted(lora_targets(model, cfg.target_modules).items()))
        scale = cfg.alpha / cfg.rank
        self.lora = nn.ModuleDict({name.replace(".", "__"): LoRALayer(*linear_shape(m), cfg.rank, scale, cfg.dropout)
                                   for name, m in self.targets.items()}).to(model.device)
        self._names = {name: self.lora[name.replace(".", "__")] for name in self.targets}
        self.merged = False
        for name, module in self.targets.items():
            self._hook_output(module, lambda out, args, layer=self._names[name]: out + layer(args[0]).to(out.dtype))

    def trainable(self) -> dict[str, nn.Parameter]:
        """'lora.<module name>.A' (rank, in) and '.B' (out, rank) for every adapted layer."""
        return {f"lora.{name}.{part}": getattr(layer, part) for name, layer in self._names.items() for part in "AB"}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale·B·A into the adapted weights and remove the hooks (`detach()` restores the originals)."""
        if self.merged:
            return
        for name, module in self.targets.items():
            self._keep_originals({f"{name}.weight": module.weight})
            delta = self._names[name].delta_weight()
            if not isinstance(module, nn.Linear):  # Conv1D: weight is (in, out)
                delta = delta.T
            module.weight.add_(delta.to(module.weight.dtype))
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.merged = True

    @classmethod
    def to_peft(cls, artifact: WeightArtifact, model=None) -> tuple[dict, dict]:
        cfg = cls.config_class.from_dict(artifact.meta["config"])
        tensors, modules = {}, []
        for name, t in artifact.tensors.items():
            module, part = name.removeprefix("lora.").rsplit(".", 1)
            tensors[f"base_model.model.{module}.lora_{part}.weight"] = t
            modules.append(module)
        modules = sorted(set(modules))
        if model is not None:
            cls.check_fits(artifact, model)
        return tensors, {
            "task_type": cls.peft_task_type(model), "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": modules,
            "fan_in_fan_out": model is not None and has_conv1d(model, modules), "bias": "none",
            "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_peft(cls, config: dict, tensors: dict, source: str, model=None) -> WeightArtifact:
        for key in ("use_dora", "lora_bias"):
            if config.get(key):
                raise PrefixFileError(f"{source}: {key}=true is not plain LoRA; prefixtune imports plain LoRA only")
        if config.get("bias", "none") != "none":
            raise PrefixFileError(f"{source}: bias={config['bias']!r} trains biases too; prefixtune imports "
                                  "bias='none' only")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise PrefixFileError(f"{source}: per-module ranks/alphas (rank_pattern, alpha_pattern) are not supported")
        rank, alpha = config.get("r"), config.get("lora_alpha")
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
            raise PrefixFileError(f"{source}: needs an int r >= 1 and a number lora_alpha, got r={rank!r}, "
                                  f"lora_alpha={alpha!r}")
        if config.get("use_rslora"):  # rank-stabilized scale alpha/sqrt(r) == (alpha*sqrt(r))/r
            alpha = alpha * math.sqrt(rank)
        out, modules = {}, set()
        for key, t in tensors.items():
            m = _PEFT_KEY.match(key)
            if m is None:
                raise PrefixFileError(f"{source}: tensor {key!r} is not a LoRA A/B weight of a linear layer; "
                                      "prefixtune imports plain LoRA only (no embedding LoRA, no modules_to_save)")
            module, part = m.groups()
            if t.dim() != 2 or t.shape[0 if part == "A" else 1] != rank:
                raise PrefixFileError(f"{source}: {key!r} has shape {tuple(t.shape)}, not rank {rank}")
            out[f"lora.{module}.{part}"] = t.float()
            modules.add(module)
        missing = [f"{m}.lora_{p}" for m in sorted(modules) for p in "AB" if f"lora.{m}.{p}" not in out]
        if missing or not modules:
            raise PrefixFileError(f"{source}: {'missing ' + ', '.join(missing) if missing else 'no LoRA tensors'}")
        cfg = cls.config_class(rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
                               target_modules="^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$")
        artifact = WeightArtifact(out, {"method": cls.name, "config": cfg.to_dict(), "imported_from": "peft",
                                        "base_model": config.get("base_model_name_or_path")})
        if model is not None:
            cls.check_fits(artifact, model, source)
            artifact.meta["fingerprint"] = fingerprint(model)
        return artifact
