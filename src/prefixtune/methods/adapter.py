"""Adapter-tuning (Houlsby et al. 2019; the paper's §5.2 baseline): a bottleneck MLP after each
attention sublayer and after each MLP sublayer, as a residual `h + up(act(down(h)))`.

`up` starts at zero, so the model is unchanged at initialization. Adapters enter through PyTorch
forward hooks on the modules the architecture table names (`attention_output`, `mlp_output`); the
base model's weights are never touched. Size: `size` (bottleneck width) or `fraction` (a target
share of the base model's parameters, e.g. 0.001 or 0.03, as the paper's ADAPTER (0.1%) / (3%)).
"""

from __future__ import annotations


import torch
from torch import nn

from ..architectures import arch_of, modules_matching
from .configs import AdapterConfig
from .weights import WeightMethod

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """h + up(act(down(h))), computed in float32 and added in h's dtype."""

    def __init__(self, hidden: int, size: int, activation: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        with torch.no_grad():
            self.down.weight.normal_(0, init_std)
            self.down.bias.zero_()
            self.up.weight.zero_()  # the model is unchanged at init
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def adapter_sites(model) -> dict[str, nn.Module]:
    """Module name -> module whose output gets an adapter (attention outputs and MLP outputs), from the table."""
    arch = arch_of(model)
    if not (arch.attention_output and arch.mlp_output):
        raise ValueError(f"the architecture table has no adapter sites for model_type={model.config.model_type!r}; "
                         "add attention_output and mlp_output to its row in prefixtune/architectures.py:ARCHITECTURES")
    sites = {**modules_matching(model, arch.attention_output), **modules_matching(model, arch.mlp_output)}
    if not sites:
        raise ValueError(f"no adapter sites matched in {type(model).__name__}")
    return dict(sorted(sites.items()))


def adapter_params(hidden: int, size: int) -> int:
    """Parameters of one adapter: down (hidden x size + size) and up (size x hidden + hidden)."""
    return 2 * hidden * size + size + hidden


def size_for_fraction(model, fraction: float) -> int:
    """The bottleneck width whose adapters hold the nearest to `fraction` of the model's parameters."""
    hidden = arch_of(model).hidden_size(model.config)
    sites = len(adapter_sites(model))
    base = sum(p.numel() for p in model.parameters())
    # sites * (2*hidden*size + size + hidden) = fraction * base
    return max(1, round((fraction * base / sites - hidden) / (2 * hidden + 1)))


class AdapterModel(WeightMethod):
    name = "adapter"
    config_class = AdapterConfig
    summary = "Houlsby bottleneck adapters after each attention and MLP sublayer (forward hooks)"
    learning_rate = 1e-4
    # at 1e-4 an adapter did not learn WebNLG in 80 steps (measured 2026-11-28: dev loss 1.77 vs the
    # prefix's 0.85, BLEU 0.036); capped runs centre their learning-rate grid here
    short_run_learning_rate = 1e-3

    def __init__(self, model, config: AdapterConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg = self.config
        hidden = arch_of(model).hidden_size(model.config)
        self.size = cfg.size or size_for_fraction(model, cfg.fraction)
        sites = adapter_sites(model)
        # ModuleDict keys cannot hold dots; the artifact names use the module's real name
        self.adapters = nn.ModuleDict({name.replace(".", "__"): Bottleneck(hidden, self.size, cfg.activation, cfg.init_std)
                                       for name in sites}).to(model.device)
        self._names = {name: self.adapters[name.replace(".", "__")] for name in sites}
        for name, module in sites.items():
            self._hook_output(module, lambda out, args, a=self._names[name]: a(out))

    def trainable(self) -> dict[str, nn.Parameter]:
        """'adapter.<module name>.{down,up}.{weight,bias}' for every adapter."""
        return {f"adapter.{name}.{pname}": p for name, a in self._names.items() for pname, p in a.named_parameters()}
