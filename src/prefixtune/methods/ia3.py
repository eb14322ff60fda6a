"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, the values and the FFN's inner activations.

    k' = l_k ⊙ W_k x     v' = l_v ⊙ W_v x     FFN: W_down (l_ff ⊙ act(W_up x))

The vectors start at one, so the model is unchanged at initialization. Keys and values are scaled at
the output of their projections (before rotary embeddings, as PEFT does), the inner activation at the
input of the FFN's output projection. By default the targets come from the architecture table's
attention and MLP modules: in each attention module its key and value projections (children named
k/v, k_proj/v_proj, key/value, or a fused q/k/v projection as a whole, as PEFT does for GPT-2), and in
each MLP the last linear layer (its output projection). Enters through PyTorch forward hooks;
PEFT's IA3 adapter format is read and written (`peft_type` "IA3").
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..architectures import arch_of, modules_matching
from ..models import fingerprint
from ..files import PrefixFileError
from .configs import IA3Config
from .lora import has_conv1d, linear_shape
from .weights import WeightArtifact, WeightMethod

# children of an attention module that project keys or values (a fused q/k/v projection: scaled whole)
_KEY_VALUE_NAMES = re.compile(r"^(?:k|v|key|value|k_proj|v_proj|c_attn|query_key_value|qkv_proj|qkv|Wqkv)$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.ia3_l$")


def _linear_children(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if n and linear_shape(m) is not None}


def ia3_targets(model, cfg: IA3Config) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(key/value projections, FFN output projections): module name -> linear module."""
    arch = arch_of(model)
    if cfg.target_modules is not None:
        kv = modules_matching(model, cfg.target_modules, search=True)
    else:
        kv = {}
        for pattern in arch.attention.values():
            for name, attention in modules_matching(model, pattern).items():
                kv.update({f"{name}.{child}": m for child, m in _linear_children(attention).items()
                           if _KEY_VALUE_NAMES.match(child.rsplit(".", 1)[-1])})
    if cfg.feedforward_modules is not None:
        ff = modules_matching(model, cfg.feedforward_modules, search=True)
    elif arch.mlp_output is None:
        ff = {}
    else:
        ff = {}
        for name, mlp in modules_matching(model, arch.mlp_output).items():
            if linear_shape(mlp) is not None:                    # the table names the output projection itself
                ff[name] = mlp
            elif children := _linear_children(mlp):
                last = list(children)[-1]                        # registered last: the output projection
                ff[f"{name}.{last}"] = children[last]
    kv = {n: m for n, m in kv.items() if n not in ff}
    if not kv and not ff:
        raise ValueError(f"IA3Config: found no key/value or FFN projections in {type(model).__name__} "
                         f"(model_type={model.config.model_type!r}); give target_modules / feedforward_modules")
    for name, m in {**kv, **ff}.items():
        if linear_shape(m) is None:
            raise ValueError(f"IA3Config: {name!r} is a {type(m).__name__}; (IA)³ rescales nn.Linear and Conv1D "
                             "layers only (anchor the regex, e.g. with '$')")
    return dict(sorted(kv.items())), dict(sorted(ff.items()))


class IA3Model(WeightMethod):
    name = "ia3"
    config_class = IA3Config
    summary = "learned vectors rescaling keys, values and the FFN's inner activations ((IA)³; forward hooks)"
    learning_rate = 3e-3  # Liu et al. train (IA)³ at 3e-3
    peft_type = "IA3"

    def __init__(self, model, config: IA3Config | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        self.kv, self.ff = ia3_targets(model, self.config)
        self.scales = nn.ParameterDict()                         # module name (dots as __) -> vector, float32
        for name, module in self.kv.items():                    # output width: scales what the layer returns
            scale = self._vector(name, linear_shape(module)[1], model)
            self._hook_output(module, lambda out, args, s=scale: out * s.to(out.dtype))
        for name, module in self.ff.items():                    # input width: scales the inner activation
            scale = self._vector(name, linear_shape(module)[0], model)
            self._hooks.append(module.register_forward_pre_hook(
                lambda mod, args, s=scale: (args[0] * s.to(args[0].dtype), *args[1:])))

    def _vector(self, name: str, width: int, model) -> nn.Parameter:
        self.scales[name.replace(".", "__")] = nn.Parameter(torch.ones(width, device=model.device))
        return self.scales[name.replace(".", "__")]

    def trainable(self) -> dict[str, nn.Parameter]:
        """'ia3.<module name>' -> its vector (output width for keys/values, input width for the FFN)."""
        return {f"ia3.{name}": self.scales[name.replace(".", "__")] for name in (*self.kv, *self.ff)}

    # -- PEFT: base_model.model.<module>.ia3_l, (out, 1) for keys/values, (1, in) for feedforward layers
    @classmethod
    def to_peft(cls, artifact: WeightArtifact, model=None) -> tuple[dict, dict]:
        tensors, targets, feedforward = {}, [], []
        for name, t in artifact.tensors.items():
            module = name.removeprefix("ia3.")
            targets.append(module)
            is_ff = module in artifact.meta.get("feedforward", [])
            tensors[f"base_model.model.{module}.ia3_l"] = t.reshape(1, -1) if is_ff else t.reshape(-1, 1)
            if is_ff:
                feedforward.append(module)
        if model is not None:
            cls.check_fits(artifact, model)
        return tensors, {"task_type": cls.peft_task_type(model), "target_modules": sorted(targets),
                         "feedforward_modules": sorted(feedforward),
                         "fan_in_fan_out": model is not None and has_conv1d(model, targets),
                         "init_ia3_weights": True}

    @classmethod
    def from_peft(cls, config: dict, tensors: dict, source: str, model=None) -> WeightArtifact:
        out, kv, ff = {}, [], []
        for key, t in tensors.items():
            m = _PEFT_KEY.match(key)
            if m is None or t.dim() != 2 or 1 not in t.shape:
                raise PrefixFileError(f"{source}: tensor {key!r} {tuple(t.shape)} is not an IA3 vector of a linear "
                                      "layer (no convolution IA3, no modules_to_save)")
            module = m.group(1)
            (ff if t.shape[0] == 1 and t.shape[1] != 1 else kv).append(module)
            out[f"ia3.{module}"] = t.float().reshape(-1)
        if not out:
            raise PrefixFileError(f"{source}: no IA3 tensors")
        anchored = lambda names: "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$" if names else "^$"
        cfg = cls.config_class(target_modules=anchored(kv), feedforward_modules=anchored(ff))
        artifact = WeightArtifact(out, {"method": cls.name, "config": cfg.to_dict(), "feedforward": sorted(ff),
                                        "imported_from": "peft", "base_model": config.get("base_model_name_or_path")})
        if model is not None:
            cls.check_fits(artifact, model, source)
            artifact.meta["fingerprint"] = fingerprint(model)
        return artifact

    def base_meta(self) -> dict:
        return {**super().base_meta(), "feedforward": sorted(self.ff)}  # which vectors scale inputs (PEFT needs it)
