"""The method registry: `--method NAME` -> (config dataclass, module class).

Every method implements `methods.base.Method`; the trainer, checkpoints, CLI, evaluation and the
server know only that protocol. Adding a method: one new file with a `Method` subclass, and its
class in `_REGISTERED` below.
"""

from __future__ import annotations

from pathlib import Path

from ..prefix import load_prefix, read_format
from .base import Method
from .registry import METHODS, get_method, register
from .infix import InfixConfig, InfixModel
from .prefix import PrefixModel
from .prompt import PromptConfig, PromptModel
from .ptuning import PTuningConfig, PTuningModel
from .adapter import AdapterModel
from .finetune import FinetuneModel
from .ft_top import FtTopModel
from .lora import LoRAModel
from .ia3 import IA3Model
from .ptuning_v2 import PTuningV2Config, PTuningV2Model
from .vpt import VPTDeepModel, VPTModel, VPTShallowModel
from .coop import CoCoOpModel, CoOpModel, DAPLModel
from .l2p import L2PModel
from .weights import WEIGHTS_FORMAT, WeightArtifact

_REGISTERED: list[type[Method]] = [PrefixModel, InfixModel, PromptModel, PTuningModel, PTuningV2Model,
                                   FinetuneModel, FtTopModel, AdapterModel, LoRAModel, IA3Model,
                                   VPTModel, VPTShallowModel, VPTDeepModel, CoOpModel, CoCoOpModel, DAPLModel,
                                   L2PModel]
for _cls in _REGISTERED:
    register(_cls)


def method_of(config) -> type[Method]:
    """The method a config object configures (each method has its own config class)."""
    for cls in METHODS.values():
        if type(config) is cls.config_class:
            return cls
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
    if isinstance(module, Method):
        return module.trainable()
    raise TypeError(f"no trainable-state rule for {type(module).__name__}: not a prefixtune method")


def save_artifact(artifact, path: str | Path, model=None) -> Path:
    """Save what a method exported (soft artifact or weight artifact) atomically, as safetensors."""
    return artifact.save(path, model=model)


def load_artifact(path: str | Path, model=None):
    """Load any method's artifact file; with `model`, refuse one made for another base model."""
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


__all__ = ["Method", "METHODS", "register", "get_method", "method_of", "artifact_method", "build", "trainable_state", "save_artifact",
           "load_artifact", "attach", "PrefixModel", "InfixModel", "InfixConfig", "PromptModel", "PromptConfig",
           "PTuningModel", "PTuningConfig"]
