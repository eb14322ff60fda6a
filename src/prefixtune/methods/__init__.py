"""The methods: `--method NAME` -> (config dataclass, module class), and what works on any method.

Every method implements `methods.base.Method`; the trainer, checkpoints, CLI, evaluation and the
server know only that protocol. The table of methods is `registry.py`: adding a method is one new
file with a `Method` subclass (its config dataclass in `configs.py`), and one line there.

Importing this package does not import torch: the module classes load on first use (CLI start-up time).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from .registry import DEFAULT_METHOD, METHODS, config_class, config_classes, get_method, register

if TYPE_CHECKING:
    from .base import Method

# Names importable from here, each loaded from its module on first use (torch).
_LAZY = {
    "Method": ".base", "WeightMethod": ".weights", "WeightArtifact": ".weights", "WEIGHTS_FORMAT": ".weights",
    "PrefixModel": ".prefix", "InfixModel": ".infix", "PromptModel": ".prompt", "PTuningModel": ".ptuning",
    "PTuningV2Model": ".ptuning_v2", "FinetuneModel": ".finetune", "FtTopModel": ".ft_top",
    "AdapterModel": ".adapter", "LoRAModel": ".lora", "IA3Model": ".ia3", "VPTModel": ".vpt",
    "VPTShallowModel": ".vpt", "VPTDeepModel": ".vpt", "CoOpModel": ".coop", "CoCoOpModel": ".coop",
    "DAPLModel": ".coop", "L2PModel": ".l2p",
    "InfixConfig": ".configs", "PromptConfig": ".configs", "PTuningConfig": ".configs",
    "PTuningV2Config": ".configs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_of(config) -> type[Method]:
    """The method a config object configures (each method has its own config class)."""
    for name, cls in config_classes().items():
        if type(config) is cls:
            return get_method(name)
    raise TypeError(f"{type(config).__name__} is no registered method's config class")


def artifact_method(artifact) -> type[Method]:
    """The method that made `artifact` (its "method" metadata; soft artifacts written without it are
    prompts when they hold soft embeddings only, else prefixes)."""
    name = artifact.meta.get("method")
    if not name:
        name = "prompt" if getattr(artifact, "embeds", None) is not None and not artifact.kv else "prefix"
    return get_method(name)


def build(model, method: str = "prefix", tokenizer=None, config=None, **fields) -> Method:
    """`build(model, "prompt", tok, length=20)`: the method's module around a frozen `model`."""
    cls = get_method(method)
    if config is None:
        config = cls.config_class(**fields)
    elif fields:
        raise TypeError("give a config or fields, not both")
    return cls(model, config, tokenizer=tokenizer)


def trainable_state(module) -> dict:
    """THE definition of what is trained and saved in checkpoints: delegated to the method."""
    from .base import Method  # torch

    if isinstance(module, Method):
        return module.trainable()
    raise TypeError(f"no trainable-state rule for {type(module).__name__}: not a prefixtune method")


def save_artifact(artifact, path: str | Path, model=None) -> Path:
    """Save what a method exported (soft artifact or weight artifact) atomically, as safetensors."""
    return artifact.save(path, model=model)


def load_artifact(path: str | Path, model=None):
    """Load any method's artifact file; with `model`, refuse one made for another base model."""
    from ..prefix import load_prefix, read_format  # torch
    from .weights import WEIGHTS_FORMAT, WeightArtifact  # torch

    if read_format(path) == WEIGHTS_FORMAT:
        return WeightArtifact.load(path, model)
    return load_prefix(path, model)


def attach(model, artifact, tokenizer=None) -> Method:
    """A method module carrying a loaded artifact, ready to generate (weight methods: applied), in eval
    mode: dropout (LoRA's, a classifier head's) is a training device, never on at inference."""
    if artifact.mixable:
        raise TypeError("soft artifacts need no attaching: pass them to generate_mixed / generate_texts, or use "
                        "`with artifact.apply(model):`")
    return get_method(artifact.meta["method"]).from_artifact(model, artifact, tokenizer=tokenizer).eval()


__all__ = ["Method", "METHODS", "DEFAULT_METHOD", "register", "get_method", "config_class", "config_classes",
           "method_of", "artifact_method", "build", "trainable_state", "save_artifact", "load_artifact", "attach",
           "PrefixModel", "InfixModel", "InfixConfig", "PromptModel", "PromptConfig", "PTuningModel", "PTuningConfig"]
